"""Checkpoints of a run: exact train state, data position and config, via orbax.

Layout: ``<run_dir>/checkpoints/<step>/{state,data,config}`` (`train.rundir`). Saves are asynchronous
(orbax writes into a temporary directory and renames it on success, so a crash mid-save
never touches the last good checkpoint). ``keep`` checkpoints are kept among those a later
divergence check has confirmed (`confirm`): the checkpoints saved since, which a divergence
may yet show to hold a bad state, are kept beside them, so a run that goes bad never rotates
its good checkpoints out. The state is saved exactly: fp32 master params, optimizer state,
FP8 meta, loss scale, step and RNG key.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from mpx.loss_scale import all_finite
from mpx._step import TrainState
from train.mesh import all_process_states
from train.rundir import CHECKPOINTS_DIR, checkpoint_dir
from train.schema import CheckpointConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore_latest` found."""

    step: int
    state: TrainState
    data_state: Any  # every process's data position: `train.mesh.this_process_state` picks this one's
    config: dict


def _to_disk(state: TrainState) -> TrainState:
    """Typed PRNG keys are stored as their raw key data."""
    return state.replace(rng=jax.random.key_data(state.rng))


def _from_disk(state: TrainState, like: TrainState) -> TrainState:
    impl = jax.random.key_impl(like.rng)
    return state.replace(rng=jax.random.wrap_key_data(state.rng, impl=impl))


