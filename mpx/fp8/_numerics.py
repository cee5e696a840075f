"""FP8 arithmetic on arrays: saturating quantize, dequantize, amax and scales.

Convention: ``scale`` multiplies into the FP8 domain.

    q = saturate(x * scale)          quantize
    x ~= q / scale                   dequantize
    scale = the largest power of two <= fp8_max / (amax * 2**margin)

so a tensor whose absolute maximum is ``amax`` lands in (fp8_max / 2, fp8_max], and
rescaling by a scale (or a product of them) is exact (`scale_from_amax`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2


def gemm_dtype(out_dtype):
    """The dtype an FP8 GEMM produces for an output in ``out_dtype``: the unscaled product
    reaches 448 * 448 * K (57344 * 448 * K for gradients), far beyond fp16's 65504, so fp16 (and
    any narrower type) gets f32; bf16 and f32 share f32's range and are kept."""
    out_dtype = jnp.dtype(out_dtype)
    return out_dtype if out_dtype in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)) else jnp.dtype(jnp.float32)


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
    clipped into a plausible finite number. So does a finite input whose product with the
    scale overflows f32 (``|x| * scale`` > 3.4e38: at least 1e35 times the range the scale
    was set for, a blow-up, not a tensor to saturate).

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
    y = _scaled(x, scale)
    # ``y - y + 1`` is 1 for a finite product and NaN for an infinite or NaN one: non-finite
    # handling in plain arithmetic on the one product (exact, -0 kept), which XLA keeps inside
    # the quantize kernel. (A select by ``isfinite(x)``, or any second expression of ``x``,
    # became a pass of its own for a transposed operand.)
    return (jnp.clip(y, -limit, limit) * (y - y + 1)).astype(dtype)


def flush_threshold(dtype) -> float:
    """Largest magnitude that rounds to zero in the FP8 ``dtype``: half its smallest subnormal
    (the tie rounds to the even neighbour, 0)."""
    return float(jnp.finfo(dtype).smallest_subnormal) / 2


def _largest_scaling_to(limits, scale: jax.Array) -> jax.Array:
    """For each of ``limits``, the largest f32 ``v`` with ``v * scale <= limit`` (f32 product),
    for a positive finite ``scale``: ``|x| * scale <= limit`` exactly when ``|x| <= v``, so a
    comparison of ``|x|`` with this scalar gives the decision of the product without
    computing it per element. One small array for all limits (one kernel, not one per limit).

    It is ``q = limit / scale`` rounded down or the float after that: every float <= q passes,
    and a product ``v * scale`` above ``limit`` by less than half an ulp of ``limit`` (it
    rounds down to it) exceeds q by less than one ulp of q. The correctly rounded quotient
    is within half an ulp of q, so the answer is its predecessor, itself or its successor."""
    scale = scale.astype(jnp.float32)
    limits = jnp.asarray(limits, jnp.float32)
    v = limits / scale
    best = jnp.nextafter(v, jnp.float32(0))
    for candidate in (v, jnp.nextafter(v, jnp.float32(jnp.inf))):
        best = jnp.where(candidate * scale <= limits, candidate, best)
    return best


