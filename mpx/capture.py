"""Every matmul of a traced function under a policy, whatever Python call produced it.

Layers that take a ``dot_general`` hook (``nn.Dense``, ``nnx.Linear``, ...) are put under a
policy by swapping the hook. Code that calls ``lax.dot_general``, ``jnp.dot``,
``jnp.matmul``, ``jnp.einsum`` or ``@`` itself has no hook; all of them become the same
``dot_general`` primitive once traced. `Captured` works there: it traces the function to a
jaxpr, finds every ``dot_general`` in it (inside ``jax.jit``, ``jax.checkpoint`` and
``lax.scan`` too), names each by the module call it ran in, and evaluates the jaxpr again
with each such matmul replaced by `mpx.ops.dot_general` under the policy, FP8 meta
included. The model's code is not touched.

Naming. While the function is traced, each module method call pushes a marker scope (see
`mpx.naming.Naming`; `mpx.linen` and `mpx.nn` install it). A matmul is named by the path of the
module whose call ran it, when that call ran one matmul (a projection layer is its op),
else ``<module path>/dot_general_<k>`` for the k-th; ``attend`` and other methods than
``__call__`` add ``/<method>`` to the module path. A module called twice gives the same
names twice, and its FP8 meta is threaded from the first call to the second (amaxes
combine by max). Matmuls inside ``lax.scan`` get one meta per iteration, stacked along a
leading axis (a scanned layer stack: one per layer); a module rebuilt inside a
transform (``nnx.scan``) is named by the call around it.

Kinds. A matmul with a parameter operand is ``dense`` (``head`` when called through an
embedding's ``attend``); between two activations it is ``attention_values`` when an
operand went through ``exp`` since its last matmul (softmax probabilities), else
``attention_logits``. ``kinds`` (path pattern -> kind, first match wins) overrides both.

Not intercepted, and reported so by `Captured.matmuls`: matmuls inside another library's
``custom_jvp`` / ``custom_vjp`` function or inside ``lax.cond`` / ``lax.while_loop`` (their
semantics are not ours to rewrite), and integer matmuls. Matmuls of layers already under
the policy through their hook (named ``mpx[<path>]``) are listed with their layer's op.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from mpx import ops
from mpx.fp8 import Fp8Meta
from mpx.fp8.dot import retraced_under_differentiation
from mpx.naming import Naming, equations, is_call_marker, op_paths, subjaxprs
from mpx.policy import OpPrecision, Policy, kind_overrides

_CALLS = ("jit", "pjit", "closed_call", "core_call")
_OPAQUE = {"custom_jvp_call": "inside a custom_jvp function", "custom_vjp_call": "inside a custom_vjp function",
           "custom_vjp_call_jaxpr": "inside a custom_vjp function", "cond": "inside lax.cond",
           "while": "inside lax.while_loop"}
_HEAD_METHODS = ("attend",)
_REMAT = ("remat2", "checkpoint")
_EXP = ("exp", "exp2", "logistic")


@contextlib.contextmanager
def setting(var: contextvars.ContextVar, value) -> Iterator[None]:
    """``var`` set to ``value`` inside the block."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def split_arrays(args: tuple, kwargs: dict) -> tuple[list, Callable[[list], tuple[tuple, dict]]]:
    """The array leaves of a call's arguments (what a trace takes as inputs) and a function
    that rebuilds ``(args, kwargs)`` from new arrays, every other leaf (flags, sizes) kept."""
    leaves, tree = jax.tree.flatten((args, kwargs))
    dynamic = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]

    def rebuild(arrays):
        it = iter(arrays)
        return jax.tree.unflatten(tree, [next(it) if d else x for x, d in zip(leaves, dynamic)])

    return [x for x, d in zip(leaves, dynamic) if d], rebuild


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
class _Site:
    path: str
    kind: str
    stack: tuple[int, ...]


@dataclasses.dataclass
class _Flags:
    data: bool  # depends on a non-parameter input (an activation)
    soft: bool  # went through exp since its last matmul (softmax probabilities)


_CONST = _Flags(False, False)


def _join(*flags: _Flags) -> _Flags:
    return _Flags(any(f.data for f in flags), any(f.soft for f in flags))


def _has_exp(jaxpr) -> bool:
    return any(e.primitive.name in _EXP for e, _ in equations(jaxpr))


def _open(j) -> tuple[Any, Sequence[Any]]:
    return (j.jaxpr, j.consts) if isinstance(j, jcore.ClosedJaxpr) else (j, ())


@dataclasses.dataclass
class _Found:
    """A matmul met by the walk, before it is named (names need every call's count)."""

    pos: tuple
    call: int | None
    module: str
    index: int
    flags: tuple[_Flags, _Flags]
    lhs: jax.ShapeDtypeStruct
    rhs: jax.ShapeDtypeStruct
    scans: tuple[int, ...]
    reason: str
    layer: str | None = None  # path of a layer's own policy op


