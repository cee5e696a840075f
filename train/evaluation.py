"""Evaluating a run: on its validation split during training, or restored afterwards.

    trained = load_model(config)            # the run's model, tokenizer, newest params + FP8 meta
    evaluate_trained(trained)               # {"loss", "perplexity", ..., "unigram_baseline"}
    export_trained(trained, "export/")      # params + FP8 meta for use outside train/
    load_trained(config).state              # the whole train state a resume would continue from

Evaluation, export, generation and quantization read only the params and the FP8 meta of a
checkpoint (`load_model`: no optimizer is built and its state is not read); `load_trained`
restores everything, for what needs the state a resume would continue from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import shutil
from collections.abc import Callable, Iterator

import jax
from flax import nnx

import mpx
from train import checkpoint as ckpt
from train import identity
from train import mesh as mesh_lib
from train import rundir
from train.build import build, build_model, task_for, tokenizer_of
from train.schema import RunConfig
from train.tasks import Task


def eval_step(task: Task, graphdef, mesh: jax.sharding.Mesh | None = None):
    """The jitted ``(params, meta, batch) -> (loss, aux)`` of ``task``, without dropout;
    activations split by batch over ``mesh`` (`train.mesh.activation_sharding`) when given."""

    def loss(params, meta, batch):
        with mesh_lib.activation_sharding(mesh) if mesh is not None else contextlib.nullcontext():
            return task.loss(graphdef, params, meta, batch, jax.random.key(0), dropout=False)

    return jax.jit(loss)


def evaluate(step, state, batches, max_batches: int, sharding=None) -> dict[str, float]:
    """Mean loss (and accuracy for classification) over at most ``max_batches`` batches.

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
        loss, aux = step(state.params, state.fp8_meta, batch)
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


def with_references(result: dict[str, float], refs: dict[str, float]) -> dict[str, float]:
    """An evaluation's numbers with its references (`Task.references`), and bits per byte
    for an LM."""
    out = {**result, **refs}
    if "tokens_per_byte" in refs:
        out["bits_per_byte"] = result["loss"] / math.log(2) * refs["tokens_per_byte"]
    return out


@dataclasses.dataclass
class Trained:
    """A run's model restored from its newest readable checkpoint.

    ``config``: the run's own, with the data and devices of the command that loaded it
    (`train.identity.for_evaluation`). ``state``: the restored params and FP8 meta
    (``state.params``, ``state.fp8_meta``); from `load_trained`, the whole `mpx.TrainState`.
    """

    config: RunConfig
    task: Task
    policy: mpx.Policy
    graphdef: object
    mesh: jax.sharding.Mesh
    state: object
    step: int

    def batch_sharding(self):
        return mesh_lib.batch_sharding(self.mesh, accumulated=False)


@dataclasses.dataclass
class Weights:
    """What `load_model` restores of a train state."""

    params: nnx.State
    fp8_meta: nnx.State


def _run_config(config: RunConfig, say: Callable[[str], None]) -> RunConfig:
    """The model, precision and tokenizer are the run's own (its ``config.yaml``), whatever
    ``config`` says of them; the data to evaluate on and the devices come from ``config``."""
    mesh_lib.initialize_distributed(config.mesh.distributed)  # a no-op once started (the CLI does)
    run_config = rundir.saved_config(config.run_dir)
    return config if run_config is None else identity.for_evaluation(run_config, config, say=say)


def _no_checkpoint(checkpointer) -> ValueError:
    return ValueError(f"no checkpoint in {checkpointer.directory}; train first: python -m train train CONFIG")


def load_model(config: RunConfig, *, say: Callable[[str], None] = print) -> Trained:
    """The run's model with the params and FP8 meta of its newest checkpoint (for eval,
    export, generate and quantize): no optimizer, and nothing else of the state read.

    The model, precision and tokenizer are the run's own (its ``config.yaml`` and
    ``tokenizer/``); the data to evaluate on and the devices come from this config, so a
    run can be evaluated on other text with the tokenizer it was trained with.
    """
    config = _run_config(config, say)
    task = task_for(config, tokenizer_of(config.run_dir, config.finetune.init_from, say))
    model = build_model(task, config.model, config.policy(), seed=config.train.seed)
    mesh = mesh_lib.make_mesh(config.mesh, batch_size=config.data.batch_size)
    params = jax.device_put(model.params, mesh_lib.split_shardings(model.params, mesh))
    meta = jax.device_put(model.fp8_meta, mesh_lib.replicated_shardings(model.fp8_meta, mesh))
    checkpointer = ckpt.Checkpointer.of(config.checkpoint, config.run_dir, training=False)
    try:
        restored = checkpointer.restore_model_latest(params, meta, say=say)
    finally:
        checkpointer.close()
    if restored is None:
        raise _no_checkpoint(checkpointer)
    step, params, meta = restored
    return Trained(config, task, model.policy, model.graphdef, mesh, Weights(params, meta), step)


def load_trained(config: RunConfig, *, say: Callable[[str], None] = print) -> Trained:
    """The run rebuilt for training with its newest checkpoint's whole state restored
    (optimizer state, loss scale, step and RNG key too): the state a resume would continue
    from. The config is taken as by `load_model`."""
    config = _run_config(config, say)
    built = build(config, say=say)
    checkpointer = ckpt.Checkpointer.of(config.checkpoint, config.run_dir, training=False)
    try:
        restored = checkpointer.restore_latest(built.state, say=say)
    finally:
        checkpointer.close()
    if restored is None:
        raise _no_checkpoint(checkpointer)
    return Trained(config, built.task, built.policy, built.graphdef, built.mesh, restored.state, restored.step)


def evaluate_trained(trained: Trained) -> dict[str, float]:
    """The restored run on its (or this command's) validation split, with references."""
    c = trained.config
    out = evaluate(eval_step(trained.task, trained.graphdef, trained.mesh), trained.state, trained.task.eval_iter(),
                   c.train.eval_batches, trained.batch_sharding())
    return with_references(out, trained.task.references())


def export_trained(trained: Trained, out_dir: str | pathlib.Path) -> pathlib.Path:
    """Write the run's params and FP8 meta for use outside train/: an orbax checkpoint of
    ``{"params", "fp8_meta"}`` (plain nested dicts of arrays, read back with
    ``orbax.checkpoint.StandardCheckpointer().restore(out_dir / "state")``), with the run's
    ``config.yaml`` and ``tokenizer/`` beside it. ``out_dir`` must not exist yet."""
    import orbax.checkpoint as ocp

    tree = {"params": trained.state.params.to_pure_dict(), "fp8_meta": nnx.State(trained.state.fp8_meta).to_pure_dict()}
    with new_directory(out_dir, "export") as (out, final):
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(out / "state", jax.device_get(tree))
        rundir.copy_record(trained.config.run_dir, out)
    return final


@contextlib.contextmanager
def new_directory(path: str | pathlib.Path, what: str) -> Iterator[tuple[pathlib.Path, pathlib.Path]]:
    """``(partial, final)``: write into ``partial``, a hidden sibling of ``path`` that is
    renamed to ``path`` (absolute, ``final``) when the block ends; if it raises, nothing is
    left at either. ``path`` must not exist yet: an output never overwrites."""
    final = pathlib.Path(path).absolute()
    if final.exists():
        raise ValueError(f"{what} directory {final} exists; give a new one (an existing directory is never written over)")
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f".{final.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by a process that was killed
    partial.mkdir()
    try:
        yield partial, final
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
