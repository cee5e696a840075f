"""Logical axis names of the decoder's activations, for flax's logical axis rules (`mpx._sharding.mark`).

The decoder marks its residual stream ``(batch, length, embed)`` at each block's input, and
the attention's queries ``(batch, length, heads, head_dim)`` and keys and values ``(batch,
length, kv_heads, head_dim)``, with `flax.linen.with_logical_constraint`. Under a mesh
(``jax.set_mesh``, or ``jax.sharding.use_abstract_mesh`` inside a jitted function) and
`flax.linen.logical_axis_rules` that map these names to mesh axes, each mark is a sharding
constraint; without rules it is nothing at all. A name the rules leave out is unsharded.

Why it matters: under FSDP the weights are split and the batch is split, and nothing else says
how an activation is laid out. XLA then propagates the weights' layout into the activations
inside a scanned stack (the queries split along the heads by where the fused qkv weight was
cut), and cuDNN's fused attention refuses queries, keys and values laid out differently. With
``batch`` mapped to the batch's mesh axes, the activations stay split by batch and every
weight is gathered before its matmul, which is FSDP (`train.mesh.activation_sharding` does
this for the app).
"""

BATCH, LENGTH, EMBED, HEADS, KV_HEADS, HEAD_DIM = "batch", "length", "embed", "heads", "kv_heads", "head_dim"

RESIDUAL = (BATCH, LENGTH, EMBED)
QUERIES = (BATCH, LENGTH, HEADS, HEAD_DIM)
KEYS_VALUES = (BATCH, LENGTH, KV_HEADS, HEAD_DIM)
