"""``python -m train sensitivity``: which matmuls of a run's model can take 8 bits.

    python -m train sensitivity configs/quickstart.yaml --batches 4 --budget 0.005 --out sens.json

The run's newest checkpoint (or, in a run directory without one, the model at init), the
first batches of its validation split, `mpx.inspect.sensitivity` on them: a table of every
matmul and a policy string to paste into the config's ``precision``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

import mpx
from train import rundir
from train.schema import RunConfig


@dataclasses.dataclass(frozen=True)
class SensitivitySettings:
    """The command's flags, checked: ``batches`` >= 1, ``budget`` >= 0 (relative),
    ``reference`` a float policy, ``target`` fp8 or int8 and among ``formats``, ``min_size`` >= 0 or None (the
    speed model's default), ``bench`` a bench JSON record with a crossover, or None."""

    batches: int = 4
    budget: float = 0.005
    reference: str = "bf16"
    target: str = "fp8"
    formats: tuple[str, ...] = ("fp8", "int8")
    min_size: int | None = None
    bench: str | None = None

    def __post_init__(self):
        if not isinstance(self.batches, int) or self.batches < 1:
            raise ValueError(f"--batches: expected an integer >= 1, got {self.batches!r}")
        if not isinstance(self.budget, (int, float)) or not math.isfinite(self.budget) or self.budget < 0:
            raise ValueError(f"--budget: expected a relative loss change >= 0 (0.005 = 0.5%), got {self.budget!r}")
        if self.target not in ("fp8", "int8"):
            raise ValueError(f"--target: expected fp8 or int8, got {self.target!r}")
        if not self.formats or any(f not in ("fp8", "int8") for f in self.formats) or self.target not in self.formats:
            raise ValueError(f"--formats: expected fp8, int8 or fp8,int8, including --target ({self.target}), got "
                             f"{','.join(self.formats)!r}")
        if self.min_size is not None and self.min_size < 0:
            raise ValueError(f"--min-size: expected an integer >= 0 (0: every matmul gains), got {self.min_size!r}")
        if self.min_size is not None and self.bench is not None:
            raise ValueError("--min-size and --bench both set the crossover; give one of them")

    def speed_model(self) -> mpx.inspect.SpeedModel:
        if self.bench is not None:
            try:
                record = json.loads(pathlib.Path(self.bench).read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"--bench {self.bench}: not a JSON bench record ({e})") from None
            return mpx.inspect.SpeedModel.from_bench(record)
        if self.min_size is not None:
            return mpx.inspect.SpeedModel(min_size=self.min_size, source="--min-size")
        return mpx.inspect.SpeedModel()


def _model(config: RunConfig, say: Callable[[str], None]) -> tuple[nnx.Module, Any, int | None]:
    """The run's model with its newest checkpoint's params (step), or at init (None)."""
    from train.build import build_model, task_for, tokenizer_of
    from train.evaluation import load_model

    if rundir.has_checkpoints(config.run_dir):
        trained = load_model(config, say=say)
        return nnx.merge(trained.graphdef, trained.state.params, trained.state.fp8_meta), trained.task, trained.step
    say(f"no checkpoint in {config.run_dir}: measuring the model at init (train.seed={config.train.seed})")
    task = task_for(config, tokenizer_of(config.run_dir, config.finetune.init_from, say))
    model = build_model(task, config.model, config.policy(), seed=config.train.seed)
    return nnx.merge(model.graphdef, model.params, model.fp8_meta), task, None


def run(config: RunConfig, settings: SensitivitySettings, *, say: Callable[[str], None] = print
        ) -> tuple[mpx.inspect.SensitivityReport, int | None]:
    """The report on the run's model over the first ``settings.batches`` validation batches,
    and the checkpoint step it was measured at (None: at init)."""
    speed = settings.speed_model()
    model, task, step = _model(config, say)
    batches = []
    for batch in task.eval_iter():
        batches.append(jax.tree.map(jax.numpy.asarray, batch))
        if len(batches) == settings.batches:
            break
    if len(batches) < settings.batches:
        raise ValueError(f"--batches {settings.batches}: the validation split has only {len(batches)} batches of "
                         f"{config.data.batch_size}; ask for fewer")

    def loss_fn(model, batch):
        graphdef, params, meta, _ = mpx.split(model)
        return task.loss(graphdef, params, meta, batch, jax.random.key(0), dropout=False)[0]

    report = mpx.inspect.sensitivity(model, loss_fn, batches, reference=settings.reference, target=settings.target,
                                     formats=settings.formats, budget=settings.budget, speed=speed)
    return report, step


def write_record(report: mpx.inspect.SensitivityReport, step: int | None, config: RunConfig,
                 path: str | pathlib.Path) -> None:
    """The report as JSON at ``path``, written atomically (a temporary sibling renamed)."""
    path = pathlib.Path(path)
    record = {"run_dir": str(config.run_dir), "step": step, **report.to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
