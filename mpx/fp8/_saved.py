"""Activations the backward pass reads in FP8: `saved_in_fp8`.

An FP8 matmul already keeps its operands for the backward as FP8 copies. What else the
backward reads stays in the compute dtype: an MLP's activation input (B, T, F), four times a
layer's width, is the largest of them. `saved_in_fp8(fn, *xs)` computes ``fn(*xs)`` exactly and
keeps, for the backward, each ``x`` as E4M3 codes with one current scale per tensor (its amax
in (224, 448]); the backward evaluates ``fn``'s VJP at the dequantized inputs. The output is exact,
the gradient that of ``fn`` at a point within E4M3's rounding (2^-4 relative) of the input:
the same kind of error the FP8 GEMMs around it make. Memory: one byte an element for the
backward instead of two (bf16) or four. A non-finite input becomes NaN in its copy (`quantize`),
so the gradients are not finite and the step is skipped, as everywhere in mpx.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from mpx.fp8._numerics import E4M3, current_scale, dequantize, quantize


# The name every FP8 copy the backward reads carries (`jax.ad_checkpoint.checkpoint_name`):
# a remat policy that saves it keeps the FP8 operands of each matmul (and their scales and
# observations) instead of recomputing them (`remat_saving_fp8`).
FP8_SAVED = "mpx_fp8_saved"


def remat_saving_fp8():
    """The ``jax.checkpoint`` / ``nnx.remat`` policy that keeps what mpx's FP8 ops save for
    the backward (operand codes, scales, observations, `saved_in_fp8` copies) and recomputes
    everything else."""
    return jax.checkpoint_policies.save_only_these_names(FP8_SAVED)


_WHOLE_WEIGHTS: contextvars.ContextVar[bool] = contextvars.ContextVar("mpx_fp8_whole_weights", default=False)


@contextlib.contextmanager
def keeping_weights_whole() -> Iterator[None]:
    """While a model is traced in it, each per-tensor fp8 matmul lays its weight's E4M3 codes
    out whole on every device (unsplit: `mpx._sharding.mark` with no axis names) where flax
    logical axis rules are active. Under FSDP the codes are then the gathered ones, and a remat
    policy that keeps them (`remat_saving_fp8`) keeps what was gathered: the backward gathers no
    weight a second time, for the memory of every layer's whole codes. Without rules, nothing."""
    token = _WHOLE_WEIGHTS.set(True)
    try:
        yield
    finally:
        _WHOLE_WEIGHTS.reset(token)


def weights_whole() -> bool:
    """Whether `keeping_weights_whole` is active (read when an fp8 matmul is traced)."""
    return _WHOLE_WEIGHTS.get()


def _named(x: jax.Array) -> jax.Array:
    if jnp.dtype(x.dtype).itemsize == 1 and jnp.issubdtype(x.dtype, jnp.floating):
        # A kept residual that the forward also reads is rounded by jax through
        # ``reduce_precision`` with its format's bits, which follows IEEE rules and turns the
        # top binade of a format without infinities (E4M3FN: 256..448, where most amaxes land)
        # into NaN. The codes' bytes are kept instead: bitcasts, free in XLA.
        return lax.bitcast_convert_type(checkpoint_name(lax.bitcast_convert_type(x, jnp.uint8), FP8_SAVED), x.dtype)
    return checkpoint_name(x, FP8_SAVED)


def saved_for_backward(tree):
    """``tree`` with every array named `FP8_SAVED` (FP8 codes through their bytes)."""
    return jax.tree.map(_named, tree)


def to_fp8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x`` as (E4M3 codes, f32 scale): the scale puts its amax in (224, 448] (1 for an
    all-zero ``x``)."""
    scale = current_scale(x, E4M3)
    return quantize(x, E4M3, scale), scale


def saved_in_fp8(fn: Callable[..., jax.Array], *xs: jax.Array) -> jax.Array:
    """``fn(*xs)``, differentiable, whose backward reads E4M3 copies of ``xs`` (`to_fp8`).

    ``fn`` must be a function of ``xs`` alone (no parameters: their gradients are not
    returned). The backward recomputes what ``fn``'s VJP needs from the copies.

    >>> x = jnp.array([0.5, -1.0, 3.5])           # scale 448 / 3.5 = 128: every copy exact
    >>> y, vjp = jax.vjp(lambda x: saved_in_fp8(jnp.tanh, x), x)
    >>> exact = jax.vjp(jnp.tanh, x)[1](jnp.ones(3))[0]
    >>> bool(jnp.all(y == jnp.tanh(x))), bool(jnp.all(vjp(jnp.ones(3))[0] == exact))
    (True, True)
    >>> x = jnp.array([0.3, -1.0, 3.5])           # 0.3 * 128 = 38.4 is kept as 40: the slope at 0.3125
    >>> slope = jax.grad(lambda x: saved_in_fp8(jnp.sin, x).sum())(x)[0]
    >>> bool(slope == jax.grad(jnp.sin)(jnp.float32(0.3125)))
    True
    """
    dtypes = tuple(jnp.dtype(x.dtype) for x in xs)

    @jax.custom_vjp
    def run(*xs):
        return fn(*xs)

    def forward(*xs):
        return fn(*xs), saved_for_backward(tuple(to_fp8(x) for x in xs))

    def backward(saved, g):
        xs = tuple(dequantize(q, s, dtype) for (q, s), dtype in zip(saved, dtypes))
        _, vjp = jax.vjp(fn, *xs)
        return vjp(g)

    run.defvjp(forward, backward)
    return run(*xs)
