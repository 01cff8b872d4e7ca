"""Replace-1-block scoring of a block library (``puzzle score``).

    from puzzle.scoring import ScoreConfig, score_library
    result = score_library("runs/lib", "runs/scores", ScoreConfig(pairs="additive"))
    result.scores        # solvers table: layer, variant (ATTENTION|FFN), is_parent, kl, loss_delta, ...
    result.subblocks     # layer, subblock, variant, kl, loss_delta, top1_agreement, final_val_nmse

See :mod:`puzzle.scoring.replace1` for the method (one layer's replacements: :mod:`puzzle.scoring.replacements`)
and :mod:`puzzle.scoring.artifact` for the directory (a run's: :mod:`puzzle.scoring.run`).
Under ``torchrun`` the parent's layers are sharded over the ranks (:mod:`puzzle.scoring.sharded`);
:mod:`puzzle.scoring.memory` gives a rank's memory in closed form.
"""

from puzzle.scoring.config import ScoreConfig
from puzzle.scoring.metrics import TokenSums, compare_logits, next_token_logprobs
from puzzle.scoring.replace1 import score_library
from puzzle.scoring.replacements import Replacement, replacements
from puzzle.scoring.run import ScoreResult

__all__ = ["Replacement", "ScoreConfig", "ScoreResult", "TokenSums", "compare_logits", "next_token_logprobs",
           "replacements", "score_library"]
