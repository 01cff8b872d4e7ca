"""Child-stream refit: the child's pruned FFNs rebuilt by least squares on the child's own stream.

The library's FFN refit (``bld.ffn_refit``, :func:`block_library.ffn.refit_down`) fits a pruned FFN to the whole
FFN on the *parent's* activations, before the MIP. Once the MIP has chosen, each pruned FFN sees the *child's*
stream instead, which drifts from the parent's layer after layer. Here, layer by layer from the first, on
the same tokens as child-aware BLD (:mod:`puzzle.distill.child_bld`):

    h  = the child's stream after layer l's attention   (N, H), the layers before already refit
    a  = silu(gate(norm(h))) * up(norm(h))               (N, k)  the child's kept channels
    t  = ffn_parent(norm_parent(h))                      (N, H)  what the parent's FFN writes on h
    t' = t + drift * (p_next - h - t)                    the parent's own next stream p_next, blended in
    down' = argmin ||a d^T - t'||^2 + lam ||d - down||^2 = (C + lam down^T)^T (G + lam I)^-1

with ``G = a^T a`` (k, k) and ``C = a^T t'`` (k, H) summed in float32 within a chunk and in float64 across chunks,
and ``lam = ridge * mean diag G``.

With ``drift`` 0 it is child-aware BLD's local target (the parent's FFN on the child's input), reached in one
forward pass and one solve per layer instead of gradient steps; ``drift`` 1 asks the FFN to bring the child's
stream back to the parent's (the parent then runs alongside, on its own stream). GPTQ-style, each layer is fit
on the stream that the already-refit layers before it produce.

With ``select`` (the default), the kept channels are chosen again too: ``a`` is then the parent's FFN's whole
intermediate (N, D) on the child's stream (through the parent's norm), ``t`` is what that FFN writes, and
:func:`puzzle.distill.channel_select.obs_select` drops the ``D - k`` channels whose removal costs the fit least,
ridge towards the parent's down projection. The child's pruned FFN becomes the parent's norm, the kept rows of its
gate and up projections and the fitted down projection: a block whose channels were picked for the *parent's*
stream (the library's FFN initializer) is replaced by one picked for this child's.

Measured on SmolLM2-135M (``benchmarks/quality.py``'s held-out text), the MIP's child at 81% of the decoder
FLOPs over the quick library, 16,384 tokens: KL 0.438 -> 0.266 with the down projections refit (drift 0),
0.239 with drift 0.5, 0.190 with the channels selected again (drift 0.5; about 3 min on 2 cores), against 0.312
after child-aware BLD's gradient steps on the same tokens.
The full library's MIP child at 81% (its FFN refit on), drift 0.75: 0.167 on 65,536 tokens, 0.146 on 131,072
(the full preset's).

Memory: the child's stream for every sequence (N, T, H) in the model's dtype on its device (with drift the
parent's too), one chunk's intermediate activations, and ``G`` and ``C`` of one layer (with ``select``, at the
parent's width, plus the elimination's inverse and fit; see :func:`refit_bytes`). The streams are bounded: the
refit reads at most :data:`REFIT_MAX_TOKENS` tokens, the first rows of the training ids (:func:`refit_ids`).

With ``host``, ``G`` and ``C`` and the solve (or the OBS elimination) live in host memory instead: the device
computes each chunk's ``a^T a`` and ``a^T t`` in float32, as it does anyway, and adds them to the host's float64 sums;
the solve runs there, its result goes back to the device. The same float64 math on another processor, for a parent
too wide for its device: a 405B FFN's ``D = 53,248`` makes ``G``, ``C`` and the elimination's matrices over 100 GiB
(:func:`refit_bytes`, :func:`refit_host_bytes`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from puzzle.distill.subblocks import replaced_subblocks, through
from puzzle.errors import ConfigError


REFIT_MAX_TOKENS = 262144
"""Most tokens the refit fits on: the first ``REFIT_MAX_TOKENS // seq_len`` rows of the training ids. ``G`` of a
width-``D`` FFN is a ``D x D`` second moment, well estimated from a few times ``D`` tokens (GPTQ-style calibration
uses about 128 x 2048); the cap keeps the refit's streams (``N x T x H`` per model) bounded however many tokens the
gradient steps take (the production preset's grow with the parent: 250 M for a 70B one). The quick and full presets
(16,384 and 131,072 tokens) are under it."""


def refit_ids(ids: torch.Tensor) -> torch.Tensor:
    """The rows of ``ids`` (N, T) the refit reads: the first ``max(1, REFIT_MAX_TOKENS // T)``."""
    return ids[:max(1, REFIT_MAX_TOKENS // ids.shape[1])]


@dataclass
class RefitResult:
    layers: list[int]
    """The layers whose FFN was refit."""
    tokens: int
    seconds: float
    error_before: dict[int, float] = field(default_factory=dict)
    """Each refit layer's relative error ``||a down^T - t||^2 / ||t||^2`` on the refit tokens, before and after."""
    error_after: dict[int, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        mean = lambda d: sum(d.values()) / len(d) if d else float("nan")  # noqa: E731
        return {"refit_layers": len(self.layers), "refit_tokens": self.tokens, "refit_seconds": round(self.seconds, 1),
                "refit_error_before": mean(self.error_before), "refit_error_after": mean(self.error_after)}


def refit_bytes(tokens: int, hidden: int, intermediate: int, dtype_bytes: int, chunk_tokens: int, drift: bool,
                select: bool = True, host: bool = False) -> int:
    """Peak device bytes of :func:`refit_child_ffns` beyond the two models: the child's stream of ``tokens`` (dtype;
    with ``drift`` the parent's too), one chunk's activations (float32 ``a`` and targets, the normed input) and its
    float32 ``a^T a`` and ``a^T t``, and unless ``host`` the float64 sums and solve of :func:`refit_host_bytes`
    (``intermediate`` is the parent's width with ``select``)."""
    stream = tokens * hidden * dtype_bytes * (2 if drift else 1)
    chunk = chunk_tokens * (intermediate + 2 * hidden) * (4 + dtype_bytes) + chunk_tokens * hidden * dtype_bytes
    sums = (intermediate * intermediate + intermediate * hidden) * 4  # a chunk's float32 a^T a, a^T t
    return stream + chunk + sums + (0 if host else _gram_bytes(hidden, intermediate, select))


def refit_host_bytes(hidden: int, intermediate: int, select: bool = True) -> int:
    """Host bytes of the refit with ``host``: a chunk's float32 sums as they arrive, ``G`` and ``C`` (float64), with
    ``select`` the elimination's ``G + lam I``, its inverse, one rank-``m`` update of it, the fit and ``C + lam w0``."""
    return (intermediate * intermediate + intermediate * hidden) * 4 + _gram_bytes(hidden, intermediate, select)


def _gram_bytes(hidden: int, intermediate: int, select: bool) -> int:
    """``G`` and ``C`` in float64, four times that with ``select`` (the elimination's matrices)."""
    return (intermediate * intermediate + intermediate * hidden) * 8 * (4 if select else 1)


def refit_flops(tokens: int, hidden: int, intermediate: int, select: bool = True) -> float:
    """Multiply-adds x 2 of one layer's refit beyond the forward passes: ``G`` and ``C`` over ``tokens``, and the
    solve (with ``select`` the elimination, at most ``2 D^3`` for the parent's width ``D``)."""
    D = intermediate
    return 2.0 * tokens * (D * D + D * hidden) + refit_solve_flops(hidden, intermediate, select)


def refit_solve_flops(hidden: int, intermediate: int, select: bool = True) -> float:
    """The part of :func:`refit_flops` after the sums: the solve, with ``select`` the elimination (the host's work
    with ``host``)."""
    D = intermediate
    return 2.0 * D * D * hidden + (2.0 * D ** 3 if select else 0.0)


def refit_todo(child: Any, parent: Any) -> list[int]:
    """The layers whose FFN the refit rebuilds: the replaced swiglu FFNs of ``child`` (narrower than the parent's),
    bias-free (Llama's: the fit has no intercept). Read from the configs and module shapes only, so it holds for
    a model whose other layers are on the meta device (one rank's share)."""
    body, teacher = child.model, parent.model
    swiglu = lambda l: body.layers[l].spec["ffn"] == teacher.layers[l].spec["ffn"] == "swiglu"  # noqa: E731
    return sorted(l for l, sub in replaced_subblocks(child, parent)
                  if sub == "ffn" and swiglu(l) and body.layers[l].mlp.down_proj.bias is None)


@torch.no_grad()
def refit_child_ffns(child: Any, parent: Any, ids: torch.Tensor, *, ridge: float = 0.1, drift: float = 0.0,
                     select: bool = True, batch: int = 4, progress: bool = False, host: bool = False) -> RefitResult:
    """Refit, in place, every FFN of ``child`` that is a pruned swiglu (narrower than the parent's) on ``ids`` (N, T)
    run through ``child`` (its first :data:`REFIT_MAX_TOKENS` tokens), ``batch`` sequences at a time: its down
    projection, and with ``select`` its kept channels too; ``drift`` in [0, 1] blends the parent's own next stream
    into the target; ``host``: the float64 sums and the solve in host memory."""
    check_refit(ids, ridge=ridge, drift=drift, batch=batch)
    ids = refit_ids(ids)
    body, teacher = child.model, parent.model
    todo = refit_todo(child, parent)
    t0 = time.perf_counter()
    result = RefitResult(layers=todo, tokens=ids.numel(), seconds=0.0)
    if not todo:
        return result
    device = next(body.parameters()).device
    ctx = refit_context(body, ids.shape[1], device)
    stream = [body.embed_tokens(ids[i:i + batch].to(device)) for i in range(0, ids.shape[0], batch)]  # (b, T, H)
    pstream = [teacher.embed_tokens(ids[i:i + batch].to(device)) for i in range(0, ids.shape[0], batch)] if drift else []
    refit_layers(child, parent, range(max(todo) + 1), stream, pstream, ctx, todo, ridge=ridge, drift=drift,
                 select=select, result=result, progress=progress, host=host)
    result.seconds = time.perf_counter() - t0
    return result


def check_refit(ids: torch.Tensor, *, ridge: float, drift: float, batch: int) -> None:
    """A :class:`ConfigError` for settings or ids the refit cannot use."""
    if not ridge > 0 or not 0.0 <= drift <= 1.0:
        raise ConfigError(f"the child-stream refit needs ridge > 0 and drift in [0, 1], got {ridge} and {drift}")
    if ids.dim() != 2 or ids.shape[0] < 1 or batch < 1:
        raise ConfigError(f"the child-stream refit needs (N, T) token ids and batch >= 1, got {tuple(ids.shape)}, {batch}")


def refit_context(body: Any, T: int, device: torch.device) -> dict[str, Any]:
    """The rotary tables of ``T`` positions, (1, T, hd) each, broadcast over a chunk's sequences."""
    pos = torch.arange(T, device=device)[None]
    cos, sin = body.rotary_emb(pos, body.embed_tokens.weight.dtype)
    return {"cos": cos, "sin": sin, "mask": None, "cache": None}


@torch.no_grad()
def refit_layers(child: Any, parent: Any, layers: range, stream: list[torch.Tensor], pstream: list[torch.Tensor],
                 ctx: dict[str, Any], todo: Sequence[int], *, ridge: float, drift: float, select: bool,
                 result: RefitResult, progress: bool = False, host: bool = False
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The refit over ``layers`` (contiguous, up to the last of ``todo``), from the child's ``stream`` entering the
    first of them (chunks (b, T, H)) and, with ``drift``, the parent's ``pstream`` there: refits the ``todo`` layers
    among them in place, recording their errors in ``result``; returns both streams leaving ``layers`` (in the last
    of ``todo`` the child's stops after the attention: nothing needs more). Layer-sharded ranks run it over their
    layers in turn (:mod:`puzzle.distill.child_bld_sharded`), one process over them all. ``host``: the float64 sums
    and the solve in host memory (the same math)."""
    body, teacher = child.model, parent.model
    last = max(todo)
    for l in tqdm([l for l in layers if l <= last], desc="child refit", unit="layer", disable=not progress):
        mine, theirs = body.layers[l], teacher.layers[l]
        stream = [through(mine, "attention", x, ctx) for x in stream]
        pstream = [through(theirs, "ffn", through(theirs, "attention", p, ctx), ctx) for p in pstream]  # after layer l
        if l in todo:
            (_select_layer if select else _refit_layer)(mine, theirs, stream, pstream, ridge, drift, result, l,
                                                        torch.device("cpu") if host else None)
        if l < last:
            stream = [through(mine, "ffn", x, ctx) for x in stream]
    return stream, pstream


def _refit_layer(mine: Any, theirs: Any, stream: list[torch.Tensor], pstream: list[torch.Tensor], ridge: float,
                 drift: float, result: RefitResult, layer: int, acc: torch.device | None = None) -> None:
    """Accumulate ``G``, ``C`` and ``||t'||^2`` over the stream's chunks and solve layer ``layer``'s down projection
    (the sums and the solve on ``acc``, the model's device when None)."""
    from block_library.linear import ridge_lambda
    from puzzle.distill.channel_select import lstsq_error

    mlp = mine.mlp
    down = mlp.down_proj.weight  # (H, k)
    H, k = down.shape
    acc = acc or down.device
    g = torch.zeros(k, k, dtype=torch.float64, device=acc)
    c = torch.zeros(k, H, dtype=torch.float64, device=acc)
    tt = 0.0
    for i, x in enumerate(stream):
        n = mine.post_attention_layernorm(x).reshape(-1, H)  # (b*T, H)
        a = (torch.nn.functional.silu(mlp.gate_proj(n)) * mlp.up_proj(n)).float()  # (b*T, k)
        t = theirs.mlp(theirs.post_attention_layernorm(x)).reshape(-1, H).float()  # (b*T, H)
        if drift:  # towards the parent's next stream: p_next - h
            t = t + drift * ((pstream[i] - x).reshape(-1, H).float() - t)
        g += (a.T @ a).to(acc)  # one chunk's sums in float32, the running sums in float64
        c += (a.T @ t).to(acc)
        tt += float(t.double().pow(2).sum())
    w0 = down.to(acc).double()
    lam = ridge_lambda(g, ridge) + 1e-12  # + a floor: a layer whose kept channels never fired
    w = torch.linalg.solve(g + lam * torch.eye(k, dtype=torch.float64, device=g.device), c + lam * w0.T).T  # (H, k)
    result.error_before[layer] = lstsq_error(g, c, tt, w0.T)  # ||a d^T - t'||^2 / ||t'||^2 from G, C and ||t'||^2
    result.error_after[layer] = lstsq_error(g, c, tt, w.T)
    down.copy_(w.to(down.dtype))


def _select_layer(mine: Any, theirs: Any, stream: list[torch.Tensor], pstream: list[torch.Tensor], ridge: float,
                  drift: float, result: RefitResult, layer: int, acc: torch.device | None = None) -> None:
    """Layer ``layer``'s pruned FFN chosen again from the parent's: ``G`` (D, D) and ``C`` (D, H) of the parent's
    intermediate on the child's stream, OBS elimination down to the child's width, the parent's rows copied (the
    sums and the elimination on ``acc``, the model's device when None)."""
    from block_library.linear import ridge_lambda
    from puzzle.distill.channel_select import lstsq_error, obs_select

    mlp, pm = mine.mlp, theirs.mlp
    H, k = mlp.down_proj.weight.shape
    D = pm.down_proj.weight.shape[1]
    dev = pm.down_proj.weight.device
    acc = acc or dev
    g = torch.zeros(D, D, dtype=torch.float64, device=acc)
    c = torch.zeros(D, H, dtype=torch.float64, device=acc)
    tt = miss = 0.0
    for i, x in enumerate(stream):
        n = theirs.post_attention_layernorm(x).reshape(-1, H)  # (b*T, H)
        a = torch.nn.functional.silu(pm.gate_proj(n)) * pm.up_proj(n)  # (b*T, D) in the model's dtype
        t = pm.down_proj(a).float()  # (b*T, H)
        a = a.float()
        if drift:  # towards the parent's next stream: p_next - h
            t = t + drift * ((pstream[i] - x).reshape(-1, H).float() - t)
        mine_out = mlp(mine.post_attention_layernorm(x)).reshape(-1, H).float()  # before: the child's own FFN
        g += (a.T @ a).to(acc)  # one chunk's sums in float32, the running sums in float64
        c += (a.T @ t).to(acc)
        tt += float(t.double().pow(2).sum())
        miss += float((mine_out - t).double().pow(2).sum())
    w0 = pm.down_proj.weight.to(acc).double().T  # (D, H)
    lam = ridge_lambda(g, ridge) + 1e-12  # + a floor: a layer whose channels never fired
    keep, w = obs_select(g, c, w0, k, lam, group=max(1, -(-(D - k) // 256)))  # (k,), (k, H); 256 steps
    result.error_before[layer] = miss / max(tt, 1e-30)
    result.error_after[layer] = lstsq_error(g[keep][:, keep], c[keep], tt, w)
    keep = keep.to(dev)
    mlp.gate_proj.weight.copy_(pm.gate_proj.weight[keep])
    mlp.up_proj.weight.copy_(pm.up_proj.weight[keep])
    mlp.down_proj.weight.copy_(w.T.to(mlp.down_proj.weight.dtype))
    mine.post_attention_layernorm.load_state_dict(theirs.post_attention_layernorm.state_dict())
