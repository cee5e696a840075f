"""FP8 scaling finer than one scale per tensor: per row, per tile and block, and OCP MX.

Every GEMM is brought to one canonical form, ``a: (B, M, K)`` times ``b: (B, N, K)`` (batch,
free, contracting; the contraction is always the last axis), and each operand gets scales
of shape ``(B, F, nb)``: one per free index and per block of ``block`` elements along the
contraction (``nb = ceil(K / block)``; K is zero-padded to ``nb * block``: zeros change no
amax and add nothing to a product). Granularities (`mpx.fp8._meta.GRANULARITIES`):

* ``tensor``: one scale (the op's `Fp8Meta`: delayed or current, as today);
* ``row``: one scale per free index (``block = K``): per token of an activation, per output
  channel of a weight, from that row's own amax (current scaling);
* ``block`` (DeepSeek-V3): activations and gradients in ``1 x block`` tiles along the
  contraction, a weight in ``block x block`` blocks (the tile scales of a weight's rows are
  shared by ``block`` consecutive rows); f32 scales from each tile's or block's amax;
* ``mx`` (OCP Microscaling v1.0, MXFP8): ``1 x 32`` tiles, each with a power-of-two (E8M0)
  scale ``2**(floor(log2(amax)) - emax)``, emax the element format's largest normal exponent
  (8 for E4M3, 15 for E5M2); elements rounded to nearest even and clamped to the largest
  normal (values of a tile at up to 2x its largest element's power of two can saturate).

Scales follow `mpx.fp8._numerics`' convention (``q = x * scale``, ``x ~= q / scale``). The
product is ``sum_j (qa_j . qb_j) / (sa_j * sb_j)`` over the contraction's blocks, accumulated
in f32 per block (one FP8 GEMM when there is one block: tensor and row scales apply to its
output).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from mpx._dims import free_axes
from mpx.fp8._numerics import E4M3, E5M2, flush_threshold, fp8_max, quantize, scale_from_amax

MX_BLOCK = 32
_MX_EMAX = {jnp.dtype(E4M3): 8, jnp.dtype(E5M2): 15}


class Canonical(NamedTuple):
    """An operand as ``(B, F, K)`` and what it takes to undo that: the shapes of its batch
    and free axes (the GEMM's output is ``(*batch, *lhs free, *rhs free)``)."""

    x: jax.Array
    batch_shape: tuple[int, ...]
    free_shape: tuple[int, ...]


def canonical(x: jax.Array, contracting, batch) -> Canonical:
    """``x`` transposed to (batch, free, contracting) axes, each group flattened into one."""
    free = free_axes(x.ndim, contracting, batch)
    shape = lambda axes: tuple(x.shape[a] for a in axes)  # noqa: E731
    y = jnp.transpose(x, (*batch, *free, *contracting))
    b, f, k = shape(batch), shape(free), shape(contracting)
    return Canonical(y.reshape(math.prod(b), math.prod(f), math.prod(k)), b, f)


class Quantized(NamedTuple):
    """An operand in FP8 with its scales: ``q`` (B, F, nb * block), ``scale`` f32 (B, F, nb)
    (or () for one scale per tensor), ``block`` the contraction's block length."""

    q: jax.Array
    scale: jax.Array
    block: int


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _magnitude(x: jax.Array) -> jax.Array:
    """``|x|`` in f32 with NaN as inf: a maximum over it is non-finite whenever ``x`` holds a
    non-finite value (XLA's CPU max reductions may drop a NaN, never an inf)."""
    a = jnp.abs(x).astype(jnp.float32)
    return jnp.where(jnp.isnan(a), jnp.float32(jnp.inf), a)


def _tile_amax(x: jax.Array, block: int) -> jax.Array:
    """Absolute maximum of each ``1 x block`` tile along the last axis of (B, F, K): (B, F, nb),
    inf for a tile holding inf or NaN."""
    b, f, k = x.shape
    tiles = _pad_to(x, 2, block).reshape(b, f, -1, block)
    return jnp.max(_magnitude(tiles), axis=-1)


def _block_amax(x: jax.Array, block: int, rows: int) -> jax.Array:
    """Absolute maximum of each ``rows x block`` block of (B, F, K), repeated over the block's
    rows: (B, F, nb), rows sharing a block sharing its value."""
    b, f, k = x.shape
    tiles = _tile_amax(x, block)  # (B, F, nb)
    grouped = _pad_to(tiles, 1, rows).reshape(b, -1, rows, tiles.shape[-1])
    shared = jnp.max(grouped, axis=2)  # (B, ceil(F / rows), nb)
    return jnp.repeat(shared, rows, axis=1)[:, :f]


def mx_scale(tile_amax: jax.Array, dtype) -> jax.Array:
    """The OCP MX shared scale of tiles with absolute maxima ``tile_amax``, as a multiplier
    into the element format: ``2**-(floor(log2(amax)) - emax)``, the exponent clamped to
    E8M0's range [-127, 127]; an all-zero tile takes the smallest exponent, a tile holding
    inf or NaN a NaN scale (E8M0's NaN: the whole tile is NaN).

    >>> mx_scale(jnp.array([448.0, 1.0, 3.0]), E4M3).tolist()   # 448 = 1.75 * 2**8 keeps 2**0
    [1.0, 256.0, 128.0]
    """
    emax = _MX_EMAX[jnp.dtype(dtype)]
    _, exp = jnp.frexp(tile_amax)  # amax = m * 2**exp, m in [0.5, 1): floor(log2(amax)) = exp - 1
    shared = jnp.clip(exp - 1 - emax, -127, 127)
    shared = jnp.where(tile_amax > 0, shared, -127)
    scale = jnp.ldexp(jnp.float32(1.0), -shared)
    return jnp.where(jnp.isfinite(tile_amax), scale, jnp.float32(jnp.nan))


def block_of(granularity: str, k: int, block_size: int) -> int:
    """The contraction's block length of a granularity for a contraction of ``k`` (a contraction
    no longer than one block is that one block, unpadded)."""
    size = {"tensor": k, "row": k, "block": block_size, "mx": MX_BLOCK}[granularity]
    return max(min(size, k), 1)


def scales(x: jax.Array, granularity: str, dtype, *, weight: bool, block_size: int) -> jax.Array:
    """The scales (B, F, nb) of a canonical operand under a granularity other than ``tensor``
    (``weight``: ``block`` shares each scale over ``block_size`` rows)."""
    block = block_of(granularity, x.shape[-1], block_size)
    if granularity == "mx":
        return mx_scale(_tile_amax(x, block), dtype)
    peak = _block_amax(x, block, block_size) if granularity == "block" and weight else _tile_amax(x, block)
    return scale_from_amax(peak, jnp.float32(1.0), fp8_max(dtype))


def quantize_canonical(x: jax.Array, granularity: str, dtype, *, weight: bool = False, block_size: int = 128,
                       tensor_scale: jax.Array | None = None) -> Quantized:
    """A canonical operand (B, F, K) in FP8 under ``granularity`` (``tensor``: with
    ``tensor_scale``). Saturating, NaN for a non-finite element, as `quantize`."""
    block = block_of(granularity, x.shape[-1], block_size)
    if granularity == "tensor":
        return Quantized(quantize(x, dtype, tensor_scale), jnp.asarray(tensor_scale, jnp.float32), block)
    scale = scales(x, granularity, dtype, weight=weight, block_size=block_size)
    padded = _pad_to(x, 2, block)
    per_element = jnp.repeat(scale, block, axis=-1)
    return Quantized(quantize(padded, dtype, per_element), scale, block)


def statistics(x: jax.Array, quantized: Quantized, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(amax, saturated, flushed)`` of a canonical operand and its quantization (the
    fractions of the operand's own elements, padding excluded), as `observe` gives them for
    one scale per tensor."""
    padded = _pad_to(x, 2, quantized.block).astype(jnp.float32)
    scale = quantized.scale if quantized.scale.ndim == 0 else jnp.repeat(quantized.scale, quantized.block, axis=-1)
    y = jnp.abs(padded) * scale
    finite = jnp.isfinite(y)
    saturated = jnp.sum((y > fp8_max(dtype)) & finite)
    flushed = jnp.sum((y <= flush_threshold(dtype)) & (padded != 0))
    size = jnp.float32(max(x.size, 1))
    peak = jnp.max(_magnitude(x)) if x.size else jnp.float32(0)
    return peak, saturated.astype(jnp.float32) / size, flushed.astype(jnp.float32) / size


def mx_operand(a: Quantized) -> tuple[jax.Array, jax.Array]:
    """An MX-quantized operand as a block-scaled GEMM takes it (``jax.nn.scaled_matmul``): its
    E4M3 / E5M2 codes (B, F, K) and, per 1x32 tile, the power of two ``2**X = 1 / scale`` that
    brings them back, as E8M0 (B, F, K / 32; a NaN scale is E8M0's NaN). Written from the
    exponent, not by dividing: 2**-127 (an all-zero tile's) is an f32 subnormal, which XLA
    flushes to zero, and E8M0 has no zero."""
    _, exp = jnp.frexp(a.scale)  # scale = 2**-X = 0.5 * 2**exp: X = 1 - exp, E8M0's byte X + 127
    byte = jnp.where(jnp.isnan(a.scale), 255, 128 - exp).astype(jnp.uint8)
    return a.q, lax.bitcast_convert_type(byte, jnp.float8_e8m0fnu)


def scaled_product(a: Quantized, b: Quantized, gemm_dtype, *, block_scaled: bool = False) -> jax.Array:
    """``sum_j (qa_j . qb_j) / (sa_j * sb_j)``: (B, M, N) in f32. One FP8 GEMM (in
    ``gemm_dtype``) with its scales applied to the output when the contraction is one block;
    with ``block_scaled`` and MX tiles on both sides, one block-scaled GEMM that applies the
    tiles' scales itself (``jax.nn.scaled_matmul``: cuDNN on Blackwell; it has no CPU or Hopper
    lowering); else one FP8 GEMM per block (a batch axis), each rescaled and accumulated in f32."""
    inv_a, inv_b = 1.0 / a.scale, 1.0 / b.scale
    if block_scaled and a.block == b.block == MX_BLOCK and a.q.shape[-1] > MX_BLOCK:
        (qa, sa), (qb, sb) = mx_operand(a), mx_operand(b)
        return jax.nn.scaled_matmul(qa, qb, sa, sb, preferred_element_type=jnp.float32)
    if a.block == a.q.shape[-1] and b.block == b.q.shape[-1]:  # one block: tensor or row scales
        out = lax.dot_general(a.q, b.q, (((2,), (2,)), ((0,), (0,))), preferred_element_type=gemm_dtype)
        out = out.astype(jnp.float32)
        cols = inv_b if inv_b.ndim == 0 else jnp.swapaxes(inv_b, 1, 2)  # (B, N, 1) -> (B, 1, N)
        return out * inv_a * cols
    bsz, m, kp = a.q.shape
    n = b.q.shape[1]
    nb = kp // a.block
    qa = a.q.reshape(bsz, m, nb, a.block)
    qb = b.q.reshape(bsz, n, nb, b.block)
    partial = lax.dot_general(qa, qb, (((3,), (3,)), ((0, 2), (0, 2))), preferred_element_type=jnp.float32)
    # partial: (B, nb, M, N); scales (B, F, nb) -> (B, nb, M, 1) and (B, nb, 1, N)
    rescaled = partial * jnp.transpose(inv_a, (0, 2, 1))[..., None] * jnp.transpose(inv_b, (0, 2, 1))[:, :, None, :]
    return jnp.sum(rescaled, axis=1)
