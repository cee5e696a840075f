"""A run never destroys its own checkpoints: a changed config on resume is an error
before anything is restored, a diverged run stops, non-finite state is never saved, and
checkpoints that cannot be restored are an error, not a fresh start."""

import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import mpx
import train.loop as loop
from train import evaluation
from train.build import build
from train.tasks import LanguageModelling, majority_baseline
from train import identity
from train.checkpoint import Checkpointer, RestoreError
from train.config import load_config
from train import rundir

from helpers import tiny_lm_run



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("data")


def config_for(tmp_path, data_dir, *overrides):
    (tmp_path / "run.yaml").write_text(tiny_lm_run("safety", data_dir))
    return load_config(tmp_path / "run.yaml", [f"run_dir={tmp_path / 'run'}", *overrides])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir) -> pathlib.Path:
    """The run of `config_for` with no overrides (4 steps, checkpoints 2 and 4), trained once
    for the module; the tests that start from it take a copy (`trained_copy`)."""
    config = config_for(tmp_path_factory.mktemp("trained"), data_dir)
    loop.train(config, say=lambda _: None)
    return pathlib.Path(config.run_dir)


def trained_copy(trained, tmp_path, data_dir, *overrides):
    """`config_for(tmp_path, data_dir, *overrides)` whose run directory is a copy of the
    module's trained run: the state a test that trained that run itself would have."""
    config = config_for(tmp_path, data_dir, *overrides)
    shutil.copytree(trained, config.run_dir)
    return config


def snapshot(run_dir: pathlib.Path) -> dict:
    """Every file under the run's checkpoints with its bytes: what must survive untouched."""
    root = run_dir / "checkpoints"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resuming_with_a_changed_model_is_an_error_that_touches_nothing(tmp_path, data_dir):
    """Also the 8bit preset: the run records the format it resolved to on this CPU (fp8), and
    the same config resolved for a chip whose 8-bit format is int8 (a TPU v5e) is another run."""
    config = config_for(tmp_path, data_dir, "precision=8bit")
    loop.train(config, say=lambda _: None)
    run = pathlib.Path(config.run_dir)
    before, recorded = snapshot(run), (run / rundir.CONFIG_FILE).read_text()
    assert rundir.saved_config(run) == config.resolved().to_dict() and rundir.saved_config(run)["precision"] == "fp8"
    on_v5e = config_for(tmp_path, data_dir, "precision=8bit", "train.steps=6").resolved("v5e")
    for changed in (["model.d_model=64"], ["precision=bf16"], on_v5e):
        with pytest.raises(identity.ConfigMismatch) as err:
            loop.train(changed if changed is on_v5e else config_for(tmp_path, data_dir, *changed, "train.steps=6"),
                       say=lambda _: None)
        key = "precision" if changed is on_v5e else changed[0].split("=")[0]
        assert f"{key}: " in str(err.value) and "new name" in str(err.value)
        assert "train.steps: " not in str(err.value)  # a harmless key is not listed as a difference
        assert snapshot(run) == before and (run / rundir.CONFIG_FILE).read_text() == recorded
    assert "precision: 'fp8' (the run) -> 'int8; int8.backward=int8' (now)" in str(err.value)


