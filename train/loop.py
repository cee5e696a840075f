"""The training loop: a built run -> jitted mpx steps -> logs, evals, checkpoints.

`train` and `_run` are where the run config is taken apart for the loop: the checkpointer
gets the ``checkpoint`` section and the run directory, the logger ``logging`` and the run
directory, the step its numbers (``optim.grad_accum``, ``model.dropout``), the divergence
guard the ``train`` limits; `train.build.build` hands out the rest. Nothing they call is
given the whole run, except the run's identity checks (`train.identity`), whose subject
it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

import mpx
from mpx.inspect import SpelledOutBlocks, Widened8Bit, describe, fp8_stats
from mpx.nn import TransformerConfig
from train import checkpoint as ckpt
from train import data as data_lib
from train import divergence
from train import identity
from train import mesh as mesh_lib
from train import metrics as mt
from train import rundir
from train.build import Built, build
from train.evaluation import eval_step, evaluate, with_references
from train.divergence import Diverged
from train.logger import Logger, drop_rows_after
from train.schema import ConfigError, RunConfig

__all__ = ["Diverged", "precision_report", "train"]


def train(
    config: RunConfig,
    *,
    say: Callable[[str], None] = print,
    on_step: Callable[[int, mpx.TrainState], None] | None = None,
    strict: bool = False,
    change_optim: bool = False,
    new_data: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the training run ``config`` describes; returns the final metrics.

    At the start it reports how many ops run in each precision and warns of every policy
    rule whose path matches no op of the model (a typo leaves those ops in the default
    precision); ``strict`` makes such a rule an error.

    ``on_step(step, state)`` is called after each step (and its checkpoint request); the
    step may still be running on the device then.

    The loop never waits on the device between log steps: each step is dispatched
    asynchronously, the next batch is loaded and put on the devices while it runs, and
    the run's health (skipped steps, an exploded loss: `train.divergence`) is kept on the
    device. Metrics are fetched (one ``jax.device_get``) only at log steps; evaluations and
    checkpoint saves read the state at their own intervals. A run that diverges stops
    (`Diverged`) at the first log step or due save after, before saving anything from then.

    A resume whose data changed since the run started (`train.identity.data_fingerprint`)
    is an error before anything is restored; ``new_data`` continues the run's state on the
    new data instead, with a fresh data position.

    Process 0 holds the run directory's lock while it trains (`train.rundir.locked`): a
    second run in the same directory is an error. A resume may change the run's optimizer
    settings (`train.identity.ADJUSTABLE`) only with ``change_optim``; the change is recorded.

    The JAX distributed system is started here if the CLI has not done it already
    (`train.mesh.initialize_distributed`), so that this function can be called from Python.
    An ``8bit`` precision is then written out for this device (`RunConfig.resolved`): the run
    records the format it trains in, and a resume on a chip that picks the other is refused.
    """
    mesh_lib.initialize_distributed(config.mesh.distributed)  # a no-op once started
    config = config.resolved()
    lock = rundir.locked(config.run_dir, say=say) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        resuming, saved, config, changes = _check_identity(config, say, change_optim=change_optim)
        built = build(config, say=say, finetune=not resuming)
        data = _check_data(built, config, resuming, new_data=new_data, say=say)
        refs = _start_report(built, config, say=say, strict=strict)
        if jax.process_index() == 0:  # once the data and the model are built: a refused start leaves nothing
            rundir.keep_tokenizer(config.run_dir, built.task.tokenizer)
            if not resuming:
                rundir.record_config(config.run_dir, config.to_dict())
                rundir.record_data(config.run_dir, data.fingerprint)
        checkpointer = ckpt.Checkpointer.of(config.checkpoint, config.run_dir, training=True)
        try:
            train_iter = built.task.train_iter()
            state, skipped = _resume(built, config.run_dir, checkpointer, train_iter, data, say)
            if changes and jax.process_index() == 0:
                identity.amend(config.run_dir, saved, changes, step=int(state.step))
            return _run(built, config, state, skipped, train_iter, checkpointer, refs, say, on_step)
        finally:
            checkpointer.close()


