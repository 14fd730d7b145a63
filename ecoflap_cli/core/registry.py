"""Registries: every allocator, solver and scoring method declared once, with its parameters.

An :class:`Entry` names a method, says what it needs (scores, input statistics), lists its
:class:`Param` s (default, valid range, the short key the sweep's ``@key=value`` syntax takes, the
help text) and points at the function that does the work. Command-line choices and completion,
validation of option values before any model is loaded, plan validation, the sweep's method
syntax and the option tables in docs/ are all derived from these entries.

Nothing here imports torch: the command line reads the registries to build ``--help`` and shell
completion without paying for torch. A function given as ``"module:attribute"`` is imported the
first time it is called.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ecoflap_cli.errors import PlanError

_TYPES: dict[str, type] = {"float": float, "int": int, "str": str, "bool": bool}


@dataclass(frozen=True)
class Param:
    """One tunable setting of a method, and how to check a value of it."""

    name: str
    default: Any
    help: str
    kind: str = "float"  # float | int | str | bool
    low: float | None = None  # inclusive bounds for numbers
    high: float | None = None
    high_open: bool = False  # the upper bound itself is excluded
    choices: tuple[str, ...] | None = None
    key: str | None = None  # short alias in the sweep's @key=value syntax
    option: str | None = None  # the command-line option that sets it, when it has its own

    def keys(self) -> tuple[str, ...]:
        return (self.name,) if self.key is None else (self.name, self.key)

    def describe_range(self) -> str:
        if self.choices:
            return " | ".join(self.choices)
        if self.kind == "bool":
            return "true | false"
        if self.low is None and self.high is None:
            return "any"
        low = "-inf" if self.low is None else f"{self.low:g}"
        high = "inf" if self.high is None else f"{self.high:g}"
        return f"[{low}, {high}{')' if self.high_open else ']'}"

    def check(self, value: Any, owner: str) -> Any:
        """The value converted to the parameter's type; PlanError (one line) when it is invalid."""
        if value is None:
            return None
        where = f"{owner}: {self.name}"
        value = self._convert(value, where)
        if self.choices is not None and value not in self.choices:
            raise PlanError(f"{where} must be one of {', '.join(self.choices)}, got {value!r}")
        if self.kind in ("float", "int"):
            if not math.isfinite(value):
                raise PlanError(f"{where} must be a finite number, got {value}")
            too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            if (self.low is not None and value < self.low) or too_high:
                raise PlanError(f"{where} must be in {self.describe_range()}, got {value:g}")
        return value

    def _convert(self, value: Any, where: str) -> Any:
        if self.kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise PlanError(f"{where} takes true or false, got {value!r}")
        if self.kind == "str":
            if not isinstance(value, str):
                raise PlanError(f"{where} takes a word, got {value!r}")
            return value
        if isinstance(value, bool):
            raise PlanError(f"{where} takes a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise PlanError(f"{where} takes a number, got {value!r}") from None
        if self.kind == "int":
            if not number.is_integer():
                raise PlanError(f"{where} takes a whole number, got {value!r}")
            return int(number)
        return number


@dataclass(frozen=True)
class Entry:
    """One method of a registry: its name, what it needs, its parameters and its function."""

    name: str
    summary: str
    function: Callable[..., Any] | str
    params: tuple[Param, ...] = ()
    #: allocators: "scores" (importance scores), "outliers" (OWL outlier ratios) or None;
    #: solvers: the input statistic it accumulates ("col_sq", "hessian") or None
    needs: str | None = None
    #: allocators that need scores: the scoring method the one-shot path and the sweep use
    default_scoring: str | None = None
    #: fills settings that depend on the request (e.g. a cap relative to the target sparsity)
    finalize: Callable[[dict[str, Any], float], dict[str, Any]] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def resolve(self) -> Callable[..., Any]:
        """The function, imported on first use when it was given as ``"module:attribute"``."""
        if callable(self.function):
            return self.function
        module, _, attribute = self.function.partition(":")
        return getattr(importlib.import_module(module), attribute)  # type: ignore[no-any-return]

    def param(self, key: str) -> Param | None:
        for p in self.params:
            if key in p.keys():
                return p
        return None

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def settings(self, given: Mapping[str, Any] | None = None, owner: str | None = None) -> dict[str, Any]:
        """Defaults overridden by ``given`` (names or short keys), every value checked.

        A key this method does not take is an error that lists the ones it does.
        """
        owner = owner or self.name
        values = self.defaults()
        for key, value in (given or {}).items():
            param = self.param(key)
            if param is None:
                allowed = ", ".join(p.name for p in self.params) or "none"
                raise PlanError(f"{owner} takes no parameter {key!r} (it takes: {allowed})")
            values[param.name] = value
        return {p.name: p.check(values[p.name], owner) for p in self.params}


class Registry:
    """Named entries of one kind (allocator, solver, scoring method), in declaration order."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> Entry:
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        return entry

    def remove(self, name: str) -> None:
        """Forget an entry (tests that register a toy method clean up with this)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise PlanError(f"unknown {self.kind} {name!r} (choose from {', '.join(self.names())})") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))


def parse_assignments(items: list[str] | None, what: str = "--param") -> dict[str, str]:
    """``["lam=0.1", "alpha=0.5"]`` -> ``{"lam": "0.1", "alpha": "0.5"}`` (values checked later)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise PlanError(f"{what} takes NAME=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out