def test_a_run_saved_before_a_model_key_existed_is_the_same_run():
    """A run's config.yaml written before model.layout, num_kv_heads, rope_base and norm_eps
    existed resumes and evaluates as the gpt2 run it was; a key it lacks that is set to
    something else now is a difference."""
    current = load_config(pathlib.Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    saved = current.to_dict()
    saved["model"] = {k: v for k, v in saved["model"].items()
                      if k not in ("layout", "num_kv_heads", "rope_base", "norm_eps")}
    said: list[str] = []
    assert identity.check_resume(saved, current.to_dict(), run_dir="runs/old", say=said.append) == {}
    assert said == []
    assert identity.for_evaluation(saved, current, say=said.append) == current and said == []
    llama = {**current.to_dict(), "model": {**current.to_dict()["model"], "layout": "llama"}}
    assert identity.differences(saved, llama) == {"model.layout": ("gpt2", "llama")}


def test_resuming_with_harmless_changes_continues_and_says_so(tmp_path, data_dir, trained):
    trained_copy(trained, tmp_path, data_dir)
    said: list[str] = []
    out = loop.train(config_for(tmp_path, data_dir, "train.steps=6", "train.log_every=3"), say=said.append)
    assert out["step"] == 6
    assert "resuming with train.steps = 6 (the run had 4)" in said
    assert any(line.startswith("resumed from checkpoint at step 4") for line in said)


def test_a_run_skipped_from_its_first_step_stops_and_keeps_no_checkpoint(tmp_path, data_dir, monkeypatch):
    """Every loss NaN: each step is skipped. With max_consecutive_skips=3 the check at step 2
    (2 in a row) lets the step-2 save happen; the check at step 4 finds 4 in a row, from
    step 1 on: the state every step went bad from is the initial one, so the step-2
    checkpoint (that same state) is moved to diverged/, none is left, and the message says
    to start again rather than resume."""
    def nan_loss(*args, **kwargs):
        loss, aux = lm_loss(*args, **kwargs)
        return loss * jnp.nan, aux

    lm_loss = LanguageModelling.loss
    monkeypatch.setattr(LanguageModelling, "loss", staticmethod(nan_loss))
    config = config_for(tmp_path, data_dir, "train.max_consecutive_skips=3", "train.steps=8")
    with pytest.raises(loop.Diverged, match=r"the last 4 steps \(from step 1 to 4\) were all skipped.*checkpoint of "
                                            r"step 2, saved from step 0 on \(step 1 went bad from the state of step 0\), "
                                            r"was moved to .*/diverged\. No good checkpoint is left: start "
                                            r"the run again with a lower learning rate, e.g. python -m train train "
                                            r"CONFIG optim.lr=0.0003"):
        loop.train(config, say=lambda _: None)
    run = pathlib.Path(config.run_dir)
    assert not any(p.name.isdigit() for p in (run / "checkpoints").iterdir())
    assert [p.name.split("-")[0] for p in (run / "diverged").iterdir()] == ["2"]


def test_an_exploding_finite_loss_stops_the_run_before_saving(tmp_path, data_dir, monkeypatch):
    """A finite loss of 100 nats is far above 2 x ln(256) = 11.09, what guessing uniformly
    over the byte vocabulary scores, from step 1 on: the running average, starting at
    ln(256), is 0.9 x 5.545 + 0.1 x 100 = 14.99 after step 1, past the ceiling at once; the
    run stops at its first check (the log step and save of step 2) naming step 1, and the
    step-2 checkpoint is never written."""
    def exploding(*args, **kwargs):
        loss, aux = lm_loss(*args, **kwargs)
        return loss * 0 + 100.0, aux

    lm_loss = LanguageModelling.loss
    monkeypatch.setattr(LanguageModelling, "loss", staticmethod(exploding))
    config = config_for(tmp_path, data_dir, "train.steps=8")
    with pytest.raises(loop.Diverged, match=r"exploded: its training loss went above train.max_loss_ratio=2 x "
                                            r"the loss of uniform guessing \(11.09\) at step 1 and stayed there, "
                                            r"its running average reaching 14.99 at step 1; stopped. No good "
                                            r"checkpoint is left"):
        loop.train(config, say=lambda _: None)
    assert not (pathlib.Path(config.run_dir) / "checkpoints" / "2").exists()
    # Turned off, the same run goes to its end.
    out = loop.train(config_for(tmp_path, data_dir, "train.steps=2", "train.max_loss_ratio=0",
                                f"run_dir={tmp_path / 'off'}"), say=lambda _: None)
    assert out["step"] == 2 and out["loss"] == 100.0


def _leaves(tree):
    import jax

    return [jnp.asarray(x, jnp.float32) for x in jax.tree.leaves(tree)]


def test_non_finite_params_are_never_saved(tmp_path, data_dir):
    config = config_for(tmp_path, data_dir)
    state = build(config, say=lambda _: None).state
    import jax

    poisoned = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
    checkpointer = Checkpointer(tmp_path / "run", every=1, keep=2, async_save=False)
    try:
        assert checkpointer.save(1, state, data_state={}, config={}) is True
        assert checkpointer.save(2, poisoned, data_state={}, config={}, force=True) is False
        assert checkpointer.steps() == [1]
    finally:
        checkpointer.close()


def test_checkpoints_that_cannot_be_restored_are_an_error_not_a_fresh_start(tmp_path, data_dir, trained):
    """A run directory from before config.yaml (so the config check cannot run first) with
    a changed model: every checkpoint is incompatible; the run says so and stops, and the
    checkpoints are still there."""
    run = pathlib.Path(trained_copy(trained, tmp_path, data_dir).run_dir)
    (run / rundir.CONFIG_FILE).unlink()
    before = snapshot(run)
    with pytest.raises(RestoreError, match=r"(?s)step 4: incompatible.*step 2: incompatible"):
        loop.train(config_for(tmp_path, data_dir, "model.d_model=64"), say=lambda _: None)
    assert snapshot(run) == before


def test_a_run_directory_is_locked_while_a_run_trains(tmp_path, data_dir):
    """A second train in the same directory while the first runs is an error naming the
    owner; the lock of a process that is gone is taken over; the lock is released after."""
    import json
    import os
    import socket
    import subprocess
    import sys

    config = config_for(tmp_path, data_dir)
    run = pathlib.Path(config.run_dir)
    seen: list = []

    def on_step(step, state):
        if step == 1:
            owner = json.loads((run / rundir.LOCK_FILE).read_text())
            seen.append(owner["pid"] == os.getpid())
            with pytest.raises(rundir.RunDirectoryInUse, match=rf"in use by pid {os.getpid()}.*delete"):
                loop.train(config, say=lambda _: None)

    loop.train(config, say=lambda _: None, on_step=on_step)
    assert seen == [True] and not (run / rundir.LOCK_FILE).exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # a process that has exited
    (run / rundir.LOCK_FILE).write_text(json.dumps({"pid": dead_pid, "host": socket.gethostname(), "started": "-"}))
    said: list[str] = []
    loop.train(config_for(tmp_path, data_dir, "train.steps=6"), say=said.append)
    assert any("taking over the stale lock" in line and str(dead_pid) in line for line in said), said


def test_start_of_run_reports_precisions_and_a_rule_that_matches_nothing(tmp_path, data_dir):
    """A typo in a rule's path ('block/*' for 'blocks/*') would leave those ops in the
    default precision: the run says so at the start, and --strict refuses to train."""
    said: list[str] = []
    typo = "precision=fp8; block/*/mlp/*->fp32"
    loop.train(config_for(tmp_path, data_dir, typo), say=said.append)
    assert any(line.startswith("precision ") and "fp8 " in line for line in said), said
    assert any("warning: policy rule 'block/*/mlp/*->fp32' matches no op" in line for line in said), said
    from train.schema import ConfigError

    with pytest.raises(ConfigError, match="block/\\*/mlp/\\*->fp32.*--strict"):
        loop.train(config_for(tmp_path, data_dir, typo, f"run_dir={tmp_path / 'strict'}"), say=lambda _: None,
                   strict=True)


def test_start_of_run_warns_of_an_8bit_format_the_chip_only_widens(tmp_path, data_dir):
    """The fp8 preset on a TPU v5e (int8 matrix units): the start of the run says the fp8 ops
    run widened and names the chip's format; the format 8bit resolves to there, no warning."""
    config = config_for(tmp_path, data_dir)
    model = build(config, say=lambda _: None).model()
    said: list[str] = []
    loop.precision_report(model, mpx.parse_policy("fp8"), "fp8", say=said.append, strict=False, device="v5e")
    assert [line for line in said if line.startswith("warning: ")] == [
        "warning: 4 ops run in fp8, which v5e's matrix units do not multiply in 8 bits: they run widened, slower "
        "than bf16 on a TPU; v5e has int8 (precision '8bit' picks it)"]
    said.clear()
    loop.precision_report(model, mpx.parse_policy("8bit", device="v5e"), "8bit", say=said.append, strict=False,
                          device="v5e")
    assert said == ["precision 8bit: bf16 5, fp32 5, int8 (int8 bwd) 4 ops"]


def test_eval_on_other_text_uses_the_runs_config_and_tokenizer(tmp_path, data_dir):
    """A SentencePiece run evaluated on another text file, by a command whose config says
    byte-level: the run's own config and tokenizer are used (before, a tokenizer was
    rebuilt from the command, and the loss was worse than uniform), and it says so."""
    sp = ["data.tokenizer=sentencepiece", "data.vocab_size=400", "train.steps=2", "checkpoint.every=0"]
    config = config_for(tmp_path, data_dir, *sp)
    loop.train(config, say=lambda _: None)
    own = rundir.run_tokenizer(config.run_dir)
    assert own is not None and own.vocab_size == 400
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"Line {i}: to be, or not to be, that is the question." for i in range(400)))
    said: list[str] = []
    command = config_for(tmp_path, data_dir, "data.tokenizer=byte", f"data.files=[{other}]",
                         f"data.data_dir={tmp_path / 'other_data'}")
    trained = evaluation.load_trained(command, say=said.append)
    assert any(line.startswith("using the run's own") and "data.tokenizer" in line for line in said), said
    sample = "To be, or not to be"
    assert trained.task.tokenizer.vocab_size == 400
    assert trained.task.tokenizer.encode(sample) == own.encode(sample)
    assert list(trained.config.data.files) == [str(other)]  # the text comes from the command
    out = evaluation.evaluate_trained(trained)
    assert np.isfinite(out["loss"]) and out["loss"] < np.log(400) + 1.0  # not worse than near-uniform


