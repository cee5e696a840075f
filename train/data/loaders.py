"""grain pipelines: random-access source -> shuffled, tokenized, packed/padded batches.

The returned iterators are grain ``DatasetIterator``s: ``it.get_state()`` is a small
JSON-able dict and ``it.set_state(state)`` continues with exactly the batches that
would have followed (an orbax checkpoint can hold it via grain's checkpoint handler, or
``json.dumps`` it). Same seed -> same batches; each epoch is reshuffled (seed + epoch).
Incomplete final batches are dropped, so every batch has the stated shape.

Several processes (hosts): ``shard_index`` / ``shard_count`` (e.g.
``train.mesh.process_shard()``) give each process a disjoint, equal share of the source
records, taken before shuffling and packing: the strided slice ``shard_index::shard_count``
of the first ``len - len % shard_count`` records (grain's ``MapDataset`` slicing, the
remainder dropped as with ``grain.sharding.ShardOptions(drop_remainder=True)``), so every
process sees as many records per epoch. ``batch_size`` is then this process's batch: a
run's ``data.batch_size`` is the global batch, and each of P processes loads
``data.batch_size / P`` rows (``train.mesh.local_batch_size``). Each shard is shuffled
with its own seed derived from ``seed`` (`shard_seed`). The defaults (0, 1) read
everything, exactly as a single process always did.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from train.data.corpora import DataError
from train.data.tokenizers import Tokenizer


def _text(example) -> str:
    text = example["text"]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def source_texts(source, *, chunk: int = 1024) -> Iterator[str]:
    """Every text of a random-access source, in order (read ``chunk`` records at a time)."""
    for start in range(0, len(source), chunk):
        indices = range(start, min(start + chunk, len(source)))
        records = source.__getitems__(indices) if hasattr(source, "__getitems__") else [source[i] for i in indices]
        yield from map(_text, records)


def _check(source, *, seq_len: int, batch_size: int, seed: int, shard_index: int, shard_count: int) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    if len(source) == 0:
        raise DataError("the data source is empty; prepare the data again or check the split name")
    grain.sharding.ShardOptions(shard_index, shard_count)  # ValueError unless 0 <= shard_index < shard_count
    if len(source) < shard_count:
        raise DataError(f"the data source has {len(source)} records, fewer than the {shard_count} processes "
                        "that share it: each process needs at least one; use more data or fewer processes")


def shard_records(ds: grain.MapDataset, shard_index: int, shard_count: int) -> grain.MapDataset:
    """This process's records: ``ds[shard_index::shard_count]`` of the first
    ``len(ds) - len(ds) % shard_count`` (equal shares; ``ds`` itself when unsharded)."""
    options = grain.sharding.ShardOptions(shard_index, shard_count, drop_remainder=True)
    if options.shard_count == 1:
        return ds
    return ds[options.shard_index: len(ds) - len(ds) % options.shard_count: options.shard_count]


def shard_seed(seed: int, shard_index: int, shard_count: int) -> int:
    """The shuffle seed of one shard: ``seed`` itself unsharded; else one derived from all
    three, so that the shards are not shuffled in lockstep (which would put records
    ``2k`` and ``2k + 1``, often neighbours in the corpus, into the same global batch)."""
    if shard_count == 1:
        return seed
    return int(np.random.SeedSequence([seed, shard_index, shard_count]).generate_state(1)[0])


def _documents(source, *, seed: int, shuffle: bool, num_epochs: int | None, encode, shard_index: int,
               shard_count: int):
    ds = shard_records(grain.MapDataset.source(source), shard_index, shard_count)  # shard first, then shuffle
    if shuffle:  # index i of epoch e uses seed + e: a new order every epoch
        ds = ds.shuffle(seed=shard_seed(seed, shard_index, shard_count))
    return ds.repeat(num_epochs).map(encode)


class _PackIterDataset(grain.IterDataset):
    """Concatenates 1-D token arrays and cuts the stream into ``{"tokens": (length,)}``
    pieces; a piece may span documents, and the tail of the last one is dropped."""

    def __init__(self, parent: grain.IterDataset, *, length: int, num_docs: int):
        super().__init__(parent)
        self._length, self._num_docs = length, num_docs

    def __iter__(self) -> _PackIterator:
        return _PackIterator(self._parent.__iter__(), length=self._length, num_docs=self._num_docs)


class _PackIterator(grain.DatasetIterator):
    """State = the parent's state before the current document + the offset into it, so
    restoring re-reads (re-tokenizes) one document instead of storing a token buffer."""

    def __init__(self, parent: grain.DatasetIterator, *, length: int, num_docs: int):
        super().__init__(parent)
        self._length, self._num_docs = length, num_docs
        self._doc_state = copy.deepcopy(parent.get_state())
        self._doc = np.zeros(0, np.int32)
        self._pos = 0

    def __next__(self) -> dict[str, np.ndarray]:
        pieces, need, empty = [], self._length, 0
        while need:
            if self._pos == len(self._doc):
                self._doc_state = copy.deepcopy(self._parent.get_state())
                self._doc, self._pos = next(self._parent), 0  # StopIteration: the partial piece is dropped
                empty = empty + 1 if len(self._doc) == 0 else 0
                if empty > self._num_docs:
                    raise DataError("every document of the source tokenizes to nothing; the split has no text")
                continue
            take = min(need, len(self._doc) - self._pos)
            pieces.append(self._doc[self._pos: self._pos + take])
            self._pos += take
            need -= take
        return {"tokens": np.concatenate(pieces)}

    def get_state(self) -> dict[str, Any]:
        return {"parent": copy.deepcopy(self._doc_state), "offset": self._pos}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._doc_state = copy.deepcopy(state["parent"])
        self._doc, self._pos = np.zeros(0, np.int32), 0
        if state["offset"]:
            self._doc, self._pos = next(self._parent), int(state["offset"])


def lm_loader(
    source,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.DatasetIterator:
    """Batches ``{"tokens": int32 (batch_size, seq_len + 1)}`` of packed text.

    Documents are shuffled (by ``seed``), tokenized and concatenated in that order; the
    stream is cut into consecutive, non-overlapping rows of ``seq_len + 1`` tokens
    (inputs ``[:, :-1]``, targets ``[:, 1:]``). ``num_epochs=None`` repeats forever; with
    ``shuffle=False`` the rows are the source's stream in order, e.g. for evaluation.
    ``shard_index``/``shard_count``: this process's share of the documents (see the module
    docstring); each process packs its own documents into its own rows.
    """
    _check(source, seq_len=seq_len, batch_size=batch_size, seed=seed, shard_index=shard_index, shard_count=shard_count)
    docs = _documents(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                      encode=lambda ex: np.asarray(tokenizer.encode(_text(ex)), np.int32),
                      shard_index=shard_index, shard_count=shard_count)
    packed = _PackIterDataset(docs.to_iter_dataset(), length=seq_len + 1, num_docs=len(source) // shard_count)
    return iter(packed.batch(batch_size, drop_remainder=True))


def classification_loader(
    source,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
) -> grain.DatasetIterator:
    """Batches ``{"tokens": int32 (B, seq_len), "mask": bool (B, seq_len), "label": int32 (B,)}``.

    Each text's ids are truncated to ``seq_len`` and right-padded with 0; ``mask`` is
    True on real tokens (a text always has at least one: blank rows are dropped at
    prepare time). ``shard_index``/``shard_count``: this process's share of the examples
    (see the module docstring).
    """
    _check(source, seq_len=seq_len, batch_size=batch_size, seed=seed, shard_index=shard_index, shard_count=shard_count)

    def encode(example) -> dict[str, np.ndarray]:
        ids = tokenizer.encode(_text(example))[:seq_len]
        tokens = np.zeros(seq_len, np.int32)
        tokens[: len(ids)] = ids
        return {"tokens": tokens, "mask": np.arange(seq_len) < len(ids), "label": np.int32(example["label"])}

    docs = _documents(source, seed=seed, shuffle=shuffle, num_epochs=num_epochs, encode=encode,
                      shard_index=shard_index, shard_count=shard_count)
    return iter(docs.batch(batch_size, drop_remainder=True).to_iter_dataset())
