"""Memory of the library build and BLD on one rank, in closed form from the parent's config.

    sizes = layer_sizes(parent_config, space)             # per layer: parent and variant parameters
    ranges = split_layers(layer_costs(sizes), world)      # the layers each rank owns (as BLD splits them)
    bld_fixed_bytes(parent_config, sizes, ranges[r], first=r == 0, ...)   # what every round of rank r holds
    TRAIN_BYTES_PER_PARAM * sum(params of a round)        # what the round's variants add

A rank of BLD holds, through every round,

* the process itself (Python, torch, puzzle): :data:`PROCESS_BYTES` (on a GPU also a CUDA context);
* its parent layers (the teacher) in the compute dtype, and on rank 0 the embedding;
* the activations of one batch: the teacher's streams x, h, y (B, T, H) and one layer's
  internals, plus the autograd graph of the one variant training at a time (variants train one
  after another, each freeing its graph);

and per round the variants it trains: fp32 weights, gradients and two AdamW moments, 16 bytes per
parameter. The library build holds the same teacher, the calibration statistics (``X^T X`` and
``X^T Y``, float64, per least-squares sub-block) and its round's variants in fp32 (4 bytes per
parameter). ``benchmarks/scale.py`` checks these counts against measured peaks. No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from block_library.space import SearchSpace
from puzzle.summary import attention_params, ffn_params

TRAIN_BYTES_PER_PARAM = 16
"""fp32 master weight, gradient and two AdamW moments."""
HELD_ONE_STEP_BYTES_PER_PARAM = 12
"""What a round of one optimizer step holds at its peak: the weights, and as each layer's AdamW steps
(layer after layer) its gradients give way to its two moments, so gradients and moments of a layer are
never held together. From the second step on, the backward refills every gradient beside the moments."""
INIT_BYTES_PER_PARAM = 4
"""An initialized (fp32) variant module, before training."""
PROCESS_BYTES = 0.58 * 2**30
"""Resident memory of a rank outside its stage's work: Python, torch, transformers, pandas, puzzle, the
tokenizer, a gloo process group and what earlier stages leave in the heap. Measured on the idle ranks of
2-rank torchrun searches on CPU (torch 2.13, transformers 5.19; ``benchmarks/scale.py``, both shapes): 0.53-0.58
GiB, and 0.60-0.65 where scikit-learn is installed (the ``eval`` extra brings it), which transformers then imports
with its generation code. Importing torch, pandas, transformers' Llama and puzzle alone takes 0.46 GiB (0.53)."""
CUDA_CONTEXT_BYTES = 0.6 * 2**30
"""Device memory the CUDA context and cuBLAS workspaces take before any tensor."""


@dataclass(frozen=True)
class VariantSize:
    key: str
    """``L007.ffn.swiglu:1024``, as :class:`block_library.variant.Variant` names it."""
    subblock: str
    kind: str
    params: int
    width: int
    """Widest activation of its forward: the FFN width, the hidden size for linear, the q/k/v width for GQA."""


@dataclass(frozen=True)
class LayerSizes:
    layer: int
    parent_params: int
    trainable: tuple[VariantSize, ...]
    """Variants BLD trains: not the parent's own, not a no-op."""
    lsq_subblocks: int
    """Sub-blocks (0-2) that offer a least-squares ``linear`` variant: their statistics live in the build."""
    ffn_width: int
    """The parent's FFN width (0 for a no-op FFN)."""

    @property
    def trainable_params(self) -> int:
        return sum(v.params for v in self.trainable)


def layer_sizes(config: Any, space: SearchSpace | None = None) -> list[LayerSizes]:
    """Every layer's parent and trainable-variant parameter counts under ``space`` (default: the default space)."""
    space = space or SearchSpace()
    out = []
    for lv, block in zip(space.layer_variants(config.blocks, num_attention_heads=config.num_attention_heads),
                         config.blocks):
        trainable, lsq = [], 0
        for sub, options in (("attention", lv.attention), ("ffn", lv.ffn)):
            for j, c in enumerate(options):
                if c.kind == "linear" and j > 0:
                    lsq += 1
                if j == 0 or c.kind == "no_op":
                    continue
                params = attention_params(c, config) if sub == "attention" else ffn_params(c, config)
                trainable.append(VariantSize(f"L{lv.layer:03d}.{sub}.{c.label}", sub, c.kind, params,
                                             _width(c, sub, config)))
        parent = attention_params(block.attention, config) + ffn_params(block.ffn, config)
        width = block.ffn.intermediate_size if block.ffn.kind == "swiglu" else 0
        out.append(LayerSizes(lv.layer, parent, tuple(trainable), lsq, width or 0))
    return out


def _width(c: Any, sub: str, config: Any) -> int:
    if c.kind == "linear":
        return config.hidden_size
    if sub == "ffn":
        return c.intermediate_size
    return (config.num_attention_heads + 2 * c.num_key_value_heads) * config.head_dim


def layer_costs(sizes: Sequence[LayerSizes]) -> list[float]:
    """What balancing ranks weighs per layer: the parent layer once, each trainable variant three times
    (forward, backward: about 3x a forward), the same weights ``open_session`` splits by."""
    return [float(s.parent_params + 3 * s.trainable_params) for s in sizes]


def embedding_params(config: Any) -> int:
    return config.vocab_size * config.hidden_size


def teacher_bytes(config: Any, sizes: Sequence[LayerSizes], layers: Sequence[int], *, first: bool,
                  dtype_bytes: int) -> float:
    """The rank's frozen parent layers, and on rank 0 the embedding, in the compute dtype."""
    params = sum(sizes[l].parent_params for l in layers) + (embedding_params(config) if first else 0)
    return float(params * dtype_bytes)


