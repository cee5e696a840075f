"""A policy, its rules, and what it decides for each op.

`Policy` holds three dtypes, an ordered tuple of `Rule`s and the configs of the quantized
precisions; `Policy.for_op` gives the `OpPrecision` of one op: the first rule that matches
its path and kind decides, and an op no rule matches runs in the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mpx._checks import is_positive_finite
from mpx.fp8 import Fp8Config
from mpx.int8 import Int8Config
from mpx.loss_scale import LossScaleConfig
from mpx.policy._paths import path_str, pattern_regex
from mpx.policy._vocabulary import DTYPES, INPUT_FORMATS, KINDS, MATMUL_KINDS, PRECISIONS, QUANTIZED, WEIGHT_RHS_KINDS, suggest


@dataclasses.dataclass(frozen=True)
class StaticInputs:
    """Static input grids of weight matmuls: the op at each path of ``clip`` takes its input
    on the ``format`` grid (int8: ``clip / 127`` steps, codes in [-127, 127]; fp8: E4M3
    scaled so that ``clip`` lands on 448), values beyond ``clip`` saturating. ``clip`` is a
    mapping ``{op path: clip value}`` (calibrated, `mpx.ptq.calibrate`), kept as sorted
    pairs so the policy stays hashable. Ops not listed take their input as it is."""

    format: str = "int8"
    clip: Any = ()

    def __post_init__(self):
        if self.format not in INPUT_FORMATS:
            raise ValueError(f"inputs.format: expected one of {', '.join(INPUT_FORMATS)}, got {self.format!r}")
        items = self.clip.items() if isinstance(self.clip, Mapping) else self.clip
        pairs = []
        for path, value in items:
            if not is_positive_finite(value):
                raise ValueError(f"inputs.clip[{path!r}]: expected a positive finite number, got {value!r}")
            pairs.append((str(path), float(value)))
        object.__setattr__(self, "clip", tuple(sorted(pairs)))

    def clip_of(self, path: str) -> float | None:
        return dict(self.clip).get(path)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "clip": dict(self.clip)}


@dataclasses.dataclass(frozen=True)
class Rule:
    """``use`` this precision for ops whose path matches ``match`` and whose kind is in ``kind``.

    ``match=None`` matches every path; ``kind=None`` every kind.
    """

    use: str
    match: str | None = None
    kind: str | None = None
    _regex: re.Pattern | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        self._validate(where=f"rule {self}")

    def _validate(self, *, where: str):
        for field in ("use", "match", "kind"):
            value = getattr(self, field)
            if not (isinstance(value, str) or (value is None and field != "use")):
                raise ValueError(
                    f"{where}: {field} must be a string, got {value!r}"
                    + (" (write several kinds as one string: 'dense|head')" if field == "kind" else "")
                )
        if self.use not in PRECISIONS:
            raise ValueError(
                f"unknown precision {self.use!r} for {where}; expected one of "
                f"{', '.join(PRECISIONS)}{suggest(self.use, PRECISIONS)}"
            )
        kinds = self.kinds
        for k in kinds or ():
            if k not in KINDS:
                raise ValueError(f"unknown op kind {k!r} for {where}; expected one of {', '.join(KINDS)}{suggest(k, KINDS)}")
        if self.use in QUANTIZED and kinds is not None and not set(kinds) & set(MATMUL_KINDS):
            raise ValueError(
                f"{where} asks for {self.use} on kinds {'|'.join(kinds)}, which are not matmuls; "
                f"{self.use} applies to {', '.join(MATMUL_KINDS)}"
            )
        if self.match is not None:
            try:
                regex = re.compile(pattern_regex(self.match))
            except re.error as e:
                raise ValueError(f"invalid path pattern {self.match!r} for {where}: {e}") from None
            object.__setattr__(self, "_regex", regex)

    @property
    def kinds(self) -> tuple[str, ...] | None:
        return None if self.kind is None else tuple(k.strip() for k in self.kind.split("|"))

    def matches(self, path: str, kind: str) -> bool:
        if self.kinds is not None and kind not in self.kinds:
            return False
        if self.use in QUANTIZED and kind not in MATMUL_KINDS:
            return False
        return self._regex is None or self._regex.fullmatch(path) is not None

    def to_dict(self) -> dict[str, str]:
        d = {"use": self.use}
        if self.match is not None:
            d["match"] = self.match
        if self.kind is not None:
            d["kind"] = self.kind
        return d

    def __str__(self) -> str:
        return f"{self.match or ''}{'@' + str(self.kind) if self.kind else ''}->{self.use}"


@dataclasses.dataclass(frozen=True)
class OpPrecision:
    """What the policy decided for one op.

    ``precision`` is one of `PRECISIONS`; ``dtype`` the dtype the op computes in (for fp8
    and int8, the dtype of the surrounding compute and of the GEMM's output); ``fp8`` the
    config for fp8 ops, ``int8`` for int8 ops; ``rule`` the index of the deciding rule,
    ``None`` for the default.
    """

    path: str
    kind: str
    precision: str
    dtype: Any
    fp8: Fp8Config | None
    rule: int | None
    int8: Int8Config | None = None
    input_clip: float | None = None  # a static input grid (`StaticInputs`), with its format
    input_format: str | None = None

    @property
    def is_fp8(self) -> bool:
        return self.precision == "fp8"

    @property
    def is_int8(self) -> bool:
        return self.precision == "int8"

    @property
    def is_quantized(self) -> bool:
        """fp8 or int8: the layer hands the matmul its master weight to quantize (one
        rounding), and attention takes the explicit path."""
        return self.precision in QUANTIZED

    @property
    def label(self) -> str:
        """The precision as `mpx.inspect.describe` shows it: an int8 op with its recipe
        (``int8 (qat)``), an fp8 op with scales finer than per tensor with its granularity
        (``fp8 (row; weight_grad compute)``), any other its precision."""
        label = self.int8.label if self.is_int8 else self.precision
        if self.is_fp8 and self.fp8.label:  # a scaling recipe other than one scale per tensor
            label = f"fp8 ({self.fp8.label})"
        return f"{label} ({self.input_format} inputs)" if self.input_clip is not None else label


def _dtype_name(value, key: str) -> str:
    if isinstance(value, str):
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r} for {key}; expected one of {', '.join(DTYPES)}{suggest(value, DTYPES)}")
        return value
    for name, dt in DTYPES.items():
        if jnp.dtype(value) == jnp.dtype(dt):
            return name
    raise ValueError(f"unsupported dtype {value!r} for {key}; expected one of {', '.join(DTYPES)}")


@dataclasses.dataclass(frozen=True)
class Policy:
    """A precision policy. Frozen and hashable: usable as a static argument to ``jit``.

    ``params``/``compute``/``output`` are dtype names from `DTYPES` (``fp32``, ``bf16``,
    ``fp16``); jnp dtypes are accepted and normalised.
    """

    params: str = "fp32"
    compute: str = "fp32"
    output: str = "fp32"
    rules: tuple[Rule, ...] = ()
    fp8: Fp8Config = Fp8Config()
    loss_scale: LossScaleConfig = LossScaleConfig()
    int8: Int8Config = Int8Config()
    inputs: StaticInputs | None = None

    def __post_init__(self):
        for key in ("params", "compute", "output"):
            object.__setattr__(self, key, _dtype_name(getattr(self, key), key))
        rules = tuple(self.rules)
        for i, r in enumerate(rules):
            if not isinstance(r, Rule):
                raise ValueError(f"rule {i} must be a Rule, got {type(r).__name__}")
        object.__setattr__(self, "rules", rules)

    @property
    def param_dtype(self):
        return DTYPES[self.params]

    @property
    def compute_dtype(self):
        return DTYPES[self.compute]

    @property
    def output_dtype(self):
        return DTYPES[self.output]

    def for_op(self, path: str | Sequence[Any], kind: str) -> OpPrecision:
        """The precision of the op at ``path`` (str or sequence of keys) of ``kind``.

        >>> from mpx.policy import parse
        >>> policy = parse("fp8")
        >>> op = policy.for_op("blocks/0/mlp/fc", "dense")
        >>> op.precision, jnp.dtype(op.dtype).name, op.rule    # fp8 GEMM in bf16 compute, rule 2
        ('fp8', 'bfloat16', 2)
        >>> print(policy.rules[op.rule])
        @dense|einsum->fp8
        >>> policy.for_op("blocks/0/attn/softmax", "softmax").precision
        'fp32'
        >>> parse("bf16").for_op("blocks/0/attn/logits", "attention_logits").rule is None   # no rule: compute dtype
        True
        """
        return _resolve(self, path_str(path), kind)

    def cast_to_param(self, tree):
        return _cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree):
        return _cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree):
        return _cast_floating(tree, self.output_dtype)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that `parse` turns back into an equal policy."""
        return {
            "params": self.params,
            "compute": self.compute,
            "output": self.output,
            "rules": [r.to_dict() for r in self.rules],
            "fp8": dataclasses.asdict(self.fp8),
            "int8": dataclasses.asdict(self.int8),
            "loss_scale": dataclasses.asdict(self.loss_scale),
            **({"inputs": self.inputs.to_dict()} if self.inputs is not None else {}),
        }


@functools.lru_cache(maxsize=4096)
def _resolve(policy: Policy, path: str, kind: str) -> OpPrecision:
    if kind not in KINDS:
        raise ValueError(f"unknown op kind {kind!r} at {path!r}; expected one of {', '.join(KINDS)}{suggest(kind, KINDS)}")
    for i, rule in enumerate(policy.rules):
        if rule.matches(path, kind):
            precision, index = rule.use, i
            break
    else:
        precision, index = policy.compute, None
    clip = policy.inputs.clip_of(path) if policy.inputs is not None and kind in WEIGHT_RHS_KINDS else None
    grid = {"input_clip": clip, "input_format": policy.inputs.format if clip is not None else None}
    if precision == "fp8":
        return OpPrecision(path, kind, "fp8", policy.compute_dtype, policy.fp8, index, **grid)
    if precision == "int8":
        return OpPrecision(path, kind, "int8", policy.compute_dtype, None, index, int8=policy.int8, **grid)
    return OpPrecision(path, kind, precision, DTYPES[precision], None, index, **grid)


def _cast_floating(tree, dtype):
    def cast(x):
        if jnp.issubdtype(jnp.result_type(x), jnp.floating):
            return jnp.asarray(x).astype(dtype)
        return x

    return jax.tree.map(cast, tree)
