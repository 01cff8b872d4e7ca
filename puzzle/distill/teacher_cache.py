"""The parent's side of GKD computed once: for every training sequence, the top-k next-token log-probabilities, the
log of the probability outside them, and the last hidden state, in one safetensors file reused by every child
distilled on the same tokens (the search's child and each baseline of the same budget).

    targets = teacher_targets(parent, train_ids, top_k=64, path=run / "gkd_teacher.safetensors")
    distill_child(child, parent, tokenizer, out, cfg, teacher=targets)   # no parent forward in training steps

With p the parent's next-token log-probabilities over the vocabulary V, S its top-k tokens at a position and q
the child's, the KL term of a training step becomes the KL between the two distributions coarsened to S plus
one outcome "elsewhere":

    kl_t = sum_{v in S} e^{p_v} (p_v - q_v) + e^{p_rest} (p_rest - q_rest),   p_rest = log sum_{v not in S} e^{p_v}

It is at most the full KL (the log-sum inequality) and equal to it when k = V; the child is pulled toward the
parent's top-k probabilities and its total mass elsewhere. The cosine term reads the cached last hidden state
(``hidden="final"``). In one process validation still runs the parent, so the KL a GKD run reports is the exact
one; under torchrun the parent's targets on the validation sequences are cached too (with ``label``, its
log-probability of each next token, for its own cross-entropy), no rank loads the parent in GKD, and the reported
validation KL is the coarsened one (the exact one when k = V).

Per token the file holds k log-probabilities (float32) and token ids (int32) and the hidden state (bfloat16 by
default): 64 x 8 + 576 x 2 = 1.6 KB for SmolLM2, 64 x 8 + 8192 x 2 = 16.9 KB for a 70B parent.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from puzzle.errors import ConfigError, CorruptArtifactError
from puzzle.model import PuzzleForCausalLM
from puzzle.scoring.metrics import next_token_logprobs

log = logging.getLogger(__name__)

FORMAT = "puzzle-gkd-teacher/1"


@dataclass(frozen=True)
class TeacherTargets:
    """The parent's outputs on N training sequences of T tokens (rows in the order of the ids they were computed
    on; a step takes the rows of its sequences)."""

    logp: torch.Tensor
    """(N, T-1, k) float32: the parent's log-probabilities of its k most likely next tokens, descending."""
    index: torch.Tensor
    """(N, T-1, k) int64: those tokens."""
    rest: torch.Tensor
    """(N, T-1) float32: log of the parent's probability outside the k tokens (-inf when k is the vocabulary)."""
    hidden: torch.Tensor
    """(N, T, H): the parent's last layer output, before the final norm (what ``hidden="final"`` compares)."""
    key: str
    """sha256 of the parent's fingerprint, the ids and k: what the targets are the targets of."""
    label: torch.Tensor | None = None
    """(N, T-1) float32: the parent's log-probability of each next token of the ids, or None. Validation targets hold
    it (the parent's own cross-entropy, wherever its next token falls); training ones need not."""
    held: torch.Tensor | None = None
    """(n,) int64 ascending: the rows of the file these are (a rank's share, :func:`load_targets` with ``rows``), or
    None when they are every row."""

    @property
    def top_k(self) -> int:
        return int(self.logp.shape[-1])

    def rows(self, idx: torch.Tensor) -> TeacherTargets:
        """The targets of sequences ``idx`` (b,) (rows of the whole file, also when only some are held)."""
        if self.held is not None:
            idx = torch.as_tensor(idx, dtype=torch.int64)
            at = torch.searchsorted(self.held, idx).clamp(max=max(len(self.held) - 1, 0))
            if len(self.held) == 0 or not bool((self.held[at] == idx).all()):
                raise ValueError(f"rows {sorted(set(idx.tolist()) - set(self.held.tolist()))[:8]} are not among "
                                 f"the {len(self.held)} rows read from the targets file")
            idx = at
        label = self.label[idx] if self.label is not None else None
        return TeacherTargets(self.logp[idx], self.index[idx], self.rest[idx], self.hidden[idx], self.key, label)

    def nbytes(self) -> int:
        tensors = [self.logp, self.index.to(torch.int32), self.rest, self.hidden]
        return sum(t.numel() * t.element_size() for t in tensors + ([self.label] if self.label is not None else []))


def bytes_per_token(top_k: int, hidden_size: int) -> int:
    """Bytes a cache holds per token (in memory and on disk): k log-probabilities and ids, the rest, the hidden
    state in bfloat16."""
    return top_k * (4 + 4) + 4 + hidden_size * 2


def targets_key(parent_sha256: str, ids: torch.Tensor, top_k: int) -> str:
    """What identifies a cache: the parent (:func:`puzzle.distill.artifact.model_fingerprint`), the ids, k."""
    from puzzle.distill.artifact import ids_sha256

    return hashlib.sha256(json.dumps([FORMAT, parent_sha256, ids_sha256(ids), int(top_k)]).encode()).hexdigest()


