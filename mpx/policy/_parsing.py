"""Policies from what users write: a preset name, a compact string, or a dict (YAML-ready).

    parse("fp8")
    parse("bf16; blocks/*/mlp/*->fp8; fp8.amax_history=16")
    parse({"preset": "fp16", "rules": [{"kind": "head", "use": "fp32"}]})

Rules given next to a preset come before the preset's own, so they take precedence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from mpx.fp8 import Fp8Config
from mpx.int8 import Int8Config
from mpx.loss_scale import LossScaleConfig
from mpx.policy._core import Policy, Rule, StaticInputs
from mpx.policy._presets import FASTEST_8BIT, PRESETS, fastest_8bit, preset
from mpx.policy._vocabulary import PRECISIONS, suggest

TOP_KEYS = ("preset", "params", "compute", "output", "rules", "fp8", "int8", "loss_scale", "inputs")
_RULE_KEYS = ("match", "kind", "use")


def _unknown_key(key, accepted, where) -> ValueError:
    return ValueError(f"unknown key {key!r} in {where}; accepted keys: {', '.join(accepted)}{suggest(key, accepted)}")


def _config(cls, values: Mapping[str, Any], base, where: str):
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} must be a mapping of {', '.join(names)}, got {values!r}")
    for key in values:
        if key not in names:
            raise _unknown_key(key, names, where)
    return dataclasses.replace(base, **values)


def _rule_from_dict(d: Any, i: int) -> Rule:
    where = f"rule {i}"
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a mapping with keys {', '.join(_RULE_KEYS)}, got {d!r}")
    for key in d:
        if key not in _RULE_KEYS:
            raise _unknown_key(key, _RULE_KEYS, where)
    if "use" not in d:
        raise ValueError(f"{where} ({d!r}) has no 'use'; expected one of {', '.join(PRECISIONS)}")
    try:
        return Rule(use=d["use"], match=d.get("match"), kind=d.get("kind"))
    except ValueError as e:
        raise ValueError(f"policy {where}: {e}") from None


def policy_from_dict(d: Mapping[str, Any]) -> Policy:
    """Build a policy from a dict with keys from ``preset, params, compute, output, rules, fp8, int8,
    loss_scale, inputs``."""
    if not isinstance(d, Mapping):
        raise ValueError(f"a policy dict must be a mapping, got {type(d).__name__}")
    for key in d:
        if key not in TOP_KEYS:
            raise _unknown_key(key, TOP_KEYS, "policy")
    base = preset(d["preset"]) if "preset" in d else Policy()
    rules = d.get("rules", [])
    if not isinstance(rules, Sequence) or isinstance(rules, (str, bytes)):
        raise ValueError(f"policy 'rules' must be a list of {{match, kind, use}} mappings, got {rules!r}")
    own = tuple(_rule_from_dict(r, i) for i, r in enumerate(rules))
    return Policy(
        params=d.get("params", base.params),
        compute=d.get("compute", base.compute),
        output=d.get("output", base.output),
        rules=own + base.rules,
        fp8=_config(Fp8Config, d.get("fp8", {}), base.fp8, "fp8"),
        int8=_config(Int8Config, d.get("int8", {}), base.int8, "int8"),
        loss_scale=_config(LossScaleConfig, d.get("loss_scale", {}), base.loss_scale, "loss_scale"),
        inputs=_config(StaticInputs, d["inputs"], StaticInputs(), "inputs") if d.get("inputs") is not None else None,
    )


def _scalar(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def policy_from_string(spec: str) -> Policy:
    """Build a policy from a compact string of ``;``-separated items (`as_dict`)."""
    return policy_from_dict(as_dict(spec))


def as_dict(spec: str) -> dict[str, Any]:
    """The dict form of a compact policy string, its preset kept by name.

    Items: a preset name (first item only); ``params=``/``compute=``/``output=`` a dtype;
    a rule ``PATTERN@KINDS->PRECISION`` (either side of ``@`` may be left out);
    ``fp8.KEY=VALUE``; ``int8.KEY=VALUE``; ``loss_scale=KIND``; ``loss_scale.KEY=VALUE``.

    >>> as_dict("8bit; fp8.margin=1; blocks/0/**->bf16")
    {'preset': '8bit', 'rules': [{'use': 'bf16', 'match': 'blocks/0/**'}], 'fp8': {'margin': 1}}
    """
    d: dict[str, Any] = {}
    rules: list[dict[str, str]] = []
    fp8: dict[str, Any] = {}
    int8: dict[str, Any] = {}
    loss: dict[str, Any] = {}
    items = [s.strip() for s in spec.split(";") if s.strip()]
    if not items:
        raise ValueError(f"empty policy string; give a preset name ({', '.join(PRESETS)}) or items like 'compute=bf16'")
    for i, item in enumerate(items):
        if "->" in item:
            target, use = (s.strip() for s in item.rsplit("->", 1))
            match, _, kind = target.partition("@")
            rules.append({"use": use, **({"match": match} if match else {}), **({"kind": kind} if kind else {})})
        elif "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
            if key.startswith("fp8."):
                fp8[key[4:]] = _scalar(value)
            elif key.startswith("int8."):
                int8[key[5:]] = _scalar(value)
            elif key == "loss_scale":
                loss["kind"] = value
            elif key.startswith("loss_scale."):
                loss[key[len("loss_scale."):]] = _scalar(value)
            elif key in ("params", "compute", "output"):
                d[key] = value
            else:
                raise ValueError(
                    f"unknown key {key!r} in policy item {item!r}; expected params, compute, output, "
                    f"fp8.<key>, int8.<key>, loss_scale or loss_scale.<key>"
                )
        elif i == 0:
            d["preset"] = item
        else:
            raise ValueError(
                f"cannot read policy item {item!r}: expected 'key=value' or a rule 'PATTERN@KINDS->PRECISION' "
                f"(a preset name may only come first)"
            )
    for key, value in (("rules", rules), ("fp8", fp8), ("int8", int8), ("loss_scale", loss)):
        if value:
            d[key] = value
    return d


def resolve(spec: Policy | str | Mapping[str, Any], device=None) -> Policy | str | Mapping[str, Any]:
    """``spec`` with the ``8bit`` preset replaced by the format ``device`` (a jax device, an
    `mpx.program.Target` or its name; default: this process's first device) multiplies natively:
    ``fp8``, or ``int8; int8.backward=int8``. Items written after the preset still apply (they
    come later). Any other spec is returned as it is.

    >>> resolve("8bit; fp8.amax_history=16", "v5e")
    'int8; int8.backward=int8; fp8.amax_history=16'
    >>> resolve({"preset": "8bit"}, "h100")
    {'preset': 'fp8'}
    """
    if isinstance(spec, str):
        items = [s.strip() for s in spec.split(";")]
        if items[0] != FASTEST_8BIT:
            return spec
        fastest = _fastest(device)
        written = [fastest["preset"]] + [f"int8.{k}={v}" for k, v in fastest.get("int8", {}).items()]
        return "; ".join(written + [s for s in items[1:] if s])
    if isinstance(spec, Mapping) and spec.get("preset") == FASTEST_8BIT:
        fastest = _fastest(device)
        out = {**spec, "preset": fastest["preset"]}
        own = spec.get("int8") or {}
        if "int8" in fastest and isinstance(own, Mapping):  # anything else: policy_from_dict says what is wrong
            out["int8"] = {**fastest["int8"], **own}
        return out
    return spec


def _fastest(device) -> dict[str, Any]:
    from mpx import program  # what each chip runs natively lives with the targets

    return fastest_8bit(program.native_8bit(device))


def parse(spec: Policy | str | Mapping[str, Any], *, device=None) -> Policy:
    """A `Policy` from a policy, a preset name / compact string, or a dict. The ``8bit``
    preset is resolved for ``device`` first (`resolve`).

    >>> policy = parse("bf16; blocks/*/mlp/*->fp8; @head->fp32")
    >>> [str(rule) for rule in policy.rules]      # the preset's own rule comes last
    ['blocks/*/mlp/*->fp8', '@head->fp32', '@softmax|norm|loss->fp32']
    >>> policy == parse({"preset": "bf16", "rules": [{"match": "blocks/*/mlp/*", "use": "fp8"},
    ...                                              {"kind": "head", "use": "fp32"}]})
    True
    >>> parse("bf16; @head->float32")
    Traceback (most recent call last):
    ...
    ValueError: policy rule 0: unknown precision 'float32' for rule @head->float32; ... (did you mean 'fp32'?)
    """
    if isinstance(spec, Policy):
        return spec
    spec = resolve(spec, device)
    if isinstance(spec, str):
        return policy_from_string(spec)
    if isinstance(spec, Mapping):
        return policy_from_dict(spec)
    raise ValueError(f"a policy spec must be a Policy, a string or a dict, got {type(spec).__name__}")