def observe(x: jax.Array, dtype, scale: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(amax, saturated, flushed)`` of ``x`` in one reduction over it: `amax`, and the
    fractions of ``x`` that ``quantize(x, dtype, scale)`` saturates (|x * scale| > fp8_max,
    finite in f32) and flushes (x != 0, |x * scale| <= `flush_threshold`: rounded to 0).

    One variadic reduction (max, count, count), so that the statistics cost no pass of their
    own: they are read in the pass that finds the amax. ``|x|`` is compared with three scalars
    (`_largest_scaling_to` of fp8_max, the flush threshold and f32's max: the same decisions
    as the f32 product ``|x| * scale``), so the reduction shares no per-element expression with `quantize`: a shared
    product would let the compiler compute it once, in the quantize kernel, and reduce
    copies of it in passes of their own.

    >>> x = jnp.array([1e-6, 1.0, 500.0, 0.0])       # at scale 1: 500 saturates, 1e-6 flushes
    >>> [float(v) for v in observe(x, E4M3, jnp.float32(1.0))]
    [500.0, 0.25, 0.25]
    """
    a = jnp.abs(x)
    af = a.astype(jnp.float32)
    edges = _largest_scaling_to([fp8_max(dtype), flush_threshold(dtype), jnp.finfo(jnp.float32).max], scale)
    finite = af <= edges[2]  # as `quantize` sees it: |x| * scale finite
    saturated = ((af > edges[0]) & finite).astype(jnp.int32)
    flushed = ((af <= edges[1]) & (af > 0)).astype(jnp.int32)

    def merge(p, q):
        return lax.max(p[0], q[0]), p[1] + q[1], p[2] + q[2]

    zero = (jnp.zeros((), a.dtype), jnp.int32(0), jnp.int32(0))
    peak, n_saturated, n_flushed = lax.reduce((a, saturated, flushed), zero, merge, tuple(range(x.ndim)))
    size = jnp.float32(max(x.size, 1))
    return peak.astype(jnp.float32), n_saturated.astype(jnp.float32) / size, n_flushed.astype(jnp.float32) / size


def quantization_stats(x: jax.Array, dtype, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(saturated, flushed)`` of `observe`: the fractions of ``x`` that ``quantize(x, dtype,
    scale)`` clips to ±fp8_max and rounds to zero.

    >>> x = jnp.array([1e-6, 1.0, 500.0, 0.0])
    >>> [float(v) for v in quantization_stats(x, E4M3, jnp.float32(1.0))]
    [0.25, 0.25]
    """
    return observe(x, dtype, scale)[1:]


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Inverse of `quantize`: ``q / scale`` in ``dtype``."""
    return (q.astype(jnp.float32) / scale.astype(jnp.float32)).astype(dtype)


def amax(x: jax.Array) -> jax.Array:
    """Absolute maximum of ``x`` as f32[] (inf or NaN when ``x`` holds one)."""
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def current_scale(x: jax.Array, dtype, *, margin: int = 0) -> jax.Array:
    """The scale that puts ``x``'s own amax in (fp8_max / 2, fp8_max] (`scale_from_amax`;
    1 for an all-zero or non-finite ``x``): current scaling, with no history.

    >>> float(current_scale(jnp.array([0.5, -3.5]), E4M3))    # 448 / 3.5
    128.0
    """
    return scale_from_amax(amax(x), jnp.float32(1.0), fp8_max(dtype), margin=margin)


def power_of_two_floor(x: jax.Array) -> jax.Array:
    """The power of two at or below each positive normal f32 ``x`` (its binade's); 0 for a
    subnormal, inf for inf or NaN.

    >>> power_of_two_floor(jnp.array([448.0, 0.75, 1.0])).tolist()
    [256.0, 0.5, 1.0]
    """
    bits = lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.uint32)
    return lax.bitcast_convert_type(bits & jnp.uint32(0x7F800000), jnp.float32)


def scale_from_amax(amax: jax.Array, prev_scale: jax.Array, fp8_max: float, *, margin: int = 0) -> jax.Array:
    """The largest power of two ``s`` with ``amax * 2**margin * s <= fp8_max``: ``fp8_max / (amax
    * 2**margin)`` rounded down to a power of two (the amax lands in (fp8_max / 2, fp8_max]); ``prev_scale`` when there is none (see below).

    Powers of two make every rescale exact: an FP8 GEMM's output times the two inverse scales
    rounds nothing, in any float type, so the GEMM can apply it itself (`mpx.fp8._dot`). What it
    costs is at most one binade of the format's range, at its bottom (values below twice the
    smallest subnormal flush that an exact scale would have kept).

    Keeping the previous scale covers an all-zero tensor (amax 0), a non-finite amax and
    an amax so small that the quotient overflows f32. Elementwise: ``amax`` and
    ``prev_scale`` may carry leading (layer) axes.

    >>> float(scale_from_amax(jnp.float32(3.5), 1.0, fp8_max(E4M3)))    # 3.5 lands on 448
    128.0
    >>> float(scale_from_amax(jnp.float32(3.5), 1.0, 448.0, margin=1))  # one bit of headroom
    64.0
    >>> float(scale_from_amax(jnp.float32(2.0), 1.0, 448.0))            # 448 / 2 = 224: 2.0 lands on 256
    128.0
    >>> float(scale_from_amax(jnp.float32(0.0), 5.0, 448.0))            # an all-zero tensor keeps its scale
    5.0
    """
    amax = jnp.asarray(amax, jnp.float32)
    top = amax * jnp.float32(2.0**margin)  # exact, or inf
    scale = power_of_two_floor(jnp.float32(fp8_max) / top)
    # The quotient was rounded: where it rounded up onto a power of two, the step below.
    scale = jnp.where(top * scale > jnp.float32(fp8_max), scale * 0.5, scale)
    ok = (amax > 0) & jnp.isfinite(amax) & jnp.isfinite(scale) & (scale > 0)
    return jnp.where(ok, scale, jnp.asarray(prev_scale, jnp.float32))
