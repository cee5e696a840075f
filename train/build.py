"""The build stage: a config turned into the objects of a run, once.

    built = build(config, say=print)
    built.policy, built.task, built.graphdef, built.optimizer, built.state, built.mesh

train, eval, generate, export and data all start here, so a run is rebuilt the same way
whatever the command. The state is a fresh step-0 `mpx.TrainState` laid out on the mesh;
restoring a checkpoint into it is the caller's (`train.loop`, `train.evaluation`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

import mpx
import mpx.nn as mn
from train import checkpoint as ckpt
from train import identity
from train import mesh as mesh_lib
from train.schema import RunConfig
from train.tasks import Task, make_task


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
    adamw = optax.adamw(make_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    if o.grad_clip:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)
    return adamw


@dataclasses.dataclass
class Built:
    """A run's objects. ``state`` is on ``mesh`` with ``shardings``."""

    config: RunConfig
    policy: mpx.Policy
    task: Task
    graphdef: Any
    optimizer: optax.GradientTransformation
    state: mpx.TrainState
    mesh: jax.sharding.Mesh
    shardings: Any

    def batch_sharding(self, *, accumulated: bool = False):
        """How a batch (stacked micro-batches when ``accumulated``) is laid out."""
        return mesh_lib.batch_sharding(self.mesh, accumulated=accumulated)

    def checkpointer(self, *, training: bool) -> ckpt.Checkpointer:
        """The run's checkpoints; only a training run saves (and saves asynchronously)."""
        c = self.config.checkpoint
        return ckpt.Checkpointer(self.config.run_dir, every=c.every if training else 0, keep=c.keep,
                                 async_save=c.async_save and training)

    def model(self, state: mpx.TrainState | None = None) -> nnx.Module:
        """The model with ``state``'s params and FP8 meta (default: the built state's)."""
        state = state or self.state
        return nnx.merge(self.graphdef, state.params, state.fp8_meta)


def build(config: RunConfig, *, say: Callable[[str], None] = print, finetune: bool = False) -> Built:
    """Policy, task (data prepared), model, optimizer, mesh and a step-0 state on it.

    The data is encoded with the run's own tokenizer once the run directory has one
    (`train.identity`), before that with the tokenizer of the run it fine-tunes from
    (`tokenizer_of`). With ``finetune`` and ``finetune.init_from`` set, the body params come
    from that pre-training run and the task's new collections (a classifier head) stay fresh.
    """
    mesh_lib.initialize_distributed(config.mesh.distributed)  # before anything else touches JAX
    policy = config.policy()
    task = make_task(config, tokenizer_of(config, say))
    model = task.model(config.model, policy, nnx.Rngs(config.train.seed))
    graphdef, params, meta, rest = mn.split(model)
    if rest:
        raise ValueError(f"the model has state besides parameters and FP8 meta ({', '.join(map(str, rest))}), "
                         "which train/ does not carry")
    if finetune and config.finetune.init_from:
        body = nnx.State({k: v for k, v in params.items() if k not in task.new_on_finetune})
        loaded, from_step = ckpt.restore_params(config.finetune.init_from, body)
        nnx.update(params, loaded)
        say(f"fine-tuning from {config.finetune.init_from} (step {from_step}): body params loaded, new head")
    optimizer = make_optimizer(config)
    state = mpx.init_train_state(params, optimizer, policy=policy, fp8_meta=meta, rng=jax.random.key(config.train.seed))
    mesh = mesh_lib.make_mesh(*config.mesh_shape(jax.device_count()))
    shardings = mesh_lib.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    return Built(config, policy, task, graphdef, optimizer, state, mesh, shardings)


def tokenizer_of(config: RunConfig, say: Callable[[str], None]):
    """The run's own tokenizer; a new fine-tuning run's is its pre-training run's (ids the
    loaded embeddings were trained on); None: the one the data config describes."""
    tokenizer = identity.run_tokenizer(config.run_dir)
    if tokenizer is None and config.finetune.init_from:
        tokenizer = identity.run_tokenizer(config.finetune.init_from)
        if tokenizer is not None:
            say(f"encoding with the tokenizer of {config.finetune.init_from} ({tokenizer.kind}, "
                f"{tokenizer.vocab_size} ids), which its params were trained on")
    return tokenizer
