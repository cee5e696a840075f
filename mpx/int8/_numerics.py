"""Symmetric int8 arithmetic on arrays: scales, quantize (nearest or stochastic), dequantize.

Convention (the opposite direction of `mpx.fp8`'s, as int8 libraries write it): ``scale``
is the size of one int8 step.

    scale = amax / 127               over the axes that share a scale (see `absmax_scale`)
    q = clip(round(x / scale), -127, 127)          quantize
    x ~= q * scale                   dequantize

Symmetric and zero-point free: the codes are [-127, 127], not [-128, 127]. -128 has no
positive twin, so with it the grid would be lopsided; without it negating a tensor negates
its codes exactly (``q(-x) == -q(x)``) and the product of two codes needs no zero-point
correction terms.

Which axes share a scale (``axes``, the axes the amax is taken over) is the granularity:
all axes for one scale per tensor, the contracted axes of a matmul operand for one scale
per row (per token of an activation, per output channel of a weight). A matmul can only
take its operands' scales out of its sum when they are constant along the contraction,
so finer granularities than one per row do not fit a GEMM.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

INT8_MAX = 127
_INV_INT8_MAX = np.float32(1.0 / INT8_MAX)

# The smallest scale: an all-zero row gets it (its codes stay 0, and 0 * scale is 0) and so
# does a row whose amax / 127 would underflow f32. A normal number, so that no backend's
# flush-to-zero turns it into a division by zero.
MIN_SCALE = float(jnp.finfo(jnp.float32).tiny)


def _axes(x: jax.Array, axes: int | Sequence[int] | None) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(x.ndim))
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return tuple(a % x.ndim for a in axes) if x.ndim else ()


def absmax_scale(x: jax.Array, axes: int | Sequence[int] | None = None) -> jax.Array:
    """``max(amax * (1 / 127), MIN_SCALE)`` as f32, the amax taken over ``axes`` (``None``: all).

    Kept dims: the result broadcasts against ``x``. A product with the f32 reciprocal of
    127 rather than a division: XLA rewrites a division by a constant into that product
    under ``jit`` (but not eagerly), so only the product gives the same scale everywhere
    (127 * f32(1 / 127) is exactly 1: an amax of 127 gives a scale of 1).

    A non-finite value makes its scale inf or NaN, which every product with the scale
    (the dequantized tensor, the rescaled matmul output) carries on: an overflow upstream
    stays visible downstream instead of being quantized into plausible numbers. (XLA
    flushes subnormal inputs to zero on CPU and GPU; they quantize as zeros.)
    """
    amax = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=_axes(x, axes), keepdims=True)
    return jnp.maximum(amax * _INV_INT8_MAX, jnp.float32(MIN_SCALE))  # NaN propagates


def quantize_with_scale(x: jax.Array, scale: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
    """int8 codes of ``x / scale``: rounded to nearest (ties to even), or stochastically
    with ``key``; clipped to [-127, 127]. A non-finite ``x / scale`` gives code 0 (the
    non-finite value lives on in the scale; see `absmax_scale`).

    Stochastic rounding, ``floor(x / scale + u)`` with ``u ~ U[0, 1)``, rounds up with a
    probability equal to the fractional part, so the codes are unbiased: ``E[q] = x /
    scale`` (within [-127, 127]). Used for gradients, where a systematic rounding bias adds
    up over steps while independent noise averages out.

    >>> x = jnp.full((10000,), 0.3)                                  # 0.3 of a step
    >>> quantize_with_scale(x, jnp.float32(1.0))[:3].tolist()        # nearest: always 0
    [0, 0, 0]
    >>> q = quantize_with_scale(x, jnp.float32(1.0), key=jax.random.key(0))
    >>> sorted(set(q.tolist())), round(float(q.mean()), 1)           # stochastic: 0 or 1, 0.3 on average
    ([0, 1], 0.3)
    """
    y = x.astype(jnp.float32) / scale.astype(jnp.float32)
    if key is None:
        y = jnp.round(y)  # half to even
    else:
        y = jnp.floor(y + jax.random.uniform(key, y.shape, jnp.float32))
    y = jnp.clip(y, -INT8_MAX, INT8_MAX)
    return jnp.where(jnp.isfinite(y), y, 0).astype(jnp.int8)


def quantize(
    x: jax.Array, axes: int | Sequence[int] | None = None, *, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``(codes int8, scale f32)`` of ``x``, one scale per slice over ``axes`` (``None``:
    one per tensor); the scale has ``x``'s rank and broadcasts against it.

        q, s = quantize(w, axes=0)        # w (K, N): one scale per output channel, s (1, N)
        q, s = quantize(x, axes=-1)       # x (B, T, K): one scale per token, s (B, T, 1)

    >>> w = jnp.array([[1.27, -0.02], [0.5, 0.005]])
    >>> q, scale = quantize(w, axes=0)    # column amaxes 1.27 and 0.02 each map to 127
    >>> q.tolist(), scale.shape
    ([[127, -127], [50, 32]], (1, 2))
    >>> np.asarray(dequantize(q, scale), np.float64).round(3).tolist()
    [[1.27, -0.02], [0.5, 0.005]]
    """
    scale = absmax_scale(x, axes)
    return quantize_with_scale(x, scale, key=key), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``q * scale`` in ``dtype`` (the product taken in f32, rounded once)."""
    return (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(dtype)


def fake_quantize(x: jax.Array, axes: int | Sequence[int] | None = None, dtype=None) -> jax.Array:
    """``dequantize(*quantize(x, axes), dtype)``: ``x`` snapped to its int8 grid, in ``dtype``
    (default ``x.dtype``). No gradient rule of its own: see `mpx.int8._dot.ste_fake_quantize`."""
    q, scale = quantize(x, axes)
    return dequantize(q, scale, x.dtype if dtype is None else dtype)
