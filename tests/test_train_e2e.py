"""The training application end to end: CLI, kill-and-resume, corrupt checkpoints, fine-tuning."""

import json
import os
import re
import pathlib
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

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
train: {{steps: 8, log_every: 1, eval_every: 4, eval_batches: 2}}
checkpoint: {{every: 2, keep: 3, async_save: true}}
logging: {{tensorboard: true, progress: false}}
"""


def write_config(tmp_path, name="tiny.yaml", precision="fp8", **fields) -> pathlib.Path:
    text = TINY.format(precision=precision, data_dir=tmp_path / "data")
    path = tmp_path / name
    path.write_text(text)
    return path


def cli(*args, cwd, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "train", *map(str, args)], cwd=cwd, env=ENV,
                         capture_output=True, text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"train {args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def losses(run_dir: pathlib.Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["split"] == "train"}


def final_leaves(config_path, run_dir, *overrides):
    trained = load_trained(load_config(config_path, [f"run_dir={run_dir}", *overrides]), say=lambda _: None)
    state = trained.state.replace(rng=jax.random.key_data(trained.state.rng))
    return trained.step, [np.asarray(x) for x in jax.tree.leaves(state)]


def test_cli_train_eval_generate(tmp_path):
    config = write_config(tmp_path)
    out = cli("train", config, "run_dir=runs/a", cwd=tmp_path)
    assert "unigram baseline on the validation split" in out.stdout
    assert "finished at step 8" in out.stdout
    run = tmp_path / "runs" / "a"
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == [4, 6, 8]
    assert sorted(losses(run)) == list(range(1, 9))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    ev = cli("eval", config, "run_dir=runs/a", cwd=tmp_path)
    assert "eval at step 8: loss" in ev.stdout
    # The cached sampler (an int8 cache): 40 tokens in the model's 32-token window (it shifts),
    # streamed, every sampling flag; the text after the prompt ends before the first stop string.
    gen = cli("generate", config, "run_dir=runs/a", "--prompt", "ROMEO", "--tokens", "40", "--seed", "1",
              "--top-k", "20", "--top-p", "0.9", "--repetition-penalty", "1.2", "--stop", "\n\n", "--stop", "zz",
              "--int8-cache", cwd=tmp_path)
    assert gen.stdout.startswith("ROMEO") and len(gen.stdout.rstrip("\n")) >= len("ROMEO")
    assert "\n\n" not in gen.stdout[len("ROMEO"):].rstrip("\n") and "zz" not in gen.stdout[len("ROMEO"):]
    assert re.search(r"^\d+ tokens in [\d.]+ s: ([\d.]+ tokens/s after the first two|too few)", gen.stderr, re.M), gen.stderr
    # Training again with the same run dir resumes at the end and has nothing left to do.
    again = cli("train", config, "run_dir=runs/a", cwd=tmp_path)
    assert "resumed from checkpoint at step 8" in again.stdout


KILL = textwrap.dedent("""
    import os, signal, sys
    from train.config import load_config
    from train.loop import train
    config = load_config(sys.argv[1], sys.argv[3:])
    kill_at = int(sys.argv[2])
    def on_step(step, state):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    train(config, on_step=on_step)
