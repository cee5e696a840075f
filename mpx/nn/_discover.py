"""Op discovery in an NNX model: which of its modules a policy decides, their kinds and
the leading axes of layers built under ``nnx.vmap`` (a scanned stack)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from flax import nnx

from mpx.nn._op_modules import DotGeneral, Fp8MetaVariable, Op
from mpx.policy import KINDS, kind_overrides


@dataclasses.dataclass(frozen=True)
class FoundOp:
    """One op of a model: its path (as in the parameter tree), kind and module."""

    path: str
    kind: str
    module: nnx.Module
    stack: tuple[int, ...] = ()  # leading axes of a layer built under nnx.vmap (a scanned stack)


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


def _unstacked_param_ndim(module) -> tuple[str, int] | None:
    """(a parameter of ``module``, its rank when the module is not stacked), for the Flax
    layers whose parameter ranks are known from their configuration."""
    if isinstance(module, nnx.Linear):
        return "kernel", 2
    if isinstance(module, nnx.LinearGeneral):
        return "kernel", len(module.batch_axis) + len(module.in_features) + len(module.out_features)
    if isinstance(module, nnx.Einsum):
        return "kernel", len(module.kernel_shape)
    if isinstance(module, nnx.Embed):
        return "embedding", 2
    if isinstance(module, (nnx.LayerNorm, nnx.RMSNorm)) and module.scale is not None:
        return "scale", 1
    return None


def _own_stack(module) -> tuple[int, ...] | None:
    """Leading axes that ``nnx.vmap`` added to ``module``'s parameters, if they can be told."""
    known = _unstacked_param_ndim(module)
    if known is None:
        return None
    name, ndim = known
    shape = getattr(module, name).shape
    return tuple(shape[: len(shape) - ndim])


def _stacks(model: nnx.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(path -> leading layer axes of every module whose parameters reveal them,
    path -> shape of every variable)."""
    stacks, shapes = {}, {}
    for path, node in nnx.iter_graph(model):
        key = "/".join(str(p) for p in path)
        if isinstance(node, nnx.Module):
            stack = _own_stack(node)
            if stack is not None:
                stacks[key] = stack
        elif isinstance(node, nnx.Variable) and not isinstance(node, Fp8MetaVariable):
            shapes[key] = tuple(getattr(node.get_value(), "shape", ()))
    return stacks, shapes


def _stack_of(path: str, stacks: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The leading axes of the op at ``path``: its own, else those of the layers in the
    nearest enclosing module that has any, provided every variable in that module leads
    with them (a vmapped block stacks everything in it alike). A module that mixes
    stacked and unstacked parts (a scanned stack beside other layers) is not inside a
    stack: ()."""
    if path in stacks:
        return stacks[path]
    parts = path.split("/")
    for n in range(len(parts) - 1, 0, -1):
        prefix = "/".join(parts[:n]) + "/"
        found = {stack for other, stack in stacks.items() if other.startswith(prefix)}
        if not found:
            continue
        stack = found.pop() if len(found) == 1 else ()
        inside = all(shape[: len(stack)] == stack for other, shape in shapes.items() if other.startswith(prefix))
        return stack if inside else ()
    return ()


def find_ops(model: nnx.Module, kinds: Mapping[str, str] | None = None) -> list[FoundOp]:
    """Every op of ``model`` that a policy can decide, in graph order.

    Kinds come from mpx op modules, ``nnx.Linear``/``LinearGeneral`` (dense),
    ``nnx.Einsum`` (einsum), ``nnx.Embed`` (embed) and ``nnx.LayerNorm``/``RMSNorm``
    (norm). ``kinds`` maps path patterns (policy syntax) to a kind, e.g.
    ``{"lm_head": "head"}`` for a model whose output projection is a plain Linear.
    Layers built under ``nnx.vmap`` (to run with ``nnx.scan``) are found once, with
    their leading axes as ``stack``.
    """
    overrides = kind_overrides(kinds)
    stacks, shapes = _stacks(model)
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
        found.append(FoundOp(path_str, kind, module, _stack_of(path_str, stacks, shapes)))
    return found
