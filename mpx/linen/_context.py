"""`policy_context`: unmodified linen models under a policy while they are traced.

One method interceptor does it all: the root module's call of ``init`` / ``apply`` is
captured whole (`mpx.linen._root`), and inside it each Dense / DenseGeneral / Einsum call
takes the layer hook (`mpx.linen._layers`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping

import jax
from flax import linen

from mpx import capture
from mpx.linen._active import ACTIVE, Active, Supplied
from mpx.linen._layers import HOOKED, layer_call
from mpx.linen._root import IN_ROOT, capture_root
from mpx.policy import Policy

# How many module calls are running inside the root call.
_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("mpx_linen_depth", default=0)


def _intercept(next_fun, args, kwargs, context):
    module, active = context.module, ACTIVE.get()
    if active is None:
        return next_fun(*args, **kwargs)
    root = module.scope is not None and module.scope.parent is None
    if not IN_ROOT.get() and root:
        return capture_root(module, active, context.method_name, next_fun, args, kwargs,
                            through_layers=lambda: _module_call(module, active, context, next_fun, args, kwargs))
    return _module_call(module, active, context, next_fun, args, kwargs)


def _module_call(module, active: Active, context, next_fun, args, kwargs):
    """One module method call inside the root call: the layer hook for Dense /
    DenseGeneral / Einsum, the call as it is otherwise."""
    # The root of an apply nested in a module's call (a head applied with the embedding's
    # kernel) has no variables of its own to keep FP8 state in: its matmul is captured
    # under the caller's path instead of taking the layer hook.
    nested_root = module.scope is not None and module.scope.parent is None and _DEPTH.get() > 0
    with capture.setting(_DEPTH, _DEPTH.get() + 1):
        if (nested_root or active.supplied is not None  # a Wrapped model's variables hold no FP8 state
                or context.method_name != "__call__"
                or not isinstance(module, HOOKED)):
            return next_fun(*args, **kwargs)
        return layer_call(module, active, next_fun, args, kwargs)


@contextlib.contextmanager
def activate(policy: Policy, kinds: Mapping[str, str] | None, record: list | None,
             supplied: Supplied | None = None) -> Iterator[None]:
    """`policy_context`, recording every matmul of a traced root call in ``record`` (when
    given) and taking a `Wrapped` model's FP8 state from ``supplied``."""
    with capture.setting(ACTIVE, Active(policy, kinds, record, supplied=supplied)), linen.intercept_methods(_intercept):
        yield


def policy_context(policy: Policy, *, kinds: Mapping[str, str] | None = None):
    """Run unmodified linen models under ``policy`` inside this ``with`` block.

    Every ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` call computes in its op's
    dtype through a `PolicyDotGeneral` (fp8 ops with their meta in `FP8_COLLECTION`).
    Ops are named by their path in the parameter tree and are of kind ``dense``
    (``einsum`` for nn.Einsum) unless ``kinds`` maps a matching path pattern (policy
    syntax: ``*`` one segment, ``**`` any) to another kind, e.g. ``{"head": "head"}``.
    A layer given its own ``dot_general_cls`` / ``dot_general`` keeps it. The innermost
    context wins. It acts when the model is traced: enter it inside the jitted function.
    `mpx.apply_policy` wraps a module's ``init`` and ``apply`` in it (`PolicyModule`).
    """
    return activate(policy, kinds, None)


def matmuls_linen(model: linen.Module, policy: Policy, *args, kinds: Mapping[str, str] | None = None,
                  **kwargs) -> list[capture.Matmul]:
    """Every matmul ``model`` runs on ``args``/``kwargs`` under ``policy`` (see
    `mpx.capture.Matmul`), in trace order: layer ops, captured matmuls and those left
    outside the policy with the reason. Traces ``model.init`` abstractly (nothing is
    computed) under `policy_context`."""
    found: list = []

    def init(*a):
        key = jax.random.key(0)
        return model.init({"params": key, "dropout": key}, *a, **kwargs)

    with activate(policy, kinds, found):
        jax.eval_shape(init, *args)
    return found
