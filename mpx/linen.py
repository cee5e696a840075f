"""Flax linen models under a precision policy.

Two ways in, one mechanism (`PolicyDotGeneral`):

* a model you write: pass ``dot_general_cls=functools.partial(PolicyDotGeneral, policy=policy)``
  to ``nn.Dense`` / ``nn.DenseGeneral``;
* a model you cannot change (it just uses ``nn.Dense``): run it inside
  ``policy_context(policy)``, which intercepts every Dense / DenseGeneral call.

Either way the parameter tree is the plain model's, and each FP8 matmul keeps its
`mpx.fp8.Fp8Meta` in the ``fp8_meta`` collection (`FP8_COLLECTION`), next to its layer::

    with mpx.linen.policy_context(policy):
        variables = model.init(key, x)
    params, meta = variables["params"], variables.get(mpx.linen.FP8_COLLECTION, {})

    def loss_fn(params, meta, batch, rng):          # for mpx.train_step
        with mpx.linen.policy_context(policy):
            y, _ = model.apply({"params": params, FP8_COLLECTION: meta}, batch["x"],
                               mutable=[FP8_COLLECTION])
        return jnp.mean((y.astype(jnp.float32) - batch["y"]) ** 2)
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from flax import linen as nn

from mpx import ops
from mpx.fp8 import Fp8Meta
from mpx.policy import KINDS, Policy, _translate_pattern

FP8_COLLECTION = "fp8_meta"
_DENSE = (nn.Dense, nn.DenseGeneral)


def _op_path(scope_path) -> str:
    return "/".join(str(p) for p in scope_path)


class PolicyDotGeneral(nn.Module):
    """A ``dot_general_cls`` that obeys ``policy`` for the layer that owns it.

    The op's path is the owning layer's path in the parameter tree; ``kind`` defaults to
    ``dense``. FP8 ops keep their meta in the ``fp8_meta`` collection and write the
    threaded meta back when that collection is mutable.
    """

    policy: Policy
    kind: str = "dense"

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
        op = self.policy.for_op(_op_path(self.scope.path[:-1]), self.kind)
        if not op.is_fp8:
            out, _ = ops.dot_general(lhs, rhs, dimension_numbers, op)
            return out
        meta = self.variable(FP8_COLLECTION, "meta", Fp8Meta.init, op.fp8.amax_history)
        out, new = ops.dot_general(lhs, rhs, dimension_numbers, op, meta.value)
        if self.is_mutable_collection(FP8_COLLECTION):
            meta.value = new  # threaded: a second call of this layer combines amaxes by max
        return out


def _kind_for(path: str, overrides) -> str:
    for regex, kind in overrides:
        if regex.fullmatch(path):
            return kind
    return "dense"


def _compile_kinds(kinds: Mapping[str, str] | None):
    out = []
    for pattern, kind in (kinds or {}).items():
        if kind not in KINDS:
            raise ValueError(f"unknown op kind {kind!r} for path {pattern!r} in kinds; expected one of {', '.join(KINDS)}")
        out.append((re.compile(_translate_pattern(pattern)), kind))
    return out


@contextlib.contextmanager
def _swapped(module, **attrs) -> Iterator[None]:
    """Temporarily set attributes of a (frozen) bound linen module."""
    old = {k: getattr(module, k) for k in attrs}
    for k, v in attrs.items():
        object.__setattr__(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            object.__setattr__(module, k, v)


@contextlib.contextmanager
def policy_context(policy: Policy, *, kinds: Mapping[str, str] | None = None) -> Iterator[None]:
    """Run every ``nn.Dense`` / ``nn.DenseGeneral`` called inside under ``policy``.

    Layers that already have a ``dot_general_cls`` are left alone. ``kinds`` maps path
    patterns (policy syntax) to op kinds, e.g. ``{"head": "head"}``.
    """
    overrides = _compile_kinds(kinds)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, _DENSE) or module.dot_general_cls is not None:
            return next_fun(*args, **kwargs)
        path = _op_path(module.scope.path)
        kind = _kind_for(path, overrides)
        op = policy.for_op(path, kind)
        dot = functools.partial(PolicyDotGeneral, policy=policy, kind=kind)
        with _swapped(module, dot_general_cls=dot, dtype=op.dtype):
            return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def linen_ops(model: nn.Module, policy: Policy, *args, kinds: Mapping[str, str] | None = None, **kwargs):
    """The (path, kind) of every Dense / DenseGeneral op ``model`` runs on these inputs.

    Traced abstractly (``jax.eval_shape`` of ``model.init``): nothing is computed. A
    layer called several times is listed once.
    """
    del policy  # the ops a model has do not depend on the policy
    overrides = _compile_kinds(kinds)
    found: dict[str, str] = {}

    def interceptor(next_fun, a, kw, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, _DENSE):
            path = _op_path(module.scope.path)
            found.setdefault(path, _kind_for(path, overrides))
        return next_fun(*a, **kw)

    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
    return sorted(found.items())


def split_variables(variables: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(params, fp8_meta)`` of a linen variable dict, for `mpx.init_train_state`."""
    return variables["params"], variables.get(FP8_COLLECTION, {})


def apply_with_meta(model: nn.Module, params, meta, *args, **kwargs):
    """``model.apply`` with the FP8 meta threaded through (call inside `policy_context`)."""
    out, _ = model.apply({"params": params, FP8_COLLECTION: meta}, *args, mutable=[FP8_COLLECTION], **kwargs)
    return out


__all__ = ["FP8_COLLECTION", "PolicyDotGeneral", "apply_with_meta", "linen_ops", "policy_context", "split_variables"]
