"""A random parent of a real model's shape: a Hugging Face Llama directory, written tensor by tensor.

    python benchmarks/random_parent.py llama-3.2-1b runs/llama-1b-random
    python benchmarks/random_parent.py llama-3.2-1b runs/small --layers 2 --vocab 49152

Stands in for a real checkpoint where one cannot be downloaded (scale tests, GPU smoke runs): the
same config, tensor names, shapes and sharding (``model-0000i-of-0000N.safetensors`` with a
``model.safetensors.index.json``), random weights (N(0, 0.02), norms 1.0) and SmolLM2's tokenizer
(its ids are below every vocabulary here). Its numbers mean nothing; its sizes are the real ones.

Memory: one tensor at a time is generated (in float32 blocks of rows) and written
(:func:`puzzle.io.save_safetensors_streamed`), so writing the 2.5 GB Llama-3.2-1B holds its
largest tensor, the 0.5 GB embedding, not the model. Writing is atomic (a temporary directory
renamed into place).

A fixture, not product code: import it as ``benchmarks.random_parent`` with the checkout's root
on ``sys.path`` (pytest puts it there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

LLAMA_3_2_1B: dict[str, Any] = {
    "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True, "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
}
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": LLAMA_3_2_1B,  # 1.24 B parameters
    "llama-3.2-1b-quick": {**LLAMA_3_2_1B, "num_hidden_layers": 2, "vocab_size": 49152},  # 0.22 B: a smoke run
}
"""Hugging Face Llama config fields of each named shape."""

STD = 0.02
"""Init std of every matrix: activations stay O(1..10) through 16 pre-norm layers."""
_BLOCK = 1 << 24  # elements generated at once (64 MB in float32)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_shape(shape: str | dict[str, Any]) -> dict[str, Any]:
    """A named shape, or a dict of overrides on the shape named by its ``base`` key (default llama-3.2-1b)."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
        return dict(SHAPES[shape])
    overrides = dict(shape)
    return {**resolve_shape(overrides.pop("base", "llama-3.2-1b")), **overrides}


def tensor_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """The weights of a Llama checkpoint of this config, in the order transformers stores them."""
    H, F, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or H // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (V, H))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (H,)), (p + "self_attn.q_proj.weight", (q, H)),
                (p + "self_attn.k_proj.weight", (kv, H)), (p + "self_attn.v_proj.weight", (kv, H)),
                (p + "self_attn.o_proj.weight", (H, q)), (p + "post_attention_layernorm.weight", (H,)),
                (p + "mlp.gate_proj.weight", (F, H)), (p + "mlp.up_proj.weight", (F, H)),
                (p + "mlp.down_proj.weight", (H, F))]
    out.append(("model.norm.weight", (H,)))
    if not cfg.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (V, H)))
    return out


