"""The streamed export from a model directory: the files of the in-memory export, byte for byte,
written one tensor at a time; and the streamed safetensors writer under it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from puzzle.errors import CorruptArtifactError, ExportError
from puzzle.export import export_decilm, export_decilm_dir
from puzzle.export.memory import export_peak_bytes
from puzzle.io import save_safetensors, save_safetensors_streamed
from puzzle.loading import load_config, load_model, resolve_source, save_runtime
from tests.model.test_runtime import hetero_model

ROOT = Path(__file__).resolve().parents[2]


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _same_models(a: Path, b: Path) -> None:
    x, y = load_model(a, dtype=None).state_dict(), load_model(b, dtype=None).state_dict()
    assert x.keys() == y.keys()
    for k in x:
        assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), k


@pytest.fixture(scope="module")
def runtime_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    """A heterogeneous runtime model (linear and no-op sub-blocks, untied head) with tokenizer-side files."""
    out = tmp_path_factory.mktemp("rt") / "model"
    save_runtime(hetero_model(), out)
    (out / "generation_config.json").write_text('{"max_length": 7}\n')
    return out


@pytest.mark.parametrize("dtype,shard", [(None, 5 * 2**30), (torch.bfloat16, 5 * 2**30), (None, 40_000)])
def test_streamed_export_equals_the_in_memory_export(runtime_dir, tmp_path, dtype, shard):
    want = export_decilm(load_model(runtime_dir, dtype=None), tmp_path / "want", source_dir=runtime_dir, dtype=dtype,
                         max_shard_bytes=shard)
    got = export_decilm_dir(runtime_dir, tmp_path / "got", dtype=dtype, max_shard_bytes=shard)
    assert _files(got) == _files(want)  # config, code, tokenizer files, shards and index: identical bytes
    assert (shard < 2**20) == (got / "model.safetensors.index.json").is_file()
    _same_models(got, want)
    assert json.loads((got / "config.json").read_text())["dtype"] == str(dtype or torch.float32).removeprefix("torch.")
    assert (got / "generation_config.json").is_file()


def test_streamed_export_of_a_tied_hf_parent(tiny_parent_factory, tmp_path):
    parent = tiny_parent_factory("qwen2", tie_word_embeddings=True)  # qkv biases, tied head: nothing to copy for it
    want = export_decilm(load_model(parent, dtype=None), tmp_path / "want", source_dir=parent)
    got = export_decilm_dir(parent, tmp_path / "got")
    assert _files(got) == _files(want)
    assert load_config(got).blocks == load_config(parent).blocks


def test_streamed_export_protects_its_sources(runtime_dir, tmp_path):
    with pytest.raises(ExportError, match="overlaps the source"):
        export_decilm_dir(runtime_dir, runtime_dir / "sub")
    with pytest.raises(ExportError, match="overlaps the source"):
        export_decilm_dir(runtime_dir, tmp_path / "tok" / "x", source_dir=tmp_path / "tok")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="not empty"):
        export_decilm_dir(runtime_dir, tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "user data"
    export_decilm_dir(runtime_dir, tmp_path / "busy", overwrite=True)
    assert not (tmp_path / "busy" / "keep.txt").exists() and (tmp_path / "busy" / "config.json").is_file()


def test_a_checkpoint_that_does_not_match_its_config_leaves_nothing(runtime_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((runtime_dir / "config.json").read_text())
    state = load_file(str(runtime_dir / "model.safetensors"))
    missing = dict(state)
    missing.pop("model.norm.weight")
    save_file(missing, str(broken / "model.safetensors"))
    with pytest.raises(CorruptArtifactError, match="has no model.norm.weight"):
        export_decilm_dir(broken, tmp_path / "out")
    save_file({**state, "model.extra": torch.zeros(2)}, str(broken / "model.safetensors"))
    with pytest.raises(CorruptArtifactError, match="unexpected"):
        export_decilm_dir(broken, tmp_path / "out")
    save_file({**state, "model.norm.weight": torch.ones(3)}, str(broken / "model.safetensors"))
    with pytest.raises(CorruptArtifactError, match=r"model.norm.weight: got \(3,\)"):
        export_decilm_dir(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # no output, no temporary directory


def test_streamed_writer_writes_the_bytes_of_save_safetensors(tmp_path):
    """Every dtype safetensors stores, a scalar and an empty tensor; one file and many shards."""
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn, torch.int16, torch.float16,
              torch.bfloat16, torch.int32, torch.float32, torch.float64, torch.int64]
    state = {f"w.{i}": (10 * torch.randn(3, 5 + i, generator=g)).to(d) for i, d in enumerate(dtypes)}
    state.update(scalar=torch.tensor(2.5), empty=torch.zeros(0, 3), view=torch.arange(12.0).reshape(3, 4)[:, 1:])
    specs = {k: (tuple(v.shape), v.dtype) for k, v in state.items()}
    for shard in (2**30, 100):
        a, b = tmp_path / f"a{shard}", tmp_path / f"b{shard}"
        names = save_safetensors(state, a, max_shard_bytes=shard)
        assert save_safetensors_streamed(specs, state.__getitem__, b, max_shard_bytes=shard) == names
        assert _files(a) == _files(b) and (len(names) == 1) == (shard > 2**20)
    with pytest.raises(CorruptArtifactError, match="expected"):
        save_safetensors_streamed(specs, lambda k: state[k].float(), tmp_path / "c")


_PEAK_SCRIPT = """
import sys
from puzzle.export import export_decilm_dir
from puzzle.peak import peak_rss_bytes, reset_peak, rss_bytes
before = rss_bytes()
reset_peak()
export_decilm_dir(sys.argv[1], sys.argv[2], dtype=__import__("torch").bfloat16, max_shard_bytes=64 * 2**20)
print(before, peak_rss_bytes())
"""


@pytest.mark.slow  # writes a 400 MB model and exports it in a subprocess
def test_streamed_export_holds_one_tensor_not_the_model(tmp_path):
    from puzzle.model import PuzzleConfig
    from tests.evaluation.sharded_worker import write_random_model

    config = PuzzleConfig(vocab_size=8000, hidden_size=512, num_attention_heads=8, num_key_value_heads=4,
                          intermediate_size=2048, num_hidden_layers=24, tie_word_embeddings=False)
    src = write_random_model(tmp_path / "src", config, seed=0)
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(src), str(tmp_path / "out")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    before, peak = map(int, r.stdout.split()[-2:])
    in_flight = export_peak_bytes(config, stored_bytes=4, dtype_bytes=2) - export_peak_bytes(
        config, stored_bytes=0, dtype_bytes=0)  # the formula without the process itself
    print(f"model {total / 2**20:.0f} MiB, stage peak {(peak - before) / 2**20:.0f} MiB, "
          f"formula (one tensor in flight) {in_flight / 2**20:.0f} MiB")
    assert peak - before < 0.15 * total
    assert peak - before < 1.3 * in_flight + 32 * 2**20  # + the interpreter's own allocations
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) == 4  # 200 MB of bf16 in 64 MiB shards
    assert resolve_source(tmp_path / "out").kind == "decilm"