@torch.no_grad()
def compute_targets(parent: PuzzleForCausalLM, ids: torch.Tensor, top_k: int, *, key: str = "", chunk: int = 2,
                    hidden_dtype: torch.dtype = torch.bfloat16, labels: bool = False,
                    progress: bool = False) -> TeacherTargets:
    """The parent's targets on ids (N, T), ``chunk`` sequences per forward pass (``labels``: with ``label``)."""
    vocab = parent.config.vocab_size
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab:
        raise ConfigError(f"top_k must be an integer from 1 to the vocabulary size {vocab}, got {top_k!r}")
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ConfigError(f"teacher targets need token ids of shape (N >= 1, T >= 2), got {tuple(ids.shape)}")
    device = next(parent.parameters()).device
    was_training = parent.training
    parent.eval()
    logps, indexes, rests, hiddens, nexts = [], [], [], [], []
    bar = tqdm(total=ids.shape[0], desc="teacher targets", unit="seq", disable=not progress)
    for s in range(0, ids.shape[0], chunk):
        x = ids[s:s + chunk].to(device)  # (b, T)
        out = parent(input_ids=x, use_cache=False, output_hidden_states=True)
        p = next_token_logprobs(out.logits)  # (b, T-1, V) float32
        top, idx = p.topk(top_k, dim=-1)  # (b, T-1, k)
        rests.append(outside_logprob(p, idx).cpu())
        logps.append(top.cpu())
        indexes.append(idx.cpu())
        hiddens.append(out.hidden_states[-1].to(hidden_dtype).cpu())  # (b, T, H)
        if labels:
            nexts.append(label_logprob(p, x[:, 1:]).cpu())
        bar.update(x.shape[0])
    bar.close()
    parent.train(was_training)
    return TeacherTargets(torch.cat(logps), torch.cat(indexes), torch.cat(rests), torch.cat(hiddens), key,
                          torch.cat(nexts) if labels else None)


def label_logprob(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(b, T-1) log-probabilities of ``labels`` (b, T-1) under logp (b, T-1, V)."""
    return logp.gather(-1, labels.to(logp.device).unsqueeze(-1)).squeeze(-1)


def teacher_targets(parent: PuzzleForCausalLM, ids: torch.Tensor, top_k: int, path: str | Path, *,
                    parent_sha256: str | None = None, hidden_dtype: torch.dtype = torch.bfloat16,
                    progress: bool = False) -> TeacherTargets:
    """The targets of ``parent`` on ids (N, T), read from ``path`` when it holds these (same parent, ids and k),
    else computed and written there atomically (a file of other targets is replaced: it is this cache's own)."""
    from puzzle.distill.artifact import model_fingerprint

    path = Path(path)
    key = targets_key(parent_sha256 or model_fingerprint(parent), ids, top_k)
    if path.is_file():
        try:
            stored = load_targets(path)
        except CorruptArtifactError as e:
            log.warning("%s; computing the teacher's targets again", e)
        else:
            if stored.key == key:
                log.info("teacher targets reused from %s", path)
                return stored
            log.info("%s holds the targets of other tokens, parent or k; computing them again", path)
    targets = compute_targets(parent, ids, top_k, key=key, hidden_dtype=hidden_dtype, progress=progress)
    save_targets(targets, path)
    return targets


def save_targets(targets: TeacherTargets, path: str | Path) -> None:
    """``targets`` written to ``path`` atomically, in one piece (the file layout is
    :class:`~puzzle.distill.targets_file.TargetsWriter`'s, which also writes it a chunk at a time)."""
    from puzzle.distill.targets_file import TargetsWriter

    n, t1, k = targets.logp.shape
    with TargetsWriter(path, n=n, seq_len=t1 + 1, top_k=k, hidden_size=targets.hidden.shape[-1], key=targets.key,
                       labels=targets.label is not None, fmt=FORMAT, hidden_dtype=targets.hidden.dtype) as w:
        w.write(0, targets.logp, targets.index, targets.rest, targets.hidden, targets.label)


def load_targets(path: str | Path, rows: torch.Tensor | None = None) -> TeacherTargets:
    """The targets in ``path``, or only its ``rows`` (any order; only their bytes are read: a rank's share under
    torchrun); :class:`CorruptArtifactError` if it is not a whole cache of this format."""
    from puzzle.distill.targets_file import read_rows

    held = None if rows is None else torch.unique(torch.as_tensor(rows, dtype=torch.int64))  # ascending
    t, meta, _ = read_rows(path, held)
    if any(name not in t for name in ("logp", "index", "rest", "hidden")):
        raise CorruptArtifactError(f"{path} is not a teacher-targets file of format {FORMAT}")
    label = t.get("label")  # validation targets
    if meta.get("format") != FORMAT:
        raise CorruptArtifactError(f"{path} is not a teacher-targets file of format {FORMAT}")
    n, t1, k = t["logp"].shape
    if t["index"].shape != (n, t1, k) or t["rest"].shape != (n, t1) or t["hidden"].shape[:2] != (n, t1 + 1) or (
            label is not None and label.shape != (n, t1)):
        raise CorruptArtifactError(f"{path}: its tensors' shapes do not agree")
    return TeacherTargets(t["logp"], t["index"].to(torch.int64), t["rest"], t["hidden"], meta.get("key", ""), label,
                          held)


def cached_kl(q: torch.Tensor, targets: TeacherTargets) -> torch.Tensor:
    """Sum over positions of the coarsened KL(parent || child) (see the module's docstring); q (b, T-1, V) are the
    child's log-probabilities, ``targets`` the same b sequences'."""
    logp, index = targets.logp.to(q.device), targets.index.to(q.device)
    q_top = q.gather(-1, index)  # (b, T-1, k)
    kl = (logp.exp() * (logp - q_top)).sum()
    if targets.top_k < q.shape[-1]:  # else nothing is outside the top k
        rest = targets.rest.to(q.device)
        kl = kl + (rest.exp() * (rest - outside_logprob(q, index))).sum()
    return kl


def outside_logprob(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(..., ) log of the probability of logp (..., V) outside the tokens ``index`` (..., k); -inf if k = V."""
    if index.shape[-1] == logp.shape[-1]:
        return torch.full(logp.shape[:-1], float("-inf"), dtype=logp.dtype, device=logp.device)
    return logp.scatter(-1, index, float("-inf")).logsumexp(-1)
