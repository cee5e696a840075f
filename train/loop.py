"""The training loop: config -> data -> model -> jitted mpx steps -> logs, evals, checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mpx
import mpx.nn as mn
from mpx.inspect import describe, fp8_stats
from train import checkpoint as ckpt
from train import data as data_lib
from train import identity
from train import mesh as mesh_lib
from train import metrics as mt
from train.config import ConfigError, RunConfig


# ----------------------------------------------------------------------------- pieces


def make_schedule(config: RunConfig) -> optax.Schedule:
    """Learning rate by update count (0 for the first): linear warmup, then cosine decay."""
    o = config.optim
    decay_steps = o.decay_steps or config.train.steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=o.lr,
        warmup_steps=o.warmup_steps,
        decay_steps=max(decay_steps, o.warmup_steps + 1),
        end_value=o.lr * o.min_lr_ratio,
    )


def make_optimizer(config: RunConfig) -> optax.GradientTransformation:
    """AdamW on `make_schedule`, after global-norm clipping."""
    o = config.optim
    schedule = make_schedule(config)
    adamw = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if o.grad_clip:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)
    return adamw


@dataclasses.dataclass
class Task:
    """What the loop needs from the data for one task (lm or classification)."""

    prepared: Any
    vocab_size: int
    num_classes: int | None
    train_iter: Callable[[], Any]
    eval_iter: Callable[[], Any]
    tokenizer: Any = None  # what the loaders encode with


def make_task(config: RunConfig, tokenizer=None) -> Task:
    """The run's data. ``tokenizer``: the one to encode with (a run's own, from its
    directory) instead of the prepared dataset's."""
    d = config.data
    seed = config.train.seed
    # With a tokenizer given, the dataset's own is not used: the cheap byte one is made
    # instead of training a SentencePiece model on text the run never saw.
    kind = "byte" if tokenizer is not None else d.tokenizer
    # Each process loads its own shard of the records and its share of the global batch.
    shard_index, shard_count = mesh_lib.process_shard()
    batch = mesh_lib.local_batch_size(d.batch_size, shard_count)
    shard = {"shard_index": shard_index, "shard_count": shard_count}
    if d.task == "lm":
        prepared = data_lib.prepare_lm(
            d.data_dir, files=d.files or None, tokenizer=kind, vocab_size=d.vocab_size,
            validation_fraction=d.validation_fraction, seed=seed,
        )
        tokenizer = tokenizer or prepared.tokenizer
        loader = functools.partial(data_lib.lm_loader, tokenizer=tokenizer, seq_len=d.seq_len, **shard)
        return Task(
            prepared, tokenizer.vocab_size, None,
            lambda: loader(prepared.train, batch_size=batch, seed=seed, shuffle=True),
            lambda: loader(prepared.validation, batch_size=batch, seed=seed, shuffle=False, num_epochs=1),
            tokenizer,
        )
    prepared = data_lib.prepare_classification(
        d.data_dir, path=d.path, text_column=d.text_column, label_column=d.label_column,
        tokenizer=kind, vocab_size=d.vocab_size, validation_fraction=d.validation_fraction, seed=seed,
    )
    tokenizer = tokenizer or prepared.tokenizer
    loader = functools.partial(data_lib.classification_loader, tokenizer=tokenizer, seq_len=d.seq_len, **shard)
    return Task(
        prepared, tokenizer.vocab_size, len(prepared.label_names),
        lambda: loader(prepared.train, batch_size=batch, seed=seed, shuffle=True),
        lambda: loader(prepared.validation, batch_size=batch, seed=seed, shuffle=False, num_epochs=1),
        tokenizer,
    )


def make_model(config: RunConfig, task: Task, policy: mpx.Policy) -> nnx.Module:
    shape = config.model.to_transformer(task.vocab_size)
    rngs = nnx.Rngs(config.train.seed)
    if config.data.task == "lm":
        return mn.TransformerLM(shape, policy=policy, rngs=rngs)
    num_classes = config.finetune.num_classes or task.num_classes
    return mn.SequenceClassifier(shape, num_classes, policy=policy, rngs=rngs)


