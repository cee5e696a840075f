"""Precision policies: which precision each op of a model runs in.

A `Policy` has three dtypes (parameter storage, compute, output), an ordered tuple of
`Rule`s, the `Fp8Config` that fp8 ops use, the `Int8Config` that int8 ops use and the
`LossScaleConfig` of the run. An op
is named by its module path (``"blocks/0/mlp/fc1"``) and its kind (`KINDS`); the first
rule that matches decides, and an op no rule matches runs in the compute dtype.

Rule paths are matched against the whole path: ``*`` is one path segment, ``**`` any
number of segments, and the rest is a regular expression (``(qkv|out)``). Kinds are a
``|``-separated list. A rule that says ``fp8`` or ``int8`` applies only to matmul kinds
(`MATMUL_KINDS`); other ops pass over it to the next rule.

Presets (`PRESETS`): ``fp32``; ``bf16`` and ``fp16`` (softmax, norms and the loss in fp32;
fp16 with a dynamic loss scale); ``fp8`` and ``int8`` (bf16 compute, dense and einsum
matmuls in FP8 / int8, embeddings and the head in bf16, softmax, norms and loss in fp32).

``inputs`` (`StaticInputs`, dict key ``inputs``) puts the input of each listed weight
matmul (kinds `WEIGHT_RHS_KINDS`) on the int8 or E4M3 grid of a calibrated static clip
value: post-training quantization of activations (`mpx.ptq`). Being part of the policy,
the grids are part of every model built and every program traced under it.

Build a policy from a preset name, a compact string or a dict (YAML-ready) with
`parse`::

    parse("fp8")
    parse("bf16; blocks/*/mlp/*->fp8; fp8.amax_history=16")
    parse("fp8; blocks/*/mlp/*->int8; int8.recipe=qat")
    parse({"preset": "fp16", "rules": [{"kind": "head", "use": "fp32"}]})

Rules given next to a preset come before the preset's own, so they take precedence.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mpx.fp8 import Fp8Config
from mpx.int8 import Int8Config
from mpx.loss_scale import LossScaleConfig

PRECISIONS = ("fp8", "bf16", "fp16", "fp32", "int8")
QUANTIZED = ("fp8", "int8")  # precisions that apply to matmuls only
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}
KINDS = (
    "dense",  # a projection: activations x weight
    "einsum",  # a general contraction with a weight
    "attention_logits",  # q @ k^T
    "attention_values",  # softmax(q k^T) @ v
    "head",  # the output projection to the vocabulary / classes
    "embed",  # embedding lookup (the dtype it is gathered into)
    "softmax",
    "norm",
    "loss",
)
MATMUL_KINDS = ("dense", "einsum", "attention_logits", "attention_values", "head")
WEIGHT_RHS_KINDS = ("dense", "einsum", "head")  # matmuls whose rhs is a weight (the rest: two activations)
INPUT_FORMATS = ("int8", "fp8")


def _suggest(value: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    aliases = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float8": "fp8"}
    hint = aliases.get(str(value)) or (close[0] if close else None)
    return f" (did you mean {hint!r}?)" if hint else ""


def _translate_pattern(pattern: str) -> str:
    """Path pattern -> regex: ``**/`` any leading segments, ``**`` anything, ``*`` one segment."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]+")
            i += 1
        else:
            out.append(pattern[i])
            i += 1
    return "".join(out)