def _run(built: Built, config: RunConfig, state, skipped: int, train_iter, checkpointer, refs, say,
         on_step) -> dict[str, Any]:
    """Steps from ``state.step`` to ``train.steps``: log, evaluate and save on the way."""
    t, accum = config.train, config.optim.grad_accum
    config_dict = config.to_dict()
    guard = divergence.Guard(checkpointer, max_consecutive_skips=t.max_consecutive_skips,
                             max_loss_ratio=t.max_loss_ratio, uniform_loss=built.task.uniform_loss(),
                             lr=config.optim.lr, say=say)
    step_fn = _make_step_fn(built, guard.ceiling, accum=accum, dropout=config.model.dropout > 0,
                            lean=t.steps >= t.fp8_lean_min_steps)
    eval_fn = eval_step(built.task, built.graphdef, built.mesh)
    batch_sharding = built.batch_sharding(accumulated=accum > 1)
    shape = config.model.to_transformer(built.task.vocab_size)
    meter = _Meter(built.state.params, shape, seq_len=config.data.seq_len,
                   tokens_per_step=config.data.batch_size * config.data.seq_len * accum,
                   schedule=built.schedule)
    start, end = int(state.step), t.steps
    logger = Logger(config.logging, config.run_dir, say, end, start)
    # The run's health (skipped steps: the total from the checkpoint on and the current streak;
    # the loss's running average and where it went above the ceiling), kept on the device by
    # the step itself.
    health = jax.device_put(divergence.initial(skipped, start_loss=guard.uniform_loss),
                            mesh_lib.replicated(built.mesh))
    counters = lambda: {"skipped": int(health["total"])}  # noqa: E731 - read at saves only
    # The data position after the batches of every step run so far: what a checkpoint
    # saves. The iterator itself runs one batch ahead (the prefetched one).
    data_state = train_iter.get_state()
    batch = _next_batch(train_iter, accum, batch_sharding) if start < end else None
    last: dict[str, Any] = {}
    try:
        for step in range(start, end):
            done = step + 1
            logged = done % t.log_every == 0 or done == end  # its FP8 statistics are read: count them
            state, health, m = step_fn(state, health, batch, statistics=logged)  # dispatched, not yet run
            data_state = train_iter.get_state()
            if done < end:  # prefetch: load and transfer the next batch while this step runs
                batch = _next_batch(train_iter, accum, batch_sharding)
            logger.step(m.loss)
            meter.tick()
            read = None
            if logged:
                last, read = meter.read(done, m, health, state)  # the one wait on the device in a window
                logger.log(done, last, "train")
            elif checkpointer.due(done):  # a save reads the state anyway: check what it would save
                read = _read_health(m, health)
            if read is not None:
                guard.check(done, read[0], loss=read[1], loss_scale=read[2])
            if t.eval_every and (done % t.eval_every == 0 or done == end):
                result = evaluate(eval_fn, state, built.task.eval_iter(), t.eval_batches, built.batch_sharding())
                result = with_references(result, refs)
                logger.log(done, result, "eval")
                last.update({f"eval_{k}": v for k, v in result.items()})
            # Host-only unless a save is due (then it reads the state); the data position
            # excludes the prefetched batch, so a resume continues with exactly that batch.
            checkpointer.save(done, state, data_state=data_state, config=config_dict, counters=counters)
            if on_step is not None:
                on_step(done, state)
        checkpointer.save(int(state.step), state, data_state=data_state, config=config_dict, force=True,
                          counters=counters)
        ended_skipping = guard.finish(int(state.step))
        checkpointer.wait()
    finally:
        logger.close()
    last["step"] = int(state.step)
    for remark in (ended_skipping, built.task.below_baseline(last, refs)):
        if remark:
            say(f"warning: {remark}")
    return last


def _read_health(m: mpx.StepMetrics, health) -> tuple[divergence.Health, float, float]:
    host = jax.device_get({"health": health, "loss": m.loss, "loss_scale": m.loss_scale})
    return divergence.Health.of(host["health"]), float(host["loss"]), float(host["loss_scale"])


# ----------------------------------------------------------------------------- start


def _check_identity(config: RunConfig, say, *, change_optim: bool):
    """``(resuming, the run's saved config, the config to run, its ADJUSTABLE changes)``; a
    resume with a changed config is an error before anything is restored, and keeps the
    run's learning-rate schedule (`train.identity.keep_decay_end`). (A new run records its
    config once it has started.)"""
    resuming = rundir.has_checkpoints(config.run_dir)
    saved = rundir.saved_config(config.run_dir)
    changes = {}
    if resuming and saved is not None:
        changes = identity.check_resume(saved, config.to_dict(), run_dir=config.run_dir, say=say,
                                        change_optim=change_optim)
        optim = identity.keep_decay_end(saved, config.optim, config.train.steps, say=say)
        config = dataclasses.replace(config, optim=optim)
    return resuming, saved, config, changes


@dataclasses.dataclass(frozen=True)
class _DataCheck:
    """The data a run trains on now (``fingerprint``), what changed since the run's
    checkpoints were saved (``changes``, only with ``new_data``), and ``since_step``: the
    checkpoints up to that step hold a data position in other data."""

    fingerprint: dict
    changes: list[str]
    since_step: int


