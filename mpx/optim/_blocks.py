"""Block-scaled 8-bit storage: codes in the array's own shape, one f32 scale per block.

A block is ``block_size`` consecutive elements of the last axis; the last block of a row
is shorter when ``block_size`` does not divide the axis (no padding is stored or
computed). A block's scale maps its absolute maximum to the format's largest value, so
``code * scale`` gives the element back with the format's relative precision. Codes keep
the array's shape (a sharding that splits the array splits its codes the same way);
scales have shape ``shape[:-1] + (ceil(shape[-1] / block_size),)``, a scalar counts as
one element. Rounding is to nearest, ties to even (``astype``).

`quantize_expanded` is for non-negative values whose blocks span a wide range (Adam's
second moment): each block is raised to the power ``k`` that makes its range (largest
over smallest nonzero) fill the format's normal range before it is scaled, and its
``k`` is kept beside its scale (COAT's dynamic range expansion, Xi et al. 2024). The
relative error of an element is the format's divided by ``k``, and no nonzero element
reads back as 0.

    >>> q = quantize(jnp.array([1.0, 0.3, -448.0, 2.0]), block_size=3)
    >>> q.codes.dtype, q.scale.tolist()  # blocks [1.0, 0.3, -448.0] and [2.0]
    (dtype(float8_e4m3fn), [1.0, 0.004464285913854837])
    >>> dequantize(q).tolist()  # 0.3 to E4M3's nearest, 1.25 * 2**-2
    [1.0, 0.3125, -448.0, 2.0]
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from mpx.fp8._numerics import E4M3, fp8_max


@struct.dataclass
class BlockQuantized:
    """An f32 array as 8-bit ``codes`` (its shape) and per-block f32 ``scale``; the block
    size is static (part of the tree's structure, not a leaf)."""

    codes: jax.Array  # (..., n) float8
    scale: jax.Array  # (..., ceil(n / block_size)) float32
    block_size: int = struct.field(pytree_node=False, default=128)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape


@struct.dataclass
class BlockExpanded:
    """A non-negative f32 array as 8-bit ``codes`` (its shape) of ``(x / amax) ** exponent``
    at the format's maximum, with each block's f32 ``amax`` and ``exponent``."""

    codes: jax.Array  # (..., n) float8
    amax: jax.Array  # (..., ceil(n / block_size)) float32
    exponent: jax.Array  # (..., ceil(n / block_size)) float32
    block_size: int = struct.field(pytree_node=False, default=128)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.codes.shape


MAX_EXPONENT = 16.0
"""`quantize_expanded`'s largest ``k``: a block of nearly equal values gains nothing from
more (its relative error is already the format's / 16), and ``k`` stays finite."""


def block_amax(x: jax.Array, block_size: int) -> jax.Array:
    """``max |x|`` of each block of the last axis: ``(..., n) -> (..., ceil(n / block_size))``."""
    return _block_reduce(jnp.abs(x), block_size, jnp.max)


def _block_reduce(x: jax.Array, block_size: int, reduce) -> jax.Array:
    x = jnp.atleast_1d(x)
    n = x.shape[-1]
    full = n // block_size * block_size
    parts = []
    if full:
        parts.append(reduce(x[..., :full].reshape(*x.shape[:-1], full // block_size, block_size), axis=-1))
    if full < n:  # the ragged last block, on its own
        parts.append(reduce(x[..., full:], axis=-1, keepdims=True))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def per_element(scale: jax.Array, n: int, block_size: int) -> jax.Array:
    """Each block's ``scale`` repeated over its elements: ``(..., nb) -> (..., n)``. A
    broadcast and a reshape (not `jnp.repeat`, whose gather a split last axis would have to
    all-gather), then the ragged last block cut."""
    blocks = jnp.broadcast_to(scale[..., None], (*scale.shape, block_size))
    full = blocks.reshape(*scale.shape[:-1], scale.shape[-1] * block_size)
    return full if full.shape[-1] == n else full[..., :n]


def quantize(x: jax.Array, block_size: int, *, dtype=E4M3, floor: bool = False) -> BlockQuantized:
    """``x`` (f32) as `BlockQuantized` with blocks of ``block_size`` along its last axis.

    An all-zero block gets scale 1 (codes 0). With ``floor``, a nonzero element never gets
    code 0: one too small for the format's smallest subnormal gets that subnormal instead
    (for a denominator, which must not become 0 where the value it stands for is not).
    """
    x = jnp.asarray(x, jnp.float32)
    fmax = fp8_max(dtype)
    flat = jnp.atleast_1d(x)
    amax = block_amax(flat, block_size)
    # times the f32 reciprocal, written out: XLA would rewrite a division by a constant so
    scale = jnp.where(amax > 0, amax * jnp.float32(1.0 / fmax), 1.0).astype(jnp.float32)
    scaled = jnp.clip(flat / per_element(scale, flat.shape[-1], block_size), -fmax, fmax)
    if floor:
        tiny = float(jnp.finfo(dtype).smallest_subnormal)
        scaled = jnp.where((scaled != 0) & (jnp.abs(scaled) < tiny), jnp.copysign(tiny, scaled), scaled)
    return BlockQuantized(scaled.astype(dtype).reshape(x.shape), scale, block_size)


def dequantize(q: BlockQuantized) -> jax.Array:
    """The f32 array ``q`` stands for."""
    codes = jnp.atleast_1d(q.codes).astype(jnp.float32)
    return (codes * per_element(q.scale, codes.shape[-1], q.block_size)).reshape(q.codes.shape)


def quantize_expanded(x: jax.Array, block_size: int, *, dtype=E4M3) -> BlockExpanded:
    """``x`` (f32, >= 0) as `BlockExpanded` with blocks of ``block_size`` along its last axis.

    A block's ``k`` maps its smallest nonzero element to the format's smallest normal
    and its largest to the format's maximum (``k`` at most `MAX_EXPONENT`); a nonzero
    element that still falls below the smallest subnormal is stored as that subnormal.
    """
    x = jnp.asarray(x, jnp.float32)
    flat = jnp.atleast_1d(x)
    n = flat.shape[-1]
    fmax, fmin = fp8_max(dtype), float(jnp.finfo(dtype).smallest_normal)
    amax = block_amax(flat, block_size)
    amin = _block_reduce(jnp.where(flat > 0, flat, jnp.inf), block_size, jnp.min)  # smallest nonzero
    # log(largest / smallest nonzero) as a difference of logs: the ratio may overflow f32
    spread = jnp.where(jnp.isfinite(amin), jnp.log(jnp.where(amax > 0, amax, 1.0)) - jnp.log(jnp.where(
        jnp.isfinite(amin), amin, 1.0)), 0.0)
    exponent = jnp.where(spread > 0, jnp.minimum(math.log(fmax / fmin) / jnp.where(spread > 0, spread, 1.0),
                                                 MAX_EXPONENT), 1.0).astype(jnp.float32)
    # In logs: x / amax may be below f32's normal range (flushed to 0) where its k-th power is not.
    log_unit = jnp.log(flat) - per_element(jnp.log(jnp.where(amax > 0, amax, 1.0)), n, block_size)
    expanded = jnp.exp(log_unit * per_element(exponent, n, block_size)) * fmax
    tiny = float(jnp.finfo(dtype).smallest_subnormal)
    expanded = jnp.where(flat > 0, jnp.clip(expanded, tiny, fmax), 0.0)
    return BlockExpanded(expanded.astype(dtype).reshape(x.shape), amax, exponent, block_size)


def dequantize_expanded(q: BlockExpanded) -> jax.Array:
    """The f32 array ``q`` stands for."""
    fmax = fp8_max(q.codes.dtype)
    codes = jnp.atleast_1d(q.codes).astype(jnp.float32)
    n = codes.shape[-1]
    log_x = jnp.log(codes / fmax) / per_element(q.exponent, n, q.block_size) + per_element(
        jnp.log(jnp.where(q.amax > 0, q.amax, 1.0)), n, q.block_size)
    return jnp.exp(log_x).reshape(q.codes.shape)  # code 0: exp(-inf) = 0
