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

Shapes: L layers, B batch, S slots (the cache length), G key/value heads, K head size, T
tokens appended at once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Keys and values of every layer for the tokens a batch has seen (see the module).

    ``keys``, ``values``: (L, B, S, G, K), one layer after another (a scanned stack's
    layer axis), in the dtype the layers' ``qkv`` projection computes in (the policy's
    compute dtype under the presets: bf16 under bf16, fp8 and int8, f32 under fp32).
    ``valid`` (B, S) bool: the slots that hold a token. ``index`` (B,) int32: the slot of
    each row's next token. ``positions`` (B,) int32: the position of each row's next
    token (its count of valid tokens so far).
    """

    keys: jax.Array
    values: jax.Array
    valid: jax.Array
    index: jax.Array
    positions: jax.Array

    @classmethod
    def init(cls, *, layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
        """An empty cache of ``length`` slots per row."""
        for name, value in (("layers", layers), ("batch", batch), ("length", length), ("kv_heads", kv_heads),
                            ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache {name} must be a positive integer, got {value!r}")
        shape = (layers, batch, length, kv_heads, head_dim)
        # A buffer of its own per field: a donated cache must not alias one array twice.
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, length), bool),
                   jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32))

    @property
    def length(self) -> int:
        """S: the slots of each row."""
        return self.valid.shape[1]

    @property
    def batch(self) -> int:
        return self.valid.shape[0]


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
