"""Checks shared by every config and policy in mpx, so that one mistake reads the same
wherever it is made: the accepted values, and a "did you mean" where a name was mistyped."""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping


def did_you_mean(value, choices: Iterable, *, aliases: Mapping[str, str] | None = None) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``value``, or ``""`` when none is close.

    ``aliases`` maps spellings a user may know from elsewhere to the accepted one
    (``float32`` -> ``fp32``); an alias wins over a merely close choice.

    >>> did_you_mean("amax_histroy", ["amax_history", "margin"])
    " (did you mean 'amax_history'?)"
    >>> did_you_mean("float32", ["fp32", "bf16"], aliases={"float32": "fp32"})
    " (did you mean 'fp32'?)"
    >>> did_you_mean("zzz", ["fp32", "bf16"])
    ''
    """
    hint = (aliases or {}).get(str(value))
    if hint is None:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = close[0] if close else None
    return f" (did you mean {hint!r}?)" if hint else ""


def is_int(value) -> bool:
    """An ``int`` that is not a ``bool`` (Python counts ``True`` as 1; a user never means it)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_positive_finite(value) -> bool:
    """A number in (0, inf)."""
    return is_number(value) and 0 < value and math.isfinite(value)


def check_int(what: str, value, *, low: int, high: int | None = None) -> None:
    """``ValueError("<what> must be an integer >= <low>, got ...")`` unless ``value`` is an
    integer in ``[low, high]`` (no upper bound when ``high`` is None).

    >>> check_int("fp8 margin", 40, low=0, high=32)
    Traceback (most recent call last):
    ...
    ValueError: fp8 margin must be an integer in [0, 32], got 40
    """
    if not is_int(value) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{what} must be an integer {bound}, got {value!r}")


def check_choice(what: str, value, choices: Iterable[str]) -> None:
    """``ValueError("<what> <value> is not supported; expected one of ...")`` unless
    ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{what} {value!r} is not supported; expected one of {', '.join(choices)}"
                         f"{did_you_mean(value, choices)}")
