"""Which op runs in which precision, and how the FP8 tensors are doing.

    print(mpx.inspect.describe(model, policy))     # every op, its precision, the deciding rule
    print(mpx.inspect.fp8_stats(state.fp8_meta))   # amax, scale, saturated / flushed fractions
    print(mpx.inspect.fp8_gemms(step, state, batch))  # which fp8 matmuls became FP8 GEMMs
    print(mpx.inspect.sensitivity(model, loss_fn, batches))  # which matmuls can take 8 bits
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from mpx import program
from mpx.fp8 import Fp8Meta
from mpx._naming import equations, op_paths
from mpx._table import format_table
from mpx.policy import FASTEST_8BIT, Policy, Rule, key_name
from mpx._sensitivity import FormatError, OpSensitivity, SensitivityReport, sensitivity
from mpx._speed_model import SpeedModel


@dataclasses.dataclass(frozen=True)
class OpRow:
    """One op of a model and what the policy decided for it.

    ``precision`` is the op's `OpPrecision.label` (``fp8``, ``int8 (qat)``, ``bf16``, ...),
    ``"not under the policy"`` for a matmul the policy cannot reach
    (``note`` says why); ``note`` is ``"captured"`` for a matmul put under the policy
    without a layer hook (`mpx.capture`), ``"x3"`` and the like for an op that runs
    several times (a module called twice), ``"stack 12"`` for one inside a scan.
    """

    path: str
    kind: str
    precision: str
    dtype: str
    rule: str  # the deciding rule as text, or "default (compute dtype)"
    note: str = ""


NOT_UNDER_POLICY = "not under the policy"
_NO_EXAMPLE = ("matmuls written as lax.dot_general / jnp.einsum / @ / attend are listed when describe "
               "is given example inputs: describe(model, policy, x)")


@dataclasses.dataclass(frozen=True)
class PrecisionTable:
    """The ops of a model under a policy; ``unmatched_rules``: path rules that matched none
    of them (rules by kind alone, like the presets', are never reported)."""

    rows: tuple[OpRow, ...]
    unmatched_rules: tuple[Rule, ...]
    notes: tuple[str, ...] = ()

    def by_precision(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for row in self.rows:
            out.setdefault(row.precision, []).append(row.path)
        return out

    def __str__(self) -> str:
        header = ["path", "kind", "precision", "dtype", "rule", "note"]
        lines = format_table(header, [dataclasses.astuple(r) for r in self.rows])
        counts = ", ".join(f"{k}: {len(v)}" for k, v in sorted(self.by_precision().items()))
        lines.append(f"{len(self.rows)} ops ({counts})")
        for rule in self.unmatched_rules:
            lines.append(f"warning: rule '{rule}' matches no op of this model (a typo in its path or kind?)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _row(policy: Policy, path: str, kind: str, note: str = "") -> OpRow:
    op = policy.for_op(path, kind)
    rule = f"{op.rule}: {policy.rules[op.rule]}" if op.rule is not None else "default (compute dtype)"
    return OpRow(path, kind, op.label, np.dtype(op.dtype).name, rule, note)


def _matmul_rows(policy: Policy, matmuls) -> list[OpRow]:
    """One row per distinct matmul (path), in trace order; repeated calls counted."""
    seen: dict[str, list] = {}
    for m in matmuls:
        seen.setdefault(m.path, []).append(m)
    rows = []
    for path, group in seen.items():
        m = group[0]
        notes = [m.reason] if m.op is None else (["captured"] if m.via == "capture" else [])
        if m.stack:
            notes.append("stack " + "x".join(map(str, m.stack)))
        if len(group) > 1:
            notes.append(f"x{len(group)}")
        if m.op is None:
            rows.append(OpRow(path, m.kind, NOT_UNDER_POLICY, np.dtype(m.lhs.dtype).name, "", ", ".join(notes)))
        else:
            rows.append(_row(policy, path, m.op.kind if m.via == "layer" else m.kind, ", ".join(notes)))
    return rows


def table_for_ops(ops: Sequence[tuple[str, str]], policy: Policy) -> PrecisionTable:
    """A `PrecisionTable` for (path, kind) pairs, sorted by path."""
    return _table(policy, [_row(policy, path, kind) for path, kind in sorted(ops)])


def _table(policy: Policy, rows: list[OpRow], notes: Sequence[str] = ()) -> PrecisionTable:
    ops = [(r.path, r.kind) for r in rows if r.precision != NOT_UNDER_POLICY]
    # A rule shadowed by an earlier one still matches ops: only a path rule matching none is reported.
    unmatched = tuple(r for r in policy.rules if r.match is not None and not any(r.matches(p, k) for p, k in ops))
    return PrecisionTable(tuple(rows), unmatched, tuple(notes))


def describe(model, policy: Policy, *args, kinds: Mapping[str, str] | None = None, device=None,
             **kwargs) -> PrecisionTable:
    """Every op of ``model`` with the precision ``policy`` gives it and the deciding rule.

    ``device`` (a jax device, an `mpx.program.Target` or its name): the chip the program is
    for. Each 8-bit op then says whether that chip's matrix units multiply its format in 8
    bits (``native on v5e``) or widen it (``widened on v5e``: an fp8 matmul on a TPU v5e runs
    at the f32 rate, slower than bf16), and a policy asking for a widened format is warned of
    (`Widened8Bit`), with the format the chip has.

    ``model`` is an NNX module, a linen module, or what `mpx.apply_policy` returned (for a
    model object: an `mpx.linen.Wrapped`), followed by example inputs (``args``,
    ``kwargs``) to trace it with. From the trace every matmul is listed, whatever wrote it
    (``nn.Dense``, ``lax.dot_general``, ``jnp.einsum``, ``@``), those the policy cannot
    reach too, with the reason (`mpx.matmuls`). An NNX module without inputs lists its
    layers' ops only (and says so). ``kinds`` maps path patterns to op kinds, as in
    `mpx.apply_policy`, and defaults to those the model was put under the policy with.
    Path rules that match no op are listed as warnings.
    """
    from flax import linen, nnx

    from mpx import _models as models
    from mpx.nn._discover import find_ops

    if isinstance(model, nnx.Module):
        kinds = models.kinds_of(model) if kinds is None else kinds
        layer_rows = [_row(policy, f.path, f.kind) for f in find_ops(model, kinds)]
        if not args and not kwargs:
            return _on_device(_table(policy, layer_rows, [_NO_EXAMPLE]), policy, device)
        traced = _matmul_rows(policy, models.matmuls(model, policy, *args, kinds=kinds, **kwargs))
        by_path = {r.path: r for r in traced}
        rows = [by_path.pop(r.path, r) for r in layer_rows] + list(by_path.values())
        return _on_device(_table(policy, rows), policy, device)
    if not isinstance(model, (linen.Module, models.PolicyModule, models.Wrapped)):
        raise TypeError(models.unreadable("describe", model))
    if not args and not kwargs:
        raise TypeError("describe needs example inputs for a linen module or a model object (it traces the model): "
                        "describe(model, policy, x)")
    return _on_device(_table(policy, _matmul_rows(policy, models.matmuls(model, policy, *args, kinds=kinds, **kwargs))),
                      policy, device)


class Widened8Bit(UserWarning):
    """A policy asks for an 8-bit format the chip's matrix units do not have: its matmuls run
    widened, slower than the chip's own 8-bit format (and on a TPU slower than bf16)."""


class SpelledOutBlocks(UserWarning):
    """A policy scales FP8 in blocks (``block``, ``mx``) on a chip whose FP8 GEMMs do not take
    such scales (every chip for ``block``; all but Blackwell's for ``mx``): each block of the
    contraction is a GEMM of its own, with its partial products rescaled and summed outside the
    GEMMs: correct numerics, several times the traffic of one scale per tensor (README, "FP8
    scaling recipes")."""


def _spelled_out(policy: Policy, row: OpRow) -> set[str]:
    """The block granularities (``block``, ``mx``) among the GEMMs of an fp8 op of the table."""
    op = policy.for_op(row.path, row.kind)
    return set(op.fp8.gemms) & {"block", "mx"} if row.precision.startswith("fp8") and op.is_fp8 else set()


def _device_name(device) -> str:
    """A short name for a device: a target's name (``v5e``, ``h100``), else jax's device kind."""
    if isinstance(device, (str, program.Target)):
        return program.get_target(device).name
    known = program.target_of(device)
    return known.name if known is not None else str(getattr(device, "device_kind", device))


def _on_device(table: PrecisionTable, policy: Policy, device) -> PrecisionTable:
    """``table`` (of ``policy``) with each 8-bit op marked native or widened on ``device``, and a
    warning for the widened ones and for FP8 block scales (nothing when ``device`` is None)."""
    if device is None:
        return table
    native, name = program.native_8bit(device), _device_name(device)
    rows, widened = [], {}
    for row in table.rows:
        fmt = row.precision.split(" ")[0]
        if fmt in ("fp8", "int8"):
            on = f"native on {name}" if fmt in native else f"widened on {name}"
            row = dataclasses.replace(row, note=f"{row.note}, {on}" if row.note else on)
            if fmt not in native:
                widened.setdefault(fmt, []).append(row.path)
        rows.append(row)
    notes = list(table.notes)
    for fmt, paths in widened.items():
        has = " and ".join(sorted(native)) or "no 8-bit format"
        message = (f"{len(paths)} ops run in {fmt}, which {name}'s matrix units do not multiply in 8 bits: they run "
                   f"widened, slower than bf16 on a TPU; {name} has {has}"
                   + (f" (precision '{FASTEST_8BIT}' picks it)" if native else ""))
        warnings.warn(message, Widened8Bit, stacklevel=3)
        notes.append(message)
    own = program.block_scaled(device)
    blocked = [kinds - own for kinds in (_spelled_out(policy, r) for r in rows) if kinds - own]
    if blocked:
        kinds = sorted(set().union(*blocked))
        takes = f"block scales of {', '.join(sorted(own))} only" if own else "one scale per operand"
        message = (f"{len(blocked)} fp8 ops scale in blocks ({', '.join(kinds)}): {name}'s FP8 GEMMs take {takes}, "
                   f"so every block of the contraction is a GEMM of its own and its partial products are "
                   f"rescaled and summed outside the GEMMs: the numerics of the recipe, at several times the memory "
                   f"traffic of one scale per tensor (fp8, fp8-rowwise)")
        warnings.warn(message, SpelledOutBlocks, stacklevel=3)
        notes.append(message)
    return dataclasses.replace(table, rows=tuple(rows), notes=tuple(notes))


@dataclasses.dataclass(frozen=True)
class TensorStats:
    """Scaling statistics of one FP8 tensor (lhs, rhs or grad of one op) after the last step.

    ``calls``: how many times the op ran in that step; ``fanout``: 1 when every reuse of
    its meta was threaded, k > 1 when k un-threaded uses added up their amaxes (a larger,
    safe amax; thread the meta to get the exact max).
    """

    path: str
    tensor: str
    amax: float
    scale: float
    saturated: float
    flushed: float
    calls: float
    fanout: float


_PLUMBING = ("fp8_meta", "meta", "dot_general", "einsum_op")


def fp8_stats(meta) -> list[TensorStats]:
    """Per tensor: latest amax, scale, the fractions saturated / flushed to zero, calls, fan-out.

    ``meta`` is any pytree of `Fp8Meta` (a dict, an NNX state, a linen collection).
    Paths leave out container plumbing (``value`` attributes). A stacked meta (a
    scanned stack of layers) gives one row per layer, its index in brackets.
    """
    found = jax.tree_util.tree_flatten_with_path(meta, is_leaf=lambda x: isinstance(x, Fp8Meta))[0]
    out = []
    for key_path, m in found:
        if not isinstance(m, Fp8Meta):
            continue
        keys = [k for k in map(key_name, key_path) if k not in ("value", "raw_value")]
        while keys and (keys[-1] in _PLUMBING or keys[-1].startswith("PolicyDotGeneral_")):  # the op's path
            keys.pop()
        path = "/".join(keys)
        for index in np.ndindex(*m.stack):
            where = path + (f"[{','.join(map(str, index))}]" if index else "")
            for name, s, _ in m.tensors():
                values = [float(np.asarray(getattr(s, f))[index]) for f in _STAT_FIELDS]
                out.append(TensorStats(where, name, *values))
    return out


_STAT_FIELDS = ("amax", "scale", "saturated", "flushed", "calls", "fanout")


def format_fp8_stats(stats: Sequence[TensorStats]) -> str:
    """The statistics as an aligned text table."""
    rows = [(s.path, s.tensor, f"{s.amax:.4g}", f"{s.scale:.4g}", f"{s.saturated:.2%}", f"{s.flushed:.2%}",
             f"{s.calls:g}", f"{s.fanout:g}") for s in stats]
    return "\n".join(format_table(["path", "tensor", "amax", "scale", "saturated", "flushed", "calls", "fanout"], rows))


# ----------------------------------------------------------------------------- FP8 GEMMs in the compiled program

@dataclasses.dataclass(frozen=True)
class GemmRow:
    """The matmuls of one policy op in a program: ``dots`` dot_generals traced under its
    name, ``fp8_dots`` of them with two FP8 operands; ``fp8_gemms`` FP8 GEMMs the backend
    compiled for it (cuBLASLt FP8 calls or Triton GEMMs on FP8 operands; forward and backward:
    3 per call site of an fp8 op) and ``other_gemms`` GEMMs of any other kind (an FP8 op with
    one of these lost FP8 somewhere)."""

    path: str
    dots: int
    fp8_dots: int
    fp8_gemms: int
    other_gemms: int = 0


@dataclasses.dataclass(frozen=True)
class Fp8GemmReport:
    """What `fp8_gemms` found. ``backend``: the platform or target compiled for;
    ``unattributed_gemms``: FP8 GEMMs outside any policy op."""

    backend: str
    rows: tuple[GemmRow, ...]
    unattributed_gemms: int

    @property
    def fp8_dots(self) -> int:
        return sum(r.fp8_dots for r in self.rows)

    @property
    def fp8_gemms(self) -> int:
        return sum(r.fp8_gemms for r in self.rows) + self.unattributed_gemms

    def missing(self) -> list[str]:
        """Ops whose FP8 dot_generals did not all become FP8 GEMMs, or that also have GEMMs of
        another kind, on this backend."""
        return [r.path for r in self.rows if r.fp8_gemms < r.fp8_dots or (r.fp8_dots and r.other_gemms)]

    def __str__(self) -> str:
        lines = format_table(["path", "dots", "fp8 dots", "fp8 GEMMs", "other GEMMs"],
                             [dataclasses.astuple(r) for r in self.rows])
        lines.append(f"{self.fp8_gemms} FP8 GEMMs for {self.fp8_dots} FP8 dot_generals on {self.backend}")
        return "\n".join(lines)


def dot_generals(fn, *args) -> list[tuple[str, tuple[str, ...]]]:
    """Every ``dot_general`` in the program ``fn(*args)`` traces (scan, remat and jit
    bodies included): ``(name stack, operand dtypes)``."""
    return [(where, tuple(str(v.aval.dtype) for v in eqn.invars))
            for eqn, where in equations(jax.make_jaxpr(fn)(*args).jaxpr) if eqn.primitive.name == "dot_general"]


def fp8_gemms(fn, *args, target: str | None = None, **kwargs) -> Fp8GemmReport:
    """Compile ``fn(*args, **kwargs)`` and report, per policy op, its dot_generals, how
    many take FP8 operands, and how many became FP8 GEMMs.

    ``target``: compile for that device without it (``"h100"``: `mpx.program.compile_for`)
    instead of for this machine's default backend. Ops are found by the name
    `mpx.ops.dot_general` gives them (``mpx[<path>]``), in the traced program (what the
    policy emitted) and in the compiled one (`mpx.program.kernels`). Pass the train step
    itself to check the forward and backward together. On a backend without FP8 GEMMs (CPU)
    every ``fp8_gemms`` is 0.
    """
    traced: dict[str, list[int]] = {}
    for where, dtypes in dot_generals(functools.partial(fn, **kwargs), *args):
        scopes = op_paths(where)
        if scopes:
            row = traced.setdefault(scopes[-1], [0, 0])
            row[0] += 1
            row[1] += all("float8" in d for d in dtypes)
    if target is None:
        compiled, backend = jax.jit(functools.partial(fn, **kwargs)).lower(*args).compile(), jax.default_backend()
    else:
        compiled, backend = program.compile_for(functools.partial(fn, **kwargs), *args, target=target), target
    gemms: dict[str, list[int]] = {}
    unattributed = 0
    for k in program.kernels(compiled.as_text()):
        if k.kind != "gemm":
            continue
        if k.op is None:
            unattributed += k.gemm == "fp8"
            continue
        row = gemms.setdefault(k.op, [0, 0])
        row[0 if k.gemm == "fp8" else 1] += 1
    paths = sorted(set(traced) | set(gemms))
    rows = tuple(GemmRow(p, *traced.get(p, (0, 0)), *gemms.get(p, (0, 0))) for p in paths)
    return Fp8GemmReport(backend, rows, unattributed)


__all__ = [
    "NOT_UNDER_POLICY",
    "FormatError",
    "Fp8GemmReport",
    "GemmRow",
    "OpRow",
    "OpSensitivity",
    "PrecisionTable",
    "SensitivityReport",
    "SpeedModel",
    "SpelledOutBlocks",
    "TensorStats",
    "Widened8Bit",
    "describe",
    "dot_generals",
    "format_fp8_stats",
    "fp8_gemms",
    "fp8_stats",
    "sensitivity",
]
