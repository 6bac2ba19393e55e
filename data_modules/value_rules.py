"""Type and range rules for values a user sets (config keys, parameters), shared by every layer that checks them:
``scgpt_train/config_checks.py`` (train.py's config) and ``data_modules.simulate.SimParams``."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    check: Callable[[object], bool]
    expected: str
    nullable: bool = False

    def refusal(self, name: str, value) -> str | None:
        """None when ``value`` passes, else ``"<name>=<value> must be <expected>"`` (a string value shows its type)."""
        if (value is None and self.nullable) or (value is not None and self.check(value)):
            return None
        shown = f"{value!r} ({type(value).__name__})" if isinstance(value, str) else repr(value)
        return f"{name}={shown} must be {self.expected}{' or null' if self.nullable else ''}"


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return (is_int(v) or isinstance(v, float)) and math.isfinite(v)


def whole(minimum: int, nullable: bool = False) -> Rule:
    return Rule(lambda v: is_int(v) and v >= minimum, f"a whole number >= {minimum}", nullable)


def number(
    minimum: float,
    strict: bool = False,
    maximum: float | None = None,
    nullable: bool = False,
    inclusive_maximum: bool = False,
) -> Rule:
    def check(v) -> bool:
        if not is_number(v) or (v <= minimum if strict else v < minimum):
            return False
        return maximum is None or (v <= maximum if inclusive_maximum else v < maximum)

    bounds = f"> {minimum}" if strict else f">= {minimum}"
    if maximum is not None:
        bounds += f" and {'<=' if inclusive_maximum else '<'} {maximum}"
    return Rule(check, f"a number {bounds}", nullable)