def abstract_like(tree):
    """Shapes, dtypes and shardings of ``tree``: what a restore is checked against."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves every ``every`` steps, keeps ``keep`` confirmed ones, restores the newest
    readable one."""

    def __init__(self, run_dir: str | pathlib.Path, *, every: int, keep: int, async_save: bool = True):
        self.directory = checkpoint_dir(run_dir)
        self.every, self.keep = every, keep
        # Rotation is `confirm`'s: orbax's own would delete the oldest whatever the newer hold.
        options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._confirmed_through = max(self.steps(), default=-1)  # what an earlier run kept, it had checked

    @classmethod
    def of(cls, checkpoint: CheckpointConfig, run_dir: str | pathlib.Path, *, training: bool) -> Checkpointer:
        """The checkpoints of the run in ``run_dir``; only a training run saves (asynchronously
        if ``checkpoint.async_save``), every other command only reads."""
        return cls(run_dir, every=checkpoint.every if training else 0, keep=checkpoint.keep,
                   async_save=checkpoint.async_save and training)

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def due(self, step: int) -> bool:
        """Whether `save` at ``step`` would save (a multiple of ``every`` not saved yet)."""
        return self.every > 0 and step % self.every == 0 and step not in self._manager.all_steps()

    def confirm(self, through: int) -> None:
        """The states saved up to step ``through`` are good (a divergence check after them
        found the run healthy): delete the oldest of those beyond ``keep``."""
        self._confirmed_through = max(self._confirmed_through, through)
        confirmed = [s for s in self.steps() if s <= self._confirmed_through]
        for step in confirmed[:-self.keep] if self.keep > 0 else []:
            self._manager.delete(step)

    def set_aside_from(self, step: int, say) -> list[tuple[int, str]]:
        """Move the checkpoints of ``step`` and later to ``<run_dir>/diverged/`` (kept, out of
        the way of a resume); returns ``(step, new path)`` of each."""
        self.wait()
        return self._set_aside([s for s in self.steps() if s >= step], say, folder="diverged",
                               why="a state from after the run went bad")

    def save(self, step: int, state: TrainState, *, data_state: Any, config: dict, force: bool = False,
             counters: Callable[[], dict] | None = None) -> bool:
        """Save if ``step`` is a multiple of ``every`` (or ``force``); returns whether it did.

        ``data_state`` is this process's data position; with several processes the save
        gathers all of them (every process calls ``save`` at every step, as the loop does).
        ``counters()``: the run's running counts (skipped steps), read only when a save is
        due, kept with the data position (``Restored.data_state["counters"]``).
        """
        if not (force or self.due(step)) or step in self._manager.all_steps():
            return False
        if not bool(all_finite(state.params)):
            # Never rotate a good checkpoint out for a state that cannot be trained from.
            log.warning("not saving step %d: its params are not finite; the newest checkpoint stays the last good one",
                        step)
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_to_disk(state)),
            data=ocp.args.JsonSave({**all_process_states(data_state), "counters": counters() if counters else {}}),
            config=ocp.args.JsonSave(config),
        )
        return self._manager.save(step, args=args, force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def restore(self, step: int, like: TrainState) -> Restored:
        """The checkpoint at ``step``, checked against the shapes/dtypes/shardings of ``like``."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(_to_disk(like))),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        out = self._manager.restore(step, args=args)
        return Restored(step, _from_disk(out.state, like), out.data, out.config)

    def restore_latest(self, like: TrainState, *, say=log.warning, set_aside: bool = False) -> Restored | None:
        """The newest checkpoint that reads back, or None if there is none.

        A truncated or corrupt newest checkpoint is reported through ``say`` and the
        previous one is tried, and so on. When there are checkpoints and none reads back,
        that is an error (`RestoreError`, one line per checkpoint: incompatible with this
        model, corrupt, or missing files), never a fresh start in the run's directory.

        ``set_aside`` (a run that goes on training): the unreadable checkpoints newer than
        the one restored are moved to ``<run_dir>/damaged/`` (kept, out of the way), so
        that the run saves those steps again and its newest checkpoint is the one it
        continues from.
        """
        return self._newest(lambda step: self.restore(step, like), say=say, set_aside=set_aside)

    def restore_model_latest(self, params, fp8_meta, *, say=log.warning) -> tuple[int, Any, Any] | None:
        """``(step, params, fp8_meta)`` of the newest checkpoint that reads back, or None if
        there is none: only those two parts of the saved state are read (no optimizer state),
        laid out like ``params`` and ``fp8_meta`` (arrays or shape/dtype/sharding structs).
        Unreadable checkpoints are handled as by `restore_latest` (never set aside)."""
        tree = {"params": params, "fp8_meta": fp8_meta} if jax.tree.leaves(fp8_meta) else {"params": params}

        def read(step):
            item = ocp.args.PyTreeRestore(item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree),
                                          partial_restore=True)
            out = self._manager.restore(step, args=ocp.args.Composite(state=item)).state
            return step, out["params"], out.get("fp8_meta", fp8_meta)

        return self._newest(read, say=say, set_aside=False)

    def _newest(self, read: Callable[[int], Any], *, say, set_aside: bool):
        failures = []
        for step in reversed(self.steps()):
            try:
                restored = read(step)
                if set_aside and failures:
                    self._set_aside([failed for failed, _ in failures], say, folder="damaged",
                                    why="unreadable; the run saves that step again")
                return restored
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
                ignore_closed_loop_callbacks()
                kind, detail = classify_restore_error(e)
                failures.append((step, f"step {step}: {kind} ({detail})"))
                say(f"checkpoint at step {step} in {self.directory} is {kind} ({detail}); falling back to the previous one")
        if failures:
            raise RestoreError(
                f"no checkpoint in {self.directory} can be restored:\n  " + "\n  ".join(line for _, line in failures)
                + "\nnothing was changed; an incompatible checkpoint belongs to another model or precision: "
                "start a new run (a new name) instead of reusing this directory")
        return None


    def _set_aside(self, steps: list[int], say, *, folder: str, why: str) -> list[tuple[int, str]]:
        aside = self.directory.parent / folder
        moved = []
        for step in steps:
            target = aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            if jax.process_index() == 0:
                aside.mkdir(exist_ok=True)
                (self.directory / str(step)).rename(target)
                say(f"moved the checkpoint of step {step} ({why}) to {target}")
            moved.append((step, str(target)))
        self._manager.reload()
        return moved


def ignore_closed_loop_callbacks() -> None:
    """Drop the "Event loop is closed" reports a failed restore leaves behind.

    When orbax gives up on a checkpoint, TensorStore still completes the reads it had
    started and calls back into the asyncio loop orbax has closed; each callback is a
    ``RuntimeError('Event loop is closed')`` reported through `sys.unraisablehook`, often
    hundreds of tracebacks after the one-line report. They carry nothing: exactly those
    are dropped, every other unraisable exception still reaches the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_callbacks", False):
        return

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        previous(unraisable)

    hook.drops_closed_loop_callbacks = True
    sys.unraisablehook = hook


class RestoreError(ValueError):
    """A run's checkpoints exist but none can be restored."""


def classify_restore_error(e: BaseException) -> tuple[str, str]:
    """``(kind, first line)`` of a failed restore: ``incompatible`` (shapes, dtypes or
    structure differ from the model's), ``missing`` (files gone) or ``corrupt``."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    for tail in (" See full TensorStore details", " Truncating/padding is disabled"):
        first = first.split(tail)[0]  # the rest is a repr of internals, or advice for orbax's API
    first = first[:200]
    lowered = first.lower()
    if isinstance(e, FileNotFoundError) or "no such file" in lowered or "not found" in lowered:
        return "missing", first
    if isinstance(e, ValueError) and any(w in lowered for w in ("shape", "structure", "dtype", "mismatch")):
        return "incompatible", first
    return "corrupt", first


def restore_params(run_dir: str | pathlib.Path, like_params) -> tuple[Any, int]:
    """The params of the newest readable checkpoint of a run (for fine-tuning).

    ``like_params`` gives the structure, shapes and dtypes to read; entries of a saved
    state that it lacks (a pre-training LM head, the optimizer state) are not read.
    Returns ``(params, step)``.
    """
    directory = pathlib.Path(run_dir).absolute()
    if directory.name != CHECKPOINTS_DIR:
        directory = checkpoint_dir(directory)
    if not directory.is_dir():
        raise ValueError(f"no checkpoints found at {directory}; finetune.init_from must name a pre-training run dir")
    with ocp.CheckpointManager(directory) as manager:
        for step in sorted(manager.all_steps(), reverse=True):
            saved = _saved_param_paths(directory / str(step) / "state")  # empty: unknown, let orbax check
            missing = sorted(_param_paths(like_params) - saved) if saved else []
            if missing:
                shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                raise ValueError(
                    f"finetune.init_from {run_dir} (step {step}) has no params for {shown}: its model is not "
                    "this model's body (fewer layers, other names?); give this run the pre-training run's "
                    "model.* settings")
            try:
                item = ocp.args.PyTreeRestore(
                    item={"params": like_params},
                    restore_args=ocp.checkpoint_utils.construct_restore_args({"params": like_params}),
                    partial_restore=True,
                )
                restored = manager.restore(step, args=ocp.args.Composite(state=item))
                return restored.state["params"], step
            except Exception as e:  # noqa: BLE001
                log.warning("checkpoint at step %d in %s is unreadable (%s); trying the previous one", step, directory, e)
    raise ValueError(f"no readable checkpoint in {directory}")


def _paths(tree) -> set[str]:
    """Leaf paths as ``a/b/c``, without NNX's Variable plumbing (``value``)."""
    from mpx.policy import key_name

    out = set()
    for key_path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [key_name(k) for k in key_path]
        while keys and keys[-1] in ("value", "raw_value"):
            keys.pop()
        out.add("/".join(keys))
    return out


def _param_paths(like_params) -> set[str]:
    return _paths(like_params)


def _saved_param_paths(state_dir: pathlib.Path) -> set[str]:
    """The param paths a saved state holds (from its metadata; nothing is read)."""
    metadata = ocp.StandardCheckpointer().metadata(state_dir)
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
    if not isinstance(tree, dict) or "params" not in tree:
        return set()
    return _paths(tree["params"])