def _random_tensor(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Ones for a norm; N(0, STD) otherwise, drawn in float32 blocks of rows (no float32 copy of the whole)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    rows, cols = shape
    out = torch.empty(shape, dtype=dtype)
    step = max(1, _BLOCK // cols)
    for r in range(0, rows, step):
        out[r:r + step] = torch.empty(min(step, rows - r), cols).normal_(0.0, STD, generator=gen)  # (rows', cols)
    return out


def _tokenizer_dir(tokenizer_from: str | Path) -> Path:
    path = Path(tokenizer_from)
    if path.is_dir():
        return path
    from puzzle.parents.embedded import embedded_tokenizer

    return embedded_tokenizer(str(tokenizer_from))  # the tokenizer alone: no weight conversion


def write_random_parent(shape: str | dict[str, Any], out_dir: str | Path, *, dtype: str = "bfloat16", seed: int = 0,
                        tokenizer_from: str | Path | None = "smollm2-135m", max_shard_bytes: int = 2**30,
                        overwrite: bool = False) -> Path:
    """Write a random Llama of ``shape`` (a name in :data:`SHAPES` or a dict of overrides, see
    :func:`resolve_shape`) to ``out_dir``: config.json, safetensors shards of at most
    ``max_shard_bytes`` (with an index when more than one) and the tokenizer files of
    ``tokenizer_from`` (an embedded parent's name or a directory; None: no tokenizer)."""
    from puzzle.io import atomic_directory, atomic_write_json, copy_tokenizer_files, save_safetensors_streamed

    cfg = resolve_shape(shape)
    torch_dtype = _DTYPES[dtype]
    specs = {name: (dims, torch_dtype) for name, dims in tensor_shapes(cfg)}
    gen = torch.Generator().manual_seed(seed)  # drawn in the order the writer asks for tensors
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        save_safetensors_streamed(specs, lambda name: _random_tensor(specs[name][0], gen, torch_dtype), tmp,
                                  max_shard_bytes=max_shard_bytes)
        bos = eos = None
        if tokenizer_from is not None:
            from transformers import AutoTokenizer

            source = _tokenizer_dir(tokenizer_from)
            copy_tokenizer_files(source, tmp)
            tok = AutoTokenizer.from_pretrained(str(source))
            bos, eos = tok.bos_token_id, tok.eos_token_id
        atomic_write_json(tmp / "config.json", {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                **cfg, "bos_token_id": bos, "eos_token_id": eos,
                                                "torch_dtype": dtype})
    return Path(out_dir)


def parameter_count(shape: str | dict[str, Any]) -> int:
    """Parameters of a shape (a tied head counted once)."""
    return sum(torch.Size(s).numel() for _, s in tensor_shapes(resolve_shape(shape)))


_MEASURE = """
import gc, json, sys, torch
from puzzle.loading import load_config, load_layers, load_model
from puzzle.peak import peak_rss_bytes, reset_peak, rss_bytes
d, out = sys.argv[1], {}
load_config(d)  # imports and config parsing before the first baseline
for what in sys.argv[2:]:
    base = rss_bytes()
    reset_peak()
    model = load_model(d) if what == "full" else load_layers(d, [0], embed=what == "rank0", head=what == "rank0")
    held = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    out[what] = {"peak": peak_rss_bytes() - base, "held": held}
    del model
    gc.collect()
print(json.dumps(out))
"""


def measure_load_peaks(directory: str | Path, *, kinds: tuple[str, ...] = ("layer", "rank0", "full")) -> dict[str, dict[str, int]]:
    """Peak RSS increase and parameter bytes held (bytes) of loads in float32: ``layer`` =
    load_layers([0]), ``rank0`` = layer 0 + embedding + head, ``full`` = load_model.

    Measured in a fresh process whose allocator returns every large block on free
    (``MALLOC_MMAP_THRESHOLD_``), so no load reuses memory that an earlier one freed.
    """
    import os
    import subprocess

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(directory), *kinds], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES), help="the model shape to copy")
    ap.add_argument("out", type=Path, help="the directory to write (must not exist, or be empty)")
    ap.add_argument("--layers", type=int, help="override the number of layers")
    ap.add_argument("--vocab", type=int, help="override the vocabulary size (>= 49152 for SmolLM2's tokenizer)")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES), help="stored dtype")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    ap.add_argument("--max-shard-gb", type=float, default=1.0, help="largest safetensors shard, in GiB")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    ap.add_argument("--measure", action="store_true",
                    help="then measure the peak RSS of loading 1 layer, 1 layer + embedding + head, and all (fp32)")
    args = ap.parse_args(argv)

    from puzzle.peak import peak_rss_bytes, reset_peak

    shape: dict[str, Any] = {"base": args.shape}
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    if args.vocab is not None:
        shape["vocab_size"] = args.vocab
    reset_peak()
    t0 = time.perf_counter()
    out = write_random_parent(shape, args.out, dtype=args.dtype, seed=args.seed,
                              max_shard_bytes=int(args.max_shard_gb * 2**30), overwrite=args.overwrite)
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out}: {parameter_count(shape) / 1e9:.3f} B parameters, {size / 2**30:.2f} GiB in "
          f"{len(list(out.glob('*.safetensors')))} file(s), {seconds:.1f} s, peak RSS {peak_rss_bytes() / 2**20:.0f} MiB")
    if args.measure:
        for kind, m in measure_load_peaks(out).items():
            print(f"load {kind:5s}: peak RSS +{m['peak'] / 2**20:.0f} MiB, parameters held {m['held'] / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
