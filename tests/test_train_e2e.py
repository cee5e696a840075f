"""The training application end to end: CLI, kill-and-resume, corrupt checkpoints, fine-tuning.

One 8-step fp8 run is trained from the command line once for the module (`fp8_run`): the CLI
test evaluates, samples and resumes it, the fp8 kill/resume test takes it as the
uninterrupted run, the corrupt-checkpoint test damages a copy of it and the mesh test
compares its losses. Each command is a fresh process (imports, then compiles or loads from
the session's compilation cache), so every run that is not trained again saves one.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from train.__main__ import main
from train.config import load_config
from train.evaluation import load_trained

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}

TINY = """
name: tiny
precision: {precision}
model: {{d_model: 32, num_heads: 2, num_layers: 1, d_ff: 64, max_len: 32}}
optim: {{lr: 3.0e-3, warmup_steps: 2}}
data: {{task: lm, seq_len: 32, batch_size: 8, data_dir: {data_dir}}}
train: {{steps: 8, log_every: 1, eval_every: 4, eval_batches: 2{train}}}
checkpoint: {{every: 2, keep: 3, async_save: true}}
logging: {{tensorboard: true, progress: false}}
"""
# The shared fp8 run switches to the lean program after step 0, as long runs do (a run this
# short would otherwise keep the first step's program throughout): its kill/resume case
# pins that a resumed run chooses the program the uninterrupted one ran.
LEAN = "fp8_lean_min_steps: 0"


def write_config(tmp_path, name="tiny.yaml", precision="fp8", train="") -> pathlib.Path:
    """``TINY`` in ``tmp_path``; ``train``: more keys of the train section (e.g. ``LEAN``)."""
    text = TINY.format(precision=precision, data_dir=tmp_path / "data", train=f", {train}" if train else "")
    path = tmp_path / name
    path.write_text(text)
    return path


def cli(*args, cwd, check=True, env=ENV) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "train", *map(str, args)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"train {args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def losses(run_dir: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())


def final_state(config_path, run_dir, *overrides):
    """``(step, leaves, state)`` of a run's newest checkpoint: every leaf as a numpy array (the
    RNG key as its data), and the restored state for further checks."""
    trained = load_trained(load_config(config_path, [f"run_dir={run_dir}", *overrides]), say=lambda _: None)
    state = trained.state.replace(rng=jax.random.key_data(trained.state.rng))
    return trained.step, [np.asarray(x) for x in jax.tree.leaves(state)], trained.state


@pytest.fixture(scope="module")
def fp8_run(tmp_path_factory):
    """``(work dir, config, run dir, stdout)`` of the module's 8-step fp8 run (``LEAN``),
    trained by ``python -m train train``. No test changes it: they read it, resume it with
    nothing left to do, or copy it."""
    work = tmp_path_factory.mktemp("fp8_run")
    config = write_config(work, train=LEAN)
    out = cli("train", config, "run_dir=runs/whole", cwd=work)
    return work, config, work / "runs" / "whole", out.stdout


def test_cli_train_eval_generate(fp8_run):
    work, config, run, stdout = fp8_run
    assert "unigram baseline on the validation split" in stdout
    assert "finished at step 8" in stdout
    assert checkpoint_steps(run) == [4, 6, 8]
    assert sorted(losses(run)) == list(range(1, 9))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    ev = cli("eval", config, f"run_dir={run}", cwd=work)
    assert "eval at step 8: loss" in ev.stdout
    # The cached sampler (an int8 cache): 40 tokens in the model's 32-token window (it shifts),
    # streamed, every sampling flag; the text after the prompt ends before the first stop string.
    gen = cli("generate", config, f"run_dir={run}", "--prompt", "ROMEO", "--tokens", "40", "--seed", "1",
              "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.2", "--stop", "\n\n", "--stop", "zz",
              "--int8-cache", cwd=work)
    assert gen.stdout.startswith("ROMEO") and len(gen.stdout.rstrip("\n")) >= len("ROMEO")
    assert "\n\n" not in gen.stdout[len("ROMEO"):].rstrip("\n") and "zz" not in gen.stdout[len("ROMEO"):]
    assert re.search(r"^\d+ tokens in [\d.]+ s: ([\d.]+ tokens/s after the first two|too few)", gen.stderr, re.M), gen.stderr
    # Training again with the same run dir resumes at the end and has nothing left to do.
    again = cli("train", config, f"run_dir={run}", cwd=work)
    assert "resumed from checkpoint at step 8" in again.stdout


# CONFIG KILL_AT WHOLE CUT [key=value ...]: the run in CUT killed (SIGKILL, no clean exit)
# right after step KILL_AT; first, unless WHOLE is "-", the same run in WHOLE trained to its
# end, uninterrupted (train.loop.train, as python -m train train runs it): one process for
# both saves an interpreter start and the imports.
KILL = textwrap.dedent("""
    import os, signal, sys
    from train.config import load_config
    from train.loop import train
    path, kill_at, whole, cut, *overrides = sys.argv[1:]
    if whole != "-":
        train(load_config(path, [f"run_dir={whole}", *overrides]))
    def on_step(step, state):
        if step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
    train(load_config(path, [f"run_dir={cut}", *overrides]), on_step=on_step)
