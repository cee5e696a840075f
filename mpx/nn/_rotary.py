"""Rotary position embeddings (RoPE, Su et al. 2021), the positions of the Llama layout.

Each head's K features form K/2 pairs; pair i at position p is rotated by the angle
``p * base ** (-2i / K)``, so the dot product of a query and a key depends on their
distance only. The pairs are the two halves of the head (feature i with feature i + K/2),
the convention of GPT-NeoX and of Hugging Face's Llama weights. Angles and the rotation
are computed in float32 (a bf16 angle at position 2000 is off by several radians); the
result is cast back to the input's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_angles(positions: jax.Array, head_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) of the rotation at ``positions``, (T,) shared by a batch or (B, T) a row's
    own (a padded or cached batch); each (..., K/2) in float32."""
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # (K/2,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (T, K/2) or (B, T, K/2)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, N, K) rotated pair by pair by the angles of `rotary_angles`, (T, K/2) or
    (B, T, K/2); same shape and dtype."""
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # (B, T, N, K/2) each
    cos, sin = cos[..., None, :], sin[..., None, :]  # (T, 1, K/2) or (B, T, 1, K/2): every head
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
