"""Evaluating a run: on its validation split during training, or restored afterwards.

    trained = load_trained(config)          # the run's model, tokenizer and newest checkpoint
    evaluate_trained(trained)               # {"loss", "perplexity", ..., "unigram_baseline"}
    export_trained(trained, "export/")      # params + FP8 meta for use outside train/
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

from train import identity
from train import mesh as mesh_lib
from train.build import Built, build
from train.schema import RunConfig
from train.tasks import Task


def eval_step(task: Task, graphdef):
    """The jitted ``(params, meta, batch) -> (loss, aux)`` of ``task``, without dropout."""
    return jax.jit(lambda p, m, b: task.loss(graphdef, p, m, b, jax.random.key(0), dropout=False))


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
    """A run rebuilt (``built``) with its newest readable checkpoint restored (``state``)."""

    built: Built
    state: object
    step: int

    @property
    def config(self) -> RunConfig:
        return self.built.config

    @property
    def task(self) -> Task:
        return self.built.task

    @property
    def graphdef(self):
        return self.built.graphdef


def load_trained(config: RunConfig, *, say: Callable[[str], None] = print) -> Trained:
    """Rebuild the run's model and restore its newest checkpoint (for eval / generate).

    The model, precision and tokenizer are the run's own (its ``config.yaml`` and
    ``tokenizer/``), whatever this config says of them; the data to evaluate on and the
    devices come from this config (`train.identity.for_evaluation`), so a run can be
    evaluated on other text with the tokenizer it was trained with.
    """
    run_config = identity.saved_config(config.run_dir)
    if run_config is not None:
        config = identity.for_evaluation(run_config, config, say=say)
    built = build(config, say=say)
    checkpointer = built.checkpointer(training=False)
    try:
        restored = checkpointer.restore_latest(built.state, say=say)
    finally:
        checkpointer.close()
    if restored is None:
        raise ValueError(f"no checkpoint in {checkpointer.directory}; train first: python -m train train CONFIG")
    return Trained(built, restored.state, restored.step)


def evaluate_trained(trained: Trained) -> dict[str, float]:
    """The restored run on its (or this command's) validation split, with references."""
    c = trained.config
    out = evaluate(eval_step(trained.task, trained.graphdef), trained.state, trained.task.eval_iter(),
                   c.train.eval_batches, trained.built.batch_sharding())
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
        identity.copy_identity(trained.config.run_dir, out)
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
