"""What a search setting is: one row of the settings table, its check, and the typed sections stages read.

    Spec(name="gkd_steps", kind="int", help="Global distillation steps; 0 skips GKD.",
         presets={"quick": 16, "full": 200}, stages=("gkd", "baselines"), at_least=0)

One row declares a setting once: its name (the YAML key, the keyword, ``--gkd-steps``), its type, its
default or its value per preset, its help (the flag's help, the docs), the stages that read it, and
whether it is a user's choice or an advanced knob. :class:`SearchConfig` checks values with
:func:`check_value`, ``puzzle search`` builds its flags from the rows (:mod:`puzzle.cli.search_flags`),
and a stage reads its own rows through a :class:`Section`, a frozen dataclass of typed fields named
after the settings:

    @dataclass(frozen=True)
    class GKDSettings(Section):
        gkd_steps: int
        gkd_batch: int

    GKDSettings.of(plan).gkd_steps        # 16 on the quick preset
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from puzzle.errors import ConfigError

KINDS = ("str", "strs", "int", "float", "bool", "size", "mapping")
"""``strs``: a tuple of strings (a YAML list, ``nargs="+"`` or a repeated flag); ``size``: ``6GiB``, ``72GB`` or
bytes; ``mapping``: a YAML mapping (``--space`` reads it from a file)."""
DERIVED = "derived"
"""The ``default`` of a setting that :func:`puzzle.search.resolver.resolve` derives (from the target, the cluster)."""
PLAN = "plan"
"""The reader of a setting that :func:`resolve` itself reads (the target, the budget, the cluster)."""


@dataclass(frozen=True, kw_only=True)
class Spec:
    """One setting of a search, declared once."""

    name: str
    kind: str
    help: str
    """One or two sentences: what it does, in the user's words. ``--help`` appends the default."""
    stages: tuple[str, ...]
    """Who reads it: stage names, or ``"plan"`` for :func:`resolve`."""
    default: Any = None
    """The plain default; :data:`DERIVED` when :func:`resolve` derives it; ignored when ``presets`` holds it."""
    default_text: str = ""
    """The default in words for ``--help``, where the value alone would not say it (a derived default)."""
    presets: Mapping[str, Any] = field(default_factory=dict)
    """``preset name -> value`` for the stage sizes (quick, full)."""
    advanced: bool = False
    """A research knob, shown apart from the user's choices in ``--help`` and under ``advanced:`` in YAML."""
    choices: tuple[str, ...] = ()
    at_least: float | None = None
    """Numbers: the smallest value allowed (``None``: any positive number)."""
    flag: str = ""
    """The flag, where it is not ``--`` + the name with dashes (``--speed`` for ``measure_speed``)."""
    repeat: bool = False
    """``strs``: one value per repeated flag (``--constraint A --constraint B``) rather than ``nargs="+"``."""
    metavar: str | None = None
    validate: Callable[[Any], Any] | None = None
    """A further check of a value already of the right kind (constraints parse, a search space is valid);
    returns the value to keep."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"setting {self.name}: kind {self.kind!r} is not one of {KINDS}")
        if not self.stages:
            raise ValueError(f"setting {self.name}: name the stages that read it (or 'plan')")

    @property
    def option(self) -> str:
        """Its command-line flag."""
        return self.flag or "--" + self.name.replace("_", "-")

    def help_text(self) -> str:
        """The help with its default: ``(preset: quick 16, full 200)`` or ``(default: 64)``."""
        if self.presets:
            said = ", ".join(f"{k} {shown(v)}" for k, v in self.presets.items())
            return f"{self.help} (preset: {said})"
        if self.default_text:
            return f"{self.help} (default: {self.default_text})"
        if self.default is None or self.default == DERIVED:
            return self.help
        return f"{self.help} (default: {shown(self.default)})"


@dataclass(frozen=True)
class PerParameter:
    """A preset value that grows with the parent: ``per_billion`` for every billion of the parent's parameters,
    rounded up to a multiple of ``unit`` and at least ``least``. The plan shows the number it comes to."""

    per_billion: float
    least: int
    unit: int = 1
    source: str = ""
    """Where the rate comes from (the docs show it)."""

    def of(self, params: float) -> int:
        return max(self.least, math.ceil(self.per_billion * params / 1e9 / self.unit) * self.unit)

    def __str__(self) -> str:
        return f"{self.per_billion:,.4g} per billion parent parameters (at least {self.least:,})"


def shown(value: Any) -> str:
    """A value as ``--help`` and the docs show it: on / off, a list space-separated, none."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value)) or "none"
    return str(value)


