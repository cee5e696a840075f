"""One precision-aware training step for any model function and any optax optimizer.

    scaled loss -> grads wrt (params, FP8 meta) -> unscale -> finite check
      -> optax update, applied only if finite -> FP8 meta overwritten -> loss scale adjusted

The step is policy-agnostic: the model function decides per op what runs in which
precision (through `mpx.policy` / `mpx.ops`); the step owns the loss scale, the skip
logic and the FP8 meta bookkeeping. Parameters stay in their storage dtype (fp32
master weights) and the optimizer never sees the meta.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mpx.fp8 import apply_meta_updates
from mpx.loss_scale import LossScale, NoOpLossScale, all_finite, select_tree


@struct.dataclass
class TrainState:
    """Everything a step reads and writes. Every field is a pytree; ``step`` is i32[].

    ``fp8_meta`` is any pytree of `mpx.fp8.Fp8Meta` (``None`` or ``{}`` when nothing
    runs in fp8); ``rng`` is the base key from which each step's key is derived.
    """

    step: jax.Array
    params: Any
    fp8_meta: Any
    opt_state: Any
    loss_scale: LossScale
    rng: jax.Array


def init_train_state(
    params,
    optimizer: optax.GradientTransformation,
    *,
    fp8_meta=None,
    loss_scale: LossScale | None = None,
    rng: jax.Array | None = None,
) -> TrainState:
    """A step-0 `TrainState`: optimizer state from ``params``, no loss scaling by default."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        fp8_meta=fp8_meta if fp8_meta is not None else {},
        opt_state=optimizer.init(params),
        loss_scale=loss_scale if loss_scale is not None else NoOpLossScale(),
        rng=rng if rng is not None else jax.random.key(0),
    )


@struct.dataclass
class StepMetrics:
    """What one step reports. ``grad_norm`` is the global norm of the unscaled gradients."""

    loss: jax.Array
    grad_norm: jax.Array
    loss_scale: jax.Array
    skipped: jax.Array  # bool[]: the update was not applied (non-finite gradients)
    aux: Any = None


def step_rng(state: TrainState) -> jax.Array:
    """The key of this step: ``fold_in(base key, step)``, the same on a resumed run."""
    return jax.random.fold_in(state.rng, state.step)


def train_step(
    state: TrainState,
    batch,
    *,
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    has_aux: bool = False,
) -> tuple[TrainState, StepMetrics]:
    """One update. Jit it with ``loss_fn``/``optimizer`` bound, e.g.::

        step = jax.jit(functools.partial(train_step, loss_fn=loss_fn, optimizer=opt), donate_argnums=0)

    ``loss_fn(params, fp8_meta, batch, rng)`` returns the scalar f32 loss, or
    ``(loss, aux)`` with ``has_aux=True``. A step with non-finite gradients changes
    neither params, optimizer state nor FP8 meta (however many in a row); it only backs
    off the loss scale and advances ``step``.
    """
    rng = step_rng(state)

    def scaled_loss(params, meta):
        out = loss_fn(params, meta, batch, rng)
        loss, aux = out if has_aux else (out, None)
        return state.loss_scale.scale(loss.astype(jnp.float32)), (loss, aux)

    grad_fn = jax.value_and_grad(scaled_loss, argnums=(0, 1), has_aux=True)
    (_, (loss, aux)), (grads, meta_updates) = grad_fn(state.params, state.fp8_meta)
    grads = state.loss_scale.unscale(grads)
    finite = all_finite(grads)

    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_meta = apply_meta_updates(state.fp8_meta, meta_updates)

    new_state = state.replace(
        step=state.step + 1,
        params=select_tree(finite, new_params, state.params),
        opt_state=select_tree(finite, new_opt_state, state.opt_state),
        fp8_meta=select_tree(finite, new_meta, state.fp8_meta),
        loss_scale=state.loss_scale.adjust(finite),
    )
    metrics = StepMetrics(
        loss=loss.astype(jnp.float32),
        grad_norm=optax.tree.norm(grads),
        loss_scale=state.loss_scale.loss_scale,
        skipped=jnp.logical_not(finite),
        aux=aux,
    )
    return new_state, metrics
