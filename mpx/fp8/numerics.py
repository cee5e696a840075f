"""FP8 arithmetic on arrays: saturating quantize, dequantize, amax and scales.

Convention: ``scale`` multiplies into the FP8 domain.

    q = saturate(x * scale)          quantize
    x ~= q / scale                   dequantize
    scale = fp8_max / (amax * 2**margin)

so a tensor whose absolute maximum is ``amax`` just fills the FP8 range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2


def fp8_max(dtype) -> float:
    """Largest finite value of an FP8 dtype (448 for E4M3, 57344 for E5M2).

    >>> fp8_max(E4M3), fp8_max(E5M2)
    (448.0, 57344.0)
    """
    return float(jnp.finfo(dtype).max)


def _scaled(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x.astype(jnp.float32) * scale.astype(jnp.float32)


def quantize(x: jax.Array, dtype, scale: jax.Array) -> jax.Array:
    """Saturating cast of ``x * scale`` to the FP8 ``dtype`` (round to nearest even).

    Finite values beyond the FP8 range become ``±fp8_max``. A non-finite input (inf or
    NaN) becomes NaN: an overflow upstream must stay visible downstream, never be
    clipped into a plausible finite number.

    >>> q = quantize(jnp.array([0.5, -3.0, 1000.0]), E4M3, jnp.float32(2.0))   # 2000 saturates
    >>> q.astype(jnp.float32).tolist()
    [1.0, -6.0, 448.0]
    >>> dequantize(q, jnp.float32(2.0)).tolist()
    [0.5, -3.0, 224.0]
    >>> quantize(jnp.array([1.05, 1.1, 1.2]), E4M3, jnp.float32(1.0)).astype(jnp.float32).tolist()  # 3 mantissa bits
    [1.0, 1.125, 1.25]
    >>> quantize(jnp.array([1.0, jnp.inf]), E4M3, jnp.float32(1.0)).astype(jnp.float32).tolist()
    [1.0, nan]
    """
    limit = fp8_max(dtype)
    y = jnp.clip(_scaled(x, scale), -limit, limit)
    return jnp.where(jnp.isfinite(x), y, jnp.nan).astype(dtype)


def flush_threshold(dtype) -> float:
    """Largest magnitude that rounds to zero in the FP8 ``dtype``: half its smallest subnormal
    (the tie rounds to the even neighbour, 0)."""
    return float(jnp.finfo(dtype).smallest_subnormal) / 2


def quantization_stats(x: jax.Array, dtype, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fractions of ``x`` that ``quantize(x, dtype, scale)`` saturates (finite, |x * scale| >
    fp8_max) and flushes (x != 0, |x * scale| <= `flush_threshold`: rounded to 0).

    Computed from ``x`` and the scale alone, with the same f32 product as `quantize`, so
    that the compiler can fuse both reductions into the quantize pass (one read of ``x``)
    instead of reading ``x`` and its FP8 copy again.

    >>> x = jnp.array([1e-6, 1.0, 500.0, 0.0])       # at scale 1: 500 saturates, 1e-6 flushes
    >>> [float(v) for v in quantization_stats(x, E4M3, jnp.float32(1.0))]
    [0.25, 0.25]
    """
    y = jnp.abs(_scaled(x, scale))
    saturated = jnp.mean(((y > fp8_max(dtype)) & jnp.isfinite(y)).astype(jnp.float32))
    flushed = jnp.mean(((y <= flush_threshold(dtype)) & (x != 0)).astype(jnp.float32))
    return saturated, flushed


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Inverse of `quantize`: ``q / scale`` in ``dtype``."""
    return (q.astype(jnp.float32) / scale.astype(jnp.float32)).astype(dtype)


def amax(x: jax.Array) -> jax.Array:
    """Absolute maximum of ``x`` as f32[] (inf or NaN when ``x`` holds one)."""
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def compute_scale(amax: jax.Array, prev_scale: jax.Array, fp8_max: float, *, margin: int = 0) -> jax.Array:
    """``fp8_max / (amax * 2**margin)``; ``prev_scale`` when that is not a finite positive number.

    Keeping the previous scale covers an all-zero tensor (amax 0), a non-finite amax and
    an amax so small that the quotient overflows f32. Elementwise: ``amax`` and
    ``prev_scale`` may carry leading (layer) axes.

    >>> float(compute_scale(jnp.float32(2.0), 1.0, fp8_max(E4M3)))    # 2.0 lands on 448
    224.0
    >>> float(compute_scale(jnp.float32(2.0), 1.0, 448.0, margin=1))  # one bit of headroom
    112.0
    >>> float(compute_scale(jnp.float32(0.0), 5.0, 448.0))            # an all-zero tensor keeps its scale
    5.0
    """
    amax = jnp.asarray(amax, jnp.float32)
    scale = jnp.float32(fp8_max) / amax / jnp.float32(2.0**margin)
    ok = (amax > 0) & jnp.isfinite(amax) & jnp.isfinite(scale) & (scale > 0)
    return jnp.where(ok, scale, jnp.asarray(prev_scale, jnp.float32))