def lm_loss(graphdef, params, meta, batch, rng, *, dropout: bool):
    model = nnx.merge(graphdef, params, meta)
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1], deterministic=not dropout, rngs=nnx.Rngs(dropout=rng))
    loss = model.loss(logits, tokens[:, 1:])
    return loss, {"correct": jnp.float32(0), "count": jnp.float32(tokens[:, 1:].size)}


def classification_loss(graphdef, params, meta, batch, rng, *, dropout: bool):
    model = nnx.merge(graphdef, params, meta)
    logits = model(batch["tokens"], batch["mask"], deterministic=not dropout, rngs=nnx.Rngs(dropout=rng))
    loss = model.loss(logits, batch["label"])
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
    return loss, {"correct": correct, "count": jnp.float32(batch["label"].shape[0])}


def references(task: Task) -> dict[str, float]:
    """What an evaluation is compared with, from the validation split.

    LM: ``unigram_baseline``, the cross-entropy (nats/token) under the add-one smoothed
    unigram distribution of the training split (what a model that learned only token
    frequencies scores; a trained LM must be clearly below it), and ``tokens_per_byte``
    of the validation text (UTF-8), which turns nats/token into bits per byte, a figure
    that compares across tokenizers. Classification: ``majority_baseline``, the accuracy
    of always answering the most frequent validation label.
    """
    prepared, tok = task.prepared, task.tokenizer
    if task.num_classes is not None:
        labels = [int(prepared.validation[i]["label"]) for i in range(len(prepared.validation))]
        return {"majority_baseline": max(np.bincount(labels)) / max(len(labels), 1)}
    counts = np.ones(tok.vocab_size, np.float64)
    for text in data_lib.loaders.source_texts(prepared.train):
        counts += np.bincount(np.asarray(tok.encode(text), np.int64), minlength=tok.vocab_size)[: tok.vocab_size]
    logp = np.log(counts / counts.sum())
    total, n, nbytes = 0.0, 0, 0
    for text in data_lib.loaders.source_texts(prepared.validation):
        ids = np.asarray(tok.encode(text), np.int64)
        total -= logp[ids].sum()
        n += ids.size
        nbytes += len(text.encode("utf-8"))
    return {"unigram_baseline": total / max(n, 1), "tokens_per_byte": n / max(nbytes, 1)}


def with_references(result: dict[str, float], refs: dict[str, float]) -> dict[str, float]:
    """An evaluation's numbers with its references (and bits per byte for an LM)."""
    out = {**result, **refs}
    if "tokens_per_byte" in refs:
        out["bits_per_byte"] = result["loss"] / math.log(2) * refs["tokens_per_byte"]
    return out


# ----------------------------------------------------------------------------- the run


class Logger:
    """Console (with a progress bar) and TensorBoard."""

    def __init__(self, config: RunConfig, say: Callable[[str], None], total: int, start: int):
        self.say = say
        self.jsonl = pathlib.Path(config.run_dir) / "metrics.jsonl"
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.bar = None
        if config.logging.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)
        self.writer = None
        if config.logging.tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(pathlib.Path(config.run_dir) / "tensorboard"))

    def step(self):
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, scalars: dict[str, float], prefix: str):
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"split": prefix, "step": step, **scalars}) + "\n")
        if self.writer is not None:
            for k, v in scalars.items():
                if v is not None:
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
        text = " ".join(f"{k} {_fmt(v)}" for k, v in scalars.items() if v is not None)
        (self.bar.write if self.bar is not None else self.say)(f"{prefix} step {step}: {text}")

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def evaluate(eval_step, state, batches, max_batches: int, sharding=None) -> dict[str, float]:
    """Mean loss (and accuracy for classification) over the validation split.

    ``sharding``: lay each batch out as a global array (`train.mesh.global_batch`); with
    several processes each passes its own shard's rows, and they stop together at the first
    batch some process lacks (packed shards can differ in length by a window).
    """
    total, correct, count, n = 0.0, 0.0, 0.0, 0
    batches = iter(batches)
    while n < max_batches:
        batch = next(batches, None)
        if not mesh_lib.all_processes_have(batch is not None):
            break
        if sharding is not None:
            batch = mesh_lib.global_batch(batch, sharding)
        loss, aux = eval_step(state.params, state.fp8_meta, batch)
        total += float(loss)
        correct += float(aux["correct"])
        count += float(aux["count"])
        n += 1
    if n == 0:
        raise ValueError("the validation split gave no batch; lower data.batch_size or raise data.validation_fraction")
    out = {"loss": total / n, "perplexity": math.exp(min(total / n, 50.0))}
    if correct:
        out["accuracy"] = correct / count
    return out


