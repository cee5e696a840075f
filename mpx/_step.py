"""One precision-aware training step for any model function and any optax optimizer.

    scaled loss -> grads wrt (params, FP8 meta) -> unscale -> finite check
      -> optax update and FP8 meta advance, applied only if finite -> loss scale adjusted

The step is policy-agnostic: the model function decides per op what runs in which
precision (through `mpx.policy` / `mpx.ops`); the step owns the loss scale, the skip
logic and the FP8 meta bookkeeping. Parameters stay in their storage dtype (fp32
master weights; bf16 ones with ``stochastic_rounding``) and the optimizer never sees the meta.

"Finite" means everything: the loss, every gradient, and the amaxes an FP8 matmul
observed of its lhs and output gradient in the step (a non-finite rhs is NaN in every
output column it touches, so the loss or gradients say it). An FP8 cast never turns an
overflowed tensor into finite numbers, and its amax says inf: the step is skipped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mpx.fp8._meta import (advance_tree, bootstrap, combine_trees, max_fanout, needs_bootstrap, observations_finite,
                           statistics)
from mpx.loss_scale import LossScale, NoOpLossScale, select_tree
from mpx.optim import apply_updates
from mpx.policy import Policy


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
    model_state: Any = struct.field(default_factory=dict)


def init_train_state(
    params,
    optimizer: optax.GradientTransformation,
    *,
    policy: Policy | None = None,
    fp8_meta=None,
    model_state=None,
    loss_scale: LossScale | None = None,
    rng: jax.Array | None = None,
) -> TrainState:
    """A step-0 `TrainState`: optimizer state from ``params``.

    ``policy``: its loss scale (``policy.loss_scale``: dynamic under the fp16 preset) is
    created here; ``loss_scale`` gives one explicitly instead (not both). Without either,
    no loss scaling. ``model_state``: state the model updates as it runs (batch
    statistics, RNG counts: the ``rest`` of `mpx.split`), for ``train_step(...,
    has_state=True)``.
    """
    if policy is not None and loss_scale is not None:
        raise ValueError("init_train_state takes the loss scale from `policy` or from `loss_scale`, not both")
    if policy is not None:
        loss_scale = policy.loss_scale.create()
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        fp8_meta=fp8_meta if fp8_meta is not None else {},
        opt_state=optimizer.init(params),
        loss_scale=loss_scale if loss_scale is not None else NoOpLossScale(),
        rng=rng if rng is not None else jax.random.key(0),
        model_state=model_state if model_state is not None else {},
    )


@struct.dataclass
class StepMetrics:
    """What one step reports. ``grad_norm`` is the global norm of the unscaled gradients.

    ``skipped``: the update was not applied, because the loss, a gradient
    (``grads_finite`` False) or an FP8 amax (``amax_finite`` False: an FP8 matmul's lhs or
    output gradient; see `mpx.fp8._meta.observations_finite`) was not finite.
    ``fp8_fanout``: the largest ``fanout`` of any FP8 tensor this step: 1 when every
    reused meta was threaded, k > 1 when k un-threaded uses added their amaxes
    (see `mpx.fp8._meta`), 0 without FP8 ops.
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


# The rounding's stream of the step's key: far from the small integers (micro-batch and
# layer indices) that models and the accumulation loop fold into it.
_ROUNDING_STREAM = 0x726F756E


def rounding_key(state: TrainState) -> jax.Array:
    """The key `train_step` rounds this step's narrow params with (``stochastic_rounding``):
    derived from `step_rng`, so a resumed run rounds as an uninterrupted one."""
    return jax.random.fold_in(step_rng(state), _ROUNDING_STREAM)


def _grads(state: TrainState, model_state, batch, rng, loss_fn, has_aux, has_state):
    """loss, aux, scaled param grads, FP8 observations and the new model state for one
    (micro-)batch."""

    def scaled_loss(params, meta):
        if has_state:
            # A fresh copy made here, inside the differentiated function: NNX state (Variables)
            # may then be updated by the model as it runs (it refuses writes to variables
            # created outside the current JAX transform).
            out, new_state = loss_fn(params, meta, jax.tree.map(lambda x: x, model_state), batch, rng)
        else:
            out, new_state = loss_fn(params, meta, batch, rng), model_state
        loss, aux = out if has_aux else (out, None)
        return state.loss_scale.scale(loss.astype(jnp.float32)), (loss.astype(jnp.float32), aux, new_state)

    (_, (loss, aux, new_state)), (grads, observed) = jax.value_and_grad(
        scaled_loss, argnums=(0, 1), has_aux=True)(state.params, state.fp8_meta)
    return loss, aux, grads, observed, new_state


