"""Library.assemble_to: the runtime directory of assemble() + save_runtime(), byte for byte, without the model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from block_library import build_library, open_library
from puzzle.errors import SchemaError
from puzzle.loading import Source, load_model, save_runtime
from puzzle.schema import AttentionConfig, BlockConfig, FFNConfig
from tests.block_library.conftest import tiny_config

pytestmark = pytest.mark.slow  # builds a library

BLOCKS = [BlockConfig(attention=AttentionConfig.gqa(1), ffn=FFNConfig.swiglu(48)),
          BlockConfig(attention=AttentionConfig.no_op(), ffn=FFNConfig.linear()),
          BlockConfig(attention=AttentionConfig.linear(), ffn=FFNConfig.no_op())]


@pytest.fixture(scope="module")
def library(tiny_text_parent, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lib") / "lib"
    build_library(str(tiny_text_parent), out, tiny_config(), progress=False)
    return out


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("dtype", [torch.float32, None, torch.bfloat16])
def test_assemble_to_writes_what_save_runtime_writes(library, tmp_path, dtype):
    lib = open_library(library)
    want = save_runtime(lib.assemble(BLOCKS, dtype=dtype), tmp_path / "want",
                        source=Source(name=str(library), kind="runtime", directory=library))
    got = lib.assemble_to(BLOCKS, tmp_path / "got", dtype=dtype)
    assert _files(got) == _files(want)  # config.json, tensors, tokenizer files
    a, b = load_model(got, dtype=None).state_dict(), load_model(want, dtype=None).state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert load_model(got).config.blocks == BLOCKS


def test_assemble_to_initial_variants_and_the_parent(library, tmp_path, tiny_text_parent):
    lib = open_library(library)
    got = lib.assemble_to(lib.parent_config.blocks, tmp_path / "parent", initial=True)
    parent, child = load_model(tiny_text_parent), load_model(got)
    ids = torch.randint(0, 49152, (2, 12))
    with torch.no_grad():
        assert torch.equal(child(ids).logits, parent(ids).logits)


def test_assemble_to_refuses_bad_input(library, tmp_path):
    lib = open_library(library)
    with pytest.raises(SchemaError, match="has 2 blocks"):
        lib.assemble_to(BLOCKS[:2], tmp_path / "a")
    with pytest.raises(SchemaError, match="no ffn variant 'swiglu:50'"):
        lib.assemble_to([BlockConfig(attention=AttentionConfig.gqa(2), ffn=FFNConfig.swiglu(50))] * 3, tmp_path / "b")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        lib.assemble_to(BLOCKS, tmp_path / "busy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
