"""Tokenizers with one interface: ``encode``, ``decode``, ``vocab_size``, ``save``, ``load``.

Both are lossless: ``decode(encode(text)) == text`` for any string, newlines, tabs and
runs of spaces included. Neither adds special ids to what ``encode`` returns, so a packed
LM stream is exactly the concatenated text (documents are separated by the text itself).

- ``ByteTokenizer``: the UTF-8 bytes, ids 0..255, ``vocab_size == 256``, no special ids.
- ``SentencePieceTokenizer``: BPE trained locally with identity normalisation, whitespace
  kept as is and ``byte_fallback`` (any character outside the vocabulary becomes its UTF-8
  bytes, so nothing maps to ``<unk>``). Ids 0..2 are SentencePiece's ``<unk>``, ``<s>``,
  ``</s>`` (never produced by ``encode``), 3..258 the 256 byte pieces, the rest merges.

- ``BytePairTokenizer``: a byte-level BPE (GPT-2's kind) read from a ``vocab.json`` and a
  ``merges.txt`` other tools wrote, through Hugging Face's ``tokenizers``; lossless too.

`import_tokenizer` reads the files another tool wrote (a SentencePiece ``.model``, or the
BPE pair), for a run whose weights were trained with them; such a SentencePiece model
encodes as its authors set it up (a leading space, normalisation), which may not round-trip.

A saved tokenizer is a directory with ``tokenizer.json`` (kind, vocab size) and its files
(SentencePiece: ``spm.model``; BPE: ``vocab.json``, ``merges.txt``); ``load_tokenizer(directory)``
reads any kind. ``definition``: the bytes that define a tokenizer (what a run's data
fingerprint hashes).
"""

from __future__ import annotations

import io
import json
import pathlib
import re
from collections.abc import Iterable, Sequence
from typing import Protocol

import sentencepiece as spm

_META = "tokenizer.json"


class Tokenizer(Protocol):
    kind: str
    vocab_size: int
    definition: bytes

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, directory: str | pathlib.Path) -> None: ...


def _write_meta(directory: pathlib.Path, **meta) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / _META).write_text(json.dumps(meta, indent=2) + "\n")


def _read_meta(directory: pathlib.Path, kind: str | None = None) -> dict:
    path = directory / _META
    if not path.is_file():
        raise FileNotFoundError(f"{directory} holds no saved tokenizer ({_META} is missing); "
                                f"prepare the data again to write it")
    meta = json.loads(path.read_text())
    if kind is not None and meta.get("kind") != kind:
        raise ValueError(f"{path} is a {meta.get('kind')!r} tokenizer, not {kind!r}; use load_tokenizer()")
    return meta


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 (no special ids)."""

    kind = "byte"
    vocab_size = 256
    definition = b""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        """Ids outside 0..255 are skipped; byte runs that are not valid UTF-8 (a model can
        sample them) decode to U+FFFD instead of raising."""
        return bytes(i for i in map(int, ids) if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | pathlib.Path) -> None:
        _write_meta(pathlib.Path(directory), kind=self.kind, vocab_size=self.vocab_size)

    @classmethod
    def load(cls, directory: str | pathlib.Path) -> ByteTokenizer:
        _read_meta(pathlib.Path(directory), cls.kind)
        return cls()

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"


class SentencePieceTokenizer:
    """A lossless SentencePiece BPE model (see the module docstring)."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = int(self._sp.get_piece_size())

    @property
    def definition(self) -> bytes:
        return self.model_proto

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int) -> SentencePieceTokenizer:
        """Train on ``texts`` (fed line by line, newlines become byte pieces).

        ``vocab_size`` is an upper bound: a small corpus may give fewer pieces
        (``hard_vocab_limit=False``). It must leave room for the 256 byte pieces, 3
        specials and every distinct character of the corpus.
        """
        lines = [line for text in texts for line in text.split("\n") if line]
        if not lines:
            raise ValueError("cannot train SentencePiece on an empty training split; add text to the corpus")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=model,
                vocab_size=vocab_size,
                model_type="bpe",
                byte_fallback=True,  # unseen characters -> UTF-8 bytes, never <unk>
                character_coverage=1.0,
                normalization_rule_name="identity",  # no NFKC: text comes back as given
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                hard_vocab_limit=False,
                max_sentence_length=1 << 16,
                input_sentence_size=2_000_000,
                shuffle_input_sentence=True,
                minloglevel=2,
            )
        except RuntimeError as e:
            need = re.search(r"required_chars\. \d+ vs (\d+)", str(e))
            if need is None:
                raise
            raise ValueError(
                f"vocab_size={vocab_size} is too small for this corpus: SentencePiece with byte fallback needs "
                f"{need[1]} pieces (256 bytes, 3 specials and one per distinct character); raise vocab_size to at "
                f"least {need[1]}"
            ) from None
        return cls(model.getvalue())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save(self, directory: str | pathlib.Path) -> None:
        directory = pathlib.Path(directory)
        _write_meta(directory, kind=self.kind, vocab_size=self.vocab_size, model="spm.model")
        (directory / "spm.model").write_bytes(self.model_proto)

    @classmethod
    def load(cls, directory: str | pathlib.Path) -> SentencePieceTokenizer:
        directory = pathlib.Path(directory)
        meta = _read_meta(directory, cls.kind)
        return cls((directory / meta["model"]).read_bytes())

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size})"


