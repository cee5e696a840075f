"""A diverged run never leaves only bad checkpoints, and the way out it advises works.

Real divergences (learning rates far too high, in fp32, fp16 and fp8) with checkpoints saved
every step, far more often than the run logs: the run stops before saving a state from
after it went bad, sets aside the checkpoint of the state it went bad from, keeps a
checkpoint that evaluates sanely, and resumes from it with ``--change-optim``.
"""

import dataclasses
import json
import math
import pathlib
import re

import jax
import numpy as np
import pytest

import train.loop as loop
from train import divergence, evaluation
from train.__main__ import main
from train.config import load_config
from train.divergence import NEVER, Health
from train.tasks import Classification, LanguageModelling
from train import rundir

from helpers import tiny_lm_run


UNIFORM = math.log(256)  # the byte tokenizer's uniform-guess loss, 5.545 nats


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("data")


def write_config(tmp_path, data_dir, precision: str, lr: str) -> pathlib.Path:
    path = tmp_path / "run.yaml"
    path.write_text(tiny_lm_run("diverge", data_dir, precision=precision, lr=lr,
                                train="steps: 12, log_every: 50, eval_every: 0, max_consecutive_skips: 4",
                                checkpoint="every: 1, keep: 2, async_save: false"))
    return path


def checkpoint_steps(run: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())


# ----------------------------------------------------------------------------- the record on the device


def reference_health(losses, skipped, ceiling, start):
    """The device record after each step, by its definition, in float64 Python."""
    total = in_a_row = streak_from = 0
    above_from = exploded_at = exploded_step = NEVER
    average, exploded_average = start, 0.0
    out = []
    for step, (loss, skip) in enumerate(zip(losses, skipped), start=1):
        loss = float(loss)
        if skip and in_a_row == 0:
            streak_from = step
        in_a_row = in_a_row + 1 if skip else 0
        total += int(skip)
        if math.isfinite(loss):
            average = 0.9 * average + 0.1 * loss
            above_from = (min(above_from, step) if loss > ceiling else NEVER)
        if average > ceiling and exploded_at == NEVER:
            exploded_at, exploded_step, exploded_average = above_from, step, average
        out.append(dict(total=total, in_a_row=in_a_row, streak_from=streak_from, above_from=above_from,
                        average=average, exploded_at=exploded_at, exploded_step=exploded_step,
                        exploded_average=exploded_average))
    return out


def test_the_health_record_follows_its_definition_step_by_step():
    """Thirty steps of NaN, sane and exploding losses and skips (two streaks; a single spike
    of 15 above the ceiling of 11.09, which the running average absorbs; then losses of 30
    from step 21 on, which it does not): after every step the jitted update equals the
    float64 reference: integers exactly, the f32 averages to 1e-5 relative (f32 rounding of
    a few dozen multiply-adds)."""
    rng = np.random.default_rng(0)
    losses = rng.uniform(2.0, 8.0, 30).astype(np.float32)
    losses[[3, 4, 5, 13, 23]] = np.nan
    losses[9] = 15.0
    losses[20:23] = losses[24:] = 30.0
    skipped = ~np.isfinite(losses)
    skipped[14] = True  # a skip with a finite loss (non-finite gradients): extends the streak from step 14
    ceiling = 2 * UNIFORM
    update = jax.jit(lambda h, step, loss, skip: divergence.update(h, step=step, loss=loss, skipped=skip,
                                                                   ceiling=ceiling))
    health = divergence.initial(3, start_loss=UNIFORM)
    expected = reference_health(losses, skipped, ceiling, UNIFORM)
    for i, (loss, skip) in enumerate(zip(losses, skipped)):
        health = update(health, np.int32(i + 1), loss, skip)
        got = dataclasses.asdict(Health.of(jax.device_get(health)))
        want = {**expected[i], "total": expected[i]["total"] + 3}
        for key in ("average", "exploded_average"):
            assert got.pop(key) == pytest.approx(want.pop(key), rel=1e-5), (i, key)
        assert got == want, i
    # The spike at step 10 moved the average to ~6.3, below the ceiling; the losses of 30 from
    # step 21 took it past at step 23 (21: 0.9 x ~5 + 3 = ~7.6, 22: ~9.8, 23: ~11.9): the
    # run went bad at step 21. The NaN at step 24 left the run of losses above the ceiling open.
    assert (got["exploded_at"], got["exploded_step"]) == (21, 23) and got["above_from"] == 21


