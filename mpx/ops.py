"""Policy-driven ops: the one place where a precision decision becomes a computation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from mpx.fp8 import Fp8Meta, fp8_dot_general
from mpx.int8 import int8_dot_general
from mpx import _probe, ptq
from mpx._naming import op_scope
from mpx.policy import MATMUL_KINDS, WEIGHT_RHS_KINDS, OpPrecision


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    op: OpPrecision,
    meta: Fp8Meta | None = None,
) -> tuple[jax.Array, Fp8Meta | None]:
    """``lax.dot_general`` in the precision ``op`` was given; returns ``(out, meta)``.

    fp8: `fp8_dot_general` with ``meta`` (required, made for the policy's `Fp8Config`),
    output in ``op.dtype``; the meta it returns is for the next call of the same op in
    this step. int8: `int8_dot_general` with the policy's `Int8Config` (the rhs of
    ``dense``/``einsum``/``head`` ops is the weight, both operands of the attention
    matmuls are activations), output in ``op.dtype``; int8 keeps no state, so ``meta`` is
    returned untouched. Otherwise, and for an fp8 or int8 matmul smaller than its config's
    ``min_size`` in any dimension, both operands are cast to ``op.dtype`` and multiplied
    there; ``meta`` is passed through untouched (an op that never runs in FP8 never
    advances its meta).

    The computation is named ``mpx[<op path>]`` (`mpx._naming.op_scope`), forward and
    backward: profiles show the op's path, and `mpx.inspect.fp8_gemms` maps compiled
    GEMMs back to it.
    """
    if not op.path:
        return _dot_general(lhs, rhs, dimension_numbers, op, meta)
    with jax.named_scope(op_scope(op.path)):
        return _dot_general(lhs, rhs, dimension_numbers, op, meta)


def gemm_dims(lhs_shape, rhs_shape, dimension_numbers) -> tuple[int, int, int]:
    """(M, K, N) of a ``dot_general``: lhs free, contracted and rhs free sizes (per batch)."""
    (lc, rc), (lb, rb) = dimension_numbers
    size = lambda shape, axes: int(math.prod(shape[a] for a in axes))  # noqa: E731
    free = lambda shape, c, b: [a for a in range(len(shape)) if a not in c and a not in b]  # noqa: E731
    return size(lhs_shape, free(lhs_shape, lc, lb)), size(lhs_shape, lc), size(rhs_shape, free(rhs_shape, rc, rb))


def _dot_general(lhs, rhs, dimension_numbers, op: OpPrecision, meta):
    if op.kind in WEIGHT_RHS_KINDS:
        ptq.record(op.path, lhs)  # a no-op unless `mpx.ptq.calibrate` is running
    if op.input_clip is not None:  # the policy's static input grid (post-training quantization)
        lhs = ptq.fake_quantize_input(lhs, op.input_clip, op.input_format)
    probe = _probe.active()  # None unless `mpx.inspect.sensitivity` is tracing: then nothing below changes
    if probe is not None and op.kind in MATMUL_KINDS:
        out = _probe.probed(probe, lhs, rhs, dimension_numbers, op.path, op.kind, op.kind in WEIGHT_RHS_KINDS)
        if out is not None:
            return out, meta
    min_size = op.fp8.min_size if op.is_fp8 else op.int8.min_size if op.is_int8 else 0
    if min_size and min(gemm_dims(lhs.shape, rhs.shape, dimension_numbers)) < min_size:
        return lax.dot_general(lhs.astype(op.dtype), rhs.astype(op.dtype), dimension_numbers), meta
    if op.is_int8:
        out = int8_dot_general(lhs, rhs, dimension_numbers, op.int8, rhs_is_weight=op.kind in WEIGHT_RHS_KINDS,
                               out_dtype=op.dtype)
        return out, meta
    if op.is_fp8:
        if meta is None:
            raise ValueError(
                f"op {op.path!r} ({op.kind}) runs in fp8 but no Fp8Meta was given; create one with "
                f"Fp8Meta.init(policy.fp8) and pass it as `meta`"
            )
        if meta.config != op.fp8:
            raise ValueError(
                f"op {op.path!r} ({op.kind}): its Fp8Meta was made for {meta.config} but the policy says "
                f"{op.fp8}; build the meta under this policy (Fp8Meta.init(policy.fp8), or apply the policy again)"
            )
        return fp8_dot_general(lhs, rhs, dimension_numbers, meta, out_dtype=op.dtype,
                               rhs_is_weight=op.kind in WEIGHT_RHS_KINDS)
    out = lax.dot_general(lhs.astype(op.dtype), rhs.astype(op.dtype), dimension_numbers)
    return out, meta


def _expand_ellipsis(spec: str, ndim: int, fill: str) -> str:
    if "..." not in spec:
        return spec
    return spec.replace("...", fill[: ndim - (len(spec) - 3)])


def einsum_dimension_numbers(subscripts: str, lhs_ndim: int, rhs_ndim: int):
    """Two-operand einsum -> ``(dimension_numbers, perm)`` for ``lax.dot_general``.

    The einsum equals ``transpose(dot_general(lhs, rhs, dims), perm)``. Supported: every
    index appears at most once per operand and each index of an operand also appears in
    the other operand or in the output (no traces, no one-sided sums).
    """
    subscripts = subscripts.replace(" ", "")
    if "->" not in subscripts or subscripts.count(",") != 1:
        raise ValueError(f"einsum {subscripts!r}: expected an explicit two-operand equation 'ab,bc->ac'")
    ins, out = subscripts.split("->")
    a, b = ins.split(",")
    used = set(ins.replace(".", "") + out.replace(".", ""))
    fill = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in used)
    n_ell = max(lhs_ndim - (len(a) - 3 if "..." in a else len(a)), rhs_ndim - (len(b) - 3 if "..." in b else len(b)), 0)
    a, b = _expand_ellipsis(a, lhs_ndim, fill), _expand_ellipsis(b, rhs_ndim, fill)
    out = out.replace("...", fill[:n_ell])
    if len(a) != lhs_ndim or len(b) != rhs_ndim:
        raise ValueError(f"einsum {subscripts!r} does not fit operands of rank {lhs_ndim} and {rhs_ndim}")
    for spec in (a, b, out):
        if len(set(spec)) != len(spec):
            raise ValueError(f"einsum {subscripts!r}: repeated index in {spec!r} (traces) is not supported")
    for spec, other in ((a, b), (b, a)):
        lonely = [c for c in spec if c not in other and c not in out]
        if lonely:
            raise ValueError(f"einsum {subscripts!r}: index {lonely[0]!r} is summed within one operand; not supported")
    batch = [c for c in a if c in b and c in out]
    contract = [c for c in a if c in b and c not in out]
    dims = (
        (tuple(a.index(c) for c in contract), tuple(b.index(c) for c in contract)),
        (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)),
    )
    result = batch + [c for c in a if c not in b] + [c for c in b if c not in a]
    if sorted(result) != sorted(out):
        raise ValueError(f"einsum {subscripts!r}: output indices {out!r} do not match the operands")
    return dims, tuple(result.index(c) for c in out)


def einsum(subscripts: str, lhs, rhs, op: OpPrecision, meta: Fp8Meta | None = None):
    """Two-operand ``jnp.einsum`` as one policy `dot_general`; returns ``(out, meta)``."""
    dims, perm = einsum_dimension_numbers(subscripts, lhs.ndim, rhs.ndim)
    out, meta = dot_general(lhs, rhs, dims, op, meta)
    return jnp.transpose(out, perm), meta