def kind_overrides(kinds: Mapping[str, str] | None) -> list:
    """``[(compiled path pattern, kind)]`` of a user's ``kinds`` mapping (policy pattern syntax)."""
    out = []
    for pattern, kind in (kinds or {}).items():
        if kind not in KINDS:
            raise ValueError(f"unknown op kind {kind!r} for path {pattern!r} in kinds; expected one of {', '.join(KINDS)}")
        out.append((re.compile(_translate_pattern(pattern)), kind))
    return out


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
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < float(value) < float("inf"):
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
                f"{', '.join(PRECISIONS)}{_suggest(self.use, PRECISIONS)}"
            )
        kinds = self.kinds
        for k in kinds or ():
            if k not in KINDS:
                raise ValueError(f"unknown op kind {k!r} for {where}; expected one of {', '.join(KINDS)}{_suggest(k, KINDS)}")
        if self.use in QUANTIZED and kinds is not None and not set(kinds) & set(MATMUL_KINDS):
            raise ValueError(
                f"{where} asks for {self.use} on kinds {'|'.join(kinds)}, which are not matmuls; "
                f"{self.use} applies to {', '.join(MATMUL_KINDS)}"
            )
        if self.match is not None:
            try:
                regex = re.compile(_translate_pattern(self.match))
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
        (``int8 (qat)``), any other its precision."""
        label = self.int8.label if self.is_int8 else self.precision
        return f"{label} ({self.input_format} inputs)" if self.input_clip is not None else label


def _dtype_name(value, key: str) -> str:
    if isinstance(value, str):
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {value!r} for {key}; expected one of {', '.join(DTYPES)}{_suggest(value, DTYPES)}")
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
        return _resolve(self, _path_str(path), kind)

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


def _path_str(path) -> str:
    if isinstance(path, str):
        return path
    return "/".join(key_name(p) for p in path)


def key_name(key) -> str:
    """A path entry as users see it: DictKey.key, SequenceKey.idx, GetAttrKey.name, or itself."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


@functools.lru_cache(maxsize=4096)
def _resolve(policy: Policy, path: str, kind: str) -> OpPrecision:
    if kind not in KINDS:
        raise ValueError(f"unknown op kind {kind!r} at {path!r}; expected one of {', '.join(KINDS)}{_suggest(kind, KINDS)}")
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


# ----------------------------------------------------------------------------- presets

_STABLE_IN_FP32 = Rule(kind="softmax|norm|loss", use="fp32")


def _preset(name: str) -> Policy:
    if name == "fp32":
        return Policy()
    if name == "bf16":
        return Policy(compute="bf16", rules=(_STABLE_IN_FP32,))
    if name == "fp16":
        return Policy(compute="fp16", rules=(_STABLE_IN_FP32,), loss_scale=LossScaleConfig(kind="dynamic"))
    if name in ("fp8", "int8"):  # the 8-bit presets differ only in the dense matmuls' precision
        return Policy(
            compute="bf16",
            rules=(
                _STABLE_IN_FP32,
                Rule(kind="embed|head", use="bf16"),
                Rule(kind="dense|einsum", use=name),
            ),
        )
    raise ValueError(f"unknown policy preset {name!r}; expected one of {', '.join(PRESETS)}{_suggest(name, PRESETS)}")


PRESETS = ("fp32", "bf16", "fp16", "fp8", "int8")


# ----------------------------------------------------------------------------- parsing

TOP_KEYS = ("preset", "params", "compute", "output", "rules", "fp8", "int8", "loss_scale", "inputs")
_RULE_KEYS = ("match", "kind", "use")


def _unknown_key(key, accepted, where) -> ValueError:
    return ValueError(f"unknown key {key!r} in {where}; accepted keys: {', '.join(accepted)}{_suggest(key, accepted)}")


def _config(cls, values: Mapping[str, Any], base, where: str):
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} must be a mapping of {', '.join(names)}, got {values!r}")
    for key in values:
        if key not in names:
            raise _unknown_key(key, names, where)
    return dataclasses.replace(base, **values)


def _rule_from_dict(d: Any, i: int) -> Rule:
    where = f"rule {i}"
    if not isinstance(d, Mapping):
        raise ValueError(f"{where} must be a mapping with keys {', '.join(_RULE_KEYS)}, got {d!r}")
    for key in d:
        if key not in _RULE_KEYS:
            raise _unknown_key(key, _RULE_KEYS, where)
    if "use" not in d:
        raise ValueError(f"{where} ({d!r}) has no 'use'; expected one of {', '.join(PRECISIONS)}")
    try:
        return Rule(use=d["use"], match=d.get("match"), kind=d.get("kind"))
    except ValueError as e:
        raise ValueError(f"policy {where}: {e}") from None


