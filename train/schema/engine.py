"""A small typed-config engine: frozen dataclasses that check themselves.

    @dataclasses.dataclass(frozen=True)
    class Shape(Section):
        _key: ClassVar[str] = "shape"
        width: int = 8
        kind: Literal["a", "b"] = "a"

    build_section(Shape, {"width": 16}, "shape")    # Shape(width=16, kind='a')
    build_section(Shape, {"widht": 16}, "shape")    # ConfigError: shape.widht: unknown key; ... (did you mean 'width'?)

Each field is coerced to its annotation (ints widen to floats, lists become tuples, a
mapping becomes a nested section); every mistake is a `ConfigError` (a ValueError) that
names the dotted key, what is expected and what was given, with a did-you-mean among the
accepted values or keys. Nothing here knows the run config's sections (`train.schema.sections`).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Union


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key and the fix."""


def did_you_mean(value, choices) -> str:
    lowered = {str(c).lower(): c for c in choices}
    close = difflib.get_close_matches(str(value).lower(), list(lowered), n=1)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


def require(ok: bool, key: str, message: str) -> None:
    if not ok:  # "key: must be ...", or "key (value) must be ..." for relations between keys
        raise ConfigError(f"{key}{' ' if message.startswith('(') else ': '}{message}")


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        item = typing.get_args(tp)[0]
        return "a list of " + ("strings" if item is str else _type_name(item))
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {', '.join(f.name for f in dataclasses.fields(tp))}"
    return {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _literals(tp) -> list:
    if typing.get_origin(tp) is Literal:
        return list(typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [c for a in typing.get_args(tp) for c in _literals(a)]
    return []


def _coerce(value, tp, key: str):
    """``value`` as type ``tp`` (ints widen to floats, lists become tuples), or a ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if isinstance(value, str) and value in typing.get_args(tp):
            return value
    elif origin is tuple:
        if isinstance(value, str):  # data.files=a.txt: one file
            value = [value]
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None or isinstance(value, Mapping):
            return build_section(tp, value, key)
    hint = did_you_mean(value, _literals(tp)) if isinstance(value, str) else ""
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}{hint}")


def under(section: str, fields: list[str], message: str) -> ConfigError:
    """A library error about ``fields`` as a ConfigError about ``section.<field>``."""
    names = "|".join(sorted(fields, key=len, reverse=True))
    if m := re.match(rf"^({names}) (must .*)$", message):
        return ConfigError(f"{section}.{m[1]}: {m[2]}")
    return ConfigError(re.sub(rf"\b({names})\b", rf"{section}.\1", message))


class Section:
    """Sections check themselves at construction: each field against its annotation (an
    int is accepted where a float is expected, a list where a tuple is), then `_validate`."""

    _key: ClassVar[str] = ""  # the section's dotted name in a RunConfig

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(getattr(self, f.name), hints[f.name], self._path(f.name))
            object.__setattr__(self, f.name, value)
        self._validate()

    def _path(self, name: str) -> str:
        return f"{self._key}.{name}" if self._key else name

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            require(value is None or value >= 1, self._path(name), f"must be >= 1, got {value}")

    def _validate(self) -> None:
        pass


def plain(x):
    """Tuples to lists, mappings to dicts: what YAML/JSON writes and reads back."""
    if isinstance(x, Mapping):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def build_section(cls, values: Mapping[str, Any] | None, prefix: str):
    """``cls`` (a `Section` dataclass) from ``values`` (None: its defaults); a key it does not
    have is a `ConfigError` under ``prefix`` that lists the keys it has."""
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in values or {}:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(
                f"{full}: unknown key; {prefix or 'the top level'} accepts {', '.join(fields)}{did_you_mean(key, fields)}"
            )
    return cls(**(values or {}))
