"""Tasks: what a run learns. Each owns its data, model, loss, metrics and baseline.

    task = make_task(config.data, seed=config.train.seed)   # data prepared, tokenizer ready
    model = task.model(config.model, policy, rngs)
    loss, aux = task.loss(graphdef, params, meta, batch, rng, dropout=False)
    task.references()                        # what an evaluation is compared with

The loop, the evaluation and the commands talk to a task through this interface only;
adding a task means adding a class to `TASKS`, not a branch to the loop.
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

import mpx
import mpx.nn as mn
from train import data as data_lib
from train import mesh as mesh_lib
from train.schema import DataConfig, ModelConfig


class Task(abc.ABC):
    """A task's data (``prepared``, ``tokenizer``, the two iterators) and behaviour.

    ``seed`` orders the shuffled batches (``train.seed``); ``num_classes`` is
    ``finetune.num_classes`` (None: the labels in the data; tasks without classes ignore it).
    ``tokenizer``: encode with this one (a run's own, from its directory) instead of the
    prepared dataset's; the dataset is then prepared with the cheap byte tokenizer rather
    than training a SentencePiece model on text the run never saw.
    """

    name: ClassVar[str]
    generates: ClassVar[bool] = False  # can sample text (generate command)
    # Top-level param collections that a fine-tuning run makes new rather than loads.
    new_on_finetune: ClassVar[tuple[str, ...]] = ()

    def __init__(self, data: DataConfig, *, seed: int, num_classes: int | None = None, tokenizer=None):
        self.data, self.seed, self._num_classes = data, seed, num_classes
        # Each process loads its own shard of the records and its share of the global batch.
        shard_index, shard_count = mesh_lib.process_shard()
        self._batch = mesh_lib.local_batch_size(data.batch_size, shard_count)
        self.prepared = self._prepare("byte" if tokenizer is not None else data.tokenizer)
        self.tokenizer = tokenizer or self.prepared.tokenizer
        self._loader = functools.partial(self._loader_fn(), tokenizer=self.tokenizer, seq_len=data.seq_len,
                                         shard_index=shard_index, shard_count=shard_count)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def train_iter(self) -> Iterator[dict]:
        """Shuffled training batches, endlessly; checkpointable (``get_state``/``set_state``)."""
        return self._loader(self.prepared.train, batch_size=self._batch, seed=self.seed, shuffle=True)

    def eval_iter(self) -> Iterator[dict]:
        """The validation split once, in order."""
        return self._loader(self.prepared.validation, batch_size=self._batch, seed=self.seed,
                            shuffle=False, num_epochs=1)

    @abc.abstractmethod
    def _prepare(self, tokenizer_kind: str):
        """The task's dataset (`train.data.Prepared`), built once and reused."""

    @abc.abstractmethod
    def _loader_fn(self) -> Callable[..., Iterator[dict]]:
        """The grain loader of the task's batches."""

    @abc.abstractmethod
    def model(self, shape: ModelConfig, policy: mpx.Policy, rngs: nnx.Rngs) -> nnx.Module:
        """A fresh model for this task's data."""

    @staticmethod
    @abc.abstractmethod
    def loss(graphdef, params, meta, batch, rng, *, dropout: bool):
        """``(mean loss, {"correct", "count"})`` of a batch; the step's ``loss_fn``."""

    @abc.abstractmethod
    def uniform_loss(self) -> float:
        """The loss of guessing uniformly: where an untrained model starts."""

    @abc.abstractmethod
    def references(self) -> dict[str, float]:
        """What an evaluation is compared with, from the data."""

    @staticmethod
    @abc.abstractmethod
    def baseline_message(refs: dict[str, float]) -> str:
        """One line saying the references at the start of a run."""

    @staticmethod
    @abc.abstractmethod
    def below_baseline(final: dict[str, float], refs: dict[str, float]) -> str | None:
        """What to say of a run whose final evaluation (``eval_*`` keys of ``final``, the
        loop's last row) is no better than the data's baseline; None when it is better or
        the run did not evaluate at its end."""


class LanguageModelling(Task):
    """Next-token prediction on packed text; nats/token, bits/byte, a unigram baseline."""

    name = "lm"
    generates = True

    def _prepare(self, tokenizer_kind: str):
        d = self.data
        return data_lib.prepare_lm(d.data_dir, files=d.files or None, tokenizer=tokenizer_kind,
                                   vocab_size=d.vocab_size, validation_fraction=d.validation_fraction,
                                   seed=self.seed)

    def _loader_fn(self):
        return data_lib.lm_loader

    def model(self, shape: ModelConfig, policy: mpx.Policy, rngs: nnx.Rngs) -> nnx.Module:
        return mn.TransformerLM(shape.to_transformer(self.vocab_size), policy=policy, rngs=rngs)

    @staticmethod
    def loss(graphdef, params, meta, batch, rng, *, dropout: bool):
        model = nnx.merge(graphdef, params, meta)
        tokens = batch["tokens"]
        logits = model(tokens[:, :-1], deterministic=not dropout, rngs=nnx.Rngs(dropout=rng))
        loss = model.loss(logits, tokens[:, 1:])
        return loss, {"correct": jnp.float32(0), "count": jnp.float32(tokens[:, 1:].size)}

    def uniform_loss(self) -> float:
        return math.log(self.vocab_size)

    def references(self) -> dict[str, float]:
        """``unigram_baseline``: the cross-entropy (nats/token) of the validation split under
        the add-one smoothed unigram distribution of the training split (what a model that
        learned only token frequencies scores; a trained LM must be clearly below it);
        ``tokens_per_byte`` of the validation text (UTF-8), which turns nats/token into bits
        per byte, a figure that compares across tokenizers."""
        tok = self.tokenizer
        counts = np.ones(tok.vocab_size, np.float64)
        for text in data_lib.loaders.source_texts(self.prepared.train):
            counts += np.bincount(np.asarray(tok.encode(text), np.int64), minlength=tok.vocab_size)[: tok.vocab_size]
        logp = np.log(counts / counts.sum())
        total, n, nbytes = 0.0, 0, 0
        for text in data_lib.loaders.source_texts(self.prepared.validation):
            ids = np.asarray(tok.encode(text), np.int64)
            total -= logp[ids].sum()
            n += ids.size
            nbytes += len(text.encode("utf-8"))
        return {"unigram_baseline": total / max(n, 1), "tokens_per_byte": n / max(nbytes, 1)}

    @staticmethod
    def baseline_message(refs: dict[str, float]) -> str:
        return f"unigram baseline on the validation split: {refs['unigram_baseline']:.4f} nats/token"

    @staticmethod
    def below_baseline(final: dict[str, float], refs: dict[str, float]) -> str | None:
        loss, baseline = final.get("eval_loss"), refs["unigram_baseline"]
        if loss is None or loss < baseline:
            return None
        return (f"the run ended at a validation loss of {loss:.4f} nats/token, no better than the unigram baseline "
                f"({baseline:.4f}): the model has learned less than the frequencies of tokens; train longer "
                "(train.steps) or check optim.lr and the data")


class Classification(Task):
    """Labelled text -> one class; accuracy and a majority-class baseline."""

    name = "classification"
    new_on_finetune = ("classifier", "head")

    def _prepare(self, tokenizer_kind: str):
        d = self.data
        return data_lib.prepare_classification(
            d.data_dir, path=d.path, text_column=d.text_column, label_column=d.label_column,
            tokenizer=tokenizer_kind, vocab_size=d.vocab_size, validation_fraction=d.validation_fraction,
            seed=self.seed,
        )

    def _loader_fn(self):
        return data_lib.classification_loader

    @property
    def num_classes(self) -> int:
        return self._num_classes or len(self.prepared.label_names)

    def model(self, shape: ModelConfig, policy: mpx.Policy, rngs: nnx.Rngs) -> nnx.Module:
        return mn.SequenceClassifier(shape.to_transformer(self.vocab_size), self.num_classes, policy=policy, rngs=rngs)

    @staticmethod
    def loss(graphdef, params, meta, batch, rng, *, dropout: bool):
        model = nnx.merge(graphdef, params, meta)
        logits = model(batch["tokens"], batch["mask"], deterministic=not dropout, rngs=nnx.Rngs(dropout=rng))
        loss = model.loss(logits, batch["label"])
        correct = jnp.sum((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
        return loss, {"correct": correct, "count": jnp.float32(batch["label"].shape[0])}

    def uniform_loss(self) -> float:
        return math.log(self.num_classes)

    def references(self) -> dict[str, float]:
        """``majority_baseline``: the accuracy of always answering the most frequent
        validation label."""
        return {"majority_baseline": majority_baseline(self.prepared.validation)}

    @staticmethod
    def baseline_message(refs: dict[str, float]) -> str:
        return f"majority-class baseline on the validation split: accuracy {refs['majority_baseline']:.4f}"

    @staticmethod
    def below_baseline(final: dict[str, float], refs: dict[str, float]) -> str | None:
        accuracy, baseline = final.get("eval_accuracy"), refs["majority_baseline"]
        if accuracy is None or accuracy > baseline:
            return None
        return (f"the run ended at a validation accuracy of {accuracy:.4f}, no better than always answering the "
                f"most frequent label ({baseline:.4f}); train longer (train.steps) or check optim.lr and the data")


def majority_baseline(records: Any) -> float:
    """The accuracy of always answering the most frequent label of ``records``."""
    labels = [int(records[i]["label"]) for i in range(len(records))]
    return float(max(np.bincount(labels))) / max(len(labels), 1)


TASKS: dict[str, type[Task]] = {t.name: t for t in (LanguageModelling, Classification)}


def task_class(data: DataConfig) -> type[Task]:
    return TASKS[data.task]  # data.task is validated against these names


def make_task(data: DataConfig, *, seed: int, num_classes: int | None = None, tokenizer=None) -> Task:
    """The task ``data.task`` with its data prepared (see `Task` for the rest)."""
    return task_class(data)(data, seed=seed, num_classes=num_classes, tokenizer=tokenizer)
