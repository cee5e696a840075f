"""A run's log: ``metrics.jsonl`` (one JSON row per log/eval step), the console (with a
progress bar) and TensorBoard.

``metrics.jsonl`` is strict JSON, one object a line: a value that is not a finite number
(the NaN loss of a skipped step) is written ``null`` and its key listed under
``"nonfinite"`` (`row_to_json`); `read_rows` gives the values back as floats. A last line
torn by a crash mid-write is dropped, with a warning, when the run resumes.
"""

from __future__ import annotations

import collections
import json
import math
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

from train import rundir
from train.schema import LoggingConfig


class Logger:
    """The log of the run in ``run_dir`` from step ``start`` of ``total``: rows to
    ``metrics.jsonl`` (and TensorBoard, and the console) as `logging` says."""

    def __init__(self, logging: LoggingConfig, run_dir: str | pathlib.Path, say: Callable[[str], None], total: int,
                 start: int):
        self.say = say
        self.jsonl = rundir.metrics_file(run_dir)
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.bar = None
        self._running = collections.deque()  # an output of each step dispatched and not seen finished
        if logging.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)
        self.writer = None
        if logging.tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(rundir.tensorboard_dir(run_dir)))

    def step(self, output) -> None:
        """A step was dispatched; ``output`` (one of its device arrays) says when it has run.
        The bar counts finished steps (asking without waiting, `jax.Array.is_ready`), so its
        rate is the device's, not how fast the host dispatches."""
        if self.bar is None:
            return
        self._running.append(output)
        finished = 0
        while self._running and self._running[0].is_ready():
            self._running.popleft()
            finished += 1
        if finished:
            self.bar.update(finished)

    def log(self, step: int, scalars: dict[str, float], prefix: str):
        with open(self.jsonl, "a") as f:
            f.write(row_to_json({"split": prefix, "step": step, **scalars}) + "\n")
        if self.writer is not None:
            for k, v in scalars.items():
                if v is not None:
                    self.writer.add_scalar(f"{prefix}/{k}", v, step)
        text = " ".join(f"{k} {_fmt(v)}" for k, v in scalars.items() if v is not None)
        (self.bar.write if self.bar is not None else self.say)(f"{prefix} step {step}: {text}")

    def close(self):
        if self.bar is not None:
            self.bar.update(len(self._running))  # the loop has waited for its last step
            self._running.clear()
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def row_to_json(row: Mapping[str, Any]) -> str:
    """``row`` as one line of strict JSON: each non-finite float is ``null``, its key listed
    under ``"nonfinite"`` (``{"loss": NaN}`` -> ``{"loss": null, "nonfinite": ["loss"]}``)."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    out = {k: (None if k in bad else v) for k, v in row.items()}
    if bad:
        out["nonfinite"] = bad
    return json.dumps(out, allow_nan=False)


def row_from_json(line: str) -> dict[str, Any]:
    """A row written by `row_to_json`, its non-finite values back as NaN (the sign of an
    infinity is not kept: a skipped step's value is what matters, not which overflow)."""
    row = json.loads(line)
    for key in row.pop("nonfinite", ()):
        row[key] = math.nan
    return row


def read_rows(run_dir) -> list[dict[str, Any]]:
    """Every row of the run's ``metrics.jsonl`` (none before the first log step)."""
    return [row_from_json(line) for line in _read_lines(rundir.metrics_file(run_dir), None)]


def drop_rows_after(run_dir, step: int, *, say: Callable[[str], None] = print) -> None:
    """Rows of ``metrics.jsonl`` past ``step`` (logged by the run before it was stopped,
    after its last checkpoint) are dropped on resume: the steps run again and log again.
    A torn last line is dropped too (``say`` warns of it)."""
    path = rundir.metrics_file(run_dir)
    rows = _read_lines(path, say)
    kept = [line for line in rows if row_from_json(line).get("step", 0) <= step]
    if len(kept) != len(rows):
        _rewrite(path, kept)


def _read_lines(path: pathlib.Path, say: Callable[[str], None] | None) -> list[str]:
    """The non-empty lines of ``path``, each valid JSON. A last line that is not (a crash
    mid-write) is cut off the file when ``say`` is given (and said), skipped otherwise;
    an invalid line before the last is a `ValueError` naming the file and line."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    good = []
    for n, (i, line) in enumerate(numbered):
        try:
            json.loads(line)
        except ValueError as e:
            if n < len(numbered) - 1:
                raise ValueError(
                    f"{path}:{i} is not a JSON row ({e}): the metrics log is damaged before its last line; "
                    f"delete or fix line {i} of {path}, then run again") from None
            if say is not None:
                say(f"warning: dropped the torn last line of {path} (line {i}, written by a run that stopped "
                    "mid-write)")
                _rewrite(path, good)
            return good
        good.append(line)
    if say is not None and text and not text.endswith("\n"):
        _rewrite(path, good)  # a valid last row without its newline: the next row would join it
    return good


def _rewrite(path: pathlib.Path, lines: list[str]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(path)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
