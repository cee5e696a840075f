"""Tokenizers: byte-level (default) and SentencePiece trained locally, lossless.

One interface: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``,
``vocab_size``, ``name``. Both round-trip any text exactly.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable
from typing import Protocol


class Tokenizer(Protocol):
    name: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A SentencePiece BPE model trained with lossless settings: identity normalisation,
    whitespace kept as is, unknown characters as bytes (byte_fallback)."""

    def __init__(self, model_file: str | pathlib.Path):
        import sentencepiece as spm

        self.model_file = pathlib.Path(model_file)
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.vocab_size = int(self._sp.get_piece_size())
        self.name = f"spm{self.vocab_size}"

    @staticmethod
    def train(texts: Iterable[str], model_file: str, *, vocab_size: int) -> None:
        """Train on ``texts`` and write the model to ``model_file`` exactly (no suffix added)."""
        import io

        import sentencepiece as spm

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(t for t in texts if t),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_by_whitespace=True,
            allow_whitespace_only_pieces=True,
            add_dummy_prefix=False,
            user_defined_symbols=["\n", "\t"],
            character_coverage=1.0,
            max_sentence_length=1 << 20,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        pathlib.Path(model_file).write_bytes(model.getvalue())

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])
