"""Post-training quantization of a run, and the comparison with its float model.

    python -m train quantize configs/quickstart.yaml --format int8 --out runs/quickstart-int8
    python -m train quantize configs/quickstart.yaml --format int8 --mode weight_activation \\
        --calibration percentile --out runs/quickstart-int8-wa
    python -m train eval configs/quickstart.yaml --quantized runs/quickstart-int8
    python -m train generate configs/quickstart.yaml --quantized runs/quickstart-int8

A quantized model directory holds ``weights/`` (orbax: each matmul weight as int8 or
E4M3 codes with one f32 scale per output channel, every other parameter float; see
`mpx.ptq`), ``quantization.json`` (format, mode, the calibrated input clip value of every
weight matmul for weight+activation, sizes, the source run and step), and the run's
``config.yaml`` and ``tokenizer/``.

The float reference and every quantized model run under the ``fp32`` policy: the only
difference between two rows of a comparison is the quantization (a run trained under
fp8 or int8 QAT is still evaluated with its own policy by plain ``eval``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

import mpx
from mpx import ptq
from train import mesh as mesh_lib
from train import rundir
from train.build import Model, build_model
from train.evaluation import Trained, eval_step, evaluate, new_directory, with_references
from train.generate import tokens_per_second
from train.schema import ConfigError

QUANT_FILE = "quantization.json"
WEIGHTS_DIR = "weights"
MODES = ("weight", "weight_activation")
CALIBRATIONS = ("absmax", "percentile")


@dataclasses.dataclass(frozen=True)
class QuantizeSettings:
    """``format``: int8 or fp8 (E4M3). ``mode``: weights only, or weights and the inputs of
    every weight matmul (static per-tensor scales calibrated on ``batches`` training
    batches, clipping at the ``calibration`` value: the absolute maximum, or the
    ``percentile``-th percentile of ``|x|``)."""

    format: str = "int8"
    mode: str = "weight"
    calibration: str = "absmax"
    percentile: float = 99.99
    batches: int = 8

    def __post_init__(self):
        for flag, value, choices in (("--format", self.format, ptq.FORMATS), ("--mode", self.mode, MODES),
                                     ("--calibration", self.calibration, CALIBRATIONS)):
            if value not in choices:
                raise ConfigError(f"{flag}: expected one of {', '.join(choices)}, got {value!r}")
        if not 0 < self.percentile <= 100:
            raise ConfigError(f"--percentile: must be in (0, 100], got {self.percentile}")
        if self.mode == "weight_activation" and self.batches < 1:
            raise ConfigError(f"--batches: weight_activation calibrates on at least 1 batch, got {self.batches}")

    @property
    def label(self) -> str:
        if self.mode == "weight":
            return f"{self.format} weights"
        clip = "absmax" if self.calibration == "absmax" else f"p{self.percentile:g}"
        return f"{self.format} weights+inputs ({clip})"


@dataclasses.dataclass
class QuantizedModel:
    """A quantized model, loaded: float params rebuilt from its codes (``params``), the
    calibrated input clip values (``amaxes``, weight_activation only) and what it says of
    itself (``info``)."""

    settings: QuantizeSettings
    params: nnx.State
    amaxes: dict[str, float] | None
    info: dict[str, Any]

    @property
    def label(self) -> str:
        return self.settings.label

    @property
    def precision(self) -> Any:
        """The policy it runs under: fp32, with the calibrated input grids if any."""
        if self.amaxes is None:
            return "fp32"
        return {"preset": "fp32", "inputs": {"format": self.settings.format, "clip": self.amaxes}}


def float_reference(trained: Trained, *, precision: Any = "fp32") -> Model:
    """The run's model under ``precision`` (default fp32: the same parameters, no fp8 or
    int8 matmul): its graph and fresh FP8 meta (the params to run it with are the trained
    or quantized ones); no optimizer, no train state."""
    return build_model(trained.task, trained.config.model, mpx.parse_policy(precision), seed=trained.config.train.seed)


def quantize(trained: Trained, settings: QuantizeSettings, out_dir, *, say: Callable[[str], None] = print
             ) -> pathlib.Path:
    """Quantize the run's newest checkpoint into ``out_dir`` (a new directory)."""
    reference = float_reference(trained)
    params = trained.state.params.to_pure_dict()
    qparams = ptq.quantize_params(params, settings.format)
    amaxes = None
    if settings.mode == "weight_activation":
        amaxes = _calibrate(reference, trained, settings)
        say(f"calibrated the inputs of {len(amaxes)} weight matmuls on {settings.batches} training batches "
            f"({settings.calibration})")
    import orbax.checkpoint as ocp

    quantized = sorted(ptq.quantized_paths(qparams))
    tree = jax.tree.map(lambda x: {"codes": x.codes, "scale": x.scale} if isinstance(x, ptq.QuantizedWeight) else x,
                        qparams, is_leaf=lambda x: isinstance(x, ptq.QuantizedWeight))
    with new_directory(out_dir, "quantize") as (partial, out):
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(partial / WEIGHTS_DIR, jax.device_get(tree))
        rundir.copy_record(trained.config.run_dir, partial)
        info = {
            **dataclasses.asdict(settings),
            "quantized": quantized,
            "activation_amax": amaxes,
            "source": {"run_dir": str(pathlib.Path(trained.config.run_dir).absolute()), "step": trained.step},
            "bytes": {"params_float32": ptq.nbytes(params), "params_quantized": ptq.nbytes(qparams),
                      "weights_on_disk": _disk_bytes(partial / WEIGHTS_DIR)},
        }
        (partial / QUANT_FILE).write_text(json.dumps(info, indent=2) + "\n")
    b = info["bytes"]
    say(f"wrote {out}: {settings.label}, {len(quantized)} weights quantized; params {_mb(b['params_quantized'])} "
        f"({b['params_float32'] / b['params_quantized']:.2f}x smaller than float32's {_mb(b['params_float32'])}), "
        f"{_mb(b['weights_on_disk'])} on disk")
    return out