class Table:
    """The settings, in order; :meth:`temporary` adds rows for the length of a ``with`` block (tests)."""

    def __init__(self, specs: list[Spec]) -> None:
        self._specs: dict[str, Spec] = {}
        for spec in specs:
            self.add(spec)

    def add(self, spec: Spec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"setting {spec.name} is declared twice")
        self._specs[spec.name] = spec

    @contextlib.contextmanager
    def temporary(self, *specs: Spec) -> Iterator[Table]:
        for spec in specs:
            self.add(spec)
        try:
            yield self
        finally:
            for spec in specs:
                self._specs.pop(spec.name, None)

    def __iter__(self) -> Iterator[Spec]:
        return iter(list(self._specs.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __getitem__(self, name: str) -> Spec:
        return self._specs[name]

    def names(self) -> list[str]:
        return list(self._specs)

    def presets(self) -> dict[str, dict[str, Any]]:
        """``preset -> {setting: value}``, as the rows declare them."""
        out: dict[str, dict[str, Any]] = {}
        for spec in self:
            for preset, value in spec.presets.items():
                out.setdefault(preset, {})[spec.name] = value
        return out


# ------------------------------------------------------------------------------------------- checks


def check_value(spec: Spec, value: Any) -> Any:
    """``value`` as ``spec``'s type; a one-line :class:`ConfigError` naming the setting otherwise."""
    name, kind = spec.name, spec.kind
    if kind == "str":
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{name} must be a non-empty string, got {value!r}")
        _check_choices(spec, (value,), f"{name} must be one of {list(spec.choices)}, got {value!r}")
    elif kind == "strs":
        items = (value,) if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(x, str) and x.strip() for x in items):
            raise ConfigError(f"{name} must be a list of non-empty strings, got {value!r}")
        value = tuple(items)
        bad = sorted(set(value) - set(spec.choices)) if spec.choices else []
        if bad:
            raise ConfigError(f"unknown {name} {bad}; choose from {list(spec.choices)}")
    elif kind == "mapping":
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
    elif kind in ("int", "float"):
        value = _number(spec, value)
    elif kind == "size":
        from block_library.rounds import parse_size

        parse_size(value, flag=name)  # a one-line ConfigError naming the setting
        value = value if isinstance(value, str) else float(value)
    return spec.validate(value) if spec.validate is not None else value


def _check_choices(spec: Spec, values: tuple[str, ...], message: str) -> None:
    if spec.choices and any(v not in spec.choices for v in values):
        raise ConfigError(message)


def _number(spec: Spec, value: Any) -> int | float:
    name = spec.name
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if spec.kind == "int":
        if float(value) != int(value):
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        value = int(value)
        if value < (spec.at_least if spec.at_least is not None else 1):
            raise ConfigError(f"{name} must be >= {spec.at_least if spec.at_least is not None else 1}, got {value}")
        return value
    value = float(value)
    if math.isnan(value):
        raise ConfigError(f"{name} must be a number, got nan")
    if spec.at_least is not None:
        if not spec.at_least <= value < math.inf:
            raise ConfigError(f"{name} must be >= {spec.at_least:g} and finite, got {value}")
    elif not value > 0:
        raise ConfigError(f"{name} must be positive, got {value}")
    return value


# ------------------------------------------------------------------------------------------- sections

S = TypeVar("S", bound="Section")


@dataclass(frozen=True)
class Section:
    """A stage's settings, typed: subclass it as a frozen dataclass whose field names are settings."""

    @classmethod
    def of(cls: type[S], plan: Any) -> S:
        """This section's values in ``plan`` (a :class:`puzzle.search.plan.Plan`)."""
        return cls(**{f.name: plan.value(f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))