def _check_data(built: Built, config: RunConfig, resuming: bool, *, new_data: bool, say) -> _DataCheck:
    """Compare the run's data with the one it recorded: changed data on resume is an error
    (before anything is restored) unless ``new_data``; a run from before data.json records
    it (a new run, once it has started)."""
    current = identity.data_fingerprint(built.task.prepared, built.task.tokenizer)
    saved = rundir.saved_data(config.run_dir) if resuming else None
    if saved is None:
        if resuming and jax.process_index() == 0:
            rundir.record_data(config.run_dir, current)
        return _DataCheck(current, [], 0)
    changes = identity.data_changes(saved, current)
    if changes and not new_data:
        where = "data.path" if config.data.task == "classification" else "data.files"
        raise identity.DataChanged(
            f"the data of run {config.run_dir} changed since its checkpoints were saved: {'; '.join(changes)}; "
            f"their data position belongs to the old data. Resume with the original files ({where}), start a "
            "new run (name=...), or pass --new-data to continue training this run on the new data from its start")
    if new_data and not changes:
        say("--new-data: the data is the one the run was trained on; resuming its data position")
    return _DataCheck(current, changes, int(saved.get("since_step", 0)))


def _start_report(built: Built, config: RunConfig, *, say, strict: bool) -> dict[str, float]:
    """Say the run's precision and baseline, check the validation split gives a batch;
    returns the task's references."""
    task = built.task
    precision_report(built.model(), built.policy, config.precision, say=say, strict=strict)
    if config.train.eval_every and next(iter(task.eval_iter()), None) is None:
        raise data_lib.DataError(
            f"the validation split gives no batch of data.batch_size={config.data.batch_size} rows of "
            f"data.seq_len={config.data.seq_len} tokens, so the first evaluation would fail; raise "
            f"data.validation_fraction (now {config.data.validation_fraction}), lower data.batch_size, or set "
            "train.eval_every=0")
    refs = task.references()
    say(task.baseline_message(refs))
    return refs