def _stack(batches):
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


def _fresh_state(config: RunConfig, *, say: Callable[[str], None], finetune: bool):
    """Policy, task, graphdef, optimizer and a step-0 state; with ``finetune`` and
    ``finetune.init_from`` set, the body params come from that pre-training run. The data
    is encoded with the run's own tokenizer once the run has one (`train.identity`)."""
    policy = config.policy()
    task = make_task(config, identity.run_tokenizer(config.run_dir))
    model = make_model(config, task, policy)
    graphdef, params, meta, rest = mn.split(model)
    if rest:
        raise ValueError(f"the model has state besides parameters and FP8 meta ({', '.join(map(str, rest))}), "
                         "which train/ does not carry")
    if finetune and config.finetune.init_from:
        body = nnx.State({k: v for k, v in params.items() if k not in ("classifier", "head")})
        loaded, from_step = ckpt.restore_params(config.finetune.init_from, body)
        nnx.update(params, loaded)
        say(f"fine-tuning from {config.finetune.init_from} (step {from_step}): body params loaded, new head")
    optimizer = make_optimizer(config)
    state = mpx.init_train_state(params, optimizer, policy=policy, fp8_meta=meta, rng=jax.random.key(config.train.seed))
    return policy, task, graphdef, optimizer, state


def _make_step_fn(config: RunConfig, graphdef, optimizer, shardings, mesh):
    """The jitted step ``(state, skips, batch) -> (state, skips, metrics)``.

    ``skips`` holds the run's count of skipped steps and the current run of consecutive
    ones (``{"total", "in_a_row"}``, i32[] on the device): the step updates both from its
    own ``metrics.skipped``, so the loop never has to read a per-step value back
    to the host; it fetches the count with the other metrics at log steps only.
    """
    loss_impl = lm_loss if config.data.task == "lm" else classification_loss
    train_step = functools.partial(
        mpx.train_step,
        loss_fn=functools.partial(loss_impl, graphdef, dropout=config.model.dropout > 0),
        optimizer=optimizer, has_aux=True, accum_steps=config.optim.grad_accum,
    )

    def step(state, skips, batch):
        state, m = train_step(state, batch)
        skipped = m.skipped.astype(jnp.int32)
        return state, {"total": skips["total"] + skipped, "in_a_row": (skips["in_a_row"] + 1) * skipped}, m

    replicated = mesh_lib.replicated(mesh)
    # The state keeps its layout (no recompiles) and its buffers are reused (donated).
    return jax.jit(step, out_shardings=(shardings, replicated, replicated), donate_argnums=0)


def _next_batch(train_iter, accum: int, sharding):
    """The next (stacked, under gradient accumulation) batch, put on the devices."""
    batches = [next(train_iter) for _ in range(accum)]
    return mesh_lib.global_batch(batches[0] if accum == 1 else _stack(batches), sharding)


