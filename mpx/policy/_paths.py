"""Op paths and the patterns that match them.

An op is named by its module path, ``"blocks/0/mlp/fc1"``: the keys of its pytree path
joined by ``/``. A pattern matches a whole path: ``*`` is one segment, ``**`` any number
of segments, and the rest is a regular expression (``blocks/*/(qkv|out)``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mpx.policy._vocabulary import KINDS


def pattern_regex(pattern: str) -> str:
    """Path pattern -> regex: ``**/`` any leading segments, ``**`` anything, ``*`` one segment.

    >>> pattern_regex("blocks/*/mlp/**")
    'blocks/[^/]+/mlp/.*'
    """
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]+")
            i += 1
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out)


def key_name(key) -> str:
    """A path entry as users see it: DictKey.key, SequenceKey.idx, GetAttrKey.name, or itself."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: str | Sequence[Any]) -> str:
    """``path`` (a string, or a sequence of pytree keys) as ``a/b/c``."""
    if isinstance(path, str):
        return path
    return "/".join(key_name(p) for p in path)


def kind_overrides(kinds: Mapping[str, str] | None) -> list:
    """``[(compiled path pattern, kind)]`` of a user's ``kinds`` mapping (policy pattern syntax)."""
    out = []
    for pattern, kind in (kinds or {}).items():
        if kind not in KINDS:
            raise ValueError(f"unknown op kind {kind!r} for path {pattern!r} in kinds; expected one of {', '.join(KINDS)}")
        out.append((re.compile(pattern_regex(pattern)), kind))
    return out
