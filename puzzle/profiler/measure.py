"""Time block variants on the device that is present: the runtime's own ``DecoderBlock``, random weights.

A block is timed inside a stack of copies, as it runs in a model: each copy has its own weights
(and KV cache), and the stack holds at least ``stream_bytes`` of them, so every pass streams
weights from main memory (DRAM on the CPU, HBM on a GPU) instead of finding them in a cache
that one block alone would fit in. The time of a pass divided by the number of copies is the
block's time; the median over ``repeats`` passes (after ``warmup``) is reported (or the fastest,
``statistic="min"``, on a machine other jobs share).

* prefill: input (B, T, H), causal attention over the T prompt tokens (no mask: SDPA's causal path);
* decode: input (B, 1, H) attending to a cache of ``length`` tokens held in a :class:`StaticKVCache`
  (preallocated, written in place at the same position every repeat: no growth, no copies).

CPU times are wall clock (``time.perf_counter``); CUDA times are CUDA events after a synchronize.
``dtype="fp8"`` (CUDA only) swaps every ``nn.Linear`` for :class:`FP8Linear` (``torch._scaled_mm``,
e4m3 weights and activations with per-tensor scales, bf16 out).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from puzzle.errors import UnknownTargetError
from puzzle.model.modeling import DecoderBlock, RMSNorm, RotaryEmbedding
from puzzle.profiler.counts import ModelShape, Op, block_ops, fixed_ops
from puzzle.profiler.scenario import Scenario
from puzzle.schema import BlockConfig

log = logging.getLogger(__name__)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
"""Activation (and weight storage) dtype per serving dtype; fp8 weights are converted by FP8Linear."""
STREAM_BYTES = 256 * 2**20
MAX_COPIES = 64
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def runtime_config(shape_or_config: Any) -> SimpleNamespace:
    """The fields ``DecoderBlock`` reads, from a :class:`ModelShape` or a runtime config."""
    s = shape_or_config if isinstance(shape_or_config, ModelShape) else ModelShape.from_config(shape_or_config)
    return SimpleNamespace(hidden_size=s.hidden_size, num_attention_heads=s.num_attention_heads,
                           head_dim=s.head_dim, vocab_size=s.vocab_size, qkv_bias=s.qkv_bias,
                           attention_bias=s.attention_bias, mlp_bias=s.mlp_bias,
                           rms_norm_eps=getattr(shape_or_config, "rms_norm_eps", 1e-5),
                           rope_parameters=getattr(shape_or_config, "rope_parameters", None)
                           or {"rope_type": "default", "rope_theta": 10000.0})


def block_spec(block: BlockConfig) -> dict[str, Any]:
    """The plain per-layer dict ``DecoderBlock`` is built from (``PuzzleConfig.resolved_blocks`` form)."""
    return {"attention": block.attention.kind, "num_key_value_heads": block.attention.num_key_value_heads,
            "ffn": block.ffn.kind, "intermediate_size": block.ffn.intermediate_size}


class StaticKVCache:
    """One layer's preallocated K and V, (B, nkv, S_max, hd), with the runtime's ``update`` interface.

    ``update`` writes the new positions at ``past`` (fixed, so repeats overwrite one another) and
    returns views of the first ``past + T`` positions: the cache never grows or reallocates.
    """

    def __init__(self, batch: int, n_kv: int, past: int, head_dim: int, *, new_tokens: int = 1,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.past = past
        size = (batch, n_kv, past + new_tokens, head_dim)
        self.k = torch.randn(size, device=device, dtype=dtype)
        self.v = torch.randn(size, device=device, dtype=dtype)

    def update(self, k: torch.Tensor, v: torch.Tensor, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.past + k.shape[2]
        self.k[:, :, self.past:end].copy_(k)  # k: (B, nkv, T, hd)
        self.v[:, :, self.past:end].copy_(v)
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, nkv, past + T, hd)


class FP8Linear(nn.Module):
    """``nn.Linear`` in FP8: e4m3 weight with a per-tensor scale, activations scaled per call, bf16 out."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        w_scale = (w.abs().amax() / FP8_MAX).clamp(min=1e-12)
        self.register_buffer("weight_t", (w / w_scale).to(torch.float8_e4m3fn).t())  # (in, out), column-major
        self.register_buffer("w_scale", w_scale.to(torch.float32))
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out) bf16
        x2 = x.reshape(-1, x.shape[-1])
        a_scale = (x2.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
        xq = (x2 / a_scale).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(xq, self.weight_t, scale_a=a_scale, scale_b=self.w_scale, bias=self.bias,
                             out_dtype=torch.bfloat16)
        return y.view(*x.shape[:-1], y.shape[-1])


def check_fp8(device: torch.device) -> None:
    """Raise :class:`UnknownTargetError` unless ``device`` is a GPU with FP8 tensor cores (sm_89+)."""
    if device.type != "cuda":
        raise UnknownTargetError(f"fp8 blocks can only be measured on a CUDA GPU, not on {device}")
    if torch.cuda.get_device_capability(device) < (8, 9) or not hasattr(torch, "_scaled_mm"):
        raise UnknownTargetError(f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores (needs sm_89+: "
                                 "L40S, H100, H200, B200); measure bf16 instead")


def to_fp8(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` under ``module`` with :class:`FP8Linear` (in place)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, FP8Linear(child))
        else:
            to_fp8(child)
    return module


def _resolve(device: str | torch.device, dtype: str) -> tuple[torch.device, torch.dtype]:
    if dtype not in TORCH_DTYPES:
        raise UnknownTargetError(f"unknown dtype {dtype!r}; choose one of {sorted(TORCH_DTYPES)}")
    dev = torch.device(device)
    if dtype == "fp8":
        check_fp8(dev)
    return dev, TORCH_DTYPES[dtype]


def _copies(bytes_per_copy: float, stream_bytes: float) -> int:
    return max(1, min(MAX_COPIES, math.ceil(stream_bytes / max(bytes_per_copy, 1.0))))


STATISTICS = {"median": statistics.median, "min": min}
"""How repeats are summarized: the median (default), or the fastest (robust when other processes
share the machine: interference only ever slows a run down)."""


def time_ms(step: Callable[[], Any], device: torch.device, *, repeats: int, warmup: int,
            statistic: str = "median") -> float:
    """Milliseconds of one ``step()`` on ``device``: ``warmup`` untimed calls, then ``repeats`` timed ones
    (CUDA events on a GPU, ``perf_counter`` elsewhere) summarized by ``STATISTICS[statistic]``."""
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
    return STATISTICS[statistic](times)


def _state_bytes(modules: Sequence[nn.Module], caches: Sequence[Any]) -> float:
    total = sum(t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()])
    return total + sum(c.k.numel() * c.k.element_size() * 2 for c in caches if c is not None)


def measure_block_ms(shape_or_config: Any, block: BlockConfig, sc: Scenario, *, device: str | torch.device = "cpu",
                     dtype: str = "fp32", repeats: int = 10, warmup: int = 2,
                     stream_bytes: float = STREAM_BYTES, seed: int = 0, statistic: str = "median") -> float:
    """Milliseconds of one ``block`` in one step of ``sc`` on ``device`` (median of ``repeats``)."""
    dev, tdtype = _resolve(device, dtype)
    cfg = runtime_config(shape_or_config)
    spec, gqa = block_spec(block), block.attention.kind == "gqa"
    B, T = sc.batch, sc.new_tokens
    torch.manual_seed(seed)
    with torch.inference_mode():
        def build() -> tuple[nn.Module, Any]:
            blk = DecoderBlock(cfg, spec, cache_slot=0).to(device=dev, dtype=tdtype).eval()
            if dtype == "fp8":
                to_fp8(blk)
            cache = (StaticKVCache(B, block.attention.num_key_value_heads, sc.length, cfg.head_dim, device=dev,
                                   dtype=tdtype) if gqa and sc.phase == "decode" else None)
            return blk, cache

        first = build()
        stack = [first] + [build() for _ in range(_copies(_state_bytes([first[0]], [first[1]]), stream_bytes) - 1)]
        past = sc.length if sc.phase == "decode" else 0
        positions = torch.arange(past, past + T, device=dev)[None].expand(B, T)
        cos, sin = RotaryEmbedding(cfg.rope_parameters, cfg.head_dim)(positions, tdtype)  # (B, T, hd)
        x = torch.randn(B, T, cfg.hidden_size, device=dev, dtype=tdtype)
        ctxs = [{"cos": cos, "sin": sin, "mask": None, "cache": cache} for _, cache in stack]

        def step() -> None:
            for (blk, _), ctx in zip(stack, ctxs):
                blk(x, ctx)

        return time_ms(step, dev, repeats=repeats, warmup=warmup, statistic=statistic) / len(stack)


class _Fixed(nn.Module):
    """Embedding lookup, final norm and LM head of the last position (tied or untied)."""

    def __init__(self, cfg: SimpleNamespace, tied: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, V)
        x = self.embed(ids)  # (B, T, H)
        return self.lm_head(self.norm(x[:, -1]))


def measure_fixed_ms(shape_or_config: Any, sc: Scenario, *, device: str | torch.device = "cpu", dtype: str = "fp32",
                     repeats: int = 10, warmup: int = 2, seed: int = 0, statistic: str = "median") -> float:
    """Milliseconds of the embedding, final norm and LM head (last position only) in ``sc``."""
    dev, tdtype = _resolve(device, dtype)
    cfg = runtime_config(shape_or_config)
    tied = shape_or_config.tie_word_embeddings if hasattr(shape_or_config, "tie_word_embeddings") else True
    torch.manual_seed(seed)
    with torch.inference_mode():
        fixed = _Fixed(cfg, bool(tied)).to(device=dev, dtype=tdtype).eval()
        if dtype == "fp8":
            fixed.lm_head = FP8Linear(fixed.lm_head)
        ids = torch.randint(0, cfg.vocab_size, (sc.batch, sc.new_tokens), device=dev)
        return time_ms(lambda: fixed(ids), dev, repeats=repeats, warmup=warmup, statistic=statistic)


@dataclass(frozen=True)
class Measurement:
    """One timed (block, scenario) with the analytic ops the cost model prices it by."""

    block: BlockConfig
    scenario: Scenario
    dtype: str
    measured_ms: float
    ops: tuple[Op, ...] = field(repr=False)

    @property
    def label(self) -> str:
        return self.block.label

    def to_dict(self) -> dict[str, Any]:
        return {"block": self.block.to_dict(), "scenario": self.scenario.to_dict(), "dtype": self.dtype,
                "measured_ms": self.measured_ms}


def measure_blocks(shape_or_config: Any, pairs: Sequence[tuple[BlockConfig, Scenario]], *,
                   device: str | torch.device = "cpu", dtype: str = "fp32", repeats: int = 10, warmup: int = 2,
                   progress: bool = True, desc: str = "timing blocks", **kwargs: Any) -> list[Measurement]:
    """Time every ``(block, scenario)`` pair (tqdm bar with ETA); each record carries its ``block_ops``."""
    from tqdm.auto import tqdm

    shape = shape_or_config if isinstance(shape_or_config, ModelShape) else ModelShape.from_config(shape_or_config)
    out = []
    for block, sc in tqdm(pairs, desc=f"{desc} ({torch.device(device).type}, {dtype})", unit="block",
                          disable=not progress):
        ms = measure_block_ms(shape_or_config, block, sc, device=device, dtype=dtype, repeats=repeats,
                              warmup=warmup, **kwargs)
        out.append(Measurement(block, sc, dtype, ms, tuple(block_ops(shape, block, sc, dtype=dtype))))
    return out


def fixed_measurement(shape_or_config: Any, sc: Scenario, *, dtype: str = "fp32", **kwargs: Any) -> tuple[float, list[Op]]:
    """``measure_fixed_ms`` with the analytic ops of the same step."""
    shape = shape_or_config if isinstance(shape_or_config, ModelShape) else ModelShape.from_config(shape_or_config)
    return measure_fixed_ms(shape_or_config, sc, dtype=dtype, **kwargs), fixed_ops(shape, sc, dtype=dtype)