""")


SCANNED = ("model.scan_layers=true", "model.remat=true", "model.num_layers=2")
LEAN = "train.fp8_lean_min_steps=0"


@pytest.mark.parametrize(
    "precision, overrides",
    # The plain FP8 run switches to the lean program after step 0 (as long runs do): a resumed
    # run must choose the program the uninterrupted one ran.
    [("fp8", (LEAN,)), ("{preset: fp16, loss_scale: {kind: dynamic, initial: 1024, period: 2}}", ()),
     ("fp8", SCANNED)],
    ids=["fp8", "fp16-dynamic", "fp8-scanned-remat"],
)
def test_killed_run_resumes_bit_identically(tmp_path, precision, overrides):
    """SIGKILL right after step 5 (no clean exit; the async step-4 save may still be in
    flight, so the newest complete checkpoint is step 4 or step 2), then resume: params,
    optimizer state, FP8 meta, loss scale and RNG at step 8 are bit-identical to an
    uninterrupted run, and so are the losses of every step after the resume point. The
    scanned case also pins that every layer keeps its own, moving FP8 meta."""
    config = write_config(tmp_path, precision=precision)
    cli("train", config, "run_dir=runs/whole", *overrides, cwd=tmp_path)

    killed = subprocess.run([sys.executable, "-c", KILL, str(config), "5", "run_dir=runs/cut", *overrides],
                            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    cut = tmp_path / "runs" / "cut"
    resume_at = max(int(p.name) for p in (cut / "checkpoints").iterdir() if p.name.isdigit())
    assert resume_at in (2, 4)
    out = cli("train", config, "run_dir=runs/cut", *overrides, cwd=tmp_path)
    assert f"resumed from checkpoint at step {resume_at}" in out.stdout

    whole_step, whole = final_leaves(config, tmp_path / "runs" / "whole", *overrides)
    cut_step, resumed = final_leaves(config, cut, *overrides)
    assert whole_step == cut_step == 8
    assert len(whole) == len(resumed)
    for a, b in zip(whole, resumed):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    ref, got = losses(tmp_path / "runs" / "whole"), losses(cut)
    assert [got[s] for s in range(resume_at + 1, 9)] == [ref[s] for s in range(resume_at + 1, 9)]
    state = load_trained(load_config(config, [f"run_dir={cut}", *overrides]), say=lambda _: None).state
    if "fp16" in precision:
        assert float(state.loss_scale.loss_scale) > 1024  # grew every 2 finite steps: the state mattered
    if "model.scan_layers=true" in overrides:
        from mpx.inspect import fp8_stats

        stats = fp8_stats(state.fp8_meta)
        assert {s.path for s in stats} >= {"blocks/mlp/fc[0]", "blocks/mlp/fc[1]", "blocks/attn/qkv[1]"}
        layer0, layer1 = ({(s.path.split("[")[0], s.tensor): s.scale for s in stats if s.path.endswith(f"[{i}]")}
                          for i in (0, 1))
        assert layer0 != layer1 and all(v != 1.0 for v in layer0.values())


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    config = write_config(tmp_path)
    cli("train", config, "run_dir=runs/c", cwd=tmp_path)
    latest = tmp_path / "runs" / "c" / "checkpoints" / "8" / "state"
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f) and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated data files
    said = []
    trained = load_trained(load_config(config, [f"run_dir={tmp_path / 'runs' / 'c'}"]), say=said.append)
    assert trained.step == 6
    assert any("step 8" in s and "is corrupt" in s and "falling back" in s for s in said), said
    out = cli("eval", config, "run_dir=runs/c", cwd=tmp_path)
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
def test_bad_config_on_the_command_line(tmp_path, override, message):
    config = write_config(tmp_path)
    out = cli("train", config, override, cwd=tmp_path, check=False)
    assert out.returncode == 2
    assert re.search(message, out.stderr), out.stderr
    assert not (tmp_path / "runs").exists()  # nothing started


def test_help_is_useful():
    out = subprocess.run([sys.executable, "-m", "train", "generate", "-h"], env=ENV, capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("--temperature", "--top-k", "--top-p", "--repetition-penalty", "--stop", "--int8-cache", "--prompt",
                 "key=value"):
        assert word in out.stdout


def test_data_parallel_and_fsdp_mesh_on_8_simulated_devices(tmp_path):
    """The same 4 steps on 8 CPU devices (mesh 4 x 2: batch over both axes, params split
    over fsdp) and on one device give the same losses up to reduction order (measured
    differences <= 1e-3 nats; bound 1e-2); the 8-device checkpoint then resumes on one
    device (restore against the new, unsharded layout)."""
    config = write_config(tmp_path)
    eight = {**ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-m", "train", "train", str(config), "run_dir=runs/mesh", "train.steps=4",
                          "mesh.data=4", "mesh.fsdp=2"], cwd=tmp_path, env=eight, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    cli("train", config, "run_dir=runs/one", "train.steps=4", cwd=tmp_path)
    sharded, single = losses(tmp_path / "runs" / "mesh"), losses(tmp_path / "runs" / "one")
    assert sorted(sharded) == [1, 2, 3, 4]
    for step in sharded:
        assert abs(sharded[step] - single[step]) < 1e-2, (step, sharded[step], single[step])
    resumed = cli("train", config, "run_dir=runs/mesh", "train.steps=6", cwd=tmp_path)
    assert "resumed from checkpoint at step 4" in resumed.stdout and "finished at step 6" in resumed.stdout
