"""Streamed parents: ``load_layers`` reads only the tensors asked for, exactly as ``load_model`` does,
one tensor at a time (sharded or not), and a rank's memory is its layers, not the model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from benchmarks.random_parent import measure_load_peaks, parameter_count, write_random_parent
from block_library.distributed import Shard
from block_library.teacher import Teacher
from puzzle.errors import CorruptArtifactError
from puzzle.export import export_decilm
from puzzle.io import load_safetensors, save_safetensors
from puzzle.loading import load_config, load_layers, load_model, resolve_source, save_runtime, tensor_files

CASES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2-bias": ("qwen2", {"tie_word_embeddings": False}),
    "mistral": ("mistral", {"sliding_window": None}),
}
EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


def assert_streamed_equals_full(part, full, layers, *, embed: bool, head: bool) -> None:
    """Every tensor asked for equals the full load's exactly; every other one is on meta."""
    tied = full.config.tie_word_embeddings
    want = {n for n, _ in full.named_parameters() if n.startswith(tuple(f"model.layers.{l}." for l in layers))}
    want |= {EMBED} if embed or (head and tied) else set()
    want |= {NORM} | ({EMBED} if tied else {HEAD}) if head else set()
    full_params = dict(full.named_parameters())
    for name, p in part.named_parameters():
        if name in want:
            assert p.device.type == "cpu" and p.dtype == full_params[name].dtype, name
            assert torch.equal(p, full_params[name]), name
        else:
            assert p.is_meta, name
    assert part.model.rotary_emb._inv_freq.device.type == "cpu"  # the RoPE table is real
    if tied:
        assert part.lm_head.weight is part.model.embed_tokens.weight


@pytest.mark.parametrize("case", list(CASES))
def test_layers_read_alone_equal_the_full_load(case, tiny_parent_factory):
    kind, overrides = CASES[case]
    d = tiny_parent_factory(kind, num_hidden_layers=3, **overrides)
    full = load_model(d)
    for layers, embed, head in (([1], False, False), ([0, 1], True, False), ([2], False, True), ([], True, True)):
        assert_streamed_equals_full(load_layers(d, layers, embed=embed, head=head), full, layers, embed=embed, head=head)
    everything = load_layers(d, range(3), embed=True, head=True)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(everything(ids).logits, full(ids).logits)


def test_bfloat16_and_stored_dtype(tiny_llama_dir):
    full = load_model(tiny_llama_dir, dtype=torch.bfloat16)
    part = load_layers(tiny_llama_dir, [1], dtype=torch.bfloat16)
    assert_streamed_equals_full(part, full, [1], embed=False, head=False)
    stored = load_layers(tiny_llama_dir, [0], dtype=None)  # save_pretrained wrote float32
    assert stored.model.layers[0].mlp.up_proj.weight.dtype == torch.float32


def _resave_sharded(src, dst, *, index: bool = True):
    """The same parent with its weights in several small safetensors files (with or without the index)."""
    shutil.copytree(src, dst)
    state = load_safetensors(dst)
    (dst / "model.safetensors").unlink()
    files = save_safetensors(state, dst, max_shard_bytes=20_000)  # a few tensors per file
    if not index:
        (dst / "model.safetensors.index.json").unlink()
    return files


@pytest.mark.parametrize("index", [True, False])
def test_sharded_checkpoint_loads_the_same(tiny_parent_factory, tmp_path, index):
    d = tiny_parent_factory("llama", num_hidden_layers=3)
    files = _resave_sharded(d, tmp_path / "sharded", index=index)
    assert len(files) > 3
    where = tensor_files(tmp_path / "sharded")
    assert len(set(where.values())) == len(files) and len(where) == len(load_safetensors(d))
    full = load_model(d)
    assert_streamed_equals_full(load_layers(tmp_path / "sharded", [2], head=True), full, [2], embed=False, head=True)
    assert_streamed_equals_full(load_model(tmp_path / "sharded"), full, range(3), embed=True, head=True)


def test_runtime_and_decilm_directories(tiny_llama_dir, tmp_path):
    full = load_model(tiny_llama_dir)
    src = resolve_source(tiny_llama_dir)
    for d in (save_runtime(full, tmp_path / "rt", source=src), export_decilm(full, tmp_path / "deci")):
        assert resolve_source(d).kind in ("runtime", "decilm")
        assert_streamed_equals_full(load_layers(d, [1], embed=True, head=True), full, [1], embed=True, head=True)


