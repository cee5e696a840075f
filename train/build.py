"""The build stage: a config turned into the objects of a run, once.

    built = build(config, say=print)
    built.policy, built.task, built.graphdef, built.optimizer, built.state, built.mesh

This is where the run config is taken apart: each stage gets its section (`task_for`: the
data section; `build_model`: the model section and the policy; `make_optimizer`: the optim
section and the step count; `train.mesh.make_mesh`: the mesh section), and nothing below
sees the whole run. train, eval, generate, export and data all start here, so a run is
rebuilt the same way whatever the command. `build` makes a fresh step-0 `mpx.TrainState`
laid out on the mesh, for training (restoring a checkpoint into it is `train.loop`'s);
`build_model` makes only the model (graph, params, FP8 meta), for the commands that do not
train: evaluation, export, generation and quantization (`train.evaluation`).
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
from train import mesh as mesh_lib
from train import rundir
from train.schema import ModelConfig, OptimConfig, RunConfig
from train.tasks import Task, make_task


def make_schedule(optim: OptimConfig, steps: int) -> optax.Schedule:
    """Learning rate by update count (0 for the first): linear warmup, then cosine decay
    to ``optim.decay_steps`` (None: ``steps``, the run's ``train.steps``)."""
    decay_steps = optim.decay_steps or steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.lr,
        warmup_steps=optim.warmup_steps,
        decay_steps=max(decay_steps, optim.warmup_steps + 1),
        end_value=optim.lr * optim.min_lr_ratio,
    )


def make_optimizer(optim: OptimConfig, steps: int) -> optax.GradientTransformation:
    """AdamW on `make_schedule` with its moments stored as ``optim.moments``
    (`mpx.optim.adamw`), after global-norm clipping. (``optim.master`` is the policy's
    params dtype and the step's rounding: `RunConfig.policy`, `Built.stochastic_rounding`.)"""
    adamw = mpx.optim.adamw(make_schedule(optim, steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                            weight_decay=optim.weight_decay, moments=optim.moments, block_size=optim.moment_block)
    if optim.grad_clip:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip), adamw)
    return adamw


@dataclasses.dataclass(frozen=True)
class Model:
    """A task's model under ``policy``, split for `jax.jit`: the graph, its params and FP8
    meta (fresh, from the seed)."""

    policy: mpx.Policy
    graphdef: Any
    params: nnx.State
    fp8_meta: nnx.State

    def module(self, params=None, fp8_meta=None) -> nnx.Module:
        """The model with ``params`` and ``fp8_meta`` (default: its own)."""
        return nnx.merge(self.graphdef, self.params if params is None else params,
                         self.fp8_meta if fp8_meta is None else fp8_meta)


def build_model(task: Task, shape: ModelConfig, policy: mpx.Policy, *, seed: int) -> Model:
    """``task``'s model of ``shape`` under ``policy``, initialised from ``seed``: no
    optimizer, no devices beyond the default one."""
    graphdef, params, meta, rest = mn.split(task.model(shape, policy, nnx.Rngs(seed)))
    if rest:
        raise ValueError(f"the model has state besides parameters and FP8 meta ({', '.join(map(str, rest))}), "
                         "which train/ does not carry")
    return Model(policy, graphdef, params, meta)


@dataclasses.dataclass
class Built:
    """A run's objects for training. ``state`` is on ``mesh`` with ``shardings``."""

    policy: mpx.Policy
    task: Task
    graphdef: Any
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule  # the optimizer's learning rate by update count
    state: mpx.TrainState
    mesh: jax.sharding.Mesh
    shardings: Any
    stochastic_rounding: bool = False  # the step rounds updates to bf16 params stochastically

    def batch_sharding(self, *, accumulated: bool = False):
        """How a batch (stacked micro-batches when ``accumulated``) is laid out."""
        return mesh_lib.batch_sharding(self.mesh, accumulated=accumulated)

    def model(self, state: mpx.TrainState | None = None) -> nnx.Module:
        """The model with ``state``'s params and FP8 meta (default: the built state's)."""
        state = state or self.state
        return nnx.merge(self.graphdef, state.params, state.fp8_meta)


def build(config: RunConfig, *, say: Callable[[str], None] = print, finetune: bool = False,
          tokenizer=None) -> Built:
    """Policy, task (data prepared), model, optimizer, mesh and a step-0 state on it.

    The data is encoded with the run's own tokenizer once the run directory has one,
    before that with the tokenizer of the run it fine-tunes from (`tokenizer_of`);
    ``tokenizer`` (a run being imported: the one its weights were trained with) comes
    before either. With ``finetune`` and ``finetune.init_from`` set, the body params come
    from that pre-training run and the task's new collections (a classifier head) stay fresh.
    """
    policy = config.policy()
    task = task_for(config, tokenizer or tokenizer_of(config.run_dir, config.finetune.init_from, say))
    model = build_model(task, config.model, policy, seed=config.train.seed)
    params = model.params
    if finetune and config.finetune.init_from:
        params = _with_body_of(config.finetune.init_from, params, task, say)
    optimizer = make_optimizer(config.optim, config.train.steps)
    state = mpx.init_train_state(params, optimizer, policy=policy, fp8_meta=model.fp8_meta,
                                 rng=jax.random.key(config.train.seed))
    mesh = mesh_lib.make_mesh(config.mesh, batch_size=config.data.batch_size)
    shardings = mesh_lib.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    return Built(policy, task, model.graphdef, optimizer, make_schedule(config.optim, config.train.steps), state,
                 mesh, shardings, stochastic_rounding=config.optim.master != "f32")


def task_for(config: RunConfig, tokenizer=None) -> Task:
    """The run's task: its data section, with the seed that orders its batches and the
    class count a fine-tuning run may fix (see `train.tasks.Task` for ``tokenizer``)."""
    return make_task(config.data, seed=config.train.seed, num_classes=config.finetune.num_classes,
                     tokenizer=tokenizer)


def _with_body_of(init_from: str, params: nnx.State, task: Task, say: Callable[[str], None]) -> nnx.State:
    """``params`` with the body (all but the task's new collections) loaded from the run
    ``init_from``."""
    body = nnx.State({k: v for k, v in params.items() if k not in task.new_on_finetune})
    loaded, from_step = ckpt.restore_params(init_from, body)
    nnx.update(params, loaded)
    say(f"fine-tuning from {init_from} (step {from_step}): body params loaded, new head")
    return params


def tokenizer_of(run_dir: str, init_from: str | None, say: Callable[[str], None]):
    """The run's own tokenizer; a new fine-tuning run's is its pre-training run's
    (``finetune.init_from``: ids the loaded embeddings were trained on); None: the one the
    data config describes."""
    tokenizer = rundir.run_tokenizer(run_dir)
    if tokenizer is None and init_from:
        tokenizer = rundir.run_tokenizer(init_from)
        if tokenizer is not None:
            say(f"encoding with the tokenizer of {init_from} ({tokenizer.kind}, "
                f"{tokenizer.vocab_size} ids), which its params were trained on")
    return tokenizer
