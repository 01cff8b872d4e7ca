"""Imports run one way: every import in puzzle/, block_library/ and solvers/ goes to its own layer or a lower one.

    cli -> search -> stages -> profiler / scoring / block_library -> model / schema / ... -> io / errors

``solvers`` stands alone: anyone may import it, and it imports no torch, no puzzle, no block_library.
So does ``puzzle.export.remote``, the DeciLM config class that export copies into every checkpoint
and that transformers runs (``trust_remote_code``) where puzzle is not installed; ``puzzle.loading``
reads DeciLM checkpoints with it. No module imports another module's private (``_name``) names.

Each file is parsed with :mod:`ast` (nothing is imported), so the test is fast and sees imports inside
functions and under ``if TYPE_CHECKING:`` too: a type-only upward import is still an upward
dependency. Imports by string (``importlib.import_module``) are not seen: ``puzzle.__getattr__``
hands out ``puzzle.search`` lazily on purpose, as the ``puzzle.search(...)`` shortcut.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("puzzle", "block_library", "solvers")

# Top to bottom: a module may import its own layer or a lower one (a larger number), never a higher one.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cli", ("puzzle.cli",)),
    ("search", ("puzzle.search",)),
    ("stages", ("puzzle.fusion", "puzzle.distill", "puzzle.evaluation", "puzzle.export")),
    ("profiler/scoring/block_library", ("puzzle.profiler", "puzzle.scoring", "block_library")),
    ("model/schema", ("puzzle.loading", "puzzle.parents", "puzzle.data", "puzzle.model", "puzzle.schema", "puzzle.engines",
                      "puzzle.summary", "puzzle.config_json")),
    ("io/errors", ("puzzle.io", "puzzle.errors", "puzzle.os_errors", "puzzle.peak", "puzzle")),
)
# Listed prefixes that stand for the package's __init__ alone, so that a new subpackage is in no layer
# until someone places it.
PACKAGE_ONLY = ("puzzle",)
# Outside the layers: anyone may import them, and they import none of the packages listed here.
STANDALONE: dict[str, tuple[str, ...]] = {
    "solvers": ("torch", "puzzle", "block_library"),
    "puzzle.export.remote": ("puzzle", "block_library", "solvers"),
}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _standalone(module: str) -> str | None:
    return next((unit for unit in STANDALONE if _within(module, unit)), None)


def _rank(module: str) -> tuple[int, str] | None:
    """The layer (index, name) of a dotted module name by its longest listed prefix; None outside the layers."""
    if _standalone(module):
        return None
    best: tuple[int, int, str] | None = None  # (prefix length, index, name)
    for index, (name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix if prefix in PACKAGE_ONLY else _within(module, prefix)
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index, name)
    return None if best is None else (best[1], best[2])


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _exists(module: str) -> bool:
    """Whether a dotted name is a module or package of this tree."""
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for each import in a file, at any depth.

    ``from a import b`` counts as an import of ``a.b`` when ``a.b`` is a module of the tree, else of ``a``
    with name ``b``. Relative imports are resolved against the file's package.
    """
    module = _module_name(path)
    package = module if _is_package(path) else module.rpartition(".")[0]
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if alias.name != "*" and _exists(sub):
                    found.append((node.lineno, sub, None))
                else:
                    found.append((node.lineno, base, alias.name))
    return found


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT).as_posix()}:{line}"


def _is_ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def test_every_source_file_is_in_a_layer():
    unplaced = [_module_name(p) for p in _sources()
                if not _standalone(_module_name(p)) and _rank(_module_name(p)) is None]
    assert not unplaced, f"modules in no layer of LAYERS (add them to the table): {unplaced}"


def test_imports_never_go_up():
    upward = []
    for path in _sources():
        importer = _module_name(path)
        mine = _rank(importer)
        for line, target, _ in _imports(path):
            theirs = _rank(target)
            if mine is None or theirs is None or theirs[0] >= mine[0]:
                continue
            upward.append(f"{_where(path, line)} imports {target} (layer {theirs[1]} above {mine[1]})")
    assert not upward, "upward imports:\n" + "\n".join(dict.fromkeys(upward))  # one line per import statement


def test_standalone_packages_stand_alone():
    bad = []
    for path in _sources():
        unit = _standalone(_module_name(path))
        if unit is None:
            continue
        for line, target, _ in _imports(path):
            hit = next((f for f in STANDALONE[unit] if _within(target, f)), None)
            if hit and not _within(target, unit):
                bad.append(f"{_where(path, line)} imports {target} ({unit} stands alone: it imports no "
                           f"{', '.join(STANDALONE[unit])})")
    assert not bad, "\n".join(dict.fromkeys(bad))


def test_no_private_names_across_modules():
    bad = []
    for path in _sources():
        importer = _module_name(path)
        for line, target, name in _imports(path):
            if name is None or not name.startswith("_") or name.startswith("__") or not _is_ours(target):
                continue
            if target != importer:
                bad.append(f"{_where(path, line)} imports the private name {name} from {target}")
    assert not bad, "private names imported from another module (make them public or move them):\n" + "\n".join(bad)
