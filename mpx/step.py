"""One precision-aware training step for any model function and any optax optimizer.

    scaled loss -> grads wrt (params, FP8 meta) -> unscale -> finite check
      -> optax update and FP8 meta advance, applied only if finite -> loss scale adjusted

The step is policy-agnostic: the model function decides per op what runs in which
precision (through `mpx.policy` / `mpx.ops`); the step owns the loss scale, the skip
logic and the FP8 meta bookkeeping. Parameters stay in their storage dtype (fp32
master weights) and the optimizer never sees the meta.

"Finite" means everything: the loss, every gradient, and every amax an FP8 matmul
observed in the step. A saturating FP8 cast turns an overflowed tensor into finite
numbers; its amax still says inf, and the step is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mpx.fp8.meta import advance_tree, combine_trees, max_fanout, observations_finite
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
    """What one step reports. ``grad_norm`` is the global norm of the unscaled gradients.

    ``skipped``: the update was not applied, because the loss, a gradient
    (``grads_finite`` False) or an FP8 amax (``amax_finite`` False) was not finite.
    ``fp8_fanout``: the largest ``fanout`` of any FP8 tensor this step: 1 when every
    reused meta was threaded, k > 1 when k un-threaded uses added their amaxes
    (see `mpx.fp8.meta`), 0 without FP8 ops.
    """

    loss: jax.Array
    grad_norm: jax.Array
    loss_scale: jax.Array
    skipped: jax.Array
    grads_finite: jax.Array
    amax_finite: jax.Array
    fp8_fanout: jax.Array
    aux: Any = None


def step_rng(state: TrainState) -> jax.Array:
    """The key of this step: ``fold_in(base key, step)``, the same on a resumed run."""
    return jax.random.fold_in(state.rng, state.step)


def _grads(state: TrainState, batch, rng, loss_fn, has_aux):
    """loss, aux, scaled param grads and FP8 observations for one (micro-)batch."""

    def scaled_loss(params, meta):
        out = loss_fn(params, meta, batch, rng)
        loss, aux = out if has_aux else (out, None)
        return state.loss_scale.scale(loss.astype(jnp.float32)), (loss.astype(jnp.float32), aux)

    (_, (loss, aux)), (grads, observed) = jax.value_and_grad(scaled_loss, argnums=(0, 1), has_aux=True)(
        state.params, state.fp8_meta
    )
    return loss, aux, grads, observed


def _accumulated_grads(state, batch, rng, loss_fn, has_aux, accum_steps):
    """Gradients averaged over ``accum_steps`` micro-batches (the leading axis of ``batch``),
    one micro-batch in memory at a time; FP8 observations combined by max."""
    for leaf in jax.tree.leaves(batch):
        if leaf.shape[:1] != (accum_steps,):
            raise ValueError(
                f"accum_steps={accum_steps} needs every batch leaf to lead with that many micro-batches; "
                f"got shape {leaf.shape}"
            )

    def body(carry, micro):
        i, grads, observed = carry
        loss, aux, g, seen = _grads(state, micro, jax.random.fold_in(rng, i), loss_fn, has_aux)
        grads = jax.tree.map(jnp.add, grads, g)
        return (i + 1, grads, combine_trees(observed, seen)), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    nothing_seen = jax.tree.map(jnp.zeros_like, state.fp8_meta)
    (_, grads, observed), (losses, aux) = jax.lax.scan(body, (0, zeros, nothing_seen), batch)
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    return jnp.mean(losses), aux, grads, observed


def train_step(
    state: TrainState,
    batch,
    *,
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    has_aux: bool = False,
    accum_steps: int = 1,
) -> tuple[TrainState, StepMetrics]:
    """One update. Jit it with ``loss_fn``/``optimizer`` bound, e.g.::

        step = jax.jit(functools.partial(train_step, loss_fn=loss_fn, optimizer=opt), donate_argnums=0)

    ``loss_fn(params, fp8_meta, batch, rng)`` returns the scalar f32 loss, or
    ``(loss, aux)`` with ``has_aux=True``. A step whose loss, gradients or FP8 amaxes
    are not all finite changes neither params, optimizer state nor FP8 meta (however
    many in a row); it only backs off the loss scale and advances ``step``.

    Every FP8 meta in ``state.fp8_meta`` advances once (its history rolls by one) from
    what its matmuls observed, however many times they ran; a meta whose op did not run
    is kept as it is.

    ``accum_steps > 1``: ``batch`` leaves lead with ``accum_steps`` micro-batches; the
    gradients are averaged over them before one optimizer update, and each FP8 op's
    amaxes are combined by max. ``aux`` is then stacked over micro-batches.
    """
    rng = step_rng(state)
    if accum_steps == 1:
        loss, aux, grads, observed = _grads(state, batch, rng, loss_fn, has_aux)
    else:
        loss, aux, grads, observed = _accumulated_grads(state, batch, rng, loss_fn, has_aux, accum_steps)
    grads = state.loss_scale.unscale(grads)
    grads_finite = all_finite(grads)
    amax_finite = observations_finite(observed)
    finite = grads_finite & amax_finite & jnp.isfinite(loss)

    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_meta = advance_tree(state.fp8_meta, observed)

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
        grads_finite=grads_finite,
        amax_finite=amax_finite,
        fp8_fanout=max_fanout(observed),
        aux=aux,
    )
    return new_state, metrics