def _eval_step(config: RunConfig, graphdef):
    loss_impl = lm_loss if config.data.task == "lm" else classification_loss
    return jax.jit(lambda p, m, b: loss_impl(graphdef, p, m, b, jax.random.key(0), dropout=False))


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
    at their own intervals.

    Process 0 holds the run directory's lock while it trains (`train.identity.locked`): a
    second run in the same directory is an error.
    """
    mesh_lib.initialize_distributed(config.mesh.distributed)  # before anything else touches JAX
    lock = identity.locked(config.run_dir, say=say) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _train_locked(config, say=say, on_step=on_step, strict=strict)


def precision_report(config: RunConfig, graphdef, state: mpx.TrainState, policy: mpx.Policy, *,
                     say: Callable[[str], None], strict: bool) -> None:
    """Say how many ops of the run's model run in each precision; unmatched path rules are
    warnings, or with ``strict`` a `ConfigError`."""
    table = describe(nnx.merge(graphdef, state.params, state.fp8_meta), policy)
    counts = ", ".join(f"{k} {len(v)}" for k, v in sorted(table.by_precision().items()))
    say(f"precision {config.precision if isinstance(config.precision, str) else 'policy'}: {counts} ops")
    for rule in table.unmatched_rules:
        message = f"policy rule '{rule}' matches no op of this model (a typo in its path?); its ops keep the default"
        if strict:
            raise ConfigError(f"precision: {message} (--strict)")
        say(f"warning: {message}")


def _train_locked(config: RunConfig, *, say: Callable[[str], None], on_step, strict: bool) -> dict[str, Any]:
    resuming = _has_checkpoints(config)
    config_dict = config.to_dict()
    saved = identity.saved_config(config.run_dir)
    if resuming and saved is not None:
        identity.check_resume(saved, config_dict, run_dir=config.run_dir, say=say)  # before restoring anything
    elif not resuming and jax.process_index() == 0:
        identity.record(config.run_dir, config_dict)
    policy, task, graphdef, optimizer, state = _fresh_state(config, say=say, finetune=not resuming)
    if jax.process_index() == 0:
        identity.keep_tokenizer(config.run_dir, task.tokenizer)
    precision_report(config, graphdef, state, policy, say=say, strict=strict)
    if config.train.eval_every and next(iter(task.eval_iter()), None) is None:
        raise data_lib.DataError(
            f"the validation split gives no batch of data.batch_size={config.data.batch_size} rows of "
            f"data.seq_len={config.data.seq_len} tokens, so the first evaluation would fail; raise "
            f"data.validation_fraction (now {config.data.validation_fraction}), lower data.batch_size, or set "
            "train.eval_every=0")
    mesh = mesh_lib.make_mesh(*config.mesh_shape(jax.device_count()))
    shardings = mesh_lib.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    batch_sharding = mesh_lib.batch_sharding(mesh, accumulated=config.optim.grad_accum > 1)
    checkpointer = ckpt.Checkpointer(
        config.run_dir, every=config.checkpoint.every, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save
    )
    train_iter = task.train_iter()
    restored = checkpointer.restore_latest(state, say=say, set_aside=True)
    skipped_before = 0
    if restored is not None:
        if saved is None:  # a run from before config.yaml: its checkpoint holds the config
            identity.check_resume(restored.config, config_dict, run_dir=config.run_dir, say=say)
            identity.record(config.run_dir, restored.config)
        state = restored.state
        train_iter.set_state(mesh_lib.this_process_state(restored.data_state))
        skipped_before = int(restored.data_state.get("counters", {}).get("skipped", 0))
        if jax.process_index() == 0:
            _drop_metrics_after(config.run_dir, restored.step)
        say(f"resumed from checkpoint at step {restored.step} in {checkpointer.directory}")

    accum = config.optim.grad_accum
    step_fn = _make_step_fn(config, graphdef, optimizer, shardings, mesh)
    eval_step = _eval_step(config, graphdef)

    shape = config.model.to_transformer(task.vocab_size)
    embedding = shape.max_len * shape.d_model + (0 if shape.tie_embeddings else shape.vocab_size * shape.d_model)
    flops_token = mt.flops_per_token(
        state.params, num_layers=shape.num_layers, seq_len=config.data.seq_len, d_model=shape.d_model,
        embedding_params=embedding,
    )
    peak = mt.peak_flops()
    tokens_per_step = config.data.batch_size * config.data.seq_len * accum

    refs = references(task)
    schedule = make_schedule(config)
    if "unigram_baseline" in refs:
        say(f"unigram baseline on the validation split: {refs['unigram_baseline']:.4f} nats/token")
    else:
        say(f"majority-class baseline on the validation split: accuracy {refs['majority_baseline']:.4f}")
    start, steps = int(state.step), config.train.steps
    logger = Logger(config, say, steps, start)
    # Skipped steps since this process started, counted on the device by the step itself.
    skips = jax.device_put({"total": np.asarray(skipped_before, np.int32), "in_a_row": np.zeros((), np.int32)},
                           mesh_lib.replicated(mesh))
    counters = lambda: {"skipped": int(skips["total"])}  # noqa: E731 - read at saves only
    # The data position after the batches of every step run so far: what a checkpoint
    # saves. The iterator itself runs one batch ahead (the prefetched one).
    data_state = train_iter.get_state()
    batch = _next_batch(train_iter, accum, batch_sharding) if start < steps else None
    window_start, window_steps = time.perf_counter(), 0
    last: dict[str, Any] = {}
    try:
        for step in range(start, steps):
            state, skips, m = step_fn(state, skips, batch)  # dispatched; returns before the step has run
            done = step + 1
            data_state = train_iter.get_state()
            if done < steps:  # prefetch: load and transfer the next batch while this step runs
                batch = _next_batch(train_iter, accum, batch_sharding)
            logger.step()
            window_steps += 1
            if done % config.train.log_every == 0 or done == steps:
                # The one wait on the device in a log window: every value in one fetch.
                host = jax.device_get({
                    "loss": m.loss, "loss_scale": m.loss_scale, "grad_norm": m.grad_norm, "skips": skips,
                    "fp8_meta": state.fp8_meta,
                })
                elapsed = time.perf_counter() - window_start
                tps = window_steps * tokens_per_step / elapsed
                loss = float(host["loss"])
                stats = fp8_stats(host["fp8_meta"])
                last = {
                    "loss": loss,
                    "perplexity": math.exp(min(loss, 50.0)),
                    "tokens_per_s": tps,
                    "mfu": mt.mfu(tps, flops_token, devices=jax.device_count(), peak=peak),
                    "lr": float(schedule(done - 1)),  # the rate of this step's update
                    "loss_scale": float(host["loss_scale"]),
                    "skipped": int(host["skips"]["total"]),
                    "grad_norm": float(host["grad_norm"]),
                    "fp8_min_scale": min((s.scale for s in stats), default=None),
                    "fp8_max_saturated": max((s.saturated for s in stats), default=None),
                    "fp8_max_flushed": max((s.flushed for s in stats), default=None),
                    # > 1: an FP8 meta fed several matmuls without threading (summed amaxes).
                    "fp8_max_fanout": max((s.fanout for s in stats), default=None),
                }
                logger.log(done, last, "train")
                window_start, window_steps = time.perf_counter(), 0
                _check_divergence(config, done, int(host["skips"]["in_a_row"]), last, checkpointer)
            if config.train.eval_every and (done % config.train.eval_every == 0 or done == steps):
                last_eval = with_references(evaluate(eval_step, state, task.eval_iter(), config.train.eval_batches,
                                                     mesh_lib.batch_sharding(mesh, accumulated=False)), refs)
                logger.log(done, last_eval, "eval")
                last.update({f"eval_{k}": v for k, v in last_eval.items()})
            # Host-only unless a save is due (then it reads the state); the data position
            # excludes the prefetched batch, so a resume continues with exactly that batch.
            checkpointer.save(done, state, data_state=data_state, config=config_dict, counters=counters)
            if on_step is not None:
                on_step(done, state)
        final = int(state.step)
        checkpointer.save(final, state, data_state=data_state, config=config_dict, force=True, counters=counters)
        checkpointer.wait()
    finally:
        logger.close()
        checkpointer.close()
    last["step"] = int(state.step)
    return last


def _drop_metrics_after(run_dir, step: int) -> None:
    """Rows of ``metrics.jsonl`` past ``step`` (logged by the run before it was stopped,
    after its last checkpoint) are dropped on resume: the steps run again and log again."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