def test_the_first_bad_step_and_what_a_healthy_check_confirms():
    def health(**kw):
        return Health(**{"total": 0, "in_a_row": 0, "streak_from": 0, "above_from": NEVER, "average": 5.0,
                         "exploded_at": NEVER, "exploded_step": NEVER, "exploded_average": 0.0, **kw})

    assert health().first_bad_step(4) is None and health().confirmed_through(10) == 9
    # A streak of 3 going on since step 8: not yet a divergence (4 allowed); the states it may
    # have gone bad from (step 7 on) are not confirmed.
    streak = health(in_a_row=3, streak_from=8)
    assert streak.first_bad_step(4) is None and streak.confirmed_through(10) == 6
    assert streak.first_bad_step(3) == 8 and streak.first_bad_step(0) is None  # 0: never stops
    # Losses above the ceiling since step 7, the average not yet past it: states from step 6
    # on wait for the verdict.
    assert health(above_from=7).first_bad_step(4) is None and health(above_from=7).confirmed_through(10) == 5
    both = health(in_a_row=3, streak_from=8, exploded_at=6, exploded_step=9)
    assert both.first_bad_step(3) == 6  # the earlier sign


def test_a_run_that_ends_no_better_than_its_baseline_is_told_so():
    lm = LanguageModelling.below_baseline
    assert lm({"eval_loss": 3.2}, {"unigram_baseline": 3.3}) is None
    assert "no better than the unigram baseline (3.3000)" in lm({"eval_loss": 3.4}, {"unigram_baseline": 3.3})
    assert lm({"loss": 9.0}, {"unigram_baseline": 3.3}) is None  # no final evaluation: nothing to compare
    cls = Classification.below_baseline
    assert cls({"eval_accuracy": 0.7}, {"majority_baseline": 0.5}) is None
    assert "most frequent label (0.5000)" in cls({"eval_accuracy": 0.5}, {"majority_baseline": 0.5})


# ----------------------------------------------------------------------------- real divergences


def check_diverged(config, message: str, sign: str) -> int:
    """What a run that diverged with a checkpoint every step must have left: the message
    names the last good checkpoint, every later one is set aside in diverged/, no confirmed
    one was rotated out, and the kept one evaluates to a loss below the ceiling the run
    itself calls an explosion (2 x ln 256 = 11.09; an untrained model scores ~6). Returns
    the last good step."""
    assert sign in message
    run = pathlib.Path(config.run_dir)
    kept = checkpoint_steps(run)
    assert kept, message
    assert re.search(rf"The last good checkpoint is step {kept[-1]}: resume from it", message)
    aside = sorted(int(p.name.split("-")[0]) for p in (run / "diverged").iterdir())
    assert aside and min(aside) == kept[-1] + 1, (kept, aside)  # every later checkpoint is out of the way
    assert len(kept) <= config.checkpoint.keep + 1  # the bad stretch rotated no confirmed one out
    trained = evaluation.load_model(config, say=lambda _: None)
    assert trained.step == kept[-1]
    result = evaluation.evaluate_trained(trained)
    assert math.isfinite(result["loss"]) and result["loss"] < 2 * UNIFORM, result
    return kept[-1]


