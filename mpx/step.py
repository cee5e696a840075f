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

from mpx.fp8 import Fp8Config, Fp8Meta, apply_meta_updates, merge_meta_updates
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


def merge_meta_trees(old, a, b, config: Fp8Config):
    """`merge_meta_updates` for every `Fp8Meta` of a meta pytree (one config for all)."""
    is_meta = lambda x: isinstance(x, Fp8Meta)  # noqa: E731
    return jax.tree.map(lambda o, x, y: merge_meta_updates(o, x, y, config), old, a, b, is_leaf=is_meta)


def _grads(state: TrainState, batch, rng, loss_fn, has_aux):
    """(loss, aux), (scaled param grads, meta updates) for one (micro-)batch."""

    def scaled_loss(params, meta):
        out = loss_fn(params, meta, batch, rng)
        loss, aux = out if has_aux else (out, None)
        return state.loss_scale.scale(loss.astype(jnp.float32)), (loss.astype(jnp.float32), aux)

    (_, (loss, aux)), (grads, meta_updates) = jax.value_and_grad(scaled_loss, argnums=(0, 1), has_aux=True)(
        state.params, state.fp8_meta
    )
    return loss, aux, grads, meta_updates


def _accumulated_grads(state, batch, rng, loss_fn, has_aux, accum_steps, fp8_config):
    """Gradients averaged over ``accum_steps`` micro-batches (the leading axis of ``batch``),
    one micro-batch in memory at a time; FP8 meta updates combined by max."""
    if jax.tree.leaves(state.fp8_meta) and fp8_config is None:
        raise ValueError("gradient accumulation with FP8 meta needs fp8_config= (the policy's Fp8Config)")
    for leaf in jax.tree.leaves(batch):
        if leaf.shape[:1] != (accum_steps,):
            raise ValueError(
                f"accum_steps={accum_steps} needs every batch leaf to lead with that many micro-batches; "
                f"got shape {leaf.shape}"
            )

    def body(carry, micro):
        i, grads, meta = carry
        loss, aux, g, m = _grads(state, micro, jax.random.fold_in(rng, i), loss_fn, has_aux)
        grads = jax.tree.map(jnp.add, grads, g)
        meta = merge_meta_trees(state.fp8_meta, meta, m, fp8_config) if fp8_config is not None else meta
        return (i + 1, grads, meta), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    meta0 = jax.tree.map(jnp.zeros_like, state.fp8_meta)
    (_, grads, meta_updates), (losses, aux) = jax.lax.scan(body, (0, zeros, meta0), batch)
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    return jnp.mean(losses), aux, grads, meta_updates


def train_step(
    state: TrainState,
    batch,
    *,
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    has_aux: bool = False,
    accum_steps: int = 1,
    fp8_config: Fp8Config | None = None,
) -> tuple[TrainState, StepMetrics]:
    """One update. Jit it with ``loss_fn``/``optimizer`` bound, e.g.::

        step = jax.jit(functools.partial(train_step, loss_fn=loss_fn, optimizer=opt), donate_argnums=0)

    ``loss_fn(params, fp8_meta, batch, rng)`` returns the scalar f32 loss, or
    ``(loss, aux)`` with ``has_aux=True``. A step with non-finite gradients changes
    neither params, optimizer state nor FP8 meta (however many in a row); it only backs
    off the loss scale and advances ``step``.

    ``accum_steps > 1``: ``batch`` leaves lead with ``accum_steps`` micro-batches; the
    gradients are averaged over them before one optimizer update, and each FP8 op's
    amaxes are combined by max (its history rolls once per step). With FP8 meta this
    needs ``fp8_config`` (the policy's). ``aux`` is then stacked over micro-batches.
    """
    rng = step_rng(state)
    if accum_steps == 1:
        loss, aux, grads, meta_updates = _grads(state, batch, rng, loss_fn, has_aux)
    else:
        loss, aux, grads, meta_updates = _accumulated_grads(
            state, batch, rng, loss_fn, has_aux, accum_steps, fp8_config
        )
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