class Diverged(ValueError):
    """A run whose recent steps were all skipped: it stops rather than run on."""


def _check_divergence(config: RunConfig, step: int, in_a_row: int, last: dict, checkpointer) -> None:
    limit = config.train.max_consecutive_skips
    if limit and in_a_row >= limit:
        saved = checkpointer.steps()
        raise Diverged(
            f"the run diverged: the last {in_a_row} steps (up to step {step}) were all skipped, their loss, "
            f"gradients or FP8 amaxes not finite (loss {last['loss']:.4g}, loss scale {last['loss_scale']:.4g}); "
            f"stopped (train.max_consecutive_skips={limit}). Skipped steps change no parameter, so the newest "
            f"checkpoint ({f'step {saved[-1]}' if saved else 'none yet'}) holds the last good state; lower "
            "optim.lr or raise optim.warmup_steps, then resume")


def _has_checkpoints(config: RunConfig) -> bool:
    directory = ckpt.checkpoint_dir(config.run_dir)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


@dataclasses.dataclass
class Trained:
    """A run's model restored from its newest readable checkpoint."""

    config: RunConfig
    task: Task
    graphdef: Any
    state: mpx.TrainState
    step: int
    mesh: Any


def load_trained(config: RunConfig, *, say: Callable[[str], None] = print) -> Trained:
    """Rebuild the run's model and restore its newest checkpoint (for eval / generate).

    The model, precision and tokenizer are the run's own (its ``config.yaml`` and
    ``tokenizer/``), whatever this config says of them; the data to evaluate on and the
    devices come from this config (`train.identity.for_evaluation`), so a run can be
    evaluated on other text with the tokenizer it was trained with.
    """
    mesh_lib.initialize_distributed(config.mesh.distributed)
    run_config = identity.saved_config(config.run_dir)
    if run_config is not None:
        config = identity.for_evaluation(run_config, config, say=say)
    _, task, graphdef, _, state = _fresh_state(config, say=say, finetune=False)
    mesh = mesh_lib.make_mesh(*config.mesh_shape(jax.device_count()))
    state = jax.device_put(state, mesh_lib.state_shardings(state, mesh))  # restored with this layout
    checkpointer = ckpt.Checkpointer(config.run_dir, every=0, keep=config.checkpoint.keep, async_save=False)
    try:
        restored = checkpointer.restore_latest(state, say=say)
    finally:
        checkpointer.close()
    if restored is None:
        raise ValueError(f"no checkpoint in {checkpointer.directory}; train first: python -m train train CONFIG")
    return Trained(config, task, graphdef, restored.state, restored.step, mesh)


