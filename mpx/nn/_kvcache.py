"""A key/value cache for decoding with `TransformerLM`: its typed state and the pure rules
that place new tokens in it.

Decoding token by token, a causal model's keys and values of the tokens already seen do not
change: the cache keeps them, so that a new token costs one position of work instead of a
pass over the whole window. `TransformerLM.decode` appends tokens to a cache and returns
their logits: over the prompt it is the prefill, with one token a decode step.

Slots and positions. Each row appends its tokens to consecutive slots, from its own
``index``. A token's position (its rotary angle, or its row of the learned table) counts
only the row's valid tokens, so a prompt padded on the left and the same prompt padded on
the right give the same positions, and the same logits. ``valid`` marks the slots that
hold a token: padding is written like a token (finite, from the padding id) but never
attended, and the next tokens of a right-padded row overwrite it.

An int8 cache (``KVCache.init(..., int8=True)``) keeps each key and value vector of a
token and head as int8 codes with one f32 scale (absmax / 127, `mpx.int8.quantize`): half
the bytes of a bf16 cache (plus 4 bytes per token and head); attention reads it
dequantized to the compute dtype, the new tokens' own keys and values included.

Shapes: L layers, B batch, S slots (the cache length), G key/value heads, K head size, T
tokens appended at once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from mpx.int8 import dequantize as dequantize_int8, quantize as quantize_int8


@struct.dataclass
class KVCache:
    """Keys and values of every layer for the tokens a batch has seen (see the module).

    ``keys``, ``values``: (L, B, S, G, K), one layer after another (a scanned stack's
    layer axis), in the dtype the layers' ``qkv`` projection computes in (the policy's
    compute dtype under the presets: bf16 under bf16, fp8 and int8, f32 under fp32).
    ``valid`` (B, S) bool: the slots that hold a token. ``index`` (B,) int32: the slot of
    each row's next token. ``positions`` (B,) int32: the position of each row's next
    token (its count of valid tokens so far). An int8 cache: ``keys`` and ``values`` are
    int8 codes, ``key_scales`` and ``value_scales`` (L, B, S, G, 1) f32 their scales (None
    otherwise); attention reads them in the dtype its ``qkv`` projection computes in.
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    index: jax.Array
    positions: jax.Array
    key_scales: jax.Array | None = None
    value_scales: jax.Array | None = None

    @classmethod
    def init(cls, *, layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype,
             int8: bool = False) -> KVCache:
        """An empty cache of ``length`` slots per row, in ``dtype`` or (``int8``) as int8 codes
        and f32 scales."""
        for name, value in (("layers", layers), ("batch", batch), ("length", length), ("kv_heads", kv_heads),
                            ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache {name} must be a positive integer, got {value!r}")
        shape = (layers, batch, length, kv_heads, head_dim)
        stored = jnp.int8 if int8 else dtype
        # A buffer of its own per field: a donated cache must not alias one array twice.
        scales = [jnp.zeros(shape[:-1] + (1,), jnp.float32) for _ in range(2)] if int8 else [None, None]
        return cls(jnp.zeros(shape, stored), jnp.zeros(shape, stored), jnp.zeros((batch, length), bool),
                   jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32), *scales)

    @property
    def is_int8(self) -> bool:
        return self.key_scales is not None

    def layers(self) -> LayerKV:
        """Every layer's `LayerKV`, stacked along a leading layer axis."""
        return LayerKV(self.keys, self.values, self.key_scales, self.value_scales)

    def with_layers(self, layers: LayerKV) -> KVCache:
        return self.replace(keys=layers.keys, values=layers.values, key_scales=layers.key_scales,
                            value_scales=layers.value_scales)

    @property
    def length(self) -> int:
        """S: the slots of each row."""
        return self.valid.shape[1]

    @property
    def batch(self) -> int:
        return self.valid.shape[0]


