"""A run's log: ``metrics.jsonl`` (one JSON row per log/eval step), the console (with a
progress bar) and TensorBoard."""

from __future__ import annotations

import collections
import json
import pathlib
from collections.abc import Callable

from train.schema import RunConfig


class Logger:
    def __init__(self, config: RunConfig, say: Callable[[str], None], total: int, start: int):
        self.say = say
        self.jsonl = pathlib.Path(config.run_dir) / "metrics.jsonl"
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.bar = None
        self._running = collections.deque()  # an output of each step dispatched and not seen finished
        if config.logging.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, leave=False)
        self.writer = None
        if config.logging.tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(pathlib.Path(config.run_dir) / "tensorboard"))

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
            f.write(json.dumps({"split": prefix, "step": step, **scalars}) + "\n")
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


def drop_rows_after(run_dir, step: int) -> None:
    """Rows of ``metrics.jsonl`` past ``step`` (logged by the run before it was stopped,
    after its last checkpoint) are dropped on resume: the steps run again and log again."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