def export_trained(trained: Trained, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Write the run's params and FP8 meta for use outside train/: an orbax checkpoint of
    ``{"params", "fp8_meta"}`` (plain nested dicts of arrays, read back with
    ``orbax.checkpoint.StandardCheckpointer().restore(out_dir / "state")``), with the run's
    ``config.yaml`` and ``tokenizer/`` beside it. ``out_dir`` must not exist yet."""
    import shutil

    import orbax.checkpoint as ocp

    out = pathlib.Path(out_dir).absolute()
    if out.exists():
        raise ValueError(f"export directory {out} exists; give a new one (an export never overwrites)")
    out.mkdir(parents=True)
    tree = {"params": trained.state.params.to_pure_dict(), "fp8_meta": nnx.State(trained.state.fp8_meta).to_pure_dict()}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out / "state", jax.device_get(tree))
    run = pathlib.Path(trained.config.run_dir)
    for name in (identity.CONFIG_FILE, identity.TOKENIZER_DIR):
        source = run / name
        if source.is_dir():
            shutil.copytree(source, out / name)
        elif source.is_file():
            shutil.copy2(source, out / name)
    return out


def evaluate_trained(trained: Trained) -> dict[str, float]:
    eval_step = _eval_step(trained.config, trained.graphdef)
    out = evaluate(eval_step, trained.state, trained.task.eval_iter(), trained.config.train.eval_batches,
                   mesh_lib.batch_sharding(trained.mesh, accumulated=False))
    return with_references(out, references(trained.task))
