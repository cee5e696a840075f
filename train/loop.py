"""The training loop: a built run -> jitted mpx steps -> logs, evals, checkpoints."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import mpx
from mpx.inspect import describe, fp8_stats
from train import checkpoint as ckpt
from train import data as data_lib
from train import identity
from train import mesh as mesh_lib
from train import metrics as mt
from train.build import Built, build, make_schedule
from train.evaluation import eval_step, evaluate, with_references
from train.logger import Logger, drop_rows_after
from train.schema import ConfigError, RunConfig


def train(
    config: RunConfig,
    *,
    say: Callable[[str], None] = print,
    on_step: Callable[[int, mpx.TrainState], None] | None = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the training run ``config`` describes; returns the final metrics.

    At the start it reports how many ops run in each precision and warns of every policy
    rule whose path matches no op of the model (a typo leaves those ops in the default
    precision); ``strict`` makes such a rule an error.

    ``on_step(step, state)`` is called after each step (and its checkpoint request); the
    step may still be running on the device then.

    The loop never waits on the device between log steps: each step is dispatched
    asynchronously, the next batch is loaded and put on the devices while it runs, and
    the skipped-step count is kept on the device. Metrics are fetched (one
    ``jax.device_get``) only at log steps; evaluations and checkpoint saves read the state
    at their own intervals. A run that diverges (`Diverged`) stops at a log step.

    Process 0 holds the run directory's lock while it trains (`train.identity.locked`): a
    second run in the same directory is an error.
    """
    mesh_lib.initialize_distributed(config.mesh.distributed)  # before anything else touches JAX
    lock = identity.locked(config.run_dir, say=say) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        resuming, saved = _check_identity(config, say)
        built = build(config, say=say, finetune=not resuming)
        refs = _start_report(built, say=say, strict=strict)
        if not resuming and jax.process_index() == 0:
            identity.record(config.run_dir, config.to_dict())  # once the data and the model are built
        checkpointer = built.checkpointer(training=True)
        try:
            train_iter = built.task.train_iter()
            state, skipped = _resume(built, checkpointer, train_iter, saved, say)
            return _run(built, state, skipped, train_iter, checkpointer, refs, say, on_step)
        finally:
            checkpointer.close()


def _run(built: Built, state, skipped: int, train_iter, checkpointer, refs, say, on_step) -> dict[str, Any]:
    """Steps from ``state.step`` to ``train.steps``: log, evaluate and save on the way."""
    config, t = built.config, built.config.train
    config_dict = config.to_dict()
    step_fn, eval_fn = _make_step_fn(built), eval_step(built.task, built.graphdef)
    accum = config.optim.grad_accum
    batch_sharding = built.batch_sharding(accumulated=accum > 1)
    meter = _Meter(built)
    start, end = int(state.step), t.steps
    logger = Logger(config, say, end, start)
    # Skipped steps: the run's total (from the checkpoint on) and the current streak,
    # counted on the device by the step itself.
    skips = jax.device_put({"total": np.asarray(skipped, np.int32), "in_a_row": np.zeros((), np.int32)},
                           mesh_lib.replicated(built.mesh))
    counters = lambda: {"skipped": int(skips["total"])}  # noqa: E731 - read at saves only
    # The data position after the batches of every step run so far: what a checkpoint
    # saves. The iterator itself runs one batch ahead (the prefetched one).
    data_state = train_iter.get_state()
    batch = _next_batch(train_iter, accum, batch_sharding) if start < end else None
    last: dict[str, Any] = {}
    try:
        for step in range(start, end):
            state, skips, m = step_fn(state, skips, batch)  # dispatched; returns before the step has run
            done = step + 1
            data_state = train_iter.get_state()
            if done < end:  # prefetch: load and transfer the next batch while this step runs
                batch = _next_batch(train_iter, accum, batch_sharding)
            logger.step()
            meter.tick()
            if done % t.log_every == 0 or done == end:
                last, in_a_row = meter.read(done, m, skips, state)  # the one wait on the device in a window
                logger.log(done, last, "train")
                _check_divergence(built, done, in_a_row, last, checkpointer)
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
        checkpointer.wait()
    finally:
        logger.close()
    last["step"] = int(state.step)
    return last


# ----------------------------------------------------------------------------- start


