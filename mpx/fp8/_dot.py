"""``fp8_dot_general``: a ``lax.dot_general`` whose forward and both gradients are FP8 GEMMs.

FP8 arrays go straight into ``lax.dot_general`` and the scales are applied to its output
(in f32), the pattern XLA rewrites into a cuBLASLt FP8 GEMM on GPUs that have one. The
op's `Fp8Meta` goes in with the operands and comes back with the output; in the backward
pass its cotangent is what this call observed (amaxes, a call count, statistics: see
`mpx.fp8._meta`), which a train step turns into the next state with `Fp8Meta.advance`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
import weakref
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax import lax

from mpx._dims import normalize_dims, transpose_dims
from mpx._sharding import mark
from mpx.fp8._meta import (NOT_COUNTED, Fp8Meta, bootstrapping, combine_metas, counting, observation,
                           scale_for_tensor)
from mpx.fp8._numerics import amax, gemm_dtype, observe, quantize
from mpx.fp8._recipes import recipe_dot
from mpx.fp8._saved import saved_for_backward, weights_whole


class Fp8FanoutWarning(UserWarning):
    """One `Fp8Meta` fed two FP8 matmuls under differentiation without being threaded."""


def _scaled_dot(qa, qb, dims, scale_a, scale_b, out_dtype):
    """FP8 x FP8 ``dot_general``, rescaled by ``1 / (scale_a * scale_b)``.

    One multiply of the GEMM's output by the inverse scales' product in the GEMM's own type:
    the form XLA folds into the FP8 GEMM (cuBLASLt takes it as its scale operand, with a bias
    or residual add after it folded in too; a Triton GEMM in its epilogue). Exact: every scale
    is a power of two (`scale_from_amax`), so is the product, and multiplying by it rounds
    nothing. A GEMM output whose range cannot hold the unscaled product (fp16) is produced in
    f32 and cast after the rescale.
    """
    gemm = gemm_dtype(out_dtype)
    out = lax.dot_general(qa, qb, dims, preferred_element_type=gemm)
    inv = (1.0 / scale_a.astype(jnp.float32)) * (1.0 / scale_b.astype(jnp.float32))
    return (out * inv.astype(gemm)).astype(out_dtype)


# Metas already consumed by an FP8 matmul in a trace under differentiation, by identity.
_CONSUMED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


_RETRACED_UNDER_GRAD: contextvars.ContextVar[bool] = contextvars.ContextVar("mpx_retraced_under_grad", default=False)


@contextlib.contextmanager
def retraced_under_differentiation(flag: bool) -> Iterator[None]:
    """Mark a trace made inside a differentiated computation (`mpx.capture` traces a model
    again with ``jax.make_jaxpr``, whose tracers no longer show the differentiation), so
    that reuse warnings still fire in it."""
    token = _RETRACED_UNDER_GRAD.set(flag)
    try:
        yield
    finally:
        _RETRACED_UNDER_GRAD.reset(token)


def under_differentiation(meta: Fp8Meta) -> bool:
    """Whether ``meta`` is being differentiated (its arrays are tracers of jax.grad / vjp,
    or of a trace made under one: `retraced_under_differentiation`)."""
    return hasattr(meta.lhs.scale, "primal") or _RETRACED_UNDER_GRAD.get()


def _warn_if_reused(meta: Fp8Meta, lhs, rhs) -> None:
    """Warn (at trace time) when the very same traced meta feeds a second matmul.

    Only tracers of differentiation (they have a ``primal``) are tracked: in a forward
    pass alone, reuse is harmless. A meta closed over by ``lax.scan`` is traced once and
    not seen here; its fan-out shows in the ``fanout`` statistic instead.
    """
    if not under_differentiation(meta):
        return
    leaf = meta.lhs.scale
    if _CONSUMED.get(id(leaf)) is leaf:
        warnings.warn(
            f"an Fp8Meta was passed to a second FP8 matmul (lhs {lhs.shape}, rhs {rhs.shape}) without "
            "threading: pass on the meta the first call returned. Un-threaded uses add their amax "
            "observations instead of taking the max, so this op's scale is smaller than it needs "
            "to be (reported as `fanout` in mpx.inspect.fp8_stats). NNX layers thread by themselves; "
            "linen: apply(..., mutable=['fp8_meta']); lax.scan: carry the meta.",
            Fp8FanoutWarning,
            stacklevel=3,
        )
    else:
        _CONSUMED[id(leaf)] = leaf


def fp8_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, meta: Fp8Meta, *, out_dtype=None,
                    rhs_is_weight: bool = False):
    """``lax.dot_general`` with both operands quantized to FP8; returns ``(out, meta)``.

    Forward: lhs and rhs are quantized to E4M3 with the scales of ``meta`` (see
    `mpx.fp8._meta.scale_for_use`), multiplied as FP8 and rescaled in f32 to
    ``out_dtype`` (default: ``lhs.dtype``). Backward: the output gradient is quantized
    (E5M2 under ``hybrid``, E4M3 under ``e4m3``) and both input gradients are FP8 GEMMs.
    The cotangent of ``meta`` is this call's observation (plus those of later calls that
    received the returned meta, combined by max): feed it to `Fp8Meta.advance` once per
    step. A non-finite operand or gradient gives NaN, never a clipped finite value.

    A config with scales finer than one per tensor (``granularity`` ``row``, ``block``,
    ``mx``, or a GEMM of its own: `Fp8Config.gemm`) runs `mpx.fp8._recipes.recipe_dot`:
    each GEMM scales its operands along its own contraction.

    The returned ``meta`` equals the input; pass it to the next call of the same op in
    this step (weight sharing, a loop) so that their amaxes combine by max. A meta fed
    to two calls without threading still works, with summed (larger, safe) amaxes, a
    `Fp8FanoutWarning` at trace time and ``fanout`` > 1 in the statistics.

    Args:
      lhs, rhs: operands, any float dtype (e.g. bf16 activations, f32 master weights:
        each is quantized from the dtype it comes in, never rounded twice).
      dimension_numbers: as for ``lax.dot_general``; batch dimensions are supported.
      meta: the op's `Fp8Meta` (its config says recipe, format, history and margin).
      out_dtype: dtype of the result.
      rhs_is_weight: ``rhs`` is a weight (``block`` scales it in square blocks, an
        activation in tiles along the contraction).
    """
    if not isinstance(meta, Fp8Meta):
        raise TypeError(f"meta must be an Fp8Meta (Fp8Meta.init(config)), got {type(meta).__name__}")
    if meta.stack:
        raise ValueError(
            f"this Fp8Meta is stacked with leading axes {meta.stack} (one meta per layer of a scanned stack); "
            "an FP8 matmul takes the meta of one layer: run the layers with nnx.scan / nn.scan / lax.scan "
            "over the stacked meta, or index it"
        )
    history_len = meta.lhs.amax_history.shape[-1]
    if history_len != meta.config.amax_history:
        raise ValueError(
            f"Fp8Meta has an amax history of length {history_len} but its Fp8Config asks for "
            f"{meta.config.amax_history}; create the meta with Fp8Meta.init(config)."
        )
    dims = normalize_dims(dimension_numbers)
    out_dtype = jnp.dtype(out_dtype if out_dtype is not None else lhs.dtype)
    _warn_if_reused(meta, lhs, rhs)
    if not meta.config.per_tensor:
        return recipe_dot(lhs, rhs, meta, dims, out_dtype, jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype), bootstrapping(),
                          bool(rhs_is_weight), counting())
    return _fp8_dot(lhs, rhs, meta, dims, out_dtype, jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype), bootstrapping(),
                    counting(), bool(rhs_is_weight) and weights_whole())


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8, 9))
def _fp8_dot(lhs, rhs, meta, dims, out_dtype, lhs_dtype, rhs_dtype, bootstrap, count, whole_rhs):
    return _fp8_dot_fwd(lhs, rhs, meta, dims, out_dtype, lhs_dtype, rhs_dtype, bootstrap, count, whole_rhs)[0]


def _quantized(x, state, dtype, config, bootstrap, count, stored_dtype=None):
    """(q, scale, observation) of one operand. Delayed scaling without ``bootstrap`` knows
    the scale before ``x`` is read: the quantize and the one reduction that observes ``x``
    are independent and can share a pass (``current`` scaling needs the amax first).
    ``count``: the observation has the saturated / flushed fractions (else `NOT_COUNTED`,
    and the reduction is the amax alone). ``stored_dtype``: the format ``state``'s scale is
    kept for, when ``dtype`` is another (`scale_for_use`)."""
    scale = scale_for_tensor(x, state, dtype, config, bootstrap=bootstrap, stored_dtype=stored_dtype)
    q = quantize(x, dtype, scale)
    if count:
        x_amax, saturated, flushed = observe(x, dtype, scale)
    else:
        x_amax, saturated, flushed = amax(x), NOT_COUNTED, NOT_COUNTED
    return q, scale, observation(state, x_amax, (saturated, flushed))


def _fp8_dot_fwd(lhs, rhs, meta, dims, out_dtype, lhs_dtype, rhs_dtype, bootstrap, count, whole_rhs):
    """``whole_rhs``: the weight's codes laid out whole (`mpx.fp8._saved.keeping_weights_whole`)."""
    fwd = meta.config.forward_dtype
    q_lhs, lhs_scale, seen_lhs = _quantized(lhs, meta.lhs, fwd, meta.config, bootstrap, count)
    q_rhs, rhs_scale, seen_rhs = _quantized(rhs, meta.rhs, fwd, meta.config, bootstrap, count)
    if whole_rhs:
        q_rhs = mark(q_rhs, (None,) * q_rhs.ndim)
    # Named before the GEMM reads them: a remat that keeps them recomputes this output from
    # the kept codes (no second quantize, no second gather), not from lhs and rhs.
    saved = saved_for_backward((q_lhs, q_rhs, lhs_scale, rhs_scale, seen_lhs, seen_rhs))
    q_lhs, q_rhs, lhs_scale, rhs_scale = saved[:4]
    out = _scaled_dot(q_lhs, q_rhs, dims, lhs_scale, rhs_scale, out_dtype)
    return (out, meta), (*saved, meta)


