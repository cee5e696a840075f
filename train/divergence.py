"""When a run has gone bad, and which of its checkpoints came from before.

A step's loss is computed on the state the step before left; so when step ``s`` shows the
run has gone bad, the state saved at step ``s - 1`` is already one it cannot be trained
from, and so is every later one. Two signs, kept on the device by the step itself (no
read of the device per step, `update`), read at log steps and at every checkpoint save
(`Health.first_bad_step`):

- the training loss exploded: its running average (`SMOOTHING`, about the last ten finite
  losses) rose above ``train.max_loss_ratio`` x the loss of uniform guessing. The run went
  bad where its losses went above that ceiling and stayed there. The average lets a
  single spike pass (the first steps of a fine-tune with a fresh head may score above
  twice uniform guessing), while a loss ten times the ceiling trips it at once;
- ``train.max_consecutive_skips`` skipped steps in a row (their loss, gradients or FP8
  amaxes not finite): the run went bad at the step its streak began.

The loop checks before each save, so nothing is saved once either has shown; the
checkpointer deletes old checkpoints only among those a later check has confirmed (none
from inside a streak of skips or of losses above the ceiling), so the good ones are never
rotated out by suspect ones (`train.checkpoint.Checkpointer`).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax.numpy as jnp
import numpy as np

NEVER = int(np.iinfo(np.int32).max)
"""A step that has not happened: ``above_from`` of a run whose last loss was sane,
``exploded_at`` of one that never exploded."""

SMOOTHING = 0.9
"""The running average of the loss: ``avg = SMOOTHING * avg + (1 - SMOOTHING) * loss``."""


class Diverged(ValueError):
    """A run whose recent steps were all skipped, or whose loss exploded: it stops rather
    than run on (and save what it learns from there)."""


def initial(skipped: int, *, start_loss: float) -> dict[str, np.ndarray]:
    """The device-side record of a run that has skipped ``skipped`` steps so far; its loss
    average starts at ``start_loss`` (the loss of uniform guessing: where a run starts)."""
    i32 = lambda v: np.asarray(v, np.int32)  # noqa: E731
    return {"total": i32(skipped), "in_a_row": i32(0), "streak_from": i32(0), "above_from": i32(NEVER),
            "average": np.asarray(start_loss, np.float32), "exploded_at": i32(NEVER), "exploded_step": i32(NEVER),
            "exploded_average": np.zeros((), np.float32)}


def update(health: dict, *, step, loss, skipped, ceiling: float) -> dict:
    """``health`` after step ``step`` (1-based) with ``loss`` and ``skipped``; traced inside
    the jitted step. ``ceiling``: the loss above which the run has exploded (inf: never)."""
    skipped = jnp.asarray(skipped, jnp.int32)
    finite = jnp.isfinite(loss)
    starts = (skipped == 1) & (health["in_a_row"] == 0)
    average = jnp.where(finite, SMOOTHING * health["average"] + (1 - SMOOTHING) * loss, health["average"])
    above = finite & (loss > ceiling)
    above_from = jnp.where(above, jnp.minimum(health["above_from"], step),
                           jnp.where(finite, NEVER, health["above_from"]))  # a non-finite loss says nothing
    # The average rises past the ceiling only on a loss above it: `above_from` is set then.
    crossed = (average > ceiling) & (health["exploded_at"] == NEVER)
    i32 = lambda x: x.astype(jnp.int32)  # noqa: E731
    return {
        "total": health["total"] + skipped,
        "in_a_row": (health["in_a_row"] + 1) * skipped,
        "streak_from": i32(jnp.where(starts, step, health["streak_from"])),
        "above_from": i32(above_from),
        "average": average.astype(jnp.float32),
        "exploded_at": i32(jnp.where(crossed, above_from, health["exploded_at"])),
        "exploded_step": i32(jnp.where(crossed, step, health["exploded_step"])),
        "exploded_average": jnp.where(crossed, average, health["exploded_average"]).astype(jnp.float32),
    }


@dataclasses.dataclass(frozen=True)
class Health:
    """The device record read back (`initial`'s keys as Python numbers)."""

    total: int
    in_a_row: int
    streak_from: int
    above_from: int
    average: float
    exploded_at: int
    exploded_step: int
    exploded_average: float

    @classmethod
    def of(cls, host: dict) -> Health:
        cast = {"int": int, "float": float}  # the annotations, as strings
        return cls(**{f.name: cast[f.type](host[f.name]) for f in dataclasses.fields(cls)})

    def first_bad_step(self, max_consecutive_skips: int) -> int | None:
        """The first step whose loss showed the run had gone bad (the state before it is
        the first bad one), or None."""
        bad = [self.exploded_at] if self.exploded_at != NEVER else []
        if max_consecutive_skips and self.in_a_row >= max_consecutive_skips:
            bad.append(self.streak_from)
        return min(bad, default=None)

    def confirmed_through(self, step: int) -> int:
        """The newest step whose state this check (at ``step``, healthy) vouches for: each
        state up to ``step - 1`` gave a later step a sane loss, except those of a streak of
        skipped steps or of losses above the ceiling still going on, which may yet turn out
        to be a divergence."""
        through = step - 1
        if self.in_a_row:
            through = min(through, self.streak_from - 2)
        if self.above_from != NEVER:
            through = min(through, self.above_from - 2)
        return through


def reason(health: Health, *, step: int, loss: float, loss_scale: float, max_consecutive_skips: int,
           max_loss_ratio: float, uniform_loss: float) -> str:
    """What the check at ``step`` found, in words (``health.first_bad_step`` is not None)."""
    if health.exploded_at != NEVER and health.exploded_at == health.first_bad_step(max_consecutive_skips):
        return (f"the run exploded: its training loss went above train.max_loss_ratio={max_loss_ratio:g} x the "
                f"loss of uniform guessing ({max_loss_ratio * uniform_loss:.4g}) at step {health.exploded_at} and "
                f"stayed there, its running average reaching {health.exploded_average:.4g} at step "
                f"{health.exploded_step}")
    return (f"the run diverged: the last {health.in_a_row} steps (from step {health.streak_from} to {step}) were "
            f"all skipped, their loss, gradients or FP8 amaxes not finite (loss {_num(loss)}, loss scale "
            f"{_num(loss_scale)}; train.max_consecutive_skips={max_consecutive_skips})")


def advice(*, bad_from: int, kept: list[int], set_aside: list[tuple[int, str]], lr: float) -> str:
    """How to go on: which checkpoints were moved, the last good one and the command that
    resumes from it with a lower learning rate."""
    moved = ""
    if set_aside:
        steps = ", ".join(str(s) for s, _ in set_aside)
        many = len(set_aside) > 1
        moved = (f" The checkpoint{'s' * many} of step{'s' * many} {steps}, saved from step {bad_from - 1} on (step "
                 f"{bad_from} went bad from the state of step {bad_from - 1}), {'were' if many else 'was'} moved to "
                 f"{pathlib.Path(set_aside[0][1]).parent}.")
    if not kept:
        return (f"stopped.{moved} No good checkpoint is left: start the run again with a lower learning rate, e.g. "
                f"python -m train train CONFIG optim.lr={lr / 10:g} (or raise optim.warmup_steps)")
    return (f"stopped without saving this state.{moved} The last good checkpoint is step {kept[-1]}: resume from "
            f"it with a lower learning rate, e.g. python -m train train CONFIG optim.lr={lr / 10:g} --change-optim "
            "(optim.warmup_steps and optim.grad_clip may change the same way)")


def _num(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


class Guard:
    """The loop's checks: ``check`` at log steps and before each save, with the health read
    back; a healthy run confirms its checkpoints, a bad one has its suspect checkpoints set
    aside and stops with `Diverged`."""

    def __init__(self, checkpointer, *, max_consecutive_skips: int, max_loss_ratio: float, uniform_loss: float,
                 lr: float, say):
        self.checkpointer, self.say, self.lr = checkpointer, say, lr
        self.last: Health | None = None  # what the latest check read
        self.max_consecutive_skips, self.max_loss_ratio, self.uniform_loss = (
            max_consecutive_skips, max_loss_ratio, uniform_loss)

    @property
    def ceiling(self) -> float:
        """The loss above which a step has exploded (`update`'s ``ceiling``)."""
        return self.max_loss_ratio * self.uniform_loss if self.max_loss_ratio else math.inf

    def check(self, step: int, health: Health, *, loss: float, loss_scale: float) -> None:
        self.last = health
        bad_from = health.first_bad_step(self.max_consecutive_skips)
        if bad_from is None:
            self.checkpointer.confirm(health.confirmed_through(step))
            return
        why = reason(health, step=step, loss=loss, loss_scale=loss_scale,
                     max_consecutive_skips=self.max_consecutive_skips, max_loss_ratio=self.max_loss_ratio,
                     uniform_loss=self.uniform_loss)
        moved = self.checkpointer.set_aside_from(bad_from - 1, self.say)
        raise Diverged(f"{why}; " + advice(bad_from=bad_from, kept=self.checkpointer.steps(), set_aside=moved,
                                           lr=self.lr))

    def finish(self, step: int) -> str | None:
        """The run ended at ``step`` (its last check found it healthy): keep the newest ``keep``
        checkpoints, unless its last steps were all skipped: then the states from before that
        streak stay the confirmed ones, and what to say of it is returned."""
        streak = self.last is not None and self.last.in_a_row > 0
        self.checkpointer.confirm(self.last.confirmed_through(step) if streak else step)
        if not streak:
            return None
        return (f"the run ended with its last {self.last.in_a_row} steps skipped (from step {self.last.streak_from} "
                f"on; train.max_consecutive_skips={self.max_consecutive_skips} would have called it diverged): its "
                f"final state may be one it cannot be trained from; the checkpoints before step "
                f"{self.last.streak_from - 1} are kept beside it")
