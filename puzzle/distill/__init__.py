"""Global knowledge distillation (GKD) of an assembled child against its frozen parent.

    from puzzle.distill import GKDConfig, distill_child
    result = distill_child(child, parent, tokenizer, "runs/gkd", GKDConfig(steps=32, lr=1e-4))

Modules: ``config`` (``GKDConfig``), ``losses`` (the objective and the validation metrics),
``artifact`` (the run directory, checkpoints, resume), ``gkd`` (the training loop), ``sharding``
(FSDP2 over the processes of ``torchrun``), ``memory`` (bytes per process, in closed form),
``teacher_cache`` (the parent's top-k targets on the GKD tokens, computed once and reused), ``child_bld``
(child-aware BLD of a searched child's replaced sub-blocks).
"""

from puzzle.distill.config import GKDConfig
from puzzle.distill.gkd import GKDResult, distill_child, gkd_train_ids
from puzzle.distill.teacher_cache import TeacherTargets, teacher_targets

__all__ = ["GKDConfig", "GKDResult", "TeacherTargets", "distill_child", "gkd_train_ids", "teacher_targets"]
