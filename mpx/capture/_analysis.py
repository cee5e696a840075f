"""Which matmuls of a traced function capture puts under the policy: a static pass over its jaxpr.

`Analysis` walks the jaxpr (inside ``jax.jit``, ``jax.checkpoint`` and ``lax.scan`` too), finds
every ``dot_general`` and names it by the module call it ran in (`mpx._naming.Naming`'s markers):
the module's path when that call ran one matmul (a projection layer is its op), else
``<module path>/dot_general_<k>`` for the k-th; ``attend`` and other methods than ``__call__``
add ``/<method>``. A module called twice gives the same names twice.

Kinds. A matmul with a parameter operand is ``dense`` (``head`` when called through an
embedding's ``attend``); between two activations it is ``attention_values`` when an operand
went through ``exp`` since its last matmul (softmax probabilities), else ``attention_logits``.
``kinds`` (path pattern -> kind, first match wins) overrides both. The walk follows two flags
per value (depends on an activation; went through exp) from the inputs to each matmul.

Left outside the policy, with the reason (`Matmul.reason`): matmuls inside another library's
``custom_jvp`` / ``custom_vjp`` function or inside ``lax.cond`` / ``lax.while_loop`` (their
semantics are not ours to rewrite), and integer matmuls. Matmuls of layers already under the
policy through their hook (named ``mpx[<path>]``) are listed with their layer's op.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from mpx._naming import Naming, equations, op_paths, subjaxprs
from mpx.policy import OpPrecision, Policy

CALLS = ("jit", "closed_call", "eval_jaxpr")  # closed_call_p is named eval_jaxpr from jax 0.11
"""Call primitives: their jaxpr runs as if inlined, so the walk (and the evaluation) goes in."""
REMAT = ("remat2",)
"""``jax.checkpoint``'s primitive: gone into like a call, re-made as a checkpoint when evaluated."""
_OPAQUE = {"custom_jvp_call": "inside a custom_jvp function", "custom_vjp_call": "inside a custom_vjp function",
           "cond": "inside lax.cond", "while": "inside lax.while_loop"}
_HEAD_METHODS = ("attend",)
_EXP = ("exp", "exp2", "logistic")


def called_jaxpr(eqn) -> tuple[Any, Sequence[Any]]:
    """``(jaxpr, consts)`` of a call, checkpoint or scan equation (a scan's: its body)."""
    j = eqn.params["jaxpr"] if "jaxpr" in eqn.params else eqn.params["call_jaxpr"]  # closed_call: call_jaxpr
    return (j.jaxpr, j.consts) if isinstance(j, jcore.ClosedJaxpr) else (j, ())


@dataclasses.dataclass(frozen=True)
class Matmul:
    """One matmul of a traced computation, as `Captured.matmuls` reports it.

    ``op`` is the policy's decision (None when the matmul is not under the policy, with
    ``reason`` saying why); ``via`` is ``"capture"`` (replaced by `Captured`) or ``"layer"``
    (a layer's own policy hook); ``stack`` the lengths of the scans around it.
    """

    path: str
    kind: str
    op: OpPrecision | None
    via: str
    lhs: jax.ShapeDtypeStruct
    rhs: jax.ShapeDtypeStruct
    stack: tuple[int, ...] = ()
    reason: str = ""

    @property
    def precision(self) -> str:
        return self.op.precision if self.op is not None else "not under the policy"


@dataclasses.dataclass
class Site:
    """A captured matmul, by its position in the jaxpr: its name, kind and the scans around it."""

    path: str
    kind: str
    stack: tuple[int, ...]


@dataclasses.dataclass
class Flags:
    """What the walk knows of a value."""

    data: bool  # depends on a non-parameter input (an activation)
    soft: bool  # went through exp since its last matmul (softmax probabilities)


_CONST = Flags(False, False)


def _join(*flags: Flags) -> Flags:
    return Flags(any(f.data for f in flags), any(f.soft for f in flags))


def _has_exp(jaxpr) -> bool:
    return any(e.primitive.name in _EXP for e, _ in equations(jaxpr))


@dataclasses.dataclass
class _Found:
    """A matmul met by the walk, before it is named (names need every call's count)."""

    pos: tuple
    call: int | None
    module: str
    index: int
    flags: tuple[Flags, Flags]
    lhs: jax.ShapeDtypeStruct
    rhs: jax.ShapeDtypeStruct
    scans: tuple[int, ...]
    reason: str
    layer: str | None = None  # path of a layer's own policy op


