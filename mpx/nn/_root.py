"""Every matmul of an NNX model under its policy, including those no layer hook reaches.

`mpx.apply_policy` gives the model's class a ``__call__`` that runs the model's own call as
a traced function (an `mpx.capture.Root`: the model rebuilt from its split state, its
module calls marked by patching their methods for the trace) through
`mpx.capture.Captured`: matmuls written as ``lax.dot_general``,
``jnp.einsum``, ``@`` or an embedding's ``attend`` get the policy's precision, and an
fp8 one keeps its `Fp8Meta` in the root module's `Fp8MetaVariable` ``mpx_fp8`` (a dict by
matmul path, created by `apply_policy` from example inputs). Layers with a policy hook
(Linear, Einsum, mpx ops) run as they are. The model's Python code runs once per call,
in the trace; the call then evaluates the traced program (named as the model's own ops,
so profiles and `mpx.inspect.fp8_gemms` read the same names) and writes back the state
it changed (BatchNorm statistics, RNG counts).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import types
from collections.abc import Iterator, Mapping

from flax import nnx

from mpx import capture
from mpx.nn._discover import find_ops
from mpx.nn._op_modules import Fp8MetaVariable, Op
from mpx._naming import Naming
from mpx.policy import Policy

META_ATTR = "mpx_fp8"
"""The root module's attribute holding the FP8 metas of its captured matmuls."""

_IN_CAPTURE: contextvars.ContextVar[bool] = contextvars.ContextVar("mpx_nnx_in_capture", default=False)
_SUBCLASSES: dict[type, type] = {}


@functools.cache
def _own_methods(cls: type) -> tuple[tuple[type, str], ...]:
    """(class, name) of ``__call__`` and the public methods the model's own classes define."""
    out = []
    for klass in cls.__mro__:
        if klass in nnx.Module.__mro__ or vars(klass).get("_mpx_captured", False):
            continue
        for name, value in vars(klass).items():
            if inspect.isfunction(value) and (name == "__call__" or not name.startswith("_")):
                out.append((klass, name))
    return tuple(out)


@contextlib.contextmanager
def module_naming(model: nnx.Module, naming: Naming) -> Iterator[None]:
    """Mark every method call of ``model``'s modules (by their path in ``model``) for the
    trace; a module that is not in the graph (one rebuilt inside ``nnx.scan``) is named by
    the call around it."""
    paths: dict[int, str] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and id(node) not in paths:
            paths[id(node)] = "/".join(str(p) for p in path)
    patched = {}
    for node_type in {type(n) for _, n in nnx.iter_graph(model) if isinstance(n, nnx.Module)}:
        if issubclass(node_type, Op):
            continue
        for klass, name in _own_methods(node_type):
            if (klass, name) not in patched:
                patched[(klass, name)] = vars(klass)[name]

    def marked(fun, name):
        @functools.wraps(fun)
        def call(self, *args, **kwargs):
            path = paths.get(id(self))
            if path is None:
                return fun(self, *args, **kwargs)
            with naming.call(path, name):
                return fun(self, *args, **kwargs)

        return call

    for (klass, name), fun in patched.items():
        setattr(klass, name, marked(fun, name))
    try:
        yield
    finally:
        for (klass, name), fun in patched.items():
            setattr(klass, name, fun)


class _CapturedMetas(Fp8MetaVariable):
    """The FP8 metas of a model's captured matmuls (a dict by matmul path)."""


def _captured_for(model: nnx.Module, policy: Policy, kinds, args, kwargs) -> capture.Captured:
    """`mpx.capture.Captured` over the model's own call ``model(*args, **kwargs)``."""
    own_call = _original_call(type(model))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def call(state, args, kwargs):
        copy = nnx.merge(graphdef, *state)
        before = _state_values(copy)
        out = own_call(copy, *args, **kwargs)
        # Only what the call changed (batch statistics, RNG counts) goes back, as a plain
        # call would write it: an untouched variable is never written.
        return out, {k: v for k, v in _state_values(copy).items() if v is not before.get(k)}

    layer_ops = {f.path: policy.for_op(f.path, f.kind) for f in find_ops(model, kinds)}
    hint = (f"{type(model).__name__} runs these matmuls outside Linear/Einsum layers and has no FP8 state for "
            f"them: pass example inputs to apply_policy, e.g. mpx.apply_policy(model, policy, x), so that it "
            f"can trace the model and create it")
    root = capture.Root(call, (params, rest), args, kwargs, marking=_marking, layer_op=layer_ops.get,
                        missing_hint=hint)
    return capture.Captured(root, policy, kinds=kinds)


