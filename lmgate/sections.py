"""
Checks shared by the configuration sections parsed outside L{lmgate.config}
(C{usage_limits:}, C{policy:}, C{audit:}, C{telemetry:}): each raises
L{SectionError} naming the dotted key, which the configuration turns into one
start-up line naming the file (C{ConfigError(source, e.where, e.problem)}).

Pure: no Twisted.
"""

from __future__ import annotations

import math
import re
from typing import Any


class SectionError(ValueError):
    """A value is wrong: C{where} is the dotted key, C{problem} one line."""

    def __init__(self, where: str, problem: str) -> None:
        self.where, self.problem = where, problem
        super().__init__(f"{where}: {problem}")


def typeName(value: Any) -> str:
    """How a wrong value is named in a problem: C{a list}, C{a mapping}, or its repr."""
    return "a list" if isinstance(value, list) else "a mapping" if isinstance(value, dict) else repr(value)


def noUnknownKeys(where: str, raw: dict[str, Any], allowed: tuple[str, ...]) -> None:
    """Refuse a key of C{raw} that is not in C{allowed}, naming the ones that are."""
    for key in raw:
        if key not in allowed:
            raise SectionError(f"{where}.{key}", f"unknown key (expected one of {', '.join(allowed)})")


def mapping(where: str, raw: Any) -> dict[str, Any]:
    """C{raw}, which must be a mapping."""
    if not isinstance(raw, dict):
        raise SectionError(where, f"must be a mapping, got {typeName(raw)}")
    return raw


def positiveNumber(where: str, value: Any) -> float:
    """A finite number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise SectionError(where, f"must be a number > 0, got {value!r}")
    return float(value)


def wholeNumber(where: str, value: Any, minimum: int = 1) -> int:
    """An int >= C{minimum} (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SectionError(where, f"must be a whole number >= {minimum}, got {value!r}")
    return value


def flag(where: str, value: Any) -> bool:
    """C{true} or C{false}."""
    if not isinstance(value, bool):
        raise SectionError(where, f"must be true or false, got {value!r}")
    return value


def strings(where: str, value: Any, pattern: re.Pattern[str] | None = None, what: str = "non-empty strings") -> tuple[str, ...]:
    """One string or a non-empty list of them (each matching C{pattern}, if given)."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v and (pattern is None or pattern.match(v)) for v in items):
        raise SectionError(where, f"must be one or a list of {what}, got {value!r}")
    return tuple(items)