def load_quantized(directory, like: nnx.State) -> QuantizedModel:
    """A quantized model directory, its params laid out like ``like`` (the run's)."""
    directory = pathlib.Path(directory)
    meta_file = directory / QUANT_FILE
    if not meta_file.is_file():
        raise ValueError(f"{directory} is not a quantized model (no {QUANT_FILE}); write one with "
                         "python -m train quantize CONFIG --out DIR")
    info = json.loads(meta_file.read_text())
    settings = QuantizeSettings(**{f.name: info[f.name] for f in dataclasses.fields(QuantizeSettings)})
    amaxes = info.get("activation_amax")
    if settings.mode == "weight_activation" and not amaxes:
        raise ValueError(f"{meta_file} says weight_activation but holds no calibration data (activation_amax); "
                         "quantize the run again with --mode weight_activation")
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(directory / WEIGHTS_DIR)
    quantized = set(info["quantized"])

    def rebuild(node, prefix=()):
        if isinstance(node, dict) and "/".join(prefix) in quantized:
            return ptq.QuantizedWeight(node["codes"], node["scale"], settings.format)
        if isinstance(node, dict):
            return {k: rebuild(v, (*prefix, k)) for k, v in node.items()}
        return node

    params = jax.tree.map(lambda x: x, like)  # a copy to fill
    try:
        nnx.replace_by_pure_dict(params, ptq.dequantize_params(rebuild(tree)))
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{directory} does not hold this run's parameters ({e}); it was quantized from "
                         f"{info['source']['run_dir']}") from None
    return QuantizedModel(settings, params, amaxes, info)


def compare(trained: Trained, models: list[QuantizedModel], *, say: Callable[[str], None] = print,
            gen_tokens: int = 64) -> list[dict[str, Any]]:
    """The float model and each quantized one on this command's validation split: loss,
    perplexity (LM) or accuracy (classification), parameter bytes and tokens/s of
    generation (LM). One row each, printed as a table."""
    refs = trained.task.references()
    built: dict[str, Model] = {}  # one model per policy: every weight-only model runs the float one

    def reference(precision) -> Model:
        key = json.dumps(precision, sort_keys=True)
        if key not in built:
            built[key] = float_reference(trained, precision=precision)
        return built[key]

    float_bytes = ptq.nbytes(trained.state.params.to_pure_dict())
    rows = [_row("float32", reference("fp32"), trained.state.params, trained, refs, float_bytes, gen_tokens)]
    for model in models:
        rows.append(_row(model.label, reference(model.precision), model.params, trained, refs,
                         model.info["bytes"]["params_quantized"], gen_tokens))
    say(format_rows(rows))
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    metric = "accuracy" if "accuracy" in rows[0] else "perplexity"
    lines = [f"{'model':34} {'loss':>8} {metric:>10} {'params':>10} {'gen tok/s':>10}"]
    for r in rows:
        tps = f"{r['gen_tokens_per_s']:.1f}" if r.get("gen_tokens_per_s") else "-"
        lines.append(f"{r['model']:34} {r['loss']:8.4f} {r[metric]:10.4f} {_mb(r['param_bytes']):>10} {tps:>10}")
    return "\n".join(lines)


def _row(label, reference: Model, params, trained: Trained, refs, nbytes: int, gen_tokens: int) -> dict[str, Any]:
    c = trained.config
    # Every model's params laid out alike (the restored ones are on the run's mesh), so that
    # the rows differ only in what is computed.
    params = jax.device_put(jax.device_get(params), mesh_lib.split_shardings(params, trained.mesh))
    meta = _on_mesh(reference.fp8_meta, trained)
    result = evaluate(eval_step(trained.task, reference.graphdef, trained.mesh), _State(params, meta),
                      trained.task.eval_iter(), c.train.eval_batches, trained.batch_sharding())
    row = {"model": label, **with_references(result, refs), "param_bytes": nbytes}
    if trained.task.generates:
        row["gen_tokens_per_s"] = tokens_per_second(reference.graphdef, params, meta,
                                                    max_len=c.model.max_len, new_tokens=gen_tokens)
    return row


def _on_mesh(fp8_meta, trained: Trained):
    """A fresh FP8 meta replicated on the run's devices, as a train state holds it."""
    return jax.device_put(fp8_meta, mesh_lib.replicated_shardings(fp8_meta, trained.mesh))


@dataclasses.dataclass
class _State:  # what `evaluate` reads of a state
    params: Any
    fp8_meta: Any


def _calibrate(reference: Model, trained: Trained, settings: QuantizeSettings) -> dict[str, float]:
    batches = trained.task.train_iter()
    params, meta = trained.state.params, _on_mesh(reference.fp8_meta, trained)

    def forward(batch):
        return trained.task.loss(reference.graphdef, params, meta, batch, jax.random.key(0), dropout=False)

    stats = ptq.calibrate(forward, (next(batches) for _ in range(settings.batches)))
    return stats.amaxes(settings.calibration, settings.percentile)


def _disk_bytes(directory: pathlib.Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"