def policy_from_dict(d: Mapping[str, Any]) -> Policy:
    """Build a policy from a dict with keys from ``preset, params, compute, output, rules, fp8, int8,
    loss_scale, inputs``."""
    if not isinstance(d, Mapping):
        raise ValueError(f"a policy dict must be a mapping, got {type(d).__name__}")
    for key in d:
        if key not in TOP_KEYS:
            raise _unknown_key(key, TOP_KEYS, "policy")
    base = _preset(d["preset"]) if "preset" in d else Policy()
    rules = d.get("rules", [])
    if not isinstance(rules, Sequence) or isinstance(rules, (str, bytes)):
        raise ValueError(f"policy 'rules' must be a list of {{match, kind, use}} mappings, got {rules!r}")
    own = tuple(_rule_from_dict(r, i) for i, r in enumerate(rules))
    return Policy(
        params=d.get("params", base.params),
        compute=d.get("compute", base.compute),
        output=d.get("output", base.output),
        rules=own + base.rules,
        fp8=_config(Fp8Config, d.get("fp8", {}), base.fp8, "fp8"),
        int8=_config(Int8Config, d.get("int8", {}), base.int8, "int8"),
        loss_scale=_config(LossScaleConfig, d.get("loss_scale", {}), base.loss_scale, "loss_scale"),
        inputs=_config(StaticInputs, d["inputs"], StaticInputs(), "inputs") if d.get("inputs") is not None else None,
    )


def _scalar(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def policy_from_string(spec: str) -> Policy:
    """Build a policy from a compact string of ``;``-separated items.

    Items: a preset name (first item only); ``params=``/``compute=``/``output=`` a dtype;
    a rule ``PATTERN@KINDS->PRECISION`` (either side of ``@`` may be left out);
    ``fp8.KEY=VALUE``; ``int8.KEY=VALUE``; ``loss_scale=KIND``; ``loss_scale.KEY=VALUE``.
    """
    d: dict[str, Any] = {"rules": []}
    fp8: dict[str, Any] = {}
    int8: dict[str, Any] = {}
    loss: dict[str, Any] = {}
    items = [s.strip() for s in spec.split(";") if s.strip()]
    if not items:
        raise ValueError(f"empty policy string; give a preset name ({', '.join(PRESETS)}) or items like 'compute=bf16'")
    for i, item in enumerate(items):
        if "->" in item:
            target, use = (s.strip() for s in item.rsplit("->", 1))
            match, _, kind = target.partition("@")
            d["rules"].append({"use": use, **({"match": match} if match else {}), **({"kind": kind} if kind else {})})
        elif "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
            if key.startswith("fp8."):
                fp8[key[4:]] = _scalar(value)
            elif key.startswith("int8."):
                int8[key[5:]] = _scalar(value)
            elif key == "loss_scale":
                loss["kind"] = value
            elif key.startswith("loss_scale."):
                loss[key[len("loss_scale."):]] = _scalar(value)
            elif key in ("params", "compute", "output"):
                d[key] = value
            else:
                raise ValueError(
                    f"unknown key {key!r} in policy item {item!r}; expected params, compute, output, "
                    f"fp8.<key>, int8.<key>, loss_scale or loss_scale.<key>"
                )
        elif i == 0:
            d["preset"] = item
        else:
            raise ValueError(
                f"cannot read policy item {item!r}: expected 'key=value' or a rule 'PATTERN@KINDS->PRECISION' "
                f"(a preset name may only come first)"
            )
    if fp8:
        d["fp8"] = fp8
    if int8:
        d["int8"] = int8
    if loss:
        d["loss_scale"] = loss
    return policy_from_dict(d)


def parse(spec: Policy | str | Mapping[str, Any]) -> Policy:
    """A `Policy` from a policy, a preset name / compact string, or a dict.

    >>> policy = parse("bf16; blocks/*/mlp/*->fp8; @head->fp32")
    >>> [str(rule) for rule in policy.rules]      # the preset's own rule comes last
    ['blocks/*/mlp/*->fp8', '@head->fp32', '@softmax|norm|loss->fp32']
    >>> policy == parse({"preset": "bf16", "rules": [{"match": "blocks/*/mlp/*", "use": "fp8"},
    ...                                              {"kind": "head", "use": "fp32"}]})
    True
    >>> parse("bf16; @head->float32")
    Traceback (most recent call last):
    ...
    ValueError: policy rule 0: unknown precision 'float32' for rule @head->float32; ... (did you mean 'fp32'?)
    """
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, str):
        return policy_from_string(spec)
    if isinstance(spec, Mapping):
        return policy_from_dict(spec)
    raise ValueError(f"a policy spec must be a Policy, a string or a dict, got {type(spec).__name__}")
