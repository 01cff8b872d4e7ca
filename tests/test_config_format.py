"""Malformed files a user hands puzzle: a model's config.json with a field missing or mistyped, a binary
or unreadable --config, a directory for a file. Each is one line, exit status 2, no traceback, and
nothing written to --out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from puzzle.cli.main import main
from puzzle.config_json import check_config_json
from puzzle.errors import ConfigError, CorruptArtifactError, SchemaError
from puzzle.io import read_json_file, read_yaml_config
from puzzle.loading import load_config
from puzzle.schema import load_blocks

GOOD = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 96, "rms_norm_eps": 1e-6,
        "rope_theta": 10000, "rope_scaling": None, "tie_word_embeddings": False, "head_dim": None}


def _refusal(argv: list[str], capsys) -> str:
    """Run ``puzzle argv``; assert exit 2, one line on stderr and no traceback; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _edited(tmp_path: Path, parent: Path, edit) -> Path:
    copy = Path(shutil.copytree(parent, tmp_path / "parent"))
    config = json.loads((copy / "config.json").read_text())
    edit(config)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


# --- the field check itself ---------------------------------------------------------------------------

def test_a_good_hf_config_passes():
    check_config_json(GOOD, where="config.json", kind="hf")


@pytest.mark.parametrize("edit,message", [
    ({"num_hidden_layers": None}, "config.json: num_hidden_layers is missing; puzzle needs it (the number of "
                                  "decoder layers, a positive integer)"),
    ({"hidden_size": "64"}, "config.json: hidden_size must be a positive integer, got '64'"),
    ({"hidden_size": 64.0}, "config.json: hidden_size must be a positive integer, got 64.0"),
    ({"vocab_size": True}, "config.json: vocab_size must be a positive integer, got True"),
    ({"num_attention_heads": -4}, "config.json: num_attention_heads must be a positive integer, got -4"),
    ({"num_key_value_heads": 0}, "config.json: num_key_value_heads must be a positive integer, got 0"),
    ({"rms_norm_eps": "1e-6"}, "config.json: rms_norm_eps must be a positive number, got '1e-6'"),
    ({"rope_scaling": "linear"}, "config.json: rope_scaling must be a JSON object, got 'linear'"),
    ({"tie_word_embeddings": "yes"}, "config.json: tie_word_embeddings must be true or false, got 'yes'"),
    ({"num_key_value_heads": 3}, "config.json: num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"num_attention_heads": 5, "num_key_value_heads": 5},
     "config.json: hidden_size 64 is not a multiple of num_attention_heads 5 and no head_dim is given"),
])
def test_a_missing_or_mistyped_field_names_the_file_the_field_and_the_value(edit, message):
    cfg = {k: v for k, v in {**GOOD, **edit}.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        check_config_json(cfg, where="config.json", kind="hf")
    assert str(e.value) == message


def test_what_is_required_depends_on_the_source_kind():
    runtime = {k: v for k, v in GOOD.items() if k not in ("num_hidden_layers", "intermediate_size")}
    check_config_json({**runtime, "block_configs": []}, where="c", kind="runtime")  # layers come from the blocks
    with pytest.raises(ConfigError, match="c: block_configs is missing"):
        check_config_json(runtime, where="c", kind="decilm")
    with pytest.raises(ConfigError, match="c: num_hidden_layers is missing"):
        check_config_json(runtime, where="c", kind="hf")


# --- config.json of a parent, through the CLI ---------------------------------------------------------

@pytest.mark.parametrize("edit,message", [
    (lambda c: c.pop("num_hidden_layers"), "num_hidden_layers is missing"),
    (lambda c: c.update(hidden_size="64"), "hidden_size must be a positive integer, got '64'"),
    (lambda c: c.update(num_attention_heads=-4), "num_attention_heads must be a positive integer, got -4"),
])
def test_inspect_and_search_refuse_a_bad_config_json_in_one_line(edit, message, tiny_llama_dir, tmp_path, capsys):
    parent = _edited(tmp_path, tiny_llama_dir, edit)
    where = f"puzzle inspect: error: {parent / 'config.json'}: {message}"
    assert _refusal(["inspect", str(parent)], capsys).startswith(where)
    out = tmp_path / "run"
    line = _refusal(["search", "--model", str(parent), "--out", str(out)], capsys)
    assert line.startswith(f"puzzle search: error: {parent / 'config.json'}: {message}")
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("content,message", [
    (b'{"hidden_size": 64,', "is not valid JSON"),
    (b"[1, 2]", "must hold a JSON object"),
    (b"\xff\xfe binary", "is not UTF-8 text (byte 0xff at offset 0); is it a binary file?"),
    (b"\x00\x01 binary", "is binary, not text (it holds NUL bytes)"),
])
def test_a_config_json_that_is_no_json_object_is_one_line(content, message, tiny_llama_dir, tmp_path, capsys):
    parent = Path(shutil.copytree(tiny_llama_dir, tmp_path / "parent"))
    (parent / "config.json").write_bytes(content)
    assert message in _refusal(["inspect", str(parent)], capsys)
    with pytest.raises(CorruptArtifactError):
        load_config(parent)


# --- the user's YAML and architecture files ------------------------------------------------------------

def test_a_binary_config_is_refused_by_name(tmp_path, capsys):
    settings = tmp_path / "settings.yaml"
    settings.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 4)  # a gzip header, then every byte value
    out = tmp_path / "run"
    line = _refusal(["search", "--config", str(settings), "--out", str(out)], capsys)
    assert line == f"puzzle search: error: config file {settings} is binary, not text (it holds NUL bytes)"
    assert not out.exists()


def test_a_config_that_is_not_utf8_names_the_byte(tmp_path):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("model: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        read_yaml_config(latin1)
    assert str(e.value) == f"config file {latin1} is not UTF-8 text (byte 0xe9 at offset 10); is it a binary file?"


def test_a_config_directory_is_called_a_directory(tmp_path, capsys):
    (tmp_path / "conf").mkdir()
    line = _refusal(["search", "--config", str(tmp_path / "conf"), "--out", str(tmp_path / "run")], capsys)
    assert line == f"puzzle search: error: config file {tmp_path / 'conf'} is a directory; name a file"
    line = _refusal(["search", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "run")], capsys)
    assert line == f"puzzle search: error: config file {tmp_path / 'none.yaml'} does not exist"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conf"]


def test_a_yaml_syntax_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("speedup: [1.5\n")
    line = _refusal(["search", "--config", str(bad), "--out", str(tmp_path / "run")], capsys)
    assert line.startswith(f"puzzle search: error: {bad} is not valid YAML: ")


def test_a_binary_space_file_is_refused(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_bytes(b"\x00\x01\x02")
    line = _refusal(["search", "--space", str(space), "--out", str(tmp_path / "run")], capsys)
    assert line == f"puzzle search: error: config file {space} is binary, not text (it holds NUL bytes)"


def test_an_architecture_file_that_is_binary_or_a_directory_is_a_schema_error(tmp_path):
    arch = tmp_path / "arch.json"
    arch.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(SchemaError, match="is not UTF-8 text"):
        load_blocks(arch)
    with pytest.raises(SchemaError, match="is a directory"):
        load_blocks(tmp_path)


def test_a_manifest_of_binary_garbage_is_a_corrupt_artifact(tmp_path):
    manifest = tmp_path / "stage.json"
    manifest.write_bytes(b"\xff\xfe{")
    with pytest.raises(CorruptArtifactError, match="stage.json is not valid JSON: byte 0xff at offset 0"):
        read_json_file(manifest)