@contextlib.contextmanager
def _marking(naming: Naming) -> Iterator[None]:
    """The root's `mpx.capture.Root.marking`: the model copy's calls are marked for ``naming``
    (`_original_call` reads it) and, being inside the trace, are not captured again."""
    with capture.setting(_IN_CAPTURE, True), capture.setting(_COPY_NAMING, naming):
        yield


# The Naming of the capture trace running now (the model copy's calls are marked for it).
_COPY_NAMING: contextvars.ContextVar[Naming | None] = contextvars.ContextVar("mpx_copy_naming", default=None)


def _original_call(cls: type):
    own = cls.__mro__[1] if getattr(cls, "_mpx_captured", False) else cls
    call = own.__call__

    def run(copy, *args, **kwargs):
        naming = _COPY_NAMING.get()
        if naming is None:
            return call(copy, *args, **kwargs)
        with module_naming(copy, naming):
            return call(copy, *args, **kwargs)

    return run


def _captured_call(self, *args, **kwargs):
    policy, kinds = self._mpx_policy
    kinds = dict(kinds)
    if _IN_CAPTURE.get():
        return _original_call(type(self))(self, *args, **kwargs)
    holder = getattr(self, META_ATTR, None)
    metas = holder.get_value() if holder is not None else {}
    captured = _captured_for(self, policy, kinds, args, kwargs)
    out, changed = captured.apply(metas)  # the model's code runs once, in its trace
    for key, var in _variables(self):
        if key in changed:
            var.set_value(changed[key])
    return out


def _variables(model: nnx.Module):
    """(path, variable) of ``model``'s variables other than parameters and FP8 state."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable) and not isinstance(node, (nnx.Param, Fp8MetaVariable)):
            yield "/".join(str(p) for p in path), node


def _state_values(model: nnx.Module) -> dict:
    return {key: var.get_value() for key, var in _variables(model)}


def captured_class(cls: type) -> type:
    """``cls`` with `_captured_call` as its ``__call__`` (one subclass per class)."""
    if getattr(cls, "_mpx_captured", False):
        return cls
    if cls not in _SUBCLASSES:
        sub = types.new_class(cls.__name__, (cls,), exec_body=lambda ns: ns.update(
            {"__call__": _captured_call, "_mpx_captured": True, "__module__": cls.__module__,
             "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}))
        _SUBCLASSES[cls] = sub
    return _SUBCLASSES[cls]


def capture_matmuls(model: nnx.Module, policy: Policy, kinds: Mapping[str, str] | None, args, kwargs) -> None:
    """Put ``model``'s own calls under `_captured_call` and, given example inputs, create
    the FP8 metas of its captured fp8 matmuls (in place)."""
    object.__setattr__(model, "__class__", captured_class(type(model)))
    model._mpx_policy = (policy, tuple((kinds or {}).items()))  # static: part of the graphdef
    if hasattr(model, META_ATTR):
        delattr(model, META_ATTR)
    if not args and not kwargs:
        return
    metas = _captured_for(model, policy, kinds, args, kwargs).init()
    if metas:
        setattr(model, META_ATTR, _CapturedMetas(metas))


def policy_of(model: nnx.Module) -> tuple[Policy | None, tuple]:
    """``(policy, kinds as pairs)`` that `capture_matmuls` put ``model`` under, or ``(None, ())``."""
    return getattr(model, "_mpx_policy", (None, ()))


def matmuls(model: nnx.Module, policy: Policy, kinds, args, kwargs) -> list[capture.Matmul]:
    """Every matmul of ``model(*args, **kwargs)`` (see `mpx.capture.Matmul`)."""
    return _captured_for(model, policy, kinds, args, kwargs).matmuls()