def _check_identity(config: RunConfig, say) -> tuple[bool, dict | None]:
    """``(resuming, the run's saved config)``; a resume with a changed config is an error
    before anything is restored. (A new run records its config once it has started.)"""
    resuming = ckpt.has_checkpoints(config.run_dir)
    saved = identity.saved_config(config.run_dir)
    if resuming and saved is not None:
        identity.check_resume(saved, config.to_dict(), run_dir=config.run_dir, say=say)
    return resuming, saved


def _start_report(built: Built, *, say, strict: bool) -> dict[str, float]:
    """Keep the run's tokenizer, say its precision and baseline, check the validation
    split gives a batch; returns the task's references."""
    config, task = built.config, built.task
    if jax.process_index() == 0:
        identity.keep_tokenizer(config.run_dir, task.tokenizer)
    precision_report(built, say=say, strict=strict)
    if config.train.eval_every and next(iter(task.eval_iter()), None) is None:
        raise data_lib.DataError(
            f"the validation split gives no batch of data.batch_size={config.data.batch_size} rows of "
            f"data.seq_len={config.data.seq_len} tokens, so the first evaluation would fail; raise "
            f"data.validation_fraction (now {config.data.validation_fraction}), lower data.batch_size, or set "
            "train.eval_every=0")
    refs = task.references()
    say(task.baseline_message(refs))
    return refs


def precision_report(built: Built, *, say: Callable[[str], None], strict: bool) -> None:
    """Say how many ops of the run's model run in each precision; unmatched path rules are
    warnings, or with ``strict`` a `ConfigError`."""
    table = describe(built.model(), built.policy)
    counts = ", ".join(f"{k} {len(v)}" for k, v in sorted(table.by_precision().items()))
    precision = built.config.precision
    say(f"precision {precision if isinstance(precision, str) else 'policy'}: {counts} ops")
    for rule in table.unmatched_rules:
        message = f"policy rule '{rule}' matches no op of this model (a typo in its path?); its ops keep the default"
        if strict:
            raise ConfigError(f"precision: {message} (--strict)")
        say(f"warning: {message}")


def _resume(built: Built, checkpointer, train_iter, saved, say) -> tuple[mpx.TrainState, int]:
    """The newest readable checkpoint's state (and the data position and skip count it
    saved), or the built step-0 state."""
    config = built.config
    restored = checkpointer.restore_latest(built.state, say=say, set_aside=True)
    if restored is None:
        return built.state, 0
    if saved is None:  # a run from before config.yaml: its checkpoint holds the config
        identity.check_resume(restored.config, config.to_dict(), run_dir=config.run_dir, say=say)
        identity.record(config.run_dir, restored.config)
    train_iter.set_state(mesh_lib.this_process_state(restored.data_state))
    if jax.process_index() == 0:
        drop_rows_after(config.run_dir, restored.step, say=say)
    say(f"resumed from checkpoint at step {restored.step} in {checkpointer.directory}")
    return restored.state, int(restored.data_state.get("counters", {}).get("skipped", 0))


# ----------------------------------------------------------------------------- steps


def _make_step_fn(built: Built):
    """The jitted step ``(state, skips, batch) -> (state, skips, metrics)``.

    ``skips`` holds the run's count of skipped steps and the current run of consecutive
    ones (``{"total", "in_a_row"}``, i32[] on the device): the step updates both from its
    own ``metrics.skipped``, so the loop never has to read a per-step value back
    to the host; it fetches the count with the other metrics at log steps only.
    """
    config, task = built.config, built.task

    def loss_fn(params, meta, batch, rng):
        return task.loss(built.graphdef, params, meta, batch, rng, dropout=config.model.dropout > 0)

    def step(state, skips, batch, *, fp8_bootstrap):
        state, m = mpx.train_step(state, batch, loss_fn=loss_fn, optimizer=built.optimizer, has_aux=True,
                                  accum_steps=config.optim.grad_accum, fp8_bootstrap=fp8_bootstrap)
        skipped = m.skipped.astype(jnp.int32)
        return state, {"total": skips["total"] + skipped, "in_a_row": (skips["in_a_row"] + 1) * skipped}, m

    replicated = mesh_lib.replicated(built.mesh)

    def jitted(fp8_bootstrap: bool):
        # The state keeps its layout (no recompiles) and its buffers are reused (donated).
        return jax.jit(functools.partial(step, fp8_bootstrap=fp8_bootstrap),
                       out_shardings=(built.shardings, replicated, replicated), donate_argnums=0)

    # The first step's program scales fresh FP8 tensors from their own amax; in a long enough run
    # the lean one runs after (a second compile, repaid over the steps).
    if config.train.steps >= config.train.fp8_lean_min_steps:
        return mpx.BootstrappedStep(jitted(True), jitted(False))
    return jitted(True)