@pytest.mark.parametrize("precision, lr, sign", [
    # fp16 at 1e6: the second update (lr 5e5 after warmup's 0) blows the params up, every step
    # after overflows and is skipped, the params stay finite: only the streak shows it.
    ("fp16", "1.0e6", "all skipped"),
    ("fp8", "1.0e3", "exploded"),
    # fp32 at lr 10 (exploded): test_the_advised_resume_works_and_is_recorded, from the CLI.
])
def test_a_diverging_run_keeps_a_checkpoint_that_evaluates_sanely(tmp_path, data_dir, precision, lr, sign):
    """A checkpoint every step, a log step only at the end: the run stops at a save, before
    writing a state from after the first bad step; the checkpoint of the state that step
    went bad from is set aside; what is kept evaluates sanely (`check_diverged`)."""
    path = write_config(tmp_path, data_dir, precision, lr)
    config = load_config(path, [f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(loop.Diverged) as err:
        loop.train(config, say=lambda _: None)
    check_diverged(config, str(err.value), sign)


def test_the_advised_resume_works_and_is_recorded(tmp_path, data_dir, capsys):
    """fp32 at lr 10 diverges; its message advises ``optim.lr=... --change-optim``. That
    command (with a learning rate that trains: the advice's tenth of 10 may diverge again,
    and would say so) resumes from the last good checkpoint and trains to the end; the run's
    config and history record the change; a later resume takes the new lr as the run's, and
    the old one is now a change."""
    path = write_config(tmp_path, data_dir, "fp32", "10.0")
    run = tmp_path / "run"
    assert main(["train", str(path), f"run_dir={run}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line
    advised = re.search(r"e\.g\. (python -m train train CONFIG optim\.lr=\S+ --change-optim)", err)
    assert advised, err
    good = check_diverged(load_config(path, [f"run_dir={run}"]), err, "exploded")
    argv = advised.group(1).split()[3:]  # after "python -m train"
    assert argv[:2] == ["train", "CONFIG"] and argv[-1] == "--change-optim"
    argv = ["train", str(path), f"run_dir={run}", "optim.lr=3e-3", "--change-optim"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"resumed from checkpoint at step {good}" in out and "resuming with optim.lr = 0.003 (the run had 10.0)" in out
    assert re.search(r"finished at step 12: loss (\d|\.)+", out)
    assert rundir.saved_config(run)["optim"]["lr"] == 3e-3
    history = [json.loads(line) for line in (run / rundir.HISTORY_FILE).read_text().splitlines()]
    assert history == [{"step": good, "time": history[0]["time"], "changed": {"optim.lr": {"from": 10.0, "to": 3e-3}}}]
    # The run's config is now the amended one: the same command without the flag resumes
    # (nothing left to do), and the old learning rate is refused, pointing at the flag.
    assert main(["train", str(path), f"run_dir={run}", "optim.lr=3e-3"]) == 0
    capsys.readouterr()
    assert main(["train", str(path), f"run_dir={run}", "train.steps=14"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.003 (the run) -> 10.0 (now)" in err and "add --change-optim" in err


def test_change_optim_allows_optimizer_keys_only(tmp_path, data_dir, capsys):
    path = write_config(tmp_path, data_dir, "fp32", "3e-3")
    run = tmp_path / "run"
    assert main(["train", str(path), f"run_dir={run}", "train.steps=2"]) == 0
    before = (run / rundir.CONFIG_FILE).read_text()
    capsys.readouterr()
    assert main(["train", str(path), f"run_dir={run}", "train.steps=4", "model.d_model=64", "--change-optim"]) == 2
    assert "model.d_model: 32 (the run) -> 64 (now)" in capsys.readouterr().err
    # Clipping on or off changes the optimizer state's structure: refused even with the flag.
    assert main(["train", str(path), f"run_dir={run}", "train.steps=4", "optim.grad_clip=null", "--change-optim"]) == 2
    assert "adds or removes the clipping stage" in capsys.readouterr().err
    assert (run / rundir.CONFIG_FILE).read_text() == before and not (run / rundir.HISTORY_FILE).exists()


def test_more_steps_keep_the_runs_decay_end_and_the_same_policy_spelled_out_is_no_change(tmp_path, data_dir):
    """A 4-step run decays to lr x min_lr_ratio at step 4. Resumed with train.steps=6 it
    keeps that end: steps 5 and 6 run at the floor (3e-4), not at the rate of a cosine
    stretched over 6 steps (which rises back to 1.65e-3 at step 5); and the policy written
    out key by key (its amax history is the preset's 1024) is the run's own."""
    path = write_config(tmp_path, data_dir, "fp8", "3e-3")
    run = tmp_path / "run"
    base = [f"run_dir={run}", "train.log_every=1"]
    loop.train(load_config(path, [*base, "train.steps=4"]), say=lambda _: None)
    said: list[str] = []
    loop.train(load_config(path, [*base, "train.steps=6", "precision.fp8.amax_history=1024"]), say=said.append)
    assert not any(line.startswith("resuming with precision") for line in said), said
    assert any("decays to 0.0003 at step 4 (the run's train.steps) and stays there" in line for line in said), said
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"}
    floor = 3e-3 * 0.1  # optim.min_lr_ratio's default
    assert rows[5]["lr"] == pytest.approx(floor, rel=1e-6) and rows[6]["lr"] == pytest.approx(floor, rel=1e-6)
