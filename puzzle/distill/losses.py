"""The GKD objective and the validation metrics, from one parent and one child forward pass.

For a batch of ids (B, T), p and q the parent's and the child's next-token log-probabilities
(B, T-1, V), h^c and h^p their hidden states (index l: the input of layer l; index L: the last
layer's output, before the final norm), and a layer map of (child index, parent index) pairs:

    kl   = mean_t sum_v exp(p_v) (p_v - q_v)                   KL(parent || child), nats per token
    cos  = mean_pairs mean_t (1 - cos(h^c_i[t], h^p_j[t]))     cosine distance of hidden states
    lm   = mean_t -q[label_t]                                  the child's own cross-entropy
    loss = kl_weight * kl + cosine_weight * cos + lm_weight * lm
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from puzzle.distill.config import GKDConfig
from puzzle.distill.teacher_cache import TeacherTargets, cached_kl
from puzzle.errors import ConfigError
from puzzle.model import PuzzleForCausalLM
from puzzle.scoring.metrics import TokenSums, next_token_logprobs

LayerMap = list[tuple[int, int]]


def resolve_layer_map(cfg: GKDConfig, child_layers: int, parent_layers: int,
                      layer_map: Sequence[Sequence[int]] | None) -> LayerMap:
    """The (child hidden index, parent hidden index) pairs the cosine term compares."""
    if cfg.hidden == "final":
        if layer_map is not None:
            raise ConfigError("a layer map is only used with hidden='all'; "
                              "hidden='final' compares the last hidden states")
        return [(child_layers, parent_layers)]
    if layer_map is None:
        if child_layers != parent_layers:
            raise ConfigError(
                f"hidden='all' needs a layer map: the child has {child_layers} layers and the parent {parent_layers}. "
                f"Pass layer_map=[(child_index, parent_index), ...] of hidden-state indices (0: the embeddings, l: the "
                f"output of layer l, so ({child_layers}, {parent_layers}) pairs the last layers), "
                "or use hidden='final'")
        return [(i, i) for i in range(1, child_layers + 1)]
    pairs = [tuple(int(v) for v in pair) for pair in layer_map]
    if not pairs or any(len(p) != 2 for p in pairs):
        raise ConfigError(f"layer_map must be a non-empty list of (child_index, parent_index) pairs, got {layer_map!r}")
    bad = [p for p in pairs if not (0 <= p[0] <= child_layers and 0 <= p[1] <= parent_layers)]
    if bad:
        raise ConfigError(f"layer_map pairs {bad} are out of range: child indices are 0..{child_layers}, "
                          f"parent indices 0..{parent_layers}")
    return [(a, b) for a, b in pairs]


def check_compatible(child: PuzzleForCausalLM, parent: PuzzleForCausalLM) -> None:
    """The child must predict over the parent's vocabulary with the parent's hidden width."""
    c, p = child.config, parent.config
    if c.vocab_size != p.vocab_size:
        raise ConfigError(f"the child's vocabulary ({c.vocab_size}) differs from the parent's ({p.vocab_size})")
    if c.hidden_size != p.hidden_size:
        raise ConfigError(f"the child's hidden size ({c.hidden_size}) differs from the parent's ({p.hidden_size}); "
                          "hidden states cannot be compared")
    devices = {next(child.parameters()).device, next(parent.parameters()).device}
    if len(devices) > 1:
        raise ConfigError(f"child and parent are on different devices {sorted(map(str, devices))}; move them to one")


def autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on CUDA (fp32 master weights), nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _cos_distance(child_h: Sequence[torch.Tensor], parent_h: Sequence[torch.Tensor], pairs: LayerMap,
                  dtype: torch.dtype) -> torch.Tensor:
    """(pairs, B, T) cosine distances 1 - cos of the mapped hidden states."""
    return torch.stack([1 - F.cosine_similarity(child_h[i].to(dtype), parent_h[j].to(dtype), dim=-1)
                        for i, j in pairs])


def batch_losses(child: PuzzleForCausalLM, parent: PuzzleForCausalLM, ids: torch.Tensor, cfg: GKDConfig,
                 pairs: LayerMap) -> dict[str, torch.Tensor]:
    """``loss`` (with a graph through the child) and its detached ``kl``, ``cos``, ``lm`` on ids (B, T)."""
    with autocast(ids.device):
        with torch.no_grad():
            p_out = parent(input_ids=ids, use_cache=False, output_hidden_states=True)
        c_out = child(input_ids=ids, use_cache=False, output_hidden_states=True)
    p_logp, q_logp = next_token_logprobs(p_out.logits), next_token_logprobs(c_out.logits)  # (B, T-1, V) fp32
    labels = ids[:, 1:]  # (B, T-1)
    kl = F.kl_div(q_logp, p_logp, reduction="sum", log_target=True) / labels.numel()
    lm = F.nll_loss(q_logp.reshape(-1, q_logp.shape[-1]), labels.reshape(-1))
    cos = _cos_distance(c_out.hidden_states, p_out.hidden_states, pairs, torch.float32).mean()
    loss = cfg.kl_weight * kl + cfg.cosine_weight * cos + cfg.lm_weight * lm
    return {"loss": loss, "kl": kl.detach(), "cos": cos.detach(), "lm": lm.detach()}


def cached_batch_losses(child: PuzzleForCausalLM, ids: torch.Tensor, targets: TeacherTargets,
                        cfg: GKDConfig) -> dict[str, torch.Tensor]:
    """:func:`batch_losses` against the parent's cached targets of the same ids (B, T) instead of a parent forward
    pass (:mod:`puzzle.distill.teacher_cache`: the KL coarsened to the parent's top k; ``hidden="final"``)."""
    with autocast(ids.device):
        c_out = child(input_ids=ids, use_cache=False, output_hidden_states=True)
    q_logp = next_token_logprobs(c_out.logits)  # (B, T-1, V) fp32
    labels = ids[:, 1:]  # (B, T-1)
    kl = cached_kl(q_logp, targets) / labels.numel()
    lm = F.nll_loss(q_logp.reshape(-1, q_logp.shape[-1]), labels.reshape(-1))
    cos = _cos_distance([c_out.hidden_states[-1]], [targets.hidden.to(ids.device)], [(0, 0)], torch.float32).mean()
    loss = cfg.kl_weight * kl + cfg.cosine_weight * cos + cfg.lm_weight * lm
    return {"loss": loss, "kl": kl.detach(), "cos": cos.detach(), "lm": lm.detach()}


SUMS = ("kl", "agree", "child_nll", "parent_nll", "tokens", "cos", "cos_n")
"""The keys of :func:`validation_sums`: sums over tokens (``cos`` over tokens and layer pairs)."""


@torch.no_grad()
def validation_sums(child: PuzzleForCausalLM, parent: PuzzleForCausalLM, ids: torch.Tensor, pairs: LayerMap, *,
                    chunk: int, passes: int | None = None) -> dict[str, float]:
    """Sums over the tokens of ids (N, T), ``chunk`` sequences per forward pass (see :data:`SUMS`).

    ``passes``: run exactly this many forward passes (sharded models: every rank must run as many as the
    others); passes past the end of ``ids`` run on its first sequence, or on a zero one, and count nothing.
    """
    device = next(child.parameters()).device
    was_training = child.training
    child.eval()
    sums, cos_sum, cos_n = TokenSums(), 0.0, 0
    passes = -(-ids.shape[0] // chunk) if passes is None else passes
    for k in range(passes):
        x = ids[k * chunk:(k + 1) * chunk].to(device)  # (b, T)
        counted = x.shape[0] > 0
        if not counted:
            x = ids[:1].to(device) if ids.shape[0] else torch.zeros(1, ids.shape[1], dtype=ids.dtype, device=device)
        with autocast(device):
            p_out = parent(input_ids=x, use_cache=False, output_hidden_states=True)
            c_out = child(input_ids=x, use_cache=False, output_hidden_states=True)
        if not counted:
            continue
        sums.add(next_token_logprobs(p_out.logits), next_token_logprobs(c_out.logits), x[:, 1:])
        # float64: identical hidden states give a distance of 0 up to ~1e-16, not float32's ~1e-7
        d = _cos_distance(c_out.hidden_states, p_out.hidden_states, pairs, torch.float64)
        cos_sum += float(d.sum())
        cos_n += d.numel()
    child.train(was_training)
    return {"kl": sums.kl, "agree": sums.agree, "child_nll": sums.child_nll, "parent_nll": sums.parent_nll,
            "tokens": float(sums.tokens), "cos": cos_sum, "cos_n": float(cos_n)}


@torch.no_grad()
def cached_validation_sums(child: PuzzleForCausalLM, targets: TeacherTargets, ids: torch.Tensor, *, chunk: int,
                           passes: int | None = None) -> dict[str, float]:
    """:func:`validation_sums` against the parent's cached targets on the same ids (N, T) (``targets.label`` held:
    :func:`puzzle.distill.teacher_sharded.sharded_targets` with ``labels``) instead of a parent forward pass: the KL
    coarsened to the parent's top k (:func:`~puzzle.distill.teacher_cache.cached_kl`; the exact one when k = V),
    agreement with its most likely token, its own cross-entropy from ``label``, and the cosine distance of the last
    hidden states (``hidden="final"``). ``passes`` as in :func:`validation_sums`."""
    device = next(child.parameters()).device
    was_training = child.training
    child.eval()
    kl, agree, child_nll, parent_nll, tokens, cos_sum, cos_n = 0.0, 0.0, 0.0, 0.0, 0, 0.0, 0
    passes = -(-ids.shape[0] // chunk) if passes is None else passes
    for k in range(passes):
        rows = torch.arange(k * chunk, min((k + 1) * chunk, ids.shape[0]))
        x = ids[rows].to(device)  # (b, T)
        counted = x.shape[0] > 0
        if not counted:
            x = ids[:1].to(device) if ids.shape[0] else torch.zeros(1, ids.shape[1], dtype=ids.dtype, device=device)
        with autocast(device):
            c_out = child(input_ids=x, use_cache=False, output_hidden_states=True)
        if not counted:
            continue
        part, q, labels = targets.rows(rows), next_token_logprobs(c_out.logits), x[:, 1:]  # q (b, T-1, V) fp32
        kl += float(cached_kl(q, part).double())
        agree += float((q.argmax(-1) == part.index[..., 0].to(device)).sum())
        child_nll -= float(q.gather(-1, labels.unsqueeze(-1)).double().sum())
        parent_nll -= float(part.label.double().sum())
        tokens += labels.numel()
        d = _cos_distance([c_out.hidden_states[-1]], [part.hidden.to(device)], [(0, 0)], torch.float64)
        cos_sum += float(d.sum())
        cos_n += d.numel()
    child.train(was_training)
    return {"kl": kl, "agree": agree, "child_nll": child_nll, "parent_nll": parent_nll, "tokens": float(tokens),
            "cos": cos_sum, "cos_n": float(cos_n)}


def validation_metrics(sums: dict[str, float]) -> dict[str, float]:
    """``kl``, ``top1``, ``lm`` (child), ``cos`` and the parent's ``parent_lm``, means of :func:`validation_sums`."""
    n = max(sums["tokens"], 1.0)
    return {"kl": sums["kl"] / n, "top1": sums["agree"] / n, "lm": sums["child_nll"] / n,
            "cos": sums["cos"] / max(sums["cos_n"], 1.0), "parent_lm": sums["parent_nll"] / n}


def validate(child: PuzzleForCausalLM, parent: PuzzleForCausalLM, ids: torch.Tensor, pairs: LayerMap, *,
             chunk: int) -> dict[str, float]:
    """``kl``, ``top1``, ``lm`` (child) and ``cos`` on ids (N, T), plus the parent's ``parent_lm``."""
    return validation_metrics(validation_sums(child, parent, ids, pairs, chunk=chunk))