def _accumulated_grads(state, batch, rng, loss_fn, has_aux, has_state, accum_steps):
    """Gradients averaged over ``accum_steps`` micro-batches (the leading axis of ``batch``),
    one micro-batch in memory at a time; FP8 observations combined by max; the model
    state passed from each micro-batch to the next."""
    for leaf in jax.tree.leaves(batch):
        if leaf.shape[:1] != (accum_steps,):
            raise ValueError(
                f"accum_steps={accum_steps} needs every batch leaf to lead with that many micro-batches; "
                f"got shape {leaf.shape}"
            )

    def body(carry, micro):
        i, grads, observed, model_state = carry
        loss, aux, g, seen, model_state = _grads(state, model_state, micro, jax.random.fold_in(rng, i), loss_fn,
                                                 has_aux, has_state)
        grads = jax.tree.map(jnp.add, grads, g)
        return (i + 1, grads, combine_trees(observed, seen), model_state), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    nothing_seen = jax.tree.map(jnp.zeros_like, state.fp8_meta)
    (_, grads, observed, model_state), (losses, aux) = jax.lax.scan(
        body, (0, zeros, nothing_seen, state.model_state), batch)
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    return jnp.mean(losses), aux, grads, observed, model_state


def train_step(
    state: TrainState,
    batch,
    *,
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    has_aux: bool = False,
    has_state: bool = False,
    accum_steps: int = 1,
    fp8_bootstrap: bool = True,
    fp8_statistics: bool = True,
    stochastic_rounding: bool = False,
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

    ``has_state=True``: the model updates state as it runs (batch statistics, RNG
    counts): ``loss_fn(params, fp8_meta, model_state, batch, rng)`` returns ``(out,
    new_model_state)``, ``out`` being what it returns otherwise; ``state.model_state``
    takes the new one when the step is applied (a skipped step keeps the old).

    ``accum_steps > 1``: ``batch`` leaves lead with ``accum_steps`` micro-batches; the
    gradients are averaged over them before one optimizer update, and each FP8 op's
    amaxes are combined by max. ``aux`` is then stacked over micro-batches.

    ``fp8_bootstrap``: an FP8 tensor whose amax history is still empty (the first step)
    scales from its own amax in this step, so that it neither saturates nor flushes. The
    price is a pass: every quantize then waits for its tensor's amax. ``False`` compiles the
    lean program for the steps after: every tensor uses its stored (delayed) scale, and the
    amax and the statistics come from the pass that reads the tensor anyway. A tensor that
    was exactly zero in every step so far (a zero-initialised weight) still has an empty
    history then and quantizes with its stored scale (1) in its first nonzero step.
    `make_train_step` runs the bootstrap program until a step has been applied, then the
    lean one.

    ``fp8_statistics=False``: the FP8 matmuls (one scale per tensor) observe each tensor's
    amax alone, not the fractions it saturates and flushes, and every meta keeps the fractions
    of the last step that counted them (`mpx.fp8._meta.statistics`): a pass less per tensor,
    for the steps whose statistics are not logged. Scales, histories and the overflow check
    are those of a counting step, bit for bit.

    ``stochastic_rounding``: bf16 and fp16 params (low-precision master weights) take
    ``param + update`` summed in f32 and rounded stochastically (`mpx.optim.apply_updates`
    with `rounding_key`), so updates under half a step of the weight still move it on
    average; f32 params are updated as without it. Off: `optax.apply_updates`, whose
    round-to-nearest loses those updates.
    """
    rng = step_rng(state)
    with bootstrap(fp8_bootstrap), statistics(fp8_statistics):
        if accum_steps == 1:
            loss, aux, grads, observed, model_state = _grads(state, state.model_state, batch, rng, loss_fn, has_aux,
                                                             has_state)
        else:
            loss, aux, grads, observed, model_state = _accumulated_grads(state, batch, rng, loss_fn, has_aux,
                                                                         has_state, accum_steps)
    grads = state.loss_scale.unscale(grads)
    # One pass over the gradients serves the metric and the check: an inf or NaN element makes
    # the global norm non-finite. (So does a norm past f32's range, 1.8e19: gradients that
    # large are a divergence too, and the step is skipped like one.)
    grad_norm = optax.tree.norm(grads)
    grads_finite = jnp.isfinite(grad_norm)
    amax_finite = observations_finite(observed)
    finite = grads_finite & amax_finite & jnp.isfinite(loss)

    updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_params = apply_updates(state.params, updates, rounding_key(state) if stochastic_rounding else None)
    new_meta = advance_tree(state.fp8_meta, observed, apply=finite)  # a skipped step keeps every meta

    new_state = state.replace(
        step=state.step + 1,
        params=select_tree(finite, new_params, state.params),
        opt_state=select_tree(finite, new_opt_state, state.opt_state),
        fp8_meta=new_meta,
        model_state=select_tree(finite, model_state, state.model_state),
        loss_scale=state.loss_scale.adjust(finite),
    )
    metrics = StepMetrics(
        loss=loss.astype(jnp.float32),
        grad_norm=grad_norm,
        loss_scale=state.loss_scale.loss_scale,
        skipped=jnp.logical_not(finite),
        grads_finite=grads_finite,
        amax_finite=amax_finite,
        fp8_fanout=max_fanout(observed),
        aux=aux,
    )
    return new_state, metrics


class BootstrappedStep:
    """A step function in two programs, three with ``quiet``: ``bootstrap``
    (``fp8_bootstrap=True``) until a step has been applied to a state with FP8 tensors, then
    ``lean`` (``fp8_bootstrap=False``; see `train_step`), or ``quiet`` (lean without the FP8
    saturation / flush counts, ``fp8_statistics=False``) for a call made with
    ``statistics=False``. A state it did not return itself (a fresh or a restored one) is
    fresh when none of its FP8 tensors has recorded an amax (`mpx.fp8._meta.needs_bootstrap`).

    Each is called as ``fn(state, *args)`` and returns a tuple whose first element is the
    new state and whose last is its `StepMetrics`. Choosing reads the device only while
    bootstrapping (the histories of a state it did not return itself, the ``skipped`` flag
    of a bootstrap step): a run in its steady state is never synchronised by it. A jitted
    program compiles at its first call, so a program never chosen costs nothing.
    """

    def __init__(self, bootstrap: Callable[..., Any], lean: Callable[..., Any], quiet: Callable[..., Any] | None = None):
        self.bootstrap, self.lean, self.quiet = bootstrap, lean, quiet if quiet is not None else lean
        self._returned = None  # the `step` array of the state this object returned last
        self._bootstrapping = True

    def _bootstraps(self, state: TrainState) -> bool:
        if state.step is not self._returned:  # a state from elsewhere: a fresh or restored run
            self._bootstrapping = needs_bootstrap(state.fp8_meta)
        return self._bootstrapping

    def _program(self, state: TrainState, statistics: bool) -> Callable[..., Any]:
        if self._bootstraps(state):
            return self.bootstrap
        return self.lean if statistics else self.quiet

    def __call__(self, state: TrainState, *args, statistics: bool = True):
        """One step; ``statistics=False`` (after the first): the FP8 fractions are not counted."""
        program = self._program(state, statistics)
        out = program(state, *args)
        if program is self.bootstrap:
            # One read of the device, after the first step: an overflowing first step changed
            # nothing, and the next must bootstrap again.
            self._bootstrapping = bool(out[-1].skipped)
        self._returned = out[0].step
        return out

    def lower(self, state: TrainState, *args, statistics: bool = True):
        """``jax.jit(...).lower`` of the program a call with these arguments would run."""
        return self._program(state, statistics).lower(state, *args)


def make_train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    has_aux: bool = False,
    has_state: bool = False,
    accum_steps: int = 1,
    donate: bool = True,
    stochastic_rounding: bool = False,
) -> BootstrappedStep:
    """`train_step` with its arguments bound, jitted: ``step(state, batch) -> (state,
    metrics)``. The loss scale and FP8 state travel in the `TrainState`
    (``init_train_state(params, optimizer, policy=policy, fp8_meta=...)``), so the step
    needs nothing else from the policy. ``donate``: reuse the old state's buffers.
    ``stochastic_rounding``: see `train_step`.

    Two programs are compiled when the model has FP8 ops: the first step's, which scales
    fresh FP8 tensors from their own amax, and the lean one of every step after
    (`BootstrappedStep`); a third, without the FP8 saturation / flush counts, the first
    time a step is called with ``statistics=False``."""

    def jitted(fp8_bootstrap: bool, fp8_statistics: bool = True):
        step = functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer, has_aux=has_aux,
                                 has_state=has_state, accum_steps=accum_steps, fp8_bootstrap=fp8_bootstrap,
                                 fp8_statistics=fp8_statistics, stochastic_rounding=stochastic_rounding)
        return jax.jit(step, donate_argnums=0 if donate else ())

    return BootstrappedStep(jitted(True), jitted(False), jitted(False, fp8_statistics=False))
