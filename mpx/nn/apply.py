"""Put any Flax NNX model under a precision policy, in place."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from flax import nnx

from mpx.nn.op import DotGeneral, EinsumOp, Op
from mpx.policy import KINDS, Policy, _translate_pattern


@dataclasses.dataclass(frozen=True)
class FoundOp:
    """One op of a model: its path (as in the parameter tree), kind and module."""

    path: str
    kind: str
    module: nnx.Module


def _default_kind(module) -> str | None:
    if isinstance(module, Op):
        return module.kind
    injected = getattr(module, "dot_general", None) or getattr(module, "einsum_op", None)
    if isinstance(injected, DotGeneral):  # an earlier apply_policy decided the kind; keep it
        return injected.kind
    kind = getattr(module, "kind", None)
    if isinstance(kind, str) and kind in KINDS:  # mpx.nn.Linear / Einsum carry one
        return kind
    if isinstance(module, (nnx.Linear, nnx.LinearGeneral)):
        return "dense"
    if isinstance(module, nnx.Einsum):
        return "einsum"
    if isinstance(module, nnx.Embed):
        return "embed"
    if isinstance(module, (nnx.LayerNorm, nnx.RMSNorm)):
        return "norm"
    return None


def kind_overrides(kinds: Mapping[str, str] | None):
    out = []
    for pattern, kind in (kinds or {}).items():
        if kind not in KINDS:
            raise ValueError(f"unknown op kind {kind!r} for path {pattern!r} in kinds; expected one of {', '.join(KINDS)}")
        out.append((re.compile(_translate_pattern(pattern)), kind))
    return out


def find_ops(model: nnx.Module, kinds: Mapping[str, str] | None = None) -> list[FoundOp]:
    """Every op of ``model`` that a policy can decide, in graph order.

    Kinds come from mpx op modules, ``nnx.Linear``/``LinearGeneral`` (dense),
    ``nnx.Einsum`` (einsum), ``nnx.Embed`` (embed) and ``nnx.LayerNorm``/``RMSNorm``
    (norm). ``kinds`` maps path patterns (policy syntax) to a kind, e.g.
    ``{"lm_head": "head"}`` for a model whose output projection is a plain Linear.
    """
    overrides = kind_overrides(kinds)
    found = []
    for path, module in nnx.iter_graph(model):
        if not isinstance(module, nnx.Module):
            continue
        if isinstance(module, DotGeneral) and module.path is not None:
            continue  # injected into a layer: that layer is the op
        kind = _default_kind(module)
        if kind is None:
            continue
        path_str = "/".join(str(p) for p in path)
        for regex, k in overrides:
            if regex.fullmatch(path_str):
                kind = k
                break
        found.append(FoundOp(path_str, kind, module))
    return found


def apply_policy(model: nnx.Module, policy: Policy, *, kinds: Mapping[str, str] | None = None) -> nnx.Module:
    """Make every op of ``model`` obey ``policy``, in place; returns ``model``.

    Linear / LinearGeneral get a policy `DotGeneral` (with an `Fp8MetaVariable` where the
    policy says fp8) and compute in the op's dtype; Einsum gets an `EinsumOp`; Embed and
    norms compute in their op's dtype; mpx op modules take their precision. Parameters
    are cast to the policy's storage dtype. Applying again replaces earlier decisions
    (and resets FP8 meta).
    """
    for param_path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var.set_value(policy.cast_to_param(var.get_value()))
    for found in find_ops(model, kinds):
        op = policy.for_op(found.path, found.kind)
        module = found.module
        if isinstance(module, Op):
            module.set_precision(op)
        elif isinstance(module, (nnx.Linear, nnx.LinearGeneral)):
            dot = DotGeneral(found.kind, path=found.path)
            dot.set_precision(op)
            module.dot_general = nnx.data(dot)
            module.dtype = op.dtype
        elif isinstance(module, nnx.Einsum):
            dot = EinsumOp(found.kind, path=found.path)
            dot.set_precision(op)
            module.einsum_op = nnx.data(dot)
            module.dtype = op.dtype
        else:
            module.dtype = op.dtype
    return model