def _fp8_dot_bwd(dims, out_dtype, lhs_dtype, rhs_dtype, bootstrap, count, whole_rhs, residuals, cotangents):
    q_lhs, q_rhs, lhs_scale, rhs_scale, seen_lhs, seen_rhs, meta = residuals
    g, later = cotangents
    config = meta.config
    # The gradient in each GEMM's format (`Fp8Config.grad_dtype_of`): one quantization when they agree.
    q_g, g_scale, seen_g = _quantized(g, meta.grad, config.grad_dtype_of("input_grad"), config, bootstrap, count,
                                      stored_dtype=config.grad_dtype)
    q_gw, gw_scale = q_g, g_scale
    if config.grad_dtype_of("weight_grad") != config.grad_dtype_of("input_grad"):
        q_gw, gw_scale, _ = _quantized(g, meta.grad, config.grad_dtype_of("weight_grad"), config, bootstrap, False,
                                       stored_dtype=config.grad_dtype)

    dims_l, perm_l = transpose_dims(dims, q_lhs.ndim, q_rhs.ndim, wrt="lhs")
    d_lhs = _scaled_dot(q_g, q_rhs, dims_l, g_scale, rhs_scale, out_dtype)
    d_lhs = jnp.transpose(d_lhs, perm_l).astype(lhs_dtype)
    dims_r, perm_r = transpose_dims(dims, q_lhs.ndim, q_rhs.ndim, wrt="rhs")
    d_rhs = _scaled_dot(q_gw, q_lhs, dims_r, gw_scale, lhs_scale, out_dtype)
    d_rhs = jnp.transpose(d_rhs, perm_r).astype(rhs_dtype)

    mine = Fp8Meta(seen_lhs, seen_rhs, seen_g, config=config)
    # `later`: observations of calls that received the returned meta (zeros if none).
    return d_lhs, d_rhs, combine_metas(mine, later)


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)
