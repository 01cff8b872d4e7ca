"""The flags of ``puzzle search`` and ``puzzle plan``, made from the settings table.

    puzzle search --budget 8xH100 --speedup 2.0            # the user's choices
    puzzle search --gkd-top-k 32 --refine-rounds 1         # advanced knobs, listed apart in --help

Each row of :data:`puzzle.search.settings.SETTINGS` is one flag (``--gkd-steps`` for ``gkd_steps``,
or the row's own spelling), its help the row's help and default; a YAML file (``--config``) takes the
same names as keys, and the flags given override it (the one merge rule of :class:`SearchConfig`).
"""

from __future__ import annotations

import argparse
from typing import Any

from puzzle.search.config import SearchConfig
from puzzle.search.setting import Spec
from puzzle.search.settings import SETTINGS


def add_search_flags(p: argparse.ArgumentParser) -> None:
    """Every setting's flag (the user's choices, then the advanced ones in their own group), and the run's."""
    p.usage = "%(prog)s [--config YAML] [--out OUT] [SETTING ...] [--verify] [--force]"
    p.add_argument("--config", metavar="YAML", help="YAML file whose keys are these settings (advanced ones may "
                   "sit under advanced:); flags given here override it")
    p.add_argument("--out", default="runs/search", help="run directory (default: runs/search)")
    user = p.add_argument_group("the search", "The parent, the data, the deployment budget and the cluster.")
    advanced = p.add_argument_group("advanced", "Stage sizes and research knobs; the --preset sets most of them. "
                                    "In a YAML file they may sit under advanced:.")
    for spec in SETTINGS:
        _add_flag(advanced if spec.advanced else user, spec)
    p.add_argument("--verify", action="store_true", help="re-hash every recorded file before skipping a stage "
                   "(file sizes are always checked)")
    p.add_argument("--force", action="store_true", help="allow --out to be a directory that holds other files")


def _add_flag(group: Any, spec: Spec) -> None:
    kw: dict[str, Any] = {"dest": spec.name, "help": spec.help_text().replace("%", "%%")}
    metavar = spec.metavar or {"int": "N", "float": "X", "size": "SIZE"}.get(spec.kind)
    if metavar and spec.kind != "bool":
        kw["metavar"] = metavar
    if spec.kind == "bool":
        kw.update(action=argparse.BooleanOptionalAction, default=None)
    elif spec.kind == "strs" and spec.repeat:
        kw.update(action="append")
    elif spec.kind == "strs":
        kw.update(nargs="+", choices=spec.choices or None)
    elif spec.kind == "mapping":
        pass  # a YAML file's path, read by config_from_args: argparse would hide its ConfigError's message
    else:
        kw.update(type={"int": int, "float": float}.get(spec.kind, str), choices=spec.choices or None)
    group.add_argument(spec.option, **kw)


def _yaml_mapping(flag: str, path: str) -> dict:
    """The mapping in the YAML file a flag names (``space:`` at the top, or the section itself); a missing,
    binary or malformed file is a one-line :class:`ConfigError`."""
    from puzzle.errors import ConfigError
    from puzzle.io import read_yaml_config

    data = read_yaml_config(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {path}: expected a mapping such as {{ffn: {{sizes: [0.5]}}}}")
    return data


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    """The YAML file's settings, then the flags' (the one merge rule: later sources override earlier ones)."""
    cfg = SearchConfig.from_file(args.config) if args.config else SearchConfig()
    flags = {spec.name: getattr(args, spec.name, None) for spec in SETTINGS}
    for spec in SETTINGS:
        if spec.kind == "mapping" and flags[spec.name] is not None:
            flags[spec.name] = _yaml_mapping(spec.option, flags[spec.name])
    return cfg.merge(flags, source="flag")


def settings_markdown() -> str:
    """``docs/settings.md``: every setting of the table, the user's choices then the advanced ones."""
    from puzzle.search.setting import DERIVED, shown

    def default(spec: Spec) -> str:
        if spec.presets:
            return ", ".join(f"{k}: {shown(v)}" for k, v in spec.presets.items())
        if spec.default_text:
            return spec.default_text
        return "" if spec.default is None or spec.default == DERIVED else f"`{shown(spec.default)}`"

    lines = ["# Settings of `puzzle search` and `puzzle plan`", "",
             "Generated from `puzzle/search/settings.py`, the one place a setting is declared "
             "(`python -m puzzle.cli.search_flags > docs/settings.md` rewrites this page; a test checks it). The "
             "YAML key is the setting's name; flags override a `--config` file; advanced settings may sit under "
             "`advanced:` in YAML. *Read by* names the stages whose settings section holds it "
             "([stages](README.md)); *plan* means the plan itself (target, budget, cluster). How they combine: "
             "[commands/search.md](commands/search.md).", ""]
    for title, advanced in (("The user's choices", False), ("Advanced: stage sizes and research knobs", True)):
        lines += [f"## {title}", "", "| setting | flag | type | default | read by | what it does |",
                  "|---|---|---|---|---|---|"]
        for spec in SETTINGS:
            if spec.advanced == advanced:
                kind = spec.kind + (f" ({' / '.join(spec.choices)})" if spec.choices else "")
                lines.append(f"| `{spec.name}` | `{spec.option}` | {kind} | {default(spec)} | "
                             f"{', '.join(spec.stages)} | {spec.help} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(settings_markdown(), end="")
