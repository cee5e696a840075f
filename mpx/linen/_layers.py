"""The layer hook: a linen ``Dense`` / ``DenseGeneral`` / ``Einsum`` call through its policy op.

Inside `mpx.linen.policy_context`, these layers compute in their op's dtype through a
`PolicyDotGeneral` (their FP8 meta at ``fp8_meta/<layer path>/PolicyDotGeneral_0/meta``);
the model's code and parameter tree stay the plain model's.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import jax.numpy as jnp
import opt_einsum
from flax import linen
from flax.linen import dtypes as linen_dtypes

from mpx import ops
from mpx.linen._active import Active
from mpx.linen._dot import PolicyDotGeneral

HOOKED = (linen.Dense, linen.DenseGeneral, linen.Einsum)
"""The linen layers the hook puts under the policy."""


def layer_call(module: linen.Module, active: Active, next_fun, args, kwargs):
    """A Dense / DenseGeneral / Einsum call (``next_fun``, intercepted) through its policy op."""
    path = "/".join(str(p) for p in module.path)
    kind = _op_kind(module, path, active.kinds)
    op = active.policy.for_op(path, kind)
    if isinstance(module, linen.Einsum):
        return _einsum(module, active, kind, op, *args, **kwargs)
    if module.dot_general_cls is not None or module.dot_general is not None:
        return next_fun(*args, **kwargs)  # the layer's own choice stands
    # The layer's own forward with the policy's op and dtype (an fp8 op gets the master
    # kernel). The fields are swapped on the bound module for this call only: a clone on
    # the same scope would work too, but would show up twice in capture_intermediates.
    dot = functools.partial(PolicyDotGeneral, policy=active.policy, kind=kind)
    promote = _promote_keep_kernel if op.is_quantized else module.promote_dtype
    with _swapped(module, dot_general_cls=dot, dtype=op.dtype, promote_dtype=promote):
        return next_fun(*args, **kwargs)


def _promote_keep_kernel(*args, dtype=None, inexact=True):
    """Flax linen's ``promote_dtype``, except that the kernel (the second array) keeps its
    storage dtype: an FP8 or int8 matmul quantizes the master weight itself (one rounding)."""
    inputs, kernel, *rest = args
    inputs, *rest = linen_dtypes.promote_dtype(inputs, *rest, dtype=dtype, inexact=inexact)
    return [inputs, kernel, *rest]


def _op_kind(module: linen.Module, path: str, kinds) -> str:
    for regex, kind in kinds:
        if regex.fullmatch(path):
            return kind
    return "einsum" if isinstance(module, linen.Einsum) else "dense"


def _einsum(module: linen.Einsum, active: Active, kind: str, op, inputs, einsum_str=None):
    """``nn.Einsum.__call__`` with the einsum as one policy dot_general.

    nn.Einsum calls ``jnp.einsum`` itself (no ``dot_general_cls``), so its forward is
    re-done here with the module's own fields; parameter names, shapes and initializers
    are nn.Einsum's.
    """
    einsum_str = linen.merge_param("einsum_str", module.einsum_str, einsum_str).replace(" ", "")
    if "->" not in einsum_str or einsum_str.count(",") != 1:
        raise ValueError(f"nn.Einsum equation {einsum_str!r} must be explicit ('->') with exactly two operands")
    kernel = module.param("kernel", module.kernel_init, module.shape, module.param_dtype)
    bias = None
    if module.use_bias:
        # The bias covers the output axes that come from the kernel (as nn.Einsum does it).
        operands, result, _ = opt_einsum.parser.parse_einsum_input((einsum_str, inputs, kernel))
        rhs_axes = {c: i for i, c in enumerate(operands.split(",")[1])}
        bias_shape = [module.shape[rhs_axes[c]] for c in result if c in rhs_axes]
        broadcast = [module.shape[rhs_axes[c]] if c in rhs_axes else 1 for c in result]
        bias = module.param("bias", module.bias_init, bias_shape, module.param_dtype)
    promote = _promote_keep_kernel if op.is_quantized else module.promote_dtype
    inputs, kernel, bias = promote(inputs, kernel, bias, dtype=op.dtype)
    dims, perm = ops.einsum_dimension_numbers(einsum_str, inputs.ndim, kernel.ndim)
    dot = PolicyDotGeneral(policy=active.policy, kind=kind, parent=module)
    y = jnp.transpose(dot(inputs, kernel, dims), perm)
    return y if bias is None else y + jnp.reshape(bias, broadcast)


@contextlib.contextmanager
def _swapped(module: linen.Module, **fields) -> Iterator[None]:
    old = {name: getattr(module, name) for name in fields}
    for name, value in fields.items():
        object.__setattr__(module, name, value)  # linen modules are frozen dataclasses
    try:
        yield
    finally:
        for name, value in old.items():
            object.__setattr__(module, name, value)
