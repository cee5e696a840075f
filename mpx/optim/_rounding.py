"""Low-precision master weights: updates added in f32, the sum rounded stochastically.

A bf16 weight keeps 8 significant bits: an update under half a bf16 step of the weight
(2^-9 of it) is lost to round-to-nearest, however often it comes, and a long run of small
updates (late in a cosine schedule, a slowly moving weight) stops moving the weight.
Rounding up or down at random, with the probabilities that make the expected result the
exact sum, keeps those updates on average: ``E[stochastic_round(x)] == x``.

    new_params = apply_updates(params, updates, key)   # f32 leaves: params + updates, as optax
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# Of an f32's 23 mantissa bits, how many a format drops (bf16 keeps 7, fp16 10).
_DROPPED_BITS = {jnp.dtype(jnp.bfloat16): 16, jnp.dtype(jnp.float16): 13}
NARROW = tuple(_DROPPED_BITS)
"""The parameter dtypes `stochastic_round` rounds to."""


def stochastic_round(x: jax.Array, dtype, key: jax.Array) -> jax.Array:
    """``x`` (f32) rounded to ``dtype`` (bf16 or fp16): to one of the two neighbouring
    values of ``dtype``, the upper with probability (x - lower) / (upper - lower), so that
    the expectation is ``x``. An ``x`` that ``dtype`` holds exactly comes back unchanged.

    Uniform random bits below ``dtype``'s last mantissa bit are added to the magnitude's
    f32 bit pattern, which is then truncated: a carry out of the mantissa moves the value
    into the next binade, as it should. The sign is put back after, so rounding is
    symmetric about 0. Subnormals of ``dtype`` are rounded on their own (evenly spaced)
    grid: bf16's are f32's with the same 16 bits dropped; fp16's are rounded as
    ``|x| + 2^-14`` at that binade's spacing, 2^-24 (``|x|`` bits below 2^-37 are lost in
    the sum, a bias under 2^-13 of a step). inf and NaN pass through; overflow is
    nearest's: a value that rounds to inf under round-to-nearest is inf, any other becomes
    at most ``dtype``'s largest finite value (so values within half a step of that largest
    value are not rounded without bias). ``key`` draws 32 random bits an element.

    >>> key = jax.random.key(0)
    >>> x = jnp.full((10000,), 1 + 2.0 ** -10)    # 1/8 of the way from 1 to bf16's next, 1 + 2^-7
    >>> y = stochastic_round(x, jnp.bfloat16, key)
    >>> sorted(set(y.astype(float).tolist()))
    [1.0, 1.0078125]
    >>> bool(abs(y.astype(jnp.float32).mean() - x[0]) < 2e-4)    # nearest: 1.0, 9.8e-4 off
    True
    """
    dtype = jnp.dtype(dtype)
    if dtype not in _DROPPED_BITS:
        raise ValueError(f"stochastic_round rounds to {', '.join(d.name for d in NARROW)}; got {dtype.name}")
    x = jnp.asarray(x)
    if x.dtype != jnp.float32:
        raise ValueError(f"stochastic_round takes f32 values (params + updates, added in f32); got {x.dtype.name}")
    dropped = _DROPPED_BITS[dtype]
    # Bit operations, not float ones: XLA on CPU flushes f32 subnormals in float arithmetic,
    # and bf16's subnormals are f32's.
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign, magnitude = bits & jnp.uint32(0x80000000), bits & jnp.uint32(0x7FFFFFFF)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> (32 - dropped)
    keep = jnp.uint32((0xFFFFFFFF << dropped) & 0xFFFFFFFF)
    largest = jax.lax.bitcast_convert_type(jnp.float32(float(jnp.finfo(dtype).max)), jnp.uint32)
    if dtype == jnp.bfloat16:
        rounded = jnp.minimum((magnitude + noise) & keep, largest)
        result = jax.lax.bitcast_convert_type(((rounded | sign) >> 16).astype(jnp.uint16), jnp.bfloat16)
    else:
        # fp16's subnormals are not f32's with bits dropped (its exponent is narrower): shift
        # them into the lowest normal binade, whose spacing is theirs, and back after.
        tiny = jnp.float32(jnp.finfo(dtype).smallest_normal)
        value = jax.lax.bitcast_convert_type(magnitude, jnp.float32)
        shift = value < tiny
        shifted = jax.lax.bitcast_convert_type(jnp.where(shift, value + tiny, value), jnp.uint32)
        rounded = jax.lax.bitcast_convert_type(jnp.minimum((shifted + noise) & keep, largest), jnp.float32)
        rounded = jnp.where(shift, rounded - tiny, rounded)  # exact: both on the 2^-24 grid
        result = jnp.where(sign > 0, -rounded, rounded).astype(dtype)  # exact: fp16 holds it
    nearest = x.astype(dtype)
    return jnp.where(jnp.isfinite(nearest), result, nearest)


def apply_updates(params, updates, key: jax.Array | None = None):
    """``params + updates``, each leaf kept in its dtype. Without ``key``:
    `optax.apply_updates` (round to nearest). With ``key``: bf16 and fp16 leaves are summed
    in f32 and `stochastic_round`-ed (leaf ``i`` with ``fold_in(key, i)``, leaves in
    `jax.tree.leaves` order), other leaves added as optax adds them.

    >>> p = {"w": jnp.ones(4, jnp.bfloat16)}
    >>> u = {"w": jnp.full(4, 2.0 ** -12)}     # 1/32 of a bf16 step at 1
    >>> apply_updates(p, u)["w"].tolist() == [1.0] * 4          # lost to nearest
    True
    """
    if key is None:
        return optax.apply_updates(params, updates)
    leaves, treedef = jax.tree.flatten(params)
    # optax's convention: a None update leaves its param as it is.
    deltas = treedef.flatten_up_to(updates)
    out = []
    for i, (p, u) in enumerate(zip(leaves, deltas)):
        p = jnp.asarray(p)
        if u is None:
            out.append(p)
        elif p.dtype in _DROPPED_BITS:
            out.append(stochastic_round(p.astype(jnp.float32) + jnp.asarray(u, jnp.float32), p.dtype,
                                        jax.random.fold_in(key, i)))
        else:
            out.append(jnp.asarray(p + u).astype(p.dtype))
    return jax.tree.unflatten(treedef, out)
