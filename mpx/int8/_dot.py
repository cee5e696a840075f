"""``int8_dot_general``: a ``lax.dot_general`` with both operands on a symmetric int8 grid.

Two recipes (`Int8Config.recipe`):

* ``int8``: the operands are quantized to int8 and multiplied by an s8 x s8 -> s32
  ``dot_general``, the pattern XLA compiles to integer GEMMs on GPUs; the scales are
  applied to the int32 output in f32. The int32 sum is exact, so the result is the
  product of the dequantized operands up to the f32 rescale.
* ``qat``: the operands are fake-quantized (snapped to their int8 grid in the compute
  dtype) and multiplied in the compute dtype: training that sees int8 rounding, for a model
  to be served in int8.

Both differentiate with the straight-through estimator: the quantizer counts as the
identity, so the gradients are those of the plain matmul of the quantized operands,
``g @ deq(q(w))^T`` and ``deq(q(x))^T @ g`` (no value is clipped: the scale comes from
the absolute maximum, so "clipped" STE variants give the same). With ``backward="int8"``
the ``int8`` recipe computes both gradient matmuls as int8 GEMMs as well.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from mpx._dims import free_axes, normalize_dims, transpose_dims
from mpx.int8._config import Int8Config
from mpx.int8._numerics import INT8_MAX, dequantize, fake_quantize, quantize

# The largest contraction whose int32 sum cannot overflow: 127 * 127 * K < 2**31.
MAX_EXACT_K = (2**31 - 1) // (INT8_MAX * INT8_MAX)


def int8_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    config: Int8Config | None = None,
    *,
    rhs_is_weight: bool = True,
    out_dtype=None,
    key: jax.Array | None = None,
) -> jax.Array:
    """``lax.dot_general(lhs, rhs, dimension_numbers)`` through int8, in ``out_dtype``
    (default ``lhs.dtype``).

    Scales are current (from these operands), one per row: over each operand's contracted
    axes, so a scale is constant along the sum and comes out of it (per token of the lhs;
    per output channel of the rhs when it is a weight, per token when ``rhs_is_weight``
    is False, as in attention); or one per tensor, as ``config`` says. Each operand is
    quantized from the dtype it comes in (an f32 master weight is rounded once).

    Args:
      lhs, rhs: float operands. A non-finite value gives a non-finite output (through its
        scale), never a plausible finite one.
      dimension_numbers: as for ``lax.dot_general``; batch dimensions are supported.
      config: recipe, backward, granularities (see `Int8Config`; default ``Int8Config()``).
      rhs_is_weight: whether the rhs takes ``config.weight_granularity`` (otherwise
        ``activation_granularity``, like the lhs).
      key: with ``backward="int8"``, a PRNG key to round the output gradient
        stochastically (unbiased); without one it is rounded to nearest.
    """
    config = Int8Config() if config is None else config
    if not isinstance(config, Int8Config):
        raise TypeError(f"config must be an Int8Config, got {type(config).__name__}")
    dims = normalize_dims(dimension_numbers)
    out_dtype = jnp.dtype(out_dtype if out_dtype is not None else lhs.dtype)
    (lc, rc), _ = dims
    rhs_granularity = config.weight_granularity if rhs_is_weight else config.activation_granularity
    lhs_axes = None if config.activation_granularity == "tensor" else lc
    rhs_axes = None if rhs_granularity == "tensor" else rc
    if config.recipe == "qat":
        return lax.dot_general(ste_fake_quantize(lhs, lhs_axes, out_dtype), ste_fake_quantize(rhs, rhs_axes, out_dtype),
                               dims)
    per_row = (lhs_axes is not None, rhs_axes is not None)
    return _int8_dot(lhs, rhs, key, dims, per_row, out_dtype, config.backward, jnp.dtype(lhs.dtype),
                     jnp.dtype(rhs.dtype))


# ----------------------------------------------------------------------------- int8 GEMMs


def int_dot(qa: jax.Array, qb: jax.Array, dims, *, max_k: int = MAX_EXACT_K) -> jax.Array:
    """``dot_general`` of two int8 arrays as f32, summed in int32 (s8 x s8 -> s32).

    A contraction longer than ``max_k`` could overflow int32; it is split along its
    longest contracted axis into pieces that cannot, each an s8 x s8 -> s32 dot, and the
    pieces are added in f32 (a weight gradient contracts over every token of the batch).
    """
    (ac, bc), _ = dims
    k = math.prod(qa.shape[a] for a in ac)
    if k <= max_k:
        return lax.dot_general(qa, qb, dims, preferred_element_type=jnp.int32).astype(jnp.float32)
    i = max(range(len(ac)), key=lambda j: qa.shape[ac[j]])
    size = qa.shape[ac[i]]
    step = max(1, max_k // (k // size))
    total = None
    for start in range(0, size, step):
        stop = min(start + step, size)
        part = int_dot(lax.slice_in_dim(qa, start, stop, axis=ac[i]), lax.slice_in_dim(qb, start, stop, axis=bc[i]),
                       dims, max_k=max_k)
        total = part if total is None else total + part
    return total


def _output_scale(scale, contracting, batch, n_before: int, n_after: int):
    """An operand's scale (kept dims) laid out like the ``dot_general`` output: batch axes,
    then ``n_before`` ones, the operand's free axes, ``n_after`` ones."""
    free = free_axes(scale.ndim, contracting, batch)
    s = jnp.transpose(scale, (*batch, *free, *contracting))  # the contracted axes have size 1
    s = s.reshape(s.shape[: len(batch) + len(free)])
    nb = len(batch)
    return s.reshape(s.shape[:nb] + (1,) * n_before + s.shape[nb:] + (1,) * n_after)