class _Analysis:
    """Static pass over a jaxpr: where each matmul is, then its name and kind."""

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

    def run(self, jaxpr, flags: list[_Flags], pos: tuple, stack: str, scans: tuple, opaque: str = "") -> list[_Flags]:
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
                outs = [_Flags(_join(*ins).data, False)]
            elif name in _CALLS or name in _REMAT:
                sub, _ = _open(eqn.params["jaxpr"])
                outs = self.run(sub, ins, here, full, scans, opaque)
            elif name == "scan":
                outs = self._scan(eqn, ins, here, full, scans, opaque)
            elif subjaxprs(eqn.params):
                why = opaque or _OPAQUE.get(name, f"inside {name}")
                for k, sub in enumerate(subjaxprs(eqn.params)):
                    self.run(sub, [_join(*ins)] * len(sub.invars), (*here, k), full, scans, why)
                soft = any(f.soft for f in ins) or any(_has_exp(s) for s in subjaxprs(eqn.params))
                outs = [_Flags(_join(*ins).data, soft)] * len(eqn.outvars)
            else:
                f = _join(*ins)
                outs = [_Flags(f.data, f.soft or name in _EXP)] * len(eqn.outvars)
            for var, f in zip(eqn.outvars, outs):
                env[var] = f
        return [read(v) for v in jaxpr.outvars]

    def _scan(self, eqn, ins, here, full, scans, opaque):
        p = eqn.params
        body, _ = _open(p["jaxpr"])
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

    def finish(self) -> tuple[dict[tuple, _Site], list[Matmul]]:
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
            sites[f.pos] = _Site(path, kind, f.scans)
            matmuls.append(Matmul(path, kind, self.policy.for_op(path, kind), "capture", f.lhs, f.rhs, f.scans))
        return sites, matmuls


def _scope(eqn):
    """The equation's name scopes (module and op names), re-entered so that the evaluated
    program is named as the traced one (profiles, `mpx.inspect.fp8_gemms`); the capture's
    own markers left out."""
    names = [n for n in str(eqn.source_info.name_stack).split("/") if n and not is_call_marker(n)]
    return jax.named_scope("/".join(names)) if names else contextlib.nullcontext()


def _bind(eqn, ins) -> list:
    """Run one equation as it was traced (``jax.core.eval_jaxpr``'s step)."""
    bound = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)  # jax < 0.5 returned subfuns too
    manager = getattr(getattr(eqn, "ctx", None), "manager", None)
    with manager if manager is not None else contextlib.nullcontext():
        outs = eqn.primitive.bind(*subfuns, *ins, **params)
    return outs if eqn.primitive.multiple_results else [outs]


