"""Policy-driven ops: the one place where a precision decision becomes a computation."""

from __future__ import annotations

import jax
from jax import lax

from mpx.fp8 import Fp8Meta, fp8_dot_general
from mpx.policy import OpPrecision


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    op: OpPrecision,
    meta: Fp8Meta | None = None,
) -> tuple[jax.Array, Fp8Meta | None]:
    """``lax.dot_general`` in the precision ``op`` was given; returns ``(out, meta)``.

    fp8: `fp8_dot_general` with ``meta`` (required), output in ``op.dtype``; the meta it
    returns is for the next call of the same op in this step. Otherwise both operands are
    cast to ``op.dtype`` and multiplied there; ``meta`` is passed through untouched.
    """
    if op.is_fp8:
        if meta is None:
            raise ValueError(
                f"op {op.path!r} ({op.kind}) runs in fp8 but no Fp8Meta was given; create one with "
                f"Fp8Meta.init({op.fp8.amax_history}) and pass it as `meta`"
            )
        return fp8_dot_general(lhs, rhs, dimension_numbers, meta, config=op.fp8, out_dtype=op.dtype)
    out = lax.dot_general(lhs.astype(op.dtype), rhs.astype(op.dtype), dimension_numbers)
    return out, meta