def precision_report(model, policy: mpx.Policy, precision, *, say: Callable[[str], None], strict: bool,
                     device=None) -> None:
    """Say how many ops of ``model`` run in each precision under ``policy`` (the config's
    ``precision``, as written); unmatched path rules are warnings, or with ``strict`` a
    `ConfigError`. On an accelerator (``device``, default this process's first unless a CPU)
    each 8-bit op is checked against what its matrix units multiply natively (`describe`'s
    ``device``): a widened format is a warning, and so are FP8 block scales, which no chip's
    GEMM takes from mpx yet."""
    if device is None and jax.devices()[0].platform != "cpu":
        device = jax.devices()[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", Widened8Bit)
        warnings.simplefilter("always", SpelledOutBlocks)
        table = describe(model, policy, device=device)
    counts = ", ".join(f"{k} {len(v)}" for k, v in sorted(table.by_precision().items()))
    say(f"precision {precision if isinstance(precision, str) else 'policy'}: {counts} ops")
    for warning in caught:
        if issubclass(warning.category, (Widened8Bit, SpelledOutBlocks)):
            say(f"warning: {warning.message}")
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    for rule in table.unmatched_rules:
        message = f"policy rule '{rule}' matches no op of this model (a typo in its path?); its ops keep the default"
        if strict:
            raise ConfigError(f"precision: {message} (--strict)")
        say(f"warning: {message}")


def _resume(built: Built, run_dir: str, checkpointer, train_iter, data: _DataCheck, say
            ) -> tuple[mpx.TrainState, int]:
    """The newest readable checkpoint's state (and the skip count it saved, and its data
    position if saved on this data), or the built step-0 state."""
    restored = checkpointer.restore_latest(built.state, say=say, set_aside=True)
    if restored is None:
        if jax.process_index() == 0:
            drop_rows_after(run_dir, 0, say=say)  # rows of an earlier start that left no checkpoint
        return built.state, 0
    if data.changes:
        # Recorded only now: the checkpoints up to this step keep a position in the old data.
        if jax.process_index() == 0:
            rundir.record_data(run_dir, data.fingerprint, since_step=restored.step)
        say(f"continuing on new data: {'; '.join(data.changes)}; the run's state is restored from step "
            f"{restored.step}, the data position starts over")
    elif restored.step > data.since_step:
        train_iter.set_state(mesh_lib.this_process_state(restored.data_state))
    if jax.process_index() == 0:
        drop_rows_after(run_dir, restored.step, say=say)
    say(f"resumed from checkpoint at step {restored.step} in {checkpointer.directory}")
    return restored.state, int(restored.data_state.get("counters", {}).get("skipped", 0))


# ----------------------------------------------------------------------------- steps


def _make_step_fn(built: Built, ceiling: float, *, accum: int, dropout: bool, lean: bool):
    """The jitted step ``(state, health, batch) -> (state, health, metrics)``.

    ``health`` (`train.divergence.initial`, on the device) is updated by the step from its
    own loss and ``metrics.skipped`` (``ceiling``: the loss of an exploded step), so the
    loop never has to read a per-step value back to the host; it fetches it with the other
    metrics at log steps, and before checkpoint saves. ``accum``: micro-batches per step;
    ``lean``: switch to the lean FP8 program after the first step (`mpx.BootstrappedStep`),
    and to one that does not count the FP8 saturated / flushed fractions on the steps a call
    marks ``statistics=False`` (the steps that are not logged).
    """
    task = built.task

    def loss_fn(params, meta, batch, rng):
        return task.loss(built.graphdef, params, meta, batch, rng, dropout=dropout)

    def step(state, health, batch, *, fp8_bootstrap, fp8_statistics):
        done = state.step + 1
        with mesh_lib.activation_sharding(built.mesh):
            state, m = mpx.train_step(state, batch, loss_fn=loss_fn, optimizer=built.optimizer, has_aux=True,
                                      accum_steps=accum, fp8_bootstrap=fp8_bootstrap, fp8_statistics=fp8_statistics,
                                      stochastic_rounding=built.stochastic_rounding)
        return state, divergence.update(health, step=done, loss=m.loss, skipped=m.skipped, ceiling=ceiling), m

    replicated = mesh_lib.replicated(built.mesh)

    def jitted(fp8_bootstrap: bool, fp8_statistics: bool = True):
        # The state keeps its layout (no recompiles) and its buffers are reused (donated).
        return jax.jit(functools.partial(step, fp8_bootstrap=fp8_bootstrap, fp8_statistics=fp8_statistics),
                       out_shardings=(built.shardings, replicated, replicated), donate_argnums=0)

    # The first step's program scales fresh FP8 tensors from their own amax; in a long enough run
    # the lean ones run after (two compiles more, repaid over the steps): the logged steps'
    # counts the FP8 statistics, the others' does not.
    if lean:
        return mpx.BootstrappedStep(jitted(True), jitted(False), jitted(False, fp8_statistics=False))
    first = jitted(True)
    return lambda state, health, batch, *, statistics=True: first(state, health, batch)


def _next_batch(train_iter, accum: int, sharding):
    """The next (stacked, under gradient accumulation) batch, put on the devices."""
    batches = [next(train_iter) for _ in range(accum)]
    if accum > 1:
        batches = [jax.tree.map(lambda *xs: np.stack(xs), *batches)]
    return mesh_lib.global_batch(batches[0], sharding)


class _Meter:
    """The numbers of a log row: throughput over the steps since the last row, MFU, the
    learning rate, the loss scale, skipped steps and FP8 scale statistics."""

    def __init__(self, params, shape: TransformerConfig, *, seq_len: int, tokens_per_step: int, schedule):
        self.flops_token = mt.flops_per_token(params, num_layers=shape.num_layers, seq_len=seq_len,
                                              d_model=shape.d_model, embedding_params=mt.embedding_params(shape))
        self.peak = mt.peak_flops()
        self.tokens_per_step = tokens_per_step
        self.schedule = schedule
        self.window_start, self.window_steps = time.perf_counter(), 0

    def tick(self) -> None:
        self.window_steps += 1

    def read(self, done: int, m: mpx.StepMetrics, health, state):
        """``(row, (health, loss, loss scale))``; every value in one fetch from the device."""
        host = jax.device_get({"loss": m.loss, "loss_scale": m.loss_scale, "grad_norm": m.grad_norm,
                               "health": health, "fp8_meta": state.fp8_meta})
        tps = self.window_steps * self.tokens_per_step / (time.perf_counter() - self.window_start)
        loss = float(host["loss"])
        stats = fp8_stats(host["fp8_meta"])
        row = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "tokens_per_s": tps,
            "mfu": mt.mfu(tps, self.flops_token, devices=jax.device_count(), peak=self.peak),
            "lr": float(self.schedule(done - 1)),  # the rate of this step's update
            "loss_scale": float(host["loss_scale"]),
            "skipped": int(host["health"]["total"]),
            "grad_norm": float(host["grad_norm"]),
            "fp8_min_scale": min((s.scale for s in stats), default=None),
            "fp8_max_saturated": max((s.saturated for s in stats), default=None),
            "fp8_max_flushed": max((s.flushed for s in stats), default=None),
            # > 1: an FP8 meta fed several matmuls without threading (summed amaxes).
            "fp8_max_fanout": max((s.fanout for s in stats), default=None),
        }
        self.window_start, self.window_steps = time.perf_counter(), 0
        return row, (divergence.Health.of(host["health"]), loss, row["loss_scale"])