def test_a_damaged_newest_checkpoint_is_set_aside_and_its_step_saved_again(tmp_path, data_dir, trained):
    """Steps 2 and 4 saved, step 4's data truncated: the resumed run restores step 2,
    moves step 4 to damaged/ (kept, out of the way), trains steps 3-4 again and saves a
    step 4 that reads back, so eval and the run agree on the newest step."""
    config = trained_copy(trained, tmp_path, data_dir)
    run = pathlib.Path(config.run_dir)
    for f in (run / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f) and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated data files
    said: list[str] = []
    out = loop.train(config, say=said.append)
    assert out["step"] == 4
    assert any("step 4" in line and "is corrupt" in line for line in said), said
    assert [p.name.split("-")[0] for p in (run / "damaged").iterdir()] == ["4"]
    trained = evaluation.load_trained(config, say=said.append)
    assert trained.step == 4


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
    (["--tokens", "0"], "--tokens must be >= 1"),
    (["--top-k", "-3"], "--top-k must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be a number > 0"),
    (["--repetition-penalty", "nan"], "--repetition-penalty must be a number > 0"),
    (["--stop", "\n", "--stop", ""], "--stop must be a non-empty string"),
])
def test_bad_sampling_flags_are_clear_errors_before_anything_loads(tmp_path, data_dir, capsys, flags, message):
    from train.__main__ import main

    (tmp_path / "run.yaml").write_text(tiny_lm_run("safety", data_dir))
    assert main(["generate", str(tmp_path / "run.yaml"), f"run_dir={tmp_path / 'none'}", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err  # one line


def test_top_k_beyond_the_vocabulary_is_a_clear_error():
    from train.generate import check_sampling

    with pytest.raises(ValueError, match="--top-k 300 is larger than the vocabulary \\(256 tokens\\)"):
        check_sampling(new_tokens=5, temperature=1.0, top_k=300, vocab_size=256)
    check_sampling(new_tokens=5, temperature=0.0, top_k=256, vocab_size=256)  # the edge is fine


def test_a_validation_split_too_small_for_one_batch_is_found_before_training(tmp_path):
    from train.data import DataError

    text = tmp_path / "small.txt"
    text.write_text("\n\n".join(f"paragraph {i} of a short text" for i in range(40)) + "\n")
    config = config_for(tmp_path, tmp_path / "data", f"data.files=[{text}]", "train.eval_every=2")
    with pytest.raises(DataError, match="validation split gives no batch.*data.validation_fraction"):
        loop.train(config, say=lambda _: None)
    assert not pathlib.Path(config.run_dir).exists()  # a start refused leaves nothing: no config, no tokenizer


def test_a_resumed_run_keeps_its_skip_count_and_logs_each_step_once(tmp_path, data_dir, monkeypatch):
    """Batches whose first token is even give a NaN loss (skipped). A run stopped after
    step 4 whose last checkpoint is step 2 (the step-4 one removed, as if killed before it
    was written) resumes at 2: its metrics hold each step once, and its skip count at every
    logged step equals that of a run that never stopped."""
    import json

    def poisoned(*args, **kwargs):
        loss, aux = lm_loss(*args, **kwargs)
        tokens = args[3]["tokens"]
        return jnp.where(tokens[0, 0] % 2 == 0, jnp.nan, loss), aux

    lm_loss = LanguageModelling.loss
    monkeypatch.setattr(LanguageModelling, "loss", staticmethod(poisoned))
    overrides = ["train.log_every=1", "train.steps=6", "train.max_consecutive_skips=0"]

    def rows(run_dir):
        lines = (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["skipped"]) for r in map(json.loads, lines) if r["split"] == "train"]

    straight = config_for(tmp_path, data_dir, *overrides, f"run_dir={tmp_path / 'straight'}")
    loop.train(straight, say=lambda _: None)
    expected = rows(straight.run_dir)
    assert 0 < expected[-1][1] < 6, expected  # a mix of skipped and applied steps

    # The same run stopped after step 4 (its save of step 4 done, the way a kill after it
    # would find it; the same program as the straight run's: a run of other train.steps has
    # another learning-rate schedule, so another compile).
    class Stopped(Exception):
        pass

    def stop_after_4(step, state):
        if step == 4:
            raise Stopped

    stopped = config_for(tmp_path, data_dir, *overrides)
    with pytest.raises(Stopped):
        loop.train(stopped, say=lambda _: None, on_step=stop_after_4)
    assert [s for s, _ in rows(stopped.run_dir)] == [1, 2, 3, 4]
    shutil.rmtree(pathlib.Path(stopped.run_dir) / "checkpoints" / "4")
    loop.train(config_for(tmp_path, data_dir, *overrides), say=lambda _: None)
    assert rows(stopped.run_dir) == expected


def test_fine_tuning_a_deeper_model_from_a_shallower_run_is_an_error(tmp_path, data_dir):
    """The pre-training run has 1 layer, the fine-tuning model 2: the second block has no
    params in the checkpoint; before, it silently stayed random under "body params loaded"."""
    from train.checkpoint import restore_params

    pre = config_for(tmp_path, data_dir, "train.steps=2")
    loop.train(pre, say=lambda _: None)
    deeper = config_for(tmp_path, data_dir, "model.num_layers=2", f"run_dir={tmp_path / 'deeper'}")
    state = build(deeper, say=lambda _: None).state
    with pytest.raises(ValueError, match=r"has no params for blocks/1/.*model\.\* settings"):
        restore_params(pre.run_dir, state.params)
    same = build(pre, say=lambda _: None).state
    params, step = restore_params(pre.run_dir, same.params)  # the same shape restores
    assert step == 2


def test_majority_baseline_is_the_accuracy_of_the_most_frequent_validation_label():
    from types import SimpleNamespace

    prepared = SimpleNamespace(validation=[{"label": label} for label in [0, 1, 1, 2, 1, 0]])
    refs = {"majority_baseline": majority_baseline(prepared.validation)}
    assert refs == {"majority_baseline": 3 / 6}
    assert evaluation.with_references({"loss": 1.0, "accuracy": 0.7}, refs) == {
        "loss": 1.0, "accuracy": 0.7, "majority_baseline": 0.5}


def test_a_run_directory_that_cannot_be_written_is_a_clear_error(tmp_path, data_dir):
    """A run_dir below a file (no directory can be made there; as root, a read-only
    directory would still be writable, so this is the case a test can see): one line
    saying what and where, not a traceback."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    config = config_for(tmp_path, data_dir, f"run_dir={blocker / 'run'}")
    with pytest.raises(rundir.RunDirectoryInUse, match="cannot write to run directory .*not-a-directory/run"):
        loop.train(config, say=lambda _: None)


def test_export_writes_params_and_fp8_meta_readable_without_train(tmp_path, data_dir, trained):
    """The export is read back with orbax alone (no train/ code) and equals the run's
    newest state; the run's config and tokenizer are beside it; an existing directory is
    refused."""
    import orbax.checkpoint as ocp
    from flax import nnx

    config = trained_copy(trained, tmp_path, data_dir)
    trained = evaluation.load_trained(config, say=lambda _: None)
    out = evaluation.export_trained(trained, tmp_path / "export")
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(out / "state")
    expected = {"params": trained.state.params.to_pure_dict(),
                "fp8_meta": nnx.State(trained.state.fp8_meta).to_pure_dict()}
    import jax

    from mpx.policy import key_name

    def by_path(t):
        return {"/".join(key_name(k) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(t)[0]}

    got, want = by_path(tree), by_path(expected)
    assert got.keys() == want.keys() and len(got) > 0
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert (out / rundir.CONFIG_FILE).is_file() and (out / rundir.TOKENIZER_DIR).is_dir()
    with pytest.raises(ValueError, match="exists; give a new one"):
        evaluation.export_trained(trained, out)


def test_the_model_only_load_reads_the_same_params_meta_and_numbers_as_the_whole_state(tmp_path, data_dir):
    """eval, export, generate and quantize read only params and FP8 meta (`load_model`, no
    optimizer built); they are bit for bit the whole restore's, and so are the eval numbers
    and the exported files."""
    import jax
    import orbax.checkpoint as ocp

    config = config_for(tmp_path, data_dir, "train.steps=3", "checkpoint.every=2")
    loop.train(config, say=lambda _: None)
    whole = evaluation.load_trained(config, say=lambda _: None)
    light = evaluation.load_model(config, say=lambda _: None)
    assert light.step == whole.step == 3 and not hasattr(light.state, "opt_state")
    for part in ("params", "fp8_meta"):
        a, b = (jax.tree_util.tree_flatten_with_path(getattr(t.state, part)) for t in (whole, light))
        assert a[1] == b[1] and len(a[0]) > 0, part  # the same structure, Variables included
        assert all(x.dtype == y.dtype and np.array_equal(x, y) for (_, x), (_, y) in zip(a[0], b[0])), part
    assert evaluation.evaluate_trained(light) == evaluation.evaluate_trained(whole)
    outs = [evaluation.export_trained(t, tmp_path / name) for t, name in ((whole, "whole"), (light, "light"))]
    with ocp.StandardCheckpointer() as checkpointer:
        trees = [checkpointer.restore(out / "state") for out in outs]
    assert jax.tree.structure(trees[0]) == jax.tree.structure(trees[1])
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(trees[1])))


def test_a_failed_restore_drops_only_the_closed_event_loop_reports(monkeypatch):
    """The reports TensorStore's late callbacks make after orbax closed its loop (hundreds
    after one failed restore) are dropped; any other unraisable exception still reaches the
    previous hook."""
    import sys
    import types

    from train.checkpoint import ignore_closed_loop_callbacks

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    ignore_closed_loop_callbacks()
    ignore_closed_loop_callbacks()  # installed once, not stacked
    report = lambda e: types.SimpleNamespace(exc_value=e)  # noqa: E731
    sys.unraisablehook(report(RuntimeError("Event loop is closed")))
    other = report(RuntimeError("something else"))
    sys.unraisablehook(other)
    sys.unraisablehook(report(ValueError("Event loop is closed")))
    assert [u.exc_value.args[0] for u in seen] == ["something else", "Event loop is closed"]
    assert seen[0] is other


def test_a_new_fine_tuning_run_encodes_with_its_pre_training_runs_tokenizer(tmp_path, data_dir, capsys):
    """Pre-trained with a 300-piece SentencePiece vocabulary: the fine-tuning config says
    byte (its own default), but the loaded embeddings index SentencePiece ids, so the
    classifier's data is encoded with the pre-training run's tokenizer, which becomes the
    fine-tuning run's own; it says so."""
    corpus = tmp_path / "corpus.txt"  # the small test corpus, as paragraphs (documents)
    corpus.write_text("\n\n".join((pathlib.Path(__file__).parent / "data" / "tiny_corpus.txt").read_text().split("\n")))
    pre = config_for(tmp_path, data_dir, "data.tokenizer=sentencepiece", "data.vocab_size=300",
                     f"data.files=[{corpus}]", f"data.data_dir={tmp_path / 'spm_data'}", "train.steps=2",
                     "data.validation_fraction=0.2", "data.batch_size=2")
    loop.train(pre, say=lambda _: None)
    rows = "text,sentiment\n" + "".join(f"{w} day,{'positive' if i % 2 else 'negative'}\n"
                                         for i, w in enumerate(["good", "bad", "fine", "awful"] * 10))
    (tmp_path / "tweets.csv").write_text(rows)
    said = []
    ft = config_for(tmp_path, data_dir, "data.task=classification", f"data.path={tmp_path / 'tweets.csv'}",
                    f"data.data_dir={tmp_path / 'ft_data'}", "data.validation_fraction=0.2", "data.batch_size=2",
                    f"finetune.init_from={pre.run_dir}", f"run_dir={tmp_path / 'ft'}", "train.steps=2")
    assert ft.data.tokenizer == "byte"
    # `data` prepares what the run will read: the same tokenizer, said the same way.
    from train.__main__ import main

    overrides = ["data.task=classification", f"data.path={tmp_path / 'tweets.csv'}", f"data.data_dir={tmp_path / 'ft_data'}",
                 "data.validation_fraction=0.2", "data.batch_size=2", f"finetune.init_from={pre.run_dir}",
                 f"run_dir={tmp_path / 'ft'}"]
    assert main(["data", str(tmp_path / "run.yaml"), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "(sentencepiece, 300 ids)" in printed and "(vocab 300)" in printed, printed
    loop.train(ft, say=said.append)
    assert any(line.startswith(f"encoding with the tokenizer of {pre.run_dir} (sentencepiece, 300 ids)")
               for line in said), said
    own = rundir.run_tokenizer(ft.run_dir)
    assert own.kind == "sentencepiece" and own.vocab_size == 300