class Analysis:
    """Static pass over a jaxpr: where each matmul is (`run`), then its name and kind (`finish`)."""

    def __init__(self, naming: Naming, policy: Policy, kinds, layer_op: Callable[[str], OpPrecision | None]):
        self.naming, self.policy, self.kinds, self.layer_op = naming, policy, kinds, layer_op
        self.found: list[_Found] = []
        self._counters: dict[int | None, int] = {}

    def _module(self, stack: str) -> tuple[int | None, str]:
        call = self.naming.innermost(stack)
        if call is None:
            return None, ""
        path, method = self.naming.calls[call]
        return call, (path if method == "__call__" else "/".join(p for p in (path, method) if p))

    def run(self, jaxpr, flags: list[Flags], pos: tuple, stack: str, scans: tuple, opaque: str = "") -> list[Flags]:
        """Walk ``jaxpr`` (at position ``pos``, name stack ``stack``, inside scans of lengths
        ``scans``; ``opaque``: why its matmuls stay outside the policy, if they do) from its
        inputs' flags; returns its outputs' flags."""
        env: dict = {}

        def read(v):
            return _CONST if isinstance(v, jcore.Literal) else env.get(v, _CONST)

        for var, f in zip(jaxpr.invars, flags):
            env[var] = f
        for i, eqn in enumerate(jaxpr.eqns):
            name, here = eqn.primitive.name, (*pos, i)
            full = f"{stack}/{eqn.source_info.name_stack}"
            ins = [read(v) for v in eqn.invars]
            if name == "dot_general":
                self._dot(eqn, ins, here, full, scans, opaque)
                outs = [Flags(_join(*ins).data, False)]
            elif name in CALLS or name in REMAT:
                sub, _ = called_jaxpr(eqn)
                outs = self.run(sub, ins, here, full, scans, opaque)
            elif name == "scan":
                outs = self._scan(eqn, ins, here, full, scans, opaque)
            elif subjaxprs(eqn.params):
                why = opaque or _OPAQUE.get(name, f"inside {name}")
                for k, sub in enumerate(subjaxprs(eqn.params)):
                    self.run(sub, [_join(*ins)] * len(sub.invars), (*here, k), full, scans, why)
                soft = any(f.soft for f in ins) or any(_has_exp(s) for s in subjaxprs(eqn.params))
                outs = [Flags(_join(*ins).data, soft)] * len(eqn.outvars)
            else:
                f = _join(*ins)
                outs = [Flags(f.data, f.soft or name in _EXP)] * len(eqn.outvars)
            for var, f in zip(eqn.outvars, outs):
                env[var] = f
        return [read(v) for v in jaxpr.outvars]

    def _scan(self, eqn, ins, here, full, scans, opaque):
        p = eqn.params
        body, _ = called_jaxpr(eqn)
        nc, nk = p["num_consts"], p["num_carry"]
        carry = ins[nc: nc + nk]
        while True:  # carries that become activations in the body: a fixed point (flags only grow)
            mark, counters = len(self.found), dict(self._counters)
            outs = self.run(body, [*ins[:nc], *carry, *ins[nc + nk:]], here, full, (*scans, p["length"]), opaque)
            new = [_join(a, b) for a, b in zip(carry, outs[:nk])]
            if new == carry:
                return outs
            carry = new
            del self.found[mark:]
            self._counters = counters

    def _dot(self, eqn, ins, here, full, scans, opaque):
        lhs, rhs = (jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars)
        layer = op_paths(full)
        if layer:  # a layer's own policy op (mpx.ops.dot_general named it)
            self.found.append(_Found(here, None, "", 0, tuple(ins), lhs, rhs, scans, "", layer=layer[-1]))
            return
        call, module = self._module(full)
        k = self._counters.get(call, 0)
        self._counters[call] = k + 1
        floating = all(jnp.issubdtype(a.dtype, jnp.floating) for a in (lhs, rhs))
        reason = opaque or ("" if floating else "integer operands")
        self.found.append(_Found(here, call, module, k, tuple(ins), lhs, rhs, scans, reason))

    def _kind(self, path: str, found: _Found) -> str:
        for regex, kind in self.kinds:
            if regex.fullmatch(path):
                return kind
        if found.call is not None and self.naming.calls[found.call][1] in _HEAD_METHODS:
            return "head"
        lhs, rhs = found.flags
        if lhs.data and rhs.data:
            return "attention_values" if lhs.soft or rhs.soft else "attention_logits"
        return "dense"

    def finish(self) -> tuple[dict[tuple, Site], list[Matmul]]:
        """Name every matmul: its module's path when that call ran one matmul, else
        ``<module path>/dot_general_<k>``; then its kind and the policy's op."""
        sites, matmuls = {}, []
        for f in self.found:
            if f.layer is not None:
                op = self.layer_op(f.layer)
                matmuls.append(Matmul(f.layer, op.kind if op else "dense", op, "layer", f.lhs, f.rhs, f.scans))
                continue
            single = f.module and self._counters[f.call] == 1
            path = f.module if single else "/".join(p for p in (f.module, f"dot_general_{f.index}") if p)
            kind = self._kind(path, f)
            if f.reason:
                matmuls.append(Matmul(path, kind, None, "capture", f.lhs, f.rhs, f.scans, f.reason))
                continue
            sites[f.pos] = Site(path, kind, f.scans)
            matmuls.append(Matmul(path, kind, self.policy.for_op(path, kind), "capture", f.lhs, f.rhs, f.scans))
        return sites, matmuls
