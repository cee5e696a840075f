"""The root call of a linen ``init`` / ``apply`` under the policy, every matmul included.

The call is traced as the pure function ``apply(variables, *args)`` of an unbound copy of
the model (an `mpx.capture.Root`); `mpx.capture.Captured` puts the matmuls that no layer
hook reached under the policy (their FP8 meta at ``fp8_meta/captured/<path>``, created on
``init``) and the layers' own policy ops run as they are. Updated mutable collections are
written back to the outer call. A `Wrapped` model's metas come from its caller instead.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

from flax import core as flax_core
from flax import linen

from mpx import capture
from mpx.linen._active import CAPTURED, FP8_COLLECTION, Active
from mpx._naming import Naming

IN_ROOT: contextvars.ContextVar[bool] = contextvars.ContextVar("mpx_linen_in_root", default=False)
"""Set while a root module's call is handled (and during the capture's own trace of it): the
calls inside are not roots of their own."""


def capture_root(module: linen.Module, active: Active, method: str, next_fun, args, kwargs, *,
                 through_layers: Callable[[], object]):
    """The root call (``next_fun``, intercepted) of ``init`` / ``apply`` under the policy:
    init, `Wrapped`'s trace, or apply. ``through_layers()`` is the call with the layer
    hooks (what ``init`` runs first, to create the parameters and the layers' FP8 state)."""
    with capture.setting(IN_ROOT, True):
        initializing = module.is_initializing()
        if initializing:  # creates the parameters and the layers' FP8 state
            out = through_layers()
        root, metas = _root(module, active, method, args, kwargs)
        captured = capture.Captured(root, active.policy, kinds=active.kinds_spec)
        if active.supplied is not None:
            if active.supplied.metas is None:  # Wrapped.init_fp8 / matmuls: trace only
                trace = captured.trace()
                if active.record is not None:
                    active.record.extend(trace.matmuls)
                active.supplied.created.update(captured.meta_specs(trace))
                return next_fun(*args, **kwargs)
            metas = active.supplied.metas
        if initializing:
            trace = captured.trace()
            if active.record is not None:
                active.record.extend(trace.matmuls)
            metas = captured.init(trace=trace)
            if metas:
                module.put_variable(FP8_COLLECTION, CAPTURED, metas)
            return out
        out, updates = captured.apply(metas)
        for col, tree_ in updates.items():
            if col in ("params", FP8_COLLECTION) or not module.is_mutable_collection(col):
                continue
            for name, value in tree_.items():
                module.put_variable(col, name, value)
        return out


def _root(module: linen.Module, active: Active, method: str, args, kwargs) -> tuple[capture.Root, dict]:
    """(the call as an `mpx.capture.Root`, the captured matmuls' metas the variables hold)."""
    rngs = {name: module.make_rng(name) for name in module.scope.rngs if name != "params"}
    unbound = module.clone(parent=None)
    mutable = _inner_mutable(module.scope.mutable)
    intermediates = _capture_intermediates()
    variables = dict(module.variables)
    params = variables.pop("params", None)
    fp8 = dict(variables.pop(FP8_COLLECTION, {}))
    metas = fp8.pop(CAPTURED, {})
    rest = {**variables, **({FP8_COLLECTION: fp8} if fp8 else {})}

    def call(state, args, kwargs):
        params, rest, rngs = state
        variables = {"params": params, **rest} if params is not None else rest
        return unbound.apply(variables, *args, rngs=rngs, method=method, mutable=mutable,
                             capture_intermediates=intermediates, **kwargs)

    root = capture.Root(call, (params, rest, rngs), args, kwargs, marking=_marking, layer_op=active.layer_op)
    return root, metas


def _capture_intermediates():
    """The ``capture_intermediates`` of the apply being run (flax keeps it in its module
    context), for the traced apply to capture the same; False where it cannot be read."""
    from flax.linen import module as linen_module

    stack = getattr(getattr(linen_module, "_context", None), "capture_stack", None)
    return stack[-1] if stack else False


def _inner_mutable(outer):
    """The traced apply's ``mutable``: the outer call's, plus the FP8 collection (so that a
    layer called twice threads its meta); never False, so the apply returns its updates."""
    if outer is True or isinstance(outer, flax_core.scope.DenyList):
        return outer
    outer = [outer] if isinstance(outer, str) else list(outer or [])
    return [*outer, FP8_COLLECTION] if FP8_COLLECTION not in outer else outer


@contextlib.contextmanager
def _marking(naming: Naming) -> Iterator[None]:
    """The root's `mpx.capture.Root.marking`: every module call marked, none a root of its own."""
    with capture.setting(IN_ROOT, True), module_naming(naming):
        yield


def _naming_interceptor(naming: Naming):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        path = "/".join(str(p) for p in module.path)
        with naming.call(path, context.method_name, name=module.name or type(module).__name__):
            return next_fun(*args, **kwargs)

    return intercept


@contextlib.contextmanager
def module_naming(naming: Naming) -> Iterator[None]:
    """Mark every linen module method call for `mpx.capture.Captured` (its ``naming``)."""
    with linen.intercept_methods(_naming_interceptor(naming)):
        yield