def _next_batch(train_iter, accum: int, sharding):
    """The next (stacked, under gradient accumulation) batch, put on the devices."""
    batches = [next(train_iter) for _ in range(accum)]
    if accum > 1:
        batches = [jax.tree.map(lambda *xs: np.stack(xs), *batches)]
    return mesh_lib.global_batch(batches[0], sharding)


class _Meter:
    """The numbers of a log row: throughput over the steps since the last row, MFU, the
    learning rate, the loss scale, skipped steps and FP8 scale statistics."""

    def __init__(self, built: Built):
        config = built.config
        shape = config.model.to_transformer(built.task.vocab_size)
        embedding = shape.max_len * shape.d_model + (0 if shape.tie_embeddings else shape.vocab_size * shape.d_model)
        self.flops_token = mt.flops_per_token(built.state.params, num_layers=shape.num_layers,
                                              seq_len=config.data.seq_len, d_model=shape.d_model,
                                              embedding_params=embedding)
        self.peak = mt.peak_flops()
        self.tokens_per_step = config.data.batch_size * config.data.seq_len * config.optim.grad_accum
        self.schedule = make_schedule(config)
        self.window_start, self.window_steps = time.perf_counter(), 0

    def tick(self) -> None:
        self.window_steps += 1

    def read(self, done: int, m: mpx.StepMetrics, skips, state) -> tuple[dict[str, Any], int]:
        """``(row, consecutive skipped steps)``; every value in one fetch from the device."""
        host = jax.device_get({"loss": m.loss, "loss_scale": m.loss_scale, "grad_norm": m.grad_norm,
                               "skips": skips, "fp8_meta": state.fp8_meta})
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
            "skipped": int(host["skips"]["total"]),
            "grad_norm": float(host["grad_norm"]),
            "fp8_min_scale": min((s.scale for s in stats), default=None),
            "fp8_max_saturated": max((s.saturated for s in stats), default=None),
            "fp8_max_flushed": max((s.flushed for s in stats), default=None),
            # > 1: an FP8 meta fed several matmuls without threading (summed amaxes).
            "fp8_max_fanout": max((s.fanout for s in stats), default=None),
        }
        self.window_start, self.window_steps = time.perf_counter(), 0
        return row, int(host["skips"]["in_a_row"])


# ----------------------------------------------------------------------------- divergence


class Diverged(ValueError):
    """A run whose recent steps were all skipped, or whose loss exploded: it stops rather
    than run on (and save what it learns from there)."""


def _check_divergence(built: Built, step: int, in_a_row: int, row: dict, checkpointer) -> None:
    t, task = built.config.train, built.task
    saved = checkpointer.steps()
    newest = f"step {saved[-1]}" if saved else "none yet"
    if t.max_consecutive_skips and in_a_row >= t.max_consecutive_skips:
        raise Diverged(
            f"the run diverged: the last {in_a_row} steps (up to step {step}) were all skipped, their loss, "
            f"gradients or FP8 amaxes not finite (loss {row['loss']:.4g}, loss scale {row['loss_scale']:.4g}); "
            f"stopped (train.max_consecutive_skips={t.max_consecutive_skips}). Skipped steps change no parameter, "
            f"so the newest checkpoint ({newest}) holds the last good state; lower optim.lr or raise "
            "optim.warmup_steps, then resume")
    ceiling = t.max_loss_ratio * task.uniform_loss()
    if t.max_loss_ratio and math.isfinite(row["loss"]) and row["loss"] > ceiling:
        raise Diverged(
            f"the run exploded: its training loss at step {step} is {row['loss']:.4g}, above "
            f"train.max_loss_ratio={t.max_loss_ratio:g} x the loss of uniform guessing ({task.uniform_loss():.4g}); "
            f"stopped without saving this state. The checkpoints kept ({', '.join(map(str, saved)) or 'none yet'}) "
            "were saved before this log step: resume from the newest whose logged loss was sane (move newer "
            "ones out of checkpoints/), with a lower optim.lr or a tighter optim.grad_clip")