def activation_bytes(config: Any, sizes: Sequence[LayerSizes], layers: Sequence[int], *, batch: int, seq_len: int,
                     dtype_bytes: int, training: bool = True) -> float:
    """Peak activations of one batch (B, T) on the rank: the teacher's streams and the larger of one layer's
    internals and (``training``) the autograd graph of its widest trainable variant, in fp32: the teacher's
    layer returns its streams before the variants of that layer train on them (``block_library.teacher.run_pass``)."""
    if not layers:
        return 0.0
    H, BT = config.hidden_size, batch * seq_len
    heads, hd = config.num_attention_heads, config.head_dim
    streams = 4 * BT * H * dtype_bytes + 2 * BT * hd * dtype_bytes  # x, h, y, a norm; RoPE cos and sin
    ffn_width = max(sizes[l].ffn_width for l in layers)
    # attention runs as a fused kernel (flash attention on the CPU as on GPUs): no (B, nh, T, T) scores
    teacher_layer = max(3 * BT * ffn_width, 3 * BT * heads * hd) * dtype_bytes
    graph = 0.0
    if training:
        widths = [v.width for l in layers for v in sizes[l].trainable]
        widest = max(widths, default=0)
        # saved for backward and their gradients: the normed input and output (B, T, H), and 4 tensors
        # of the widest intermediate (gate, up, silu, product / q, k, v, attention output) in fp32
        graph = 2 * (2 * BT * H + 4 * BT * widest) * 4
        if any(v.kind == "gqa" for l in layers for v in sizes[l].trainable):
            graph = max(graph, 2 * (2 * BT * H + 4 * BT * heads * hd) * 4)
    return streams + max(teacher_layer, graph)


def bld_fixed_bytes(config: Any, sizes: Sequence[LayerSizes], layers: Sequence[int], *, first: bool,
                    batch: int, seq_len: int, dtype_bytes: int, device: str = "cpu") -> float:
    """A BLD rank's memory that every round holds (on its device; the process itself included on CPU)."""
    base = PROCESS_BYTES if device == "cpu" else CUDA_CONTEXT_BYTES
    return (base + teacher_bytes(config, sizes, layers, first=first, dtype_bytes=dtype_bytes)
            + activation_bytes(config, sizes, layers, batch=batch, seq_len=seq_len, dtype_bytes=dtype_bytes))


def _refits(sizes: Sequence[LayerSizes], layers: Sequence[int], ffn_refit: bool) -> list[int]:
    """The layers among ``layers`` whose pruned FFNs are refit (``bld.ffn_refit``): those with a narrower swiglu."""
    return [l for l in layers if ffn_refit and any(v.kind == "swiglu" for v in sizes[l].trainable)]


def calibration_bytes(config: Any, sizes: Sequence[LayerSizes], layers: Sequence[int]) -> float:
    """The build's statistics: float64 ``X^T X`` and ``X^T Y`` (H, H) per least-squares sub-block, and
    the FFN channel importances."""
    H = config.hidden_size
    return float(sum(sizes[l].lsq_subblocks * 2 * H * H * 8 + sizes[l].ffn_width * 8 for l in layers))


def gram_bytes(sizes: Sequence[LayerSizes], layers: Sequence[int], *, ffn_refit: bool) -> float:
    """The FFN refit's statistics (``bld.ffn_refit``): a float64 (m, m) Gram matrix per layer with a pruned FFN,
    held in host memory (the solve runs on the device, :func:`build_fixed_bytes`)."""
    return float(sum(sizes[l].ffn_width ** 2 * 8 for l in _refits(sizes, layers, ffn_refit)))


def build_fixed_bytes(config: Any, sizes: Sequence[LayerSizes], layers: Sequence[int], *, first: bool,
                      batch: int, seq_len: int, dtype_bytes: int, device: str = "cpu", ffn_refit: bool = False) -> float:
    """A library-build rank's memory outside its round of variants: teacher, statistics, one least-squares
    solve (three float64 (H, H) work arrays, or (m, m) for an FFN refit) and the activations of a validation
    batch. The FFN refit's Gram matrices live in host memory: counted here on a CPU only."""
    base = PROCESS_BYTES if device == "cpu" else CUDA_CONTEXT_BYTES
    H = config.hidden_size
    solve = 3 * H * H * 8 if any(sizes[l].lsq_subblocks for l in layers) else 0
    solve = max([solve] + [3 * sizes[l].ffn_width ** 2 * 8 for l in _refits(sizes, layers, ffn_refit)])
    gram = gram_bytes(sizes, layers, ffn_refit=ffn_refit) if device == "cpu" else 0.0
    return (base + teacher_bytes(config, sizes, layers, first=first, dtype_bytes=dtype_bytes)
            + calibration_bytes(config, sizes, layers) + gram + solve
            + activation_bytes(config, sizes, layers, batch=batch, seq_len=seq_len, dtype_bytes=dtype_bytes,
                               training=False))


def train_peak_bytes_per_param(steps: int) -> int:
    """Bytes per trainable parameter a BLD round holds at its peak: 16, or 12 for a one-step round."""
    return TRAIN_BYTES_PER_PARAM if steps > 1 else HELD_ONE_STEP_BYTES_PER_PARAM


def round_items(sizes: Sequence[LayerSizes], layers: Sequence[int]) -> list[tuple[str, int]]:
    """``(key, params)`` of the rank's trainable variants in layer order: what rounds partition."""
    return [(v.key, v.params) for l in layers for v in sizes[l].trainable]