class LayerKV(NamedTuple):
    """One layer's keys and values (B, S, G, K) and, in an int8 cache, their scales
    (B, S, G, 1); None otherwise. Stacked: every array with a leading layer axis."""

    keys: jax.Array
    values: jax.Array
    key_scales: jax.Array | None = None
    value_scales: jax.Array | None = None


def store(layer: LayerKV, keys: jax.Array, values: jax.Array, start: jax.Array) -> LayerKV:
    """``layer`` with new ``keys``, ``values`` (B, T, G, K) written from slot ``start`` (B,)
    of each row: cast to its dtype, or as int8 codes with one scale per token and head."""
    if layer.key_scales is None:
        return LayerKV(write(layer.keys, keys, start), write(layer.values, values, start))
    (kq, ks), (vq, vs) = quantize_int8(keys, axes=-1), quantize_int8(values, axes=-1)
    return LayerKV(write(layer.keys, kq, start), write(layer.values, vq, start),
                   write(layer.key_scales, ks, start), write(layer.value_scales, vs, start))


def load(layer: LayerKV, dtype) -> tuple[jax.Array, jax.Array]:
    """(keys, values) (B, S, G, K) of ``layer`` in ``dtype`` (dequantized in an int8 cache)."""
    if layer.key_scales is None:
        return layer.keys, layer.values
    return dequantize_int8(layer.keys, layer.key_scales, dtype), dequantize_int8(layer.values, layer.value_scales, dtype)


class Placement(NamedTuple):
    """Where ``T`` new tokens go and what each may read, for every layer alike.

    ``positions`` (B, T) int32: each token's position. ``start`` (B,) int32: the slot of
    each row's first new token (they take ``start .. start + T - 1``). ``allowed``
    (B, T, S) bool: the slots each new token attends to.
    """

    positions: jax.Array
    start: jax.Array
    allowed: jax.Array


def place(cache: KVCache, mask: jax.Array) -> tuple[Placement, KVCache]:
    """Place T new tokens of validity ``mask`` (B, T) after each row's last: their
    `Placement` and the cache's bookkeeping (``valid``, ``index``, ``positions``) updated
    for them; its keys and values are the layers' to write (`write`).

    A valid token reads the valid slots up to its own; a padding token reads its own slot
    only (a row of T padding tokens must not be empty: its output is never read, but must
    be finite). The caller keeps ``index + T <= S``: a slot past the end would be clamped
    back into the cache (``lax.dynamic_update_slice``), over older tokens.
    """
    b, t = mask.shape
    mask = mask.astype(bool)
    start = cache.index
    counts = jnp.cumsum(mask, axis=1, dtype=jnp.int32)  # (B, T): valid tokens so far in this chunk
    positions = cache.positions[:, None] + jnp.maximum(counts - 1, 0)
    valid = write(cache.valid, mask, start)  # (B, S)
    query_slot = start[:, None] + jnp.arange(t, dtype=jnp.int32)  # (B, T)
    slots = jnp.arange(cache.length, dtype=jnp.int32)
    own = slots[None, None, :] == query_slot[..., None]  # (B, T, S)
    reads = valid[:, None, :] & (slots[None, None, :] <= query_slot[..., None])
    allowed = jnp.where(mask[..., None], reads, own)
    last = jnp.max(jnp.where(mask, jnp.arange(1, t + 1, dtype=jnp.int32), 0), axis=1)  # (B,): after the last valid
    updated = cache.replace(valid=valid, index=start + last, positions=cache.positions + counts[:, -1])
    return Placement(positions, start, allowed), updated


def write(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """``buffer`` (B, S, ...) with ``new`` (B, T, ...) written at slots ``start .. start + T - 1``
    of each row (``start`` (B,)), cast to the buffer's dtype."""
    def one(row, rows_new, at):
        return jax.lax.dynamic_update_slice_in_dim(row, rows_new.astype(row.dtype), at, axis=0)

    return jax.vmap(one)(buffer, new, start)