def scaled_int_dot(qa, scale_a, qb, scale_b, dims, out_dtype) -> jax.Array:
    """``dot_general(qa, qb)`` (int32 sum) times both scales in f32, cast to ``out_dtype``."""
    (ac, bc), (ab, bb) = dims
    n_free_a = len(free_axes(qa.ndim, ac, ab))
    n_free_b = len(free_axes(qb.ndim, bc, bb))
    sa = _output_scale(scale_a.astype(jnp.float32), ac, ab, 0, n_free_b)
    sb = _output_scale(scale_b.astype(jnp.float32), bc, bb, n_free_a, 0)
    return (int_dot(qa, qb, dims) * sa * sb).astype(out_dtype)


def _quantized_dot(a, b, dims, per_row: tuple[bool, bool], out_dtype, key=None):
    """An int8 GEMM of float operands: each quantized per row of this contraction (or per
    tensor); ``a`` stochastically with ``key``."""
    (ac, bc), _ = dims
    qa, sa = quantize(a, ac if per_row[0] else None, key=key)
    qb, sb = quantize(b, bc if per_row[1] else None)
    return scaled_int_dot(qa, sa, qb, sb, dims, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _int8_dot(lhs, rhs, key, dims, per_row, out_dtype, backward, lhs_dtype, rhs_dtype):
    return _int8_dot_fwd(lhs, rhs, key, dims, per_row, out_dtype, backward, lhs_dtype, rhs_dtype)[0]


def _int8_dot_fwd(lhs, rhs, key, dims, per_row, out_dtype, backward, lhs_dtype, rhs_dtype):
    (lc, rc), _ = dims
    q_lhs, s_lhs = quantize(lhs, lc if per_row[0] else None)
    q_rhs, s_rhs = quantize(rhs, rc if per_row[1] else None)
    out = scaled_int_dot(q_lhs, s_lhs, q_rhs, s_rhs, dims, out_dtype)
    if backward == "int8":
        # Each gradient GEMM contracts other axes than the forward, along which the forward's
        # scales vary: it quantizes the operands again, from the originals.
        return out, (lhs, rhs, key)
    return out, (q_lhs, s_lhs, q_rhs, s_rhs)  # int8 residuals: a quarter of f32's memory


def _int8_dot_bwd(dims, per_row, out_dtype, backward, lhs_dtype, rhs_dtype, residuals, g):
    if backward == "int8":
        lhs, rhs, key = residuals
        keys = (None, None) if key is None else tuple(jax.random.split(key))
        # The output gradient is an activation: per row of each GEMM when the lhs is.
        dims_l, perm_l = transpose_dims(dims, lhs.ndim, rhs.ndim, wrt="lhs")
        d_lhs = _quantized_dot(g, rhs, dims_l, (per_row[0], per_row[1]), jnp.float32, keys[0])
        dims_r, perm_r = transpose_dims(dims, lhs.ndim, rhs.ndim, wrt="rhs")
        d_rhs = _quantized_dot(g, lhs, dims_r, (per_row[0], per_row[0]), jnp.float32, keys[1])
        d_lhs = jnp.transpose(d_lhs, perm_l).astype(lhs_dtype)
        d_rhs = jnp.transpose(d_rhs, perm_r).astype(rhs_dtype)
        return d_lhs, d_rhs, None
    q_lhs, s_lhs, q_rhs, s_rhs = residuals
    a, b = dequantize(q_lhs, s_lhs, out_dtype), dequantize(q_rhs, s_rhs, out_dtype)
    _, vjp = jax.vjp(lambda a, b: lax.dot_general(a, b, dims), a, b)
    d_lhs, d_rhs = vjp(g.astype(out_dtype))
    return d_lhs.astype(lhs_dtype), d_rhs.astype(rhs_dtype), None


_int8_dot.defvjp(_int8_dot_fwd, _int8_dot_bwd)


# ----------------------------------------------------------------------------- fake quantization


def ste_fake_quantize(x: jax.Array, axes=None, dtype=None) -> jax.Array:
    """`fake_quantize` (``x`` snapped to its int8 grid, in ``dtype``, default ``x.dtype``)
    with the straight-through gradient: the incoming gradient, cast to ``x.dtype``."""
    axes = None if axes is None else tuple(axes) if not isinstance(axes, int) else (axes,)
    return _ste(x, axes, jnp.dtype(dtype if dtype is not None else x.dtype), jnp.dtype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _ste(x, axes, dtype, x_dtype):
    return fake_quantize(x, axes, dtype)


def _ste_fwd(x, axes, dtype, x_dtype):
    return fake_quantize(x, axes, dtype), None


def _ste_bwd(axes, dtype, x_dtype, _, g):
    return (g.astype(x_dtype),)


_ste.defvjp(_ste_fwd, _ste_bwd)
