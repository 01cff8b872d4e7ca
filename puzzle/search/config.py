"""``SearchConfig``: what the user said for one ``puzzle search`` run, and nothing else.

    # runs/search.yaml -- run with: puzzle search --config runs/search.yaml
    model: smollm2-135m
    budget: 8xH100
    speedup: 1.5
    preset: quick
    advanced:            # research knobs may sit here, or at the top level
      gkd_top_k: 32

Its keys are the rows of :data:`puzzle.search.settings.SETTINGS`; a setting no one set reads ``None``.
Sources merge by one rule (:meth:`SearchConfig.merge`): a later source overrides an earlier one
setting by setting, and an explicit value is never dropped. :func:`puzzle.search.resolver.resolve` is the
only place that fills in defaults. Values are checked here, so ``speedup: "fast"`` is a one-line
:class:`ConfigError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from puzzle.errors import ConfigError
from puzzle.search.setting import check_value
from puzzle.search.settings import BASELINES, PRESETS, SETTINGS

__all__ = ["BASELINES", "PRESETS", "SOURCES", "SearchConfig"]

SOURCES = ("default", "preset", "derived", "file", "flag", "keyword")
"""Where a setting's value came from, as a plan reports it."""
ADVANCED = "advanced"
"""The YAML key that may group the advanced settings."""


class SearchConfig:
    """One ``puzzle search`` run as the user wrote it: ``SearchConfig(budget="cpu", speedup=2.0)``.

    Each setting reads as an attribute (``None``: not said; the plan fills it in); :meth:`given` lists
    the ones said and :attr:`origin` where each came from (``file``, ``flag`` or ``keyword``). Immutable.
    """

    __slots__ = ("_values", "origin")

    def __init__(self, *, origin: Mapping[str, str] | None = None, **values: Any) -> None:
        unknown = sorted(set(values) - set(SETTINGS.names()))
        if unknown:
            raise ConfigError(f"search config: unknown key(s) {unknown}; allowed keys are {sorted(SETTINGS.names())}")
        checked = {name: check_value(SETTINGS[name], v) for name, v in values.items() if v is not None}
        object.__setattr__(self, "_values", checked)
        object.__setattr__(self, "origin", {k: v for k, v in dict(origin or {}).items() if k in checked})

    def __getattr__(self, name: str) -> Any:
        if name in SETTINGS:
            return self._values.get(name)
        raise AttributeError(f"SearchConfig has no setting {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("SearchConfig is immutable; use merge() or replace()")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SearchConfig) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, repr(v)) for k, v in self._values.items())))

    def __reduce__(self) -> tuple[Any, ...]:
        return _rebuild, (dict(self._values), dict(self.origin))

    def __repr__(self) -> str:
        return f"SearchConfig({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    # ------------------------------------------------------------------ building and merging

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "keyword") -> SearchConfig:
        """The settings in ``data`` (``None`` values mean "not said"), all marked as coming from ``source``;
        advanced settings may be grouped under ``advanced:``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"search config: expected a mapping of setting names to values, got {type(data).__name__}")
        flat = _flatten(data)
        set_ = {k: v for k, v in flat.items() if v is not None}  # unknown keys: refused by __init__
        return cls(**set_, origin={k: source for k in set_})

    @classmethod
    def from_file(cls, path: str | Path) -> SearchConfig:
        from puzzle.io import read_yaml_config

        data = read_yaml_config(path)
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of flag names to values")
        try:
            return cls.from_dict(data, source="file")
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def merge(self, overrides: Mapping[str, Any] | SearchConfig, *, source: str = "keyword") -> SearchConfig:
        """This config with every setting that ``overrides`` sets replacing ours (the one merge rule)."""
        other = overrides if isinstance(overrides, SearchConfig) else SearchConfig.from_dict(overrides, source=source)
        values, origin = dict(self._values), dict(self.origin)
        for name in other.given():
            values[name] = getattr(other, name)
            origin[name] = other.origin.get(name, source)
        return SearchConfig(**values, origin=origin)

    def without(self, *names: str) -> SearchConfig:
        """This config with ``names`` unset (their defaults apply again)."""
        return SearchConfig(**{k: v for k, v in self._values.items() if k not in names}, origin=self.origin)

    def given(self) -> list[str]:
        """The names of the settings the user set, in the table's order."""
        return [name for name in SETTINGS.names() if name in self._values]

    def to_dict(self) -> dict[str, Any]:
        """The settings the user set (JSON-able: tuples as lists)."""
        return {name: list(v) if isinstance(v := self._values[name], tuple) else v for name in self.given()}

    def replace(self, **changes: Any) -> SearchConfig:
        return self.merge(changes)


def _rebuild(values: dict[str, Any], origin: dict[str, str]) -> SearchConfig:
    return SearchConfig(**values, origin=origin)


def _flatten(data: Mapping[str, Any]) -> dict[str, Any]:
    """Keys with dashes as underscores; an ``advanced:`` mapping's advanced settings lifted to the top."""
    flat = {str(k).replace("-", "_"): v for k, v in data.items() if k != ADVANCED}
    group = data.get(ADVANCED)
    if group is None:
        return flat
    if not isinstance(group, Mapping):
        raise ConfigError(f"search config: {ADVANCED}: expected a mapping of advanced settings, got {group!r}")
    for key, value in group.items():
        name = str(key).replace("-", "_")
        if name not in SETTINGS:
            raise ConfigError(f"search config: unknown key {ADVANCED}.{key}; the advanced settings are "
                              f"{sorted(s.name for s in SETTINGS if s.advanced)}")
        if not SETTINGS[name].advanced:
            raise ConfigError(f"search config: {name} is a user setting, not an advanced one; write it at the top "
                              f"level, not under {ADVANCED}:")
        if name in flat:
            raise ConfigError(f"search config: {name} is given twice, at the top level and under {ADVANCED}:")
        flat[name] = value
    return flat
