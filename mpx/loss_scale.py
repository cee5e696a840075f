"""Loss scaling for FP16 training: no-op, static and dynamic scales, all pytrees.

Every field of every loss scale is a pytree leaf, so a scale passes through ``jax.jit``,
``lax.cond`` and checkpoints with nothing lost. The scale itself is always float32,
also under an FP16 policy (an FP16 scale overflows at 65504).

All three share one interface::

    scaled_loss = ls.scale(loss)         # before differentiating
    grads = ls.unscale(grads)            # after
    ls = ls.adjust(all_finite(grads))    # once per step

`DynamicLossScale.adjust` semantics (``period`` P, ``factor`` F):

* a non-finite step: the scale becomes ``max(scale / F, min_loss_scale)`` and the run of
  finite steps restarts at 0;
* a finite step: the run grows by 1; on the P-th consecutive finite step the scale
  becomes ``scale * F`` (unless that overflows f32) and the run restarts at 0.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mpx._checks import check_choice, check_int, is_number

__all__ = [
    "DynamicLossScale",
    "LossScale",
    "LossScaleConfig",
    "NoOpLossScale",
    "StaticLossScale",
    "all_finite",
    "dynamic_loss_scale",
    "select_tree",
]


def _scale_tree(tree, factor: jax.Array):
    """Multiply every floating leaf by ``factor`` (computed in f32, cast back)."""

    def mul(x):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return x
        return (jnp.asarray(x, jnp.float32) * factor).astype(jnp.result_type(x))

    return jax.tree.map(mul, tree)


def all_finite(tree) -> jax.Array:
    """True (bool[]) iff every element of every floating leaf is finite."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.array(True)
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


def select_tree(pred: jax.Array, on_true, on_false):
    """``on_true`` where the scalar ``pred`` holds, else ``on_false``, leaf by leaf."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


@struct.dataclass
class NoOpLossScale:
    """No loss scaling (FP32 / BF16 training)."""

    @property
    def loss_scale(self) -> jax.Array:
        return jnp.ones((), jnp.float32)

    def scale(self, tree):
        return tree

    def unscale(self, tree):
        return tree

    def adjust(self, grads_finite: jax.Array) -> NoOpLossScale:
        del grads_finite
        return self


@struct.dataclass
class StaticLossScale:
    """A fixed loss scale (stored as f32)."""

    loss_scale: jax.Array

    def __post_init__(self):
        if isinstance(self.loss_scale, (int, float)):
            object.__setattr__(self, "loss_scale", jnp.asarray(self.loss_scale, jnp.float32))

    def scale(self, tree):
        return _scale_tree(tree, self.loss_scale)

    def unscale(self, tree):
        return _scale_tree(tree, 1.0 / self.loss_scale)

    def adjust(self, grads_finite: jax.Array) -> StaticLossScale:
        del grads_finite
        return self


@struct.dataclass
class DynamicLossScale:
    """A loss scale that backs off on overflow and grows after ``period`` finite steps.

    Build it with `dynamic_loss_scale`; every field, ``period`` and ``min_loss_scale``
    included, is an array leaf.
    """

    loss_scale: jax.Array  # f32[]
    counter: jax.Array  # i32[]: consecutive finite steps since the last change
    period: jax.Array  # i32[]
    factor: jax.Array  # f32[]
    min_loss_scale: jax.Array  # f32[]

    def scale(self, tree):
        return _scale_tree(tree, self.loss_scale)

    def unscale(self, tree):
        return _scale_tree(tree, 1.0 / self.loss_scale)

    def adjust(self, grads_finite: jax.Array) -> DynamicLossScale:
        run = self.counter + 1
        grown = self.loss_scale * self.factor
        grow = run >= self.period
        up_scale = jnp.where(grow & jnp.isfinite(grown), grown, self.loss_scale)
        up_counter = jnp.where(grow, 0, run)
        down_scale = jnp.maximum(self.loss_scale / self.factor, self.min_loss_scale)
        return self.replace(
            loss_scale=jnp.where(grads_finite, up_scale, down_scale).astype(jnp.float32),
            counter=jnp.where(grads_finite, up_counter, 0).astype(jnp.int32),
        )


LossScale = NoOpLossScale | StaticLossScale | DynamicLossScale


def dynamic_loss_scale(
    initial: float = 2.0**15, *, period: int = 2000, factor: float = 2.0, min_loss_scale: float = 1.0
) -> DynamicLossScale:
    """A `DynamicLossScale` with every field an f32/i32 array.

    >>> ls = dynamic_loss_scale(2.0**15, period=2)
    >>> for finite in (True, True, False):       # grows after 2 finite steps, halves on overflow
    ...     ls = ls.adjust(jnp.array(finite))
    ...     print(float(ls.loss_scale), int(ls.counter))
    32768.0 1
    65536.0 0
    32768.0 0
    >>> float(ls.scale(jnp.float32(0.5))), float(ls.unscale(jnp.float32(16384.0)))
    (16384.0, 0.5)
    """
    return DynamicLossScale(
        loss_scale=jnp.asarray(initial, jnp.float32),
        counter=jnp.zeros((), jnp.int32),
        period=jnp.asarray(period, jnp.int32),
        factor=jnp.asarray(factor, jnp.float32),
        min_loss_scale=jnp.asarray(min_loss_scale, jnp.float32),
    )


_KINDS = ("none", "static", "dynamic")


@dataclasses.dataclass(frozen=True)
class LossScaleConfig:
    """Static description of a loss scale (what a policy carries); `create` builds it.

    ``kind``: ``none``, ``static`` (uses ``initial``) or ``dynamic`` (all fields).
    """

    kind: Literal["none", "static", "dynamic"] = "none"
    initial: float = 2.0**15
    period: int = 2000
    factor: float = 2.0
    min: float = 1.0

    def __post_init__(self):
        check_choice("loss_scale kind", self.kind, _KINDS)
        for name in ("initial", "factor", "min"):
            value = getattr(self, name)
            if not is_number(value) or not value > 0:
                raise ValueError(f"loss_scale {name} must be a positive number, got {value!r}")
            if not value <= float(np.finfo(np.float32).max):  # the scale lives in f32
                raise ValueError(f"loss_scale {name} must be a finite float32 (<= 3.4e38), got {value!r}")
        check_int("loss_scale period", self.period, low=1)
        if self.kind == "dynamic" and self.factor <= 1:
            raise ValueError(f"loss_scale factor must be > 1 for a dynamic scale, got {self.factor!r}")

    def create(self) -> LossScale:
        if self.kind == "none":
            return NoOpLossScale()
        if self.kind == "static":
            return StaticLossScale(jnp.asarray(self.initial, jnp.float32))
        return dynamic_loss_scale(self.initial, period=self.period, factor=self.factor, min_loss_scale=self.min)
