"""The training loop keeps the device busy: between log steps the host never waits on it.

Each step is dispatched asynchronously, the next batch is loaded and put on the device
while it runs, and the skipped-step count stays on the device; the loop reads device
values only at log steps (and at eval steps and due checkpoint saves).

How this is checked on a CPU: JAX's transfer guards do not fire there (a CPU array is
host memory already: ``int(x)`` under ``jax.transfer_guard_device_to_host("disallow")``
passes), and a host callback makes a CPU computation run synchronously, so neither can
observe the loop. Instead the run's loss is slowed down on the device (600 rounds
of data-dependent 512x512 matmuls per call: about 0.8 s on an idle 2-core machine, far
longer than a loop iteration takes on the host even on a loaded machine; 100 rounds, 0.13 s,
once lost that race right after an asynchronous checkpoint save while the other test worker
compiled; its value unchanged), and at the end of each loop
iteration (``on_step``) the test asks, without waiting (``jax.Array.is_ready``), whether
the step just dispatched has finished. A loop that reads any output of a step before the
next iteration (``int(m.skipped)``) always finds it finished; a loop that does not finds
it still running at every step that is not a log step. On an accelerator the non-log
iterations also run under ``transfer_guard_device_to_host("disallow")``.

One short run (8 steps, log / eval / checkpoint every 4) serves the tests below.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train.loop as loop
from train.build import task_for
from train.tasks import LanguageModelling
from train.config import RunConfig, load_config
from train.logger import read_rows

CONFIG = """
name: loop
precision: fp8
model: {{d_model: 32, num_heads: 2, num_layers: 1, d_ff: 64, max_len: 32}}
optim: {{lr: 3.0e-3, warmup_steps: 2}}
data: {{task: lm, seq_len: 32, batch_size: 8, data_dir: {data_dir}}}
train: {{steps: 8, log_every: 4, eval_every: 4, eval_batches: 1}}
checkpoint: {{every: 4, keep: 3, async_save: true}}
logging: {{tensorboard: false, progress: false}}
"""


def poisoned(tokens) -> bool:
    """Batches whose first token is even get a NaN loss: their steps are skipped."""
    return int(tokens[0, 0]) % 2 == 0


def instrumented(loss_fn, *, size=512, rounds=600):
    """``loss_fn`` slowed down on the device and poisoned (see `poisoned`). The matmuls
    read the batch (no constant folding) and no parameter (the gradient is the same)."""
    traced = []

    def loss(graphdef, params, meta, batch, rng, *, dropout):
        traced.append(True)
        out, aux = loss_fn(graphdef, params, meta, batch, rng, dropout=dropout)
        h0 = jnp.full((size, size), jnp.mean(batch["tokens"].astype(jnp.float32)) * 1e-4, jnp.float32)
        h = jax.lax.fori_loop(0, rounds, lambda i, h: jnp.tanh(h @ h0 + 1.0 / size), h0)
        out = out + 0.0 * jnp.sum(h)
        return jnp.where(batch["tokens"][0, 0] % 2 == 0, jnp.nan, out), aux

    return loss, traced


class DeviceToHostGuard:
    """``transfer_guard_device_to_host("disallow")`` switched on and off across calls
    (a no-op on a CPU; on an accelerator an implicit read such as ``int(x)`` raises)."""

    def __init__(self):
        self._cm = None

    def on(self):
        self.off()
        self._cm = jax.transfer_guard_device_to_host("disallow")
        self._cm.__enter__()

    def off(self):
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)


@dataclasses.dataclass
class Run:
    config: RunConfig
    out: dict
    finished_at_iteration_end: dict[int, bool]
    traced: list

    @property
    def dir(self) -> pathlib.Path:
        return pathlib.Path(self.config.run_dir)

    def rows(self, split: str) -> dict[int, dict]:
        return {r["step"]: r for r in read_rows(self.dir) if r["split"] == split}  # non-finite values as NaN

    def is_log(self, step: int) -> bool:
        return step % self.config.train.log_every == 0 or step == self.config.train.steps


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    tmp = tmp_path_factory.mktemp("loop")
    (tmp / "loop.yaml").write_text(CONFIG.format(data_dir=tmp / "data"))
    config = load_config(tmp / "loop.yaml", [f"run_dir={tmp / 'run'}"])
    result = Run(config, {}, {}, [])
    guard = DeviceToHostGuard()

    def on_step(step, state):
        guard.off()  # the guarded part of this iteration ends here
        result.finished_at_iteration_end[step] = state.step.is_ready()  # does not wait
        if not result.is_log(step + 1):
            guard.on()  # the whole next iteration, from its dispatch to here: no read of the device

    loss, result.traced = instrumented(LanguageModelling.loss)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LanguageModelling, "loss", staticmethod(loss))
        try:
            result.out = loop.train(config, say=lambda _: None, on_step=on_step)
        finally:
            guard.off()
    return result


def test_no_wait_on_the_device_between_log_steps(run):
    assert run.traced, "the instrumented loss was not used; the test no longer sees how the loop runs"
    steps = run.config.train.steps
    assert sorted(run.finished_at_iteration_end) == list(range(1, steps + 1))
    # Step 1 may be done: with the lean FP8 program (train.fp8_lean_min_steps), the first step's
    # `skipped` flag chooses the program of the next (mpx.BootstrappedStep), one read a run.
    waited = [s for s, done in run.finished_at_iteration_end.items() if done and not run.is_log(s) and s != 1]
    assert not waited, f"the loop waited on the device at steps {waited}, which are not log steps"
    # A log step (which evaluates and saves here too) reads the device: its step is done.
    assert all(run.finished_at_iteration_end[s] for s in range(1, steps + 1) if run.is_log(s))


def test_metrics_are_fetched_at_log_steps(run):
    train_rows = run.rows("train")
    assert sorted(train_rows) == [4, 8] and sorted(run.rows("eval")) == [4, 8]
    for row in train_rows.values():
        assert row["tokens_per_s"] > 0 and row["grad_norm"] is not None and row["loss_scale"] == 1.0
        assert row["fp8_min_scale"] is not None and row["fp8_max_fanout"] == 1
    assert run.out["step"] == 8 and run.out["tokens_per_s"] == train_rows[8]["tokens_per_s"]
    # The learning rate of each logged step's update: warmup 2 steps to lr = 3e-3, then cosine
    # to lr * min_lr_ratio at step 8 (optax counts updates from 0, so step s is update s - 1).
    peak, end = 3e-3, 3e-3 * run.config.optim.min_lr_ratio
    for step, row in train_rows.items():
        expected = end + (peak - end) * (1 + np.cos(np.pi * (step - 1 - 2) / 6)) / 2
        assert row["lr"] == pytest.approx(expected, rel=1e-5), (step, row["lr"])
    for row in run.rows("eval").values():
        # bits per byte = nats/token / ln 2 * tokens/byte; the byte tokenizer has one token
        # per UTF-8 byte of the text (plus the end-of-document separators: a little more)
        assert 1.0 <= row["tokens_per_byte"] < 1.05
        assert row["bits_per_byte"] == pytest.approx(row["loss"] / np.log(2) * row["tokens_per_byte"], rel=1e-6)
        assert row["unigram_baseline"] > 0


def test_skipped_steps_are_counted_on_the_device(run):
    batches = task_for(run.config).train_iter()
    expected = np.cumsum([poisoned(next(batches)["tokens"]) for _ in range(run.config.train.steps)])
    assert 0 < expected[-1] < len(expected), "the data no longer gives a mix of skipped and applied steps"
    assert {s: r["skipped"] for s, r in run.rows("train").items()} == {4: expected[3], 8: expected[7]}
    assert run.out["skipped"] == expected[7] and isinstance(run.out["skipped"], int)


def test_checkpoints_save_the_data_position_before_the_prefetched_batch(run):
    """The data state saved with step 4 is the position after the batches of steps 1..4,
    not after the batch the loop had already loaded for step 5: a resume goes on with it."""
    import orbax.checkpoint as ocp

    directory = run.dir / "checkpoints"
    assert sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) == [4, 8]
    batches = task_for(run.config).train_iter()
    for step in range(1, 9):
        next(batches)
        if step in (4, 8):
            with ocp.CheckpointManager(directory) as manager:
                saved = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
            assert saved["processes"] == [json.loads(json.dumps(batches.get_state()))], step  # one process


@pytest.mark.parametrize("every", [0, 5])
def test_a_checkpoint_that_is_not_due_reads_nothing(tmp_path, every):
    """``Checkpointer.save`` on a step where no save is due returns before touching the
    state, so the loop may call it every step."""
    from train.checkpoint import Checkpointer

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"save read state.{name} with no save due")

    checkpointer = Checkpointer(tmp_path / "run", every=every, keep=2, async_save=False)
    try:
        for step in (1, 2, 3, 4, 6, 7):
            assert checkpointer.save(step, Untouchable(), data_state={}, config={}) is False
    finally:
        checkpointer.close()


def test_the_progress_bar_counts_finished_steps_not_dispatched_ones(tmp_path):
    """The loop dispatches steps ahead of the device; the bar moves when a step's output is
    ready (asked without waiting), in order, and the rest count when the run closes."""
    from train.config import config_from_dict
    from train.logger import Logger

    class Output:  # a step's device array, finished when the test says so
        done = False

        def is_ready(self):
            return self.done

    config = config_from_dict({"run_dir": str(tmp_path / "run"), "logging": {"progress": True, "tensorboard": False}})
    logger = Logger(config.logging, config.run_dir, lambda _: None, 10, 2)
    steps = [Output() for _ in range(4)]
    logger.step(steps[0])
    logger.step(steps[1])
    assert logger.bar.n == 2  # resumed at step 2; two dispatched, none finished
    steps[1].done = True  # a later step cannot have finished before an earlier one: not counted alone
    logger.step(steps[2])
    assert logger.bar.n == 2
    steps[0].done = True
    logger.step(steps[3])
    assert logger.bar.n == 4  # steps 3 and 4 of the run
    logger.close()
    assert logger.bar.n == 6  # the loop waited for the last steps before closing