class _Evaluator:
    """Evaluates a jaxpr with the captured matmuls replaced by policy ops."""

    def __init__(self, policy: Policy, sites: Mapping[tuple, _Site]):
        self.policy, self.sites = policy, sites
        # Positions of the equations (calls, scans) that hold a captured matmul.
        self._holders = {pos[:k] for pos in sites for k in range(1, len(pos))}

    def run(self, jaxpr, consts, args, pos: tuple, metas: dict) -> list:
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for var, value in zip(jaxpr.constvars, consts):
            env[var] = value
        for var, value in zip(jaxpr.invars, args):
            env[var] = value
        for i, eqn in enumerate(jaxpr.eqns):
            with _scope(eqn):
                outs = self._eqn(eqn, (*pos, i), [read(v) for v in eqn.invars], metas)
            for var, value in zip(eqn.outvars, outs):
                if not isinstance(var, jcore.DropVar):
                    env[var] = value
        return [read(v) for v in jaxpr.outvars]

    def _eqn(self, eqn, here: tuple, ins: list, metas: dict) -> list:
        name = eqn.primitive.name
        if name == "dot_general" and here in self.sites:
            return [self._dot(eqn, ins, self.sites[here], metas)]
        if not self._inside(here):
            return _bind(eqn, ins)  # nothing captured in it: as traced
        if name in _CALLS:
            sub, sub_consts = _open(eqn.params["jaxpr"])
            return self.run(sub, sub_consts, ins, here, metas)
        if name in _REMAT:
            sub, sub_consts = _open(eqn.params["jaxpr"])
            fun = jax.checkpoint(lambda *a: self.run(sub, sub_consts, a, here, metas),
                                 prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
            return fun(*ins)
        if name == "scan":
            return self._scan(eqn, ins, here, metas)
        return _bind(eqn, ins)

    def _inside(self, pos: tuple) -> bool:
        return pos in self._holders

    def _dot(self, eqn, ins, site: _Site, metas: dict):
        op = self.policy.for_op(site.path, site.kind)
        out, meta = ops.dot_general(ins[0], ins[1], eqn.params["dimension_numbers"], op, metas.get(site.path))
        if meta is not None:
            metas[site.path] = meta  # threaded to the next call of the same op
        return out.astype(eqn.outvars[0].aval.dtype)

    def _scan(self, eqn, ins, here, metas):
        p = eqn.params
        body, body_consts = _open(p["jaxpr"])
        nc, nk = p["num_consts"], p["num_carry"]
        inner = {s.path for pos, s in self.sites.items() if pos[: len(here)] == here}
        stacked = {k: v for k, v in metas.items() if k in inner}

        def step(carry, x):
            xs, per_layer = x
            outs = self.run(body, body_consts, [*ins[:nc], *carry, *xs], here, dict(per_layer))
            return outs[:nk], outs[nk:]

        carry, ys = lax.scan(step, ins[nc: nc + nk], (ins[nc + nk:], stacked), length=p["length"],
                             reverse=p["reverse"], unroll=p["unroll"])
        return [*carry, *ys]


class Captured:
    """``fn`` with every matmul it runs under ``policy``.

    ``fn(params, *args)``: the first argument's leaves are the parameters (a matmul with
    one of them, or anything computed from them alone, is a projection), the rest are
    activations. ``naming`` is entered around each trace of ``fn`` (a context manager
    factory taking a `Naming`: `mpx.linen` passes one that marks every module call).

    ``init(params, *args)`` returns the FP8 metas of the captured fp8 matmuls (a dict by
    path, stacked for matmuls inside scans); ``apply(metas, params, *args)`` runs ``fn``
    with each captured matmul replaced by its policy op and returns ``fn``'s output.
    ``matmuls(params, *args)`` lists every matmul of the trace (see `Matmul`).
    """

    def __init__(self, fn: Callable, policy: Policy, *, kinds: Mapping[str, str] | None = None,
                 naming: Callable[[Naming], Any] | None = None,
                 layer_op: Callable[[str], OpPrecision | None] | None = None,
                 missing_hint: str = "initialize the model under the same policy (its FP8 state is created "
                                     "from a trace of the model on example inputs)"):
        self.fn, self.policy, self.missing_hint = fn, policy, missing_hint
        self.kinds = kind_overrides(kinds)
        self._naming = naming
        self.layer_op = layer_op or (lambda path: None)

    def trace(self, params, *args) -> _Trace:
        """Trace ``fn`` and find its matmuls (what `apply` evaluates; ``trace=`` reuses it)."""
        naming = Naming()
        flat, tree = jax.tree.flatten((params, args))
        n_params = len(jax.tree.leaves(params))

        def flat_fn(*leaves):
            p, a = jax.tree.unflatten(tree, leaves)
            return self.fn(p, *a)

        differentiated = any(hasattr(x, "primal") for x in flat)  # JVP tracers: inside jax.grad
        with (self._naming(naming) if self._naming else contextlib.nullcontext(),
              retraced_under_differentiation(differentiated)):
            closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*flat)
        analysis = _Analysis(naming, self.policy, self.kinds, self.layer_op)
        analysis.run(closed.jaxpr, [_Flags(i >= n_params, False) for i in range(len(flat))], (), "", ())
        sites, matmuls = analysis.finish()
        return _Trace(closed, flat, jax.tree.structure(out_shape), sites, matmuls)

    def matmuls(self, params, *args) -> list[Matmul]:
        """Every matmul ``fn`` runs on these arguments, in trace order (see `Matmul`)."""
        return self.trace(params, *args).matmuls

    def init(self, params, *args, trace: _Trace | None = None) -> dict[str, Fp8Meta]:
        """A fresh `Fp8Meta` for each captured matmul the policy puts in fp8, by path."""
        trace = trace if trace is not None else self.trace(params, *args)
        return create_metas(self.meta_specs(trace))

    def meta_specs(self, trace: _Trace) -> dict[str, tuple[Any, tuple[int, ...]]]:
        """``{path: (Fp8Config, stack)}`` of the metas `init` creates (to create them
        outside a trace)."""
        specs: dict[str, tuple[Any, tuple[int, ...]]] = {}
        for site in trace.sites.values():
            op = self.policy.for_op(site.path, site.kind)
            if op.is_fp8:
                specs.setdefault(site.path, (op.fp8, site.stack))
        return specs

    def apply(self, metas: Mapping[str, Fp8Meta], params, *args, trace: _Trace | None = None):
        """``fn(params, *args)`` with every captured matmul under the policy."""
        trace = trace if trace is not None else self.trace(params, *args)
        missing = sorted(set(self.meta_specs(trace)) - set(metas))
        if missing:
            raise ValueError(f"no FP8 meta for the fp8 matmul(s) {', '.join(missing)}; {self.missing_hint}")
        outs = _Evaluator(self.policy, trace.sites).run(trace.jaxpr.jaxpr, trace.jaxpr.consts, trace.flat, (),
                                                        dict(metas))
        return jax.tree.unflatten(trace.out_tree, outs)


def create_metas(specs: Mapping[str, tuple[Any, tuple[int, ...]]]) -> dict[str, Fp8Meta]:
    """Fresh metas from `Captured.meta_specs` (``{path: (Fp8Config, stack)}``)."""
    return {path: Fp8Meta.init(config, stack=stack) for path, (config, stack) in specs.items()}


@dataclasses.dataclass
class _Trace:
    jaxpr: jcore.ClosedJaxpr
    flat: list
    out_tree: Any
    sites: dict[tuple, _Site]
    matmuls: list[Matmul]