class BytePairTokenizer:
    """A byte-level BPE (GPT-2's): ``vocab.json`` (piece -> id, pieces spelt with GPT-2's
    byte-to-character table) and ``merges.txt`` (one merge a line, the first merged first).

    Encoding adds no special ids (``<|endoftext|>`` in a text is encoded as its pieces);
    any text round-trips, and decoding skips ids beyond the vocabulary (a model's padded
    rows) and turns byte runs that are not UTF-8 into U+FFFD.
    """

    kind = "bpe"

    def __init__(self, vocab: bytes, merges: bytes):
        from tokenizers import ByteLevelBPETokenizer

        self.vocab, self.merges = vocab, merges
        try:
            pieces = json.loads(vocab)
            pairs = [tuple(line.split(" ")) for line in merges.decode("utf-8").splitlines()
                     if line and not line.startswith("#version")]
            self._bpe = ByteLevelBPETokenizer(pieces, pairs, add_prefix_space=False)
        except Exception as e:  # noqa: BLE001 - json's, utf-8's or the BPE model's own (a plain Exception)
            raise ValueError(f"cannot read a byte-level BPE from this vocab.json and merges.txt ({e})") from None
        self.vocab_size = int(self._bpe.get_vocab_size())

    @property
    def definition(self) -> bytes:
        return self.vocab + b"\0" + self.merges

    def encode(self, text: str) -> list[int]:
        return list(self._bpe.encode(text).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self._bpe.decode([int(i) for i in ids])

    def save(self, directory: str | pathlib.Path) -> None:
        directory = pathlib.Path(directory)
        _write_meta(directory, kind=self.kind, vocab_size=self.vocab_size, vocab="vocab.json", merges="merges.txt")
        (directory / "vocab.json").write_bytes(self.vocab)
        (directory / "merges.txt").write_bytes(self.merges)

    @classmethod
    def load(cls, directory: str | pathlib.Path) -> BytePairTokenizer:
        directory = pathlib.Path(directory)
        meta = _read_meta(directory, cls.kind)
        return cls((directory / meta["vocab"]).read_bytes(), (directory / meta["merges"]).read_bytes())

    def __repr__(self) -> str:
        return f"BytePairTokenizer(vocab_size={self.vocab_size})"


_KINDS = {"byte": ByteTokenizer, "sentencepiece": SentencePieceTokenizer, "bpe": BytePairTokenizer}

_IMPORTABLE = ("a SentencePiece model (a .model file), or a byte-level BPE's vocab.json and merges.txt, "
               "or a directory holding either")


def import_tokenizer(paths: Sequence[str | pathlib.Path]) -> Tokenizer:
    """The tokenizer in files another tool wrote: a SentencePiece ``.model``; a byte-level
    BPE's ``vocab.json`` and ``merges.txt`` (a ``.json`` and a ``.txt``, in either order);
    or a directory holding one of those (``tokenizer.model``, or ``vocab.json`` and
    ``merges.txt``)."""
    paths = [pathlib.Path(p) for p in paths]
    if len(paths) == 1 and paths[0].is_dir():
        directory = paths[0]
        models = sorted(directory.glob("*.model"))
        if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            paths = [directory / "vocab.json", directory / "merges.txt"]
        elif len(models) == 1:
            paths = models
        else:
            raise ValueError(f"{directory} holds no tokenizer mpx reads (or several .model files); give "
                             + _IMPORTABLE)
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(2, "No such file", str(p))
    suffixes = sorted(p.suffix for p in paths)
    if suffixes == [".model"]:
        try:
            return SentencePieceTokenizer(paths[0].read_bytes())
        except RuntimeError as e:
            raise ValueError(f"cannot read {paths[0]} as a SentencePiece model ({e})") from None
    if suffixes == [".json", ".txt"]:
        vocab, merges = sorted(paths, key=lambda p: p.suffix != ".json")
        try:
            return BytePairTokenizer(vocab.read_bytes(), merges.read_bytes())
        except ValueError as e:
            raise ValueError(f"{vocab}, {merges}: {e}") from None
    raise ValueError(f"cannot tell the tokenizer in {', '.join(map(str, paths))}; give " + _IMPORTABLE)


def load_tokenizer(directory: str | pathlib.Path) -> Tokenizer:
    """The tokenizer saved in ``directory``, whichever its kind."""
    kind = _read_meta(pathlib.Path(directory)).get("kind")
    if kind not in _KINDS:
        raise ValueError(f"{directory}/{_META} names an unknown tokenizer kind {kind!r}; "
                         f"expected one of {', '.join(_KINDS)}")
    return _KINDS[kind].load(directory)