""")


SCANNED = ("model.scan_layers=true", "model.remat=true", "model.num_layers=2")
FP16 = "{preset: fp16, loss_scale: {kind: dynamic, initial: 1024, period: 2}}"


@pytest.mark.parametrize(
    "precision, overrides",
    # fp8: the module's run (lean program after step 0). The scanned run keeps the first
    # step's program throughout (one compile of the slowest program of the module).
    [("fp8", ()), (FP16, ()), ("fp8", SCANNED)],
    ids=["fp8", "fp16-dynamic", "fp8-scanned-remat"],
)
def test_killed_run_resumes_bit_identically(tmp_path, request, precision, overrides):
    """SIGKILL right after step 5 (no clean exit; the async step-4 save may still be in
    flight, so the newest complete checkpoint is step 4 or step 2), then resume: params,
    optimizer state, FP8 meta, loss scale and RNG at step 8 are bit-identical to an
    uninterrupted run, and so are the losses of every step after the resume point. The
    scanned case also pins that every layer keeps its own, moving FP8 meta."""
    cut = tmp_path / "runs" / "cut"
    if precision == "fp8" and not overrides:  # the uninterrupted run: the module's
        _, config, whole, _ = request.getfixturevalue("fp8_run")
        train_whole = "-"
    else:  # trained to its end by the killed process, before the run it kills
        config, whole = write_config(tmp_path, precision=precision), tmp_path / "runs" / "whole"
        train_whole = whole
    killed = subprocess.run([sys.executable, "-c", KILL, str(config), "5", str(train_whole), str(cut), *overrides],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert checkpoint_steps(whole)[-1] == 8 and sorted(losses(whole)) == list(range(1, 9))
    resume_at = max(checkpoint_steps(cut))
    assert resume_at in (2, 4)
    out = cli("train", config, f"run_dir={cut}", *overrides, cwd=tmp_path)
    assert f"resumed from checkpoint at step {resume_at}" in out.stdout

    whole_step, expected, _ = final_state(config, whole, *overrides)
    cut_step, resumed, state = final_state(config, cut, *overrides)
    assert whole_step == cut_step == 8
    assert len(expected) == len(resumed)
    for a, b in zip(expected, resumed):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    ref, got = losses(whole), losses(cut)
    assert [got[s] for s in range(resume_at + 1, 9)] == [ref[s] for s in range(resume_at + 1, 9)]
    if "fp16" in precision:
        assert float(state.loss_scale.loss_scale) > 1024  # grew every 2 finite steps: the state mattered
    if "model.scan_layers=true" in overrides:
        from mpx.inspect import fp8_stats

        stats = fp8_stats(state.fp8_meta)
        assert {s.path for s in stats} >= {"blocks/mlp/fc[0]", "blocks/mlp/fc[1]", "blocks/attn/qkv[1]"}
        layer0, layer1 = ({(s.path.split("[")[0], s.tensor): s.scale for s in stats if s.path.endswith(f"[{i}]")}
                          for i in (0, 1))
        assert layer0 != layer1 and all(v != 1.0 for v in layer0.values())


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, fp8_run):
    work, config, whole, _ = fp8_run
    run = tmp_path / "runs" / "c"
    shutil.copytree(whole, run)  # the module's run, a copy of it to damage
    latest = run / "checkpoints" / "8" / "state"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f) and f.parent.name == "d":
            # Truncated data files, to nothing: with half of each file kept, every array that
            # eval's model-only load reads (params, FP8 meta) can lie in the halves kept, and
            # whether they do depends on the order of the save's writes.
            f.write_bytes(b"")
    said = []
    trained = load_trained(load_config(config, [f"run_dir={run}"]), say=said.append)
    assert trained.step == 6
    assert any("step 8" in s and "is corrupt" in s and "falling back" in s for s in said), said
    out = cli("eval", config, f"run_dir={run}", cwd=tmp_path)
    assert "eval at step 6" in out.stdout and "falling back" in out.stdout


def test_missing_checkpoint_dir_is_a_clear_error(tmp_path):
    config = write_config(tmp_path)
    out = cli("eval", config, "run_dir=runs/none", cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert "no checkpoint in" in out.stderr and "train first" in out.stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.d_model=31", r"model.d_model \(31\) must be divisible by model.num_heads \(2\)"),
        ("optim.lrr=1", r"optim.lrr: unknown key.*did you mean 'lr'"),
        ("train.steps=abc", r"train.steps: expected an integer, got 'abc'"),
        ("data.seq_len=64", r"data.seq_len \(64\) must be <= model.max_len \(32\)"),
        ("precision=fp9", r"precision: unknown policy preset 'fp9'"),
        ("trainsteps", r"override 'trainsteps' is not key=value"),
    ],
)
def test_bad_config_on_the_command_line(tmp_path, monkeypatch, capsys, override, message):
    """The command line's own entry point (``python -m train`` calls ``main`` with its argv and
    exits with what it returns; the exit status of the process itself is pinned by
    `test_missing_checkpoint_dir_is_a_clear_error`), in this process: a fresh interpreter
    per bad override only repeated the imports."""
    config = write_config(tmp_path)
    monkeypatch.chdir(tmp_path)  # the config's run_dir (runs/tiny) is relative to the working directory
    assert main(["train", str(config), override]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_help_is_useful():
    out = subprocess.run([sys.executable, "-m", "train", "generate", "-h"], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("--temperature", "--top-k", "--top-p", "--repetition-penalty", "--stop", "--int8-cache", "--prompt",
                 "key=value"):
        assert word in out.stdout


def test_data_parallel_and_fsdp_mesh_on_8_simulated_devices(tmp_path, fp8_run):
    """The module's run on 8 CPU devices (mesh 4 x 2: batch over both axes, params split over
    fsdp) for 4 steps, under the 8-step run's learning-rate schedule (optim.decay_steps=8):
    the losses of the run's first 4 steps on one device, up to reduction order (measured
    differences <= 2e-3 nats; bound 1e-2); the 8-device checkpoint then resumes on one
    device (restore against the new, unsharded layout)."""
    _, config, single, _ = fp8_run
    mesh, schedule = tmp_path / "runs" / "mesh", "optim.decay_steps=8"
    eight = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    cli("train", config, f"run_dir={mesh}", "train.steps=4", schedule, "mesh.data=4", "mesh.fsdp=2", cwd=tmp_path,
        env=eight)
    sharded, reference = losses(mesh), losses(single)
    assert sorted(sharded) == [1, 2, 3, 4]
    for step in sharded:
        assert abs(sharded[step] - reference[step]) < 1e-2, (step, sharded[step], reference[step])
    resumed = cli("train", config, f"run_dir={mesh}", "train.steps=6", schedule, cwd=tmp_path)
    assert "resumed from checkpoint at step 4" in resumed.stdout and "finished at step 6" in resumed.stdout
