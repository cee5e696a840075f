"""Every failure a user can cause from the command line is one line on stderr and exit
status 2, and a refused command leaves nothing half-written: no config.yaml for a run
that never started, no partial export, the checkpoints byte-identical."""

import errno
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import train.loop as loop
from train import evaluation, logger
from train import rundir
from train.__main__ import main

from helpers import tiny_lm_run


ROOT = os.geteuid() == 0  # root writes through any permission bits: a chmod refuses it nothing


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> pathlib.Path:
    """A run trained to step 4 (checkpoints 2 and 4); tests work on copies (`run_copy`)."""
    tmp = tmp_path_factory.mktemp("trained")
    config = write_config(tmp, data_dir)
    loop.train(load(config, tmp / "run"), say=lambda _: None)
    return tmp / "run"


def write_config(tmp_path, data_dir) -> pathlib.Path:
    (tmp_path / "run.yaml").write_text(tiny_lm_run("fail", data_dir))
    return tmp_path / "run.yaml"


def load(config_path, run_dir, *overrides):
    from train.config import load_config

    return load_config(config_path, [f"run_dir={run_dir}", *overrides])


def run_copy(trained, tmp_path, data_dir) -> tuple[pathlib.Path, pathlib.Path]:
    """``(config file, run dir)``: a copy of the trained run, its own to damage."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return write_config(tmp_path, data_dir), run


def snapshot(run_dir: pathlib.Path) -> dict:
    root = run_dir / "checkpoints"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def full_disk(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


@pytest.mark.parametrize("how", ["unwritable", "disk full"])
def test_export_that_cannot_be_written_is_one_line_and_leaves_nothing(trained, tmp_path, data_dir, capsys,
                                                                      monkeypatch, how):
    config, run = run_copy(trained, tmp_path, data_dir)
    parent = tmp_path / "exports"
    parent.mkdir()
    if how == "unwritable":
        if ROOT:
            pytest.skip("root ignores permission bits; the disk-full case covers this path")
        parent.chmod(0o500)
    else:  # the params are written, then the disk fills while the run's config is copied beside them
        def no_space(run_dir, out):
            raise full_disk(out / rundir.CONFIG_FILE)

        monkeypatch.setattr(rundir, "copy_record", no_space)
    try:
        assert main(["export", str(config), f"run_dir={run}", "--out", str(parent / "x")]) == 2
        err = one_line_error(capsys)
        assert str(parent) in err and ("writable" in err if how == "unwritable" else "free space" in err), err
        assert sorted(os.listdir(parent)) == []  # neither the export nor its partial sibling
    finally:
        parent.chmod(0o700)


@pytest.mark.parametrize("how", ["unwritable", "below a file"])
def test_a_data_dir_that_cannot_be_written_refuses_the_run_and_records_nothing(tmp_path, capsys, how):
    """Before, a 51-line traceback, and the run's config.yaml left behind in a run that
    never started."""
    if how == "unwritable":
        if ROOT:
            pytest.skip("root ignores permission bits; the below-a-file case covers this path")
        data = tmp_path / "locked"
        data.mkdir(0o500)
        bad = data / "data"
    else:
        (tmp_path / "a-file").write_text("")
        bad = tmp_path / "a-file" / "data"
    config = write_config(tmp_path, bad)
    assert main(["train", str(config), f"run_dir={tmp_path / 'run'}"]) == 2
    err = one_line_error(capsys)
    assert str(bad) in err and ("writable" in err if how == "unwritable" else "not a directory" in err), err
    assert not (tmp_path / "run").exists()  # no config.yaml, not even an empty directory


def test_a_full_disk_while_logging_is_one_line_and_keeps_the_checkpoints(trained, tmp_path, data_dir, capsys,
                                                                         monkeypatch):
    config, run = run_copy(trained, tmp_path, data_dir)
    before = snapshot(run)

    def no_space(path, mode="r", *args, **kwargs):
        raise full_disk(path)

    monkeypatch.setattr(logger, "open", no_space, raising=False)  # the metrics writer's open
    assert main(["train", str(config), f"run_dir={run}", "train.steps=6"]) == 2
    err = one_line_error(capsys)
    assert f"{run / 'metrics.jsonl'}: No space left on device; free space" in err, err
    assert snapshot(run) == before  # the step-6 save comes after its log row: never reached


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_keeps_the_older_ones(trained, tmp_path, data_dir,
                                                                                    capsys, monkeypatch):
    """The disk fills while orbax writes step 6's JSON items (inside its own save machinery,
    which may wrap the error): one line naming the file; steps 2 and 4 untouched."""
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    config, run = run_copy(trained, tmp_path, data_dir)
    before = snapshot(run)

    async def no_space(self, x, directory):
        raise full_disk(directory / self._filename)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", no_space)
    assert main(["train", str(config), f"run_dir={run}", "train.steps=6"]) == 2
    err = one_line_error(capsys)
    assert "No space left on device; free space" in err and str(run / "checkpoints") in err, err
    after = snapshot(run)
    assert {k: after[k] for k in before} == before


def test_a_file_system_error_wrapped_by_a_library_is_found_through_its_cause():
    """orbax and TensorStore raise their own exceptions from the OSError."""
    from train.__main__ import _os_error

    try:
        try:
            raise full_disk("/ckpt/4/state")
        except OSError as e:
            raise RuntimeError("orbax: save failed") from e
    except RuntimeError as wrapped:
        found = _os_error(wrapped)
    assert found is not None and found.filename == "/ckpt/4/state"
    assert _os_error(RuntimeError("no file involved")) is None


def test_a_torn_last_metrics_line_is_repaired_on_resume_with_a_warning(trained, tmp_path, data_dir, capsys):
    """A crash mid-write leaves half a row; before, every resume failed on it with
    "Expecting ',' delimiter" and no file named."""
    config, run = run_copy(trained, tmp_path, data_dir)
    metrics = run / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"split": "train", "step": 6, "lo')
    assert main(["train", str(config), f"run_dir={run}", "train.steps=6"]) == 0
    out = capsys.readouterr().out
    assert f"warning: dropped the torn last line of {metrics}" in out, out
    assert [r["step"] for r in logger.read_rows(run)] == [2, 4, 6]


def test_an_invalid_metrics_line_before_the_last_names_the_file_and_line(trained, tmp_path, data_dir, capsys):
    config, run = run_copy(trained, tmp_path, data_dir)
    metrics = run / "metrics.jsonl"
    first, *rest = metrics.read_text().splitlines()
    metrics.write_text("\n".join([first, "{not json", *rest]) + "\n")
    before = snapshot(run)
    assert main(["train", str(config), f"run_dir={run}", "train.steps=6"]) == 2
    err = one_line_error(capsys)
    assert f"{metrics}:2 is not a JSON row" in err, err
    assert snapshot(run) == before


def test_metrics_are_strict_json_with_non_finite_values_flagged(tmp_path, data_dir, monkeypatch):
    """Every loss NaN (every step skipped): each row parses as strict JSON (NaN and
    Infinity rejected), the NaNs are null and listed under "nonfinite", and read back as NaN."""
    from train.tasks import LanguageModelling

    def nan_loss(*args, **kwargs):
        loss, aux = lm_loss(*args, **kwargs)
        return loss * math.nan, aux

    lm_loss = LanguageModelling.loss
    monkeypatch.setattr(LanguageModelling, "loss", staticmethod(nan_loss))
    config = load(write_config(tmp_path, data_dir), tmp_path / "run", "train.steps=2", "train.log_every=1",
                  "train.max_consecutive_skips=0", "checkpoint.every=0")
    loop.train(config, say=lambda _: None)

    def reject(constant):
        raise AssertionError(f"{constant} in metrics.jsonl")

    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=reject) for line in lines]
    assert len(rows) == 2 and all(r["loss"] is None and "loss" in r["nonfinite"] for r in rows), rows
    assert all(math.isnan(r["loss"]) and "nonfinite" not in r for r in logger.read_rows(tmp_path / "run"))


def test_eval_prints_four_significant_digits_whatever_the_size(tmp_path, data_dir, capsys, monkeypatch):
    """A perplexity of e^50 used to print with 22 digits (:.4f)."""
    fake = type("Trained", (), {"step": 4})()
    monkeypatch.setattr(evaluation, "load_model", lambda config: fake)
    monkeypatch.setattr(evaluation, "evaluate_trained",
                        lambda trained: {"loss": 50.0, "perplexity": math.exp(50.0), "bits_per_byte": 0.000123456})
    assert main(["eval", str(write_config(tmp_path, data_dir))]) == 0
    assert capsys.readouterr().out.strip() == "eval at step 4: loss 50 perplexity 5.185e+21 bits_per_byte 0.0001235"


def test_a_resume_with_nothing_left_to_do_says_so(trained, tmp_path, data_dir, capsys):
    """Before: "finished at step 4: " and nothing after it."""
    config, run = run_copy(trained, tmp_path, data_dir)
    assert main(["train", str(config), f"run_dir={run}"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "run already at step 4 (train.steps=4): nothing to do; raise train.steps to train further"


def test_a_held_run_directory_is_refused_before_jax_loads(tmp_path):
    """The lock names this (live) test process: the second command stops with the "in use"
    line, and jax never entered its interpreter (before, everything loaded first)."""
    import socket

    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                     "started": "-"}))
    config = write_config(tmp_path, tmp_path / "data")
    code = ("import sys, train.__main__ as m; "
            f"rc = m.main(['train', {str(config)!r}, 'run_dir={run}']); print(rc, 'jax' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["2", "False"], (out.stdout, out.stderr)
    assert f"run directory {run} is in use by pid {os.getpid()}" in out.stderr and out.stderr.count("\n") == 1
