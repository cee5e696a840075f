"""The FP8 matmul under a scaling recipe other than one scale per tensor everywhere.

Each of a matmul's three GEMMs (forward x.w, input gradient dy.w^T, weight gradient x^T.dy)
runs under its own granularity from the op's `Fp8Config` (`Fp8Config.gemm`), or in the
compute dtype. Every GEMM quantizes its operands along its own contraction (a per-row scale
of the forward is a per-column scale of the weight gradient), so the backward keeps the
operands in the precision they came in, not their forward FP8 copies: more saved memory
than the per-tensor program (`mpx.fp8._dot`), which keeps the FP8 copies.

The op's `Fp8Meta` still observes each tensor once per call (the amax of the whole tensor,
and the saturated and flushed fractions of the first GEMM that quantizes it: forward for x
and w, input gradient for dy; the fractions only in a step that counts them,
`mpx.fp8._meta.statistics`), so the logs and the step's finite check see what they see under
per-tensor scaling.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mpx import program
from mpx._dims import transpose_dims
from mpx.fp8._granular import canonical, quantize_canonical, scaled_product, statistics
from mpx.fp8._meta import NOT_COUNTED, Fp8Meta, Fp8Scale, combine_metas, observation, scale_for_tensor
from mpx.fp8._numerics import amax, gemm_dtype


def _quantize(x, granularity, dtype, state: Fp8Scale, config, bootstrap, weight, stored_dtype):
    if granularity == "tensor":
        scale = scale_for_tensor(x, state, dtype, config, bootstrap=bootstrap, stored_dtype=stored_dtype)
        return quantize_canonical(x, "tensor", dtype, tensor_scale=scale)
    return quantize_canonical(x, granularity, dtype, weight=weight, block_size=config.block_size)


def _gemm(x, y, dims, role, meta: Fp8Meta, states, dtypes, weights, bootstrap, count, out_dtype):
    """One GEMM of the op under its role's granularity: ``(out, (seen_x, seen_y))``, ``out``
    in ``dot_general``'s layout (batch, x free, y free) and ``out_dtype``; ``None`` for the
    observations of a GEMM that runs in the compute dtype. ``count``: the observations have
    the saturated / flushed fractions (else the amax alone, `NOT_COUNTED`)."""
    config = meta.config
    granularity = config.gemm(role)
    if granularity == "compute":
        out = lax.dot_general(x.astype(out_dtype), y.astype(out_dtype), dims)
        return out, (None, None)
    (xc, yc), (xb, yb) = dims
    cx, cy = canonical(x, xc, xb), canonical(y, yc, yb)
    # the gradient GEMMs' first operand is dy, whose stored scale is kept for `grad_dtype`; its
    # GEMM may take another format
    fwd = config.forward_dtype
    stored = (fwd, fwd) if role == "forward" else (config.grad_dtype, fwd)
    qx = _quantize(cx.x, granularity, dtypes[0], states[0], config, bootstrap, weights[0], stored[0])
    qy = _quantize(cy.x, granularity, dtypes[1], states[1], config, bootstrap, weights[1], stored[1])
    # MX tiles go to a GEMM that scales them itself where the target has one (a Blackwell GPU)
    native = granularity in program.block_scaled_gemms(cx.x)
    out = scaled_product(qx, qy, gemm_dtype(out_dtype), block_scaled=native).astype(out_dtype)
    out = out.reshape(*cx.batch_shape, *cx.free_shape, *cy.free_shape)
    if count:
        seen = tuple(observation(s, *_split(statistics(c.x, q, dt)))
                     for s, c, q, dt in zip(states, (cx, cy), (qx, qy), dtypes))
    else:
        seen = tuple(observation(s, amax(c.x), (NOT_COUNTED, NOT_COUNTED)) for s, c in zip(states, (cx, cy)))
    return out, seen


def _split(stats):
    peak, saturated, flushed = stats
    return peak, (saturated, flushed)


def _amax_only(state: Fp8Scale, x, count: bool) -> Fp8Scale:
    """The observation of a tensor no GEMM of the op quantized: its amax, no statistics."""
    nothing = jnp.float32(0) if count else NOT_COUNTED
    return observation(state, amax(x), (nothing, nothing))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8, 9))
def recipe_dot(lhs, rhs, meta, dims, out_dtype, lhs_dtype, rhs_dtype, bootstrap, rhs_is_weight, count):
    """``(out, meta)`` of the op's forward GEMM; its VJP runs the two gradient GEMMs."""
    return _fwd(lhs, rhs, meta, dims, out_dtype, lhs_dtype, rhs_dtype, bootstrap, rhs_is_weight, count)[0]


def _fwd(lhs, rhs, meta, dims, out_dtype, lhs_dtype, rhs_dtype, bootstrap, rhs_is_weight, count):
    fwd = meta.config.forward_dtype
    out, seen = _gemm(lhs, rhs, dims, "forward", meta, (meta.lhs, meta.rhs), (fwd, fwd), (False, rhs_is_weight),
                      bootstrap, count, out_dtype)
    return (out, meta), (lhs, rhs, meta, seen)


def _bwd(dims, out_dtype, lhs_dtype, rhs_dtype, bootstrap, rhs_is_weight, count, residuals, cotangents):
    lhs, rhs, meta, (seen_lhs, seen_rhs) = residuals
    g, later = cotangents
    fwd = meta.config.forward_dtype
    grad_i, grad_w = meta.config.grad_dtype_of("input_grad"), meta.config.grad_dtype_of("weight_grad")

    dims_l, perm_l = transpose_dims(dims, lhs.ndim, rhs.ndim, wrt="lhs")
    d_lhs, (seen_g, seen_rhs_bwd) = _gemm(g, rhs, dims_l, "input_grad", meta, (meta.grad, meta.rhs), (grad_i, fwd),
                                          (False, rhs_is_weight), bootstrap, count, out_dtype)
    d_lhs = jnp.transpose(d_lhs, perm_l).astype(lhs_dtype)
    dims_r, perm_r = transpose_dims(dims, lhs.ndim, rhs.ndim, wrt="rhs")
    d_rhs, (seen_g_w, seen_lhs_bwd) = _gemm(g, lhs, dims_r, "weight_grad", meta, (meta.grad, meta.lhs), (grad_w, fwd),
                                            (False, False), bootstrap, count, out_dtype)
    d_rhs = jnp.transpose(d_rhs, perm_r).astype(rhs_dtype)

    def first(*seen, state, x):
        found = next((s for s in seen if s is not None), None)
        return found if found is not None else _amax_only(state, x, count)

    mine = Fp8Meta(first(seen_lhs, seen_lhs_bwd, state=meta.lhs, x=lhs),
                   first(seen_rhs, seen_rhs_bwd, state=meta.rhs, x=rhs),
                   first(seen_g, seen_g_w, state=meta.grad, x=g), config=meta.config)
    # `later`: observations of calls that received the returned meta (zeros if none).
    return d_lhs, d_rhs, combine_metas(mine, later)


recipe_dot.defvjp(_fwd, _bwd)
