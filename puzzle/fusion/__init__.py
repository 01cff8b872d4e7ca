"""FFN fusion: runs of attention-free SwiGLU blocks become one wide block computed in parallel.

    from puzzle.fusion import FusionConfig, fuse_and_report, find_runs, fuse_model, Segment
    runs = find_runs(model.config.blocks)                   # maximal attention-free SwiGLU runs
    fused = fuse_model(model, [Segment(20, 24)])            # exact parallel-sum fusion of layers 20-23
    result = fuse_and_report(model, tokenizer, FusionConfig(threshold=0.1))   # analyze, choose, fuse, evaluate

Modules: ``runs`` (detection and choice, no torch), ``fuse`` (exact weight fusion),
``dependency`` (pairwise dependency on calibration data), ``evaluate`` (KL and latency),
``distill`` (optional local distillation of a fused block), ``pipeline`` (the stage),
``artifact`` (the output directory), ``derive`` (attention removed by hand), ``candidates``
(fused segments as span rows of the MIP's tables), ``sharded`` (the stage with the child's layers
split over ``torchrun`` ranks, from model directories: ``puzzle.fusion.sharded.fuse_sharded``), its
``pipelined`` passes and ``memory`` (its memory per rank in closed form).
"""

from puzzle.fusion.fuse import fuse_model
from puzzle.fusion.pipeline import FusionConfig, FusionResult, fuse_and_report
from puzzle.fusion.runs import Segment, choose_segments, find_runs, fused_blocks, parse_segments

__all__ = ["FusionConfig", "FusionResult", "Segment", "choose_segments", "find_runs", "fuse_and_report",
           "fuse_model", "fused_blocks", "parse_segments"]