def test_teacher_takes_only_loaded_layers(tiny_parent_factory):
    d = tiny_parent_factory("llama", num_hidden_layers=3)
    model = load_layers(d, [1, 2])
    teacher = Teacher(model, Shard(rank=1, world=2, layers=range(1, 3), device=torch.device("cpu")), dtype=torch.float32)
    x = torch.randn(2, 5, 64)
    h, y = teacher.layer(1, x, teacher.context(2, 5))
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="layer 0 of the parent was not loaded"):
        Teacher(model, Shard(rank=1, world=3, layers=range(0, 1), device=torch.device("cpu")), dtype=torch.float32)
    with pytest.raises(ValueError, match="the embedding of the parent was not loaded"):
        Teacher(model, Shard(rank=0, world=2, layers=range(1, 3), device=torch.device("cpu")), dtype=torch.float32)


def test_bad_requests_and_files_are_clear_errors(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"layers \[5\] are outside 0..1"):
        load_layers(tiny_llama_dir, [5])
    shape = shutil.copytree(tiny_llama_dir, tmp_path / "shape")
    cfg = json.loads((shape / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (shape / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CorruptArtifactError, match=r"mlp\.(down|gate|up)_proj\.weight: checkpoint shape"):
        load_layers(shape, [0])
    trunc = shutil.copytree(tiny_llama_dir, tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptArtifactError, match="truncated"):
        load_layers(trunc, [1])
    cfg = json.loads((tiny_llama_dir / "config.json").read_text())
    deeper = shutil.copytree(tiny_llama_dir, tmp_path / "deeper")
    (deeper / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CorruptArtifactError, match="no model.layers.2.input_layernorm.weight"):
        load_layers(deeper, [2])


# --- random parents of a real shape ------------------------------------------------------------------

SMALL = {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 500, "max_position_embeddings": 16384}


def test_llama_3_2_1b_shape_has_its_parameter_count():
    assert parameter_count("llama-3.2-1b") == 1_235_814_400


@pytest.mark.parametrize("tied", [True, False])
def test_random_parent_is_a_transformers_llama(tmp_path, tied):
    from transformers import AutoModelForCausalLM

    d = write_random_parent({**SMALL, "tie_word_embeddings": tied}, tmp_path / "p", dtype="float32",
                            tokenizer_from=None, max_shard_bytes=40_000)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    cfg = load_config(d)
    assert (cfg.num_hidden_layers, cfg.rope_parameters["rope_type"], cfg.tie_word_embeddings) == (3, "llama3", tied)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    model = load_model(d)
    ids = torch.randint(0, 500, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = ref(ids).logits, model(ids).logits
    assert torch.isfinite(got).all() and (want - got).abs().max().item() < 1e-5
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert all(torch.equal(p, torch.ones_like(p)) for p in norms)
    assert abs(model.model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 2e-3


@pytest.mark.slow
def test_one_layer_costs_one_layer_of_memory(tmp_path):
    """A 4-layer parent of ~200 MB (bf16): reading layer 0 in fp32 peaks at that layer plus about a tensor
    in flight, a small fraction of the full load (whose peak holds the model and the file)."""
    shape = {"num_hidden_layers": 4, "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
             "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 32000}
    d = write_random_parent(shape, tmp_path / "p", tokenizer_from=None, max_shard_bytes=100 * 2**20)
    peaks = measure_load_peaks(d)
    MiB = 2**20
    print({k: {a: round(b / MiB) for a, b in v.items()} for k, v in peaks.items()})
    layer, rank0, full = peaks["layer"], peaks["rank0"], peaks["full"]
    largest = 4096 * 1024 * 4  # one FFN matrix in fp32 (16 MiB)
    assert layer["held"] == 4 * (3 * 1024 * 1024 + 3 * 1024 * 4096 + 2 * 1024)  # 60 MiB: layer 0 in fp32
    assert layer["peak"] < layer["held"] + 2 * largest + 16 * MiB
    assert rank0["peak"] < rank0["held"] + 2 * 32000 * 1024 * 4 + 16 * MiB  # + the embedding in flight
    assert full["held"] > 6 * layer["held"] and layer["peak"] < full["peak"] / 5


@pytest.mark.slow
def test_smollm2_layers_equal_the_full_load(smollm2_source, smollm2):
    layers = [0, 17, 29]
    part = load_layers(smollm2_source, layers, embed=True, head=True)
    assert_streamed_equals_full(part, smollm2, layers, embed=True, head=True)
    assert sum(p.numel() for p in part.parameters() if not p.is_meta) < 0.45 * smollm2.num_parameters()
