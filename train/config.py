"""Run configs from YAML files: ``base:`` inheritance and dotted overrides.

    config = load_config("configs/quickstart.yaml", ["train.steps=100", "optim.lr=3e-4"])

The schema (sections, keys, validation) is `train.schema`; this module reads files into
the plain dicts it validates. A file may start from another with ``base: other.yaml``
(relative to the file): its sections are merged key by key over the base's, so a config
states only its differences. Overrides are applied last.
"""

from __future__ import annotations

import difflib
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

import mpx
from train.schema import ConfigError, RunConfig, config_from_dict
from train.schema.sections import checked_precision

__all__ = ["ConfigError", "RunConfig", "apply_overrides", "config_from_dict", "load_config"]

# ----------------------------------------------------------------------------- files and overrides


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 scalars: ``3e-4`` is a number (YAML 1.1 reads a
    string), only true/false are booleans (1.1 also reads yes/no/on/off: ``grad_clip=off``
    would be False). And a key given twice in one mapping is an error, not a silent win."""

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def _as_section(key: str, value) -> dict:
    """``precision: fp8`` as a mapping, so that ``precision.fp8.margin=1`` can go under it."""
    if key != "precision" or not isinstance(value, str):
        return value
    return mpx.policy.as_dict(checked_precision(value))


def _set_dotted(d: dict, key: str, value, item: str) -> None:
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: {key!r} is not a dotted key like train.steps")
    node = d
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None and node is d and part == "precision":
            child = RunConfig.precision  # the default spec, so that overrides refine it
        if i == 0:
            child = _as_section(part, child)
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is {child!r}, not a section")
        node[part] = child = dict(child)
        node = child
    node[parts[-1]] = value


def apply_overrides(d: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``d`` (not changed) with each ``key.sub=value`` set; values are read as YAML."""
    d = dict(d)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=100 or optim.lr=3e-4)")
        if not raw.strip():
            raise ConfigError(f"override {item!r} has no value; write {key}=null to unset it")
        try:
            value = _yaml(raw)
        except (yaml.YAMLError, ConfigError) as e:
            why = getattr(e, "problem", None) or e
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({why}); quote it: {key}='...'") from None
        _set_dotted(d, key, value, item)
    return d


def load_config(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> RunConfig:
    """A validated `RunConfig` from a YAML file (with its ``base:`` chain) and
    ``key.sub=value`` overrides.

    ``name`` defaults to the file's stem; ``name`` and ``run_dir`` are never inherited from
    a base (two configs would otherwise share one run directory). Override values are YAML:
    ``optim.lr=3e-4``, ``logging.tensorboard=false``, ``data.files=[a.txt,b.txt]``,
    ``finetune.init_from=null``.
    """
    path = pathlib.Path(path)
    d = _with_bases(path, ())
    d.setdefault("name", path.stem)
    return config_from_dict(apply_overrides(d, overrides))


def _with_bases(path: pathlib.Path, chain: tuple[pathlib.Path, ...]) -> dict[str, Any]:
    """The file's mapping merged over its base's (recursively), ``base`` removed."""
    d = _read_file(path)
    base = d.pop("base", None)
    if base is None:
        return d
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected the path of another config file (relative to this one), got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in chain or base_path == path.resolve():
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve(), base_path))
        raise ConfigError(f"{path}: base: the configs inherit from each other in a cycle ({cycle})")
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: no config file {base_path} (the path is relative to {path.parent})")
    inherited = _with_bases(base_path, (*chain, path.resolve()))
    for key in ("name", "run_dir"):  # a run's identity is its own
        inherited.pop(key, None)
    return _merged(inherited, d)


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on ``base``: mappings merge key by key, anything else replaces. A
    ``precision`` mapping without a ``preset`` refines the base's policy (``fp8: {margin:
    1}``); a precision with a preset, or a policy string, replaces it whole."""
    out = dict(base)
    for key, value in over.items():
        below = out.get(key)
        if key == "precision" and isinstance(value, Mapping) and "preset" not in value:
            below = _as_section(key, below if below is not None else RunConfig.precision)
        out[key] = _merged(below, value) if isinstance(below, Mapping) and isinstance(value, Mapping) else value
    return out


def _read_file(path: pathlib.Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        siblings = sorted(str(p) for p in path.parent.glob("*.y*ml")) if path.parent.is_dir() else []
        close = difflib.get_close_matches(str(path), siblings, n=1)
        raise ConfigError(
            f"cannot read config file {path}: {getattr(e, 'strerror', None) or e}"
            + (f" (did you mean {close[0]}?)" if close else "")
        ) from None
    try:
        d = _yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    except ConfigError as e:
        raise ConfigError(f"{path}, {e}") from None
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(d).__name__}")
    return d
