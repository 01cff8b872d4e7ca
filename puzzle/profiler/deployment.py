"""A valid deployment: the tensor-parallel degree serving engines accept for a model on a target.

``8xH100`` names one node of eight GPUs, not "tensor parallelism 8". Engines split every layer
evenly across the tensor-parallel ranks, so vLLM, SGLang and TensorRT-LLM accept a degree ``tp``
only when

* the query heads divide evenly: ``num_attention_heads % tp == 0``;
* every attention layer's KV heads divide evenly, or are replicated whole: ``kv % tp == 0`` or
  ``tp % kv == 0``;
* every SwiGLU width divides evenly: ``intermediate_size % tp == 0``;
* the group stays inside one node's NVLink domain: ``tp <= 8``.

SmolLM2-135M (9 query heads, 3 KV heads) accepts 1, 3 and 9; on ``8xH100`` that is 1 or 3.
:func:`choose_tensor_parallel` takes the smallest valid degree at which the model's weights and
KV cache fit a device; the other GPUs of the target serve replicas (target throughput = replicas
x replica throughput).
"""

from __future__ import annotations

from collections.abc import Sequence

from puzzle.errors import UnknownTargetError
from puzzle.profiler.counts import ModelShape, block_weight_bytes, fixed_weight_bytes, kv_bytes_per_token
from puzzle.profiler.devices import Target
from puzzle.schema import BlockConfig

NODE_DEVICES = 8
"""Largest tensor-parallel group: one node's NVLink domain."""
MEMORY_MARGIN = 0.9
"""Fraction of a device's memory that weights and KV cache may take (the rest: activations, runtime)."""


def engine_accepts(tp: int, *, num_attention_heads: int, blocks: Sequence[BlockConfig]) -> bool:
    """Whether serving engines can split every layer of the model ``tp`` ways (see the module docstring)."""
    if tp < 1 or num_attention_heads % tp:
        return False
    for b in blocks:
        kv = b.attention.num_key_value_heads if b.attention.kind == "gqa" else None
        if kv and kv % tp and tp % kv:
            return False
        if b.ffn.kind == "swiglu" and b.ffn.intermediate_size % tp:
            return False
    return True


def valid_tensor_parallel(count: int, *, num_attention_heads: int, blocks: Sequence[BlockConfig]) -> list[int]:
    """Every degree from 1 to ``min(count, 8)`` that engines accept for the model."""
    return [tp for tp in range(1, min(count, NODE_DEVICES) + 1)
            if engine_accepts(tp, num_attention_heads=num_attention_heads, blocks=blocks)]


def memory_per_device(shape: ModelShape, blocks: Sequence[BlockConfig], *, dtype: str, tp: int, batch: int,
                      kv_tokens: int) -> float:
    """Bytes on the most loaded rank: weights plus the KV cache of ``batch`` sequences of ``kv_tokens`` tokens."""
    weights = fixed_weight_bytes(shape, dtype=dtype, tp=tp)
    weights += sum(block_weight_bytes(shape, b, dtype=dtype, tp=tp) for b in blocks)
    kv = sum(kv_bytes_per_token(shape, b, dtype=dtype, tp=tp) for b in blocks) * batch * kv_tokens
    return weights + kv


def choose_tensor_parallel(target: Target, shape: ModelShape, blocks: Sequence[BlockConfig], *, batch: int,
                           kv_tokens: int, memory_bytes: float | None = None, tp: int | None = None) -> Target:
    """``target`` with its tensor-parallel degree chosen for this model (or ``tp``, checked).

    The smallest valid degree at which the model fits ``memory_bytes`` per device (default: 90% of
    the device's memory); when it fits at none, the largest valid degree (the child must then fit:
    the MIP's memory budget). The CPU target is one process: tensor parallelism 1.
    """
    if target.is_cpu:
        if tp not in (None, 1):
            raise UnknownTargetError(f"--tp {tp}: the cpu target is one process; tensor parallelism must be 1")
        return target.with_tensor_parallel(1)
    valid = valid_tensor_parallel(target.count, num_attention_heads=shape.num_attention_heads, blocks=blocks)
    if tp is not None:
        if tp not in valid:
            raise UnknownTargetError(
                f"--tp {tp} is not valid for this model on {target.count}x{target.accelerator.name}: engines split "
                f"{shape.num_attention_heads} query heads, the KV heads and the FFN widths evenly; valid degrees: "
                f"{', '.join(map(str, valid))}")
        return target.with_tensor_parallel(tp)
    limit = memory_bytes if memory_bytes is not None else MEMORY_MARGIN * target.accelerator.memory_bytes
    for degree in valid:
        need = memory_per_device(shape, blocks, dtype=target.dtype, tp=degree, batch=batch, kv_tokens=kv_tokens)
        if need <= limit:
            return target.with_tensor_parallel(degree)
    return target.with_tensor_parallel(valid[-1])
