"""Which matmuls of a model can take 8 bits: the measurement behind `mpx.inspect.sensitivity`.

Per 8-bit format, the model's loss is traced once with every matmul probed (`mpx._probe`):
each computes its reference and its 8-bit result and a runtime mask picks one. The same
compiled function then runs with the mask "only op i", "all but op i", "all", "none" and
the candidate policies of the suggestion, over the same fixed batches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen, nnx

from mpx import _probe
from mpx._models import apply_policy, kinds_of
from mpx.linen._module import PolicyModule
from mpx._table import format_table
from mpx._speed_model import SpeedModel
from mpx.ops import gemm_dims
from mpx.policy import MATMUL_KINDS, Policy, parse

REASONS = ("chosen", "too sensitive", "too small to gain", "over budget together")


# ----------------------------------------------------------------------------- pure math

def sqnr_db(ref2: float, err2: float) -> float:
    """Signal-to-quantization-noise ratio in dB, ``10 log10(sum(ref^2) / sum((q - ref)^2))``,
    from the two sums (inf when the error is zero, -inf when the reference is)."""
    if err2 <= 0:
        return math.inf
    if ref2 <= 0:
        return -math.inf
    return 10.0 * math.log10(ref2 / err2)


def cosine(dot: float, ref2: float, q2: float) -> float:
    """``sum(ref q) / sqrt(sum(ref^2) sum(q^2))`` from the sums (1 for two zero tensors)."""
    if ref2 <= 0 and q2 <= 0:
        return 1.0
    return dot / math.sqrt(ref2 * q2) if ref2 > 0 and q2 > 0 else 0.0


def relative_change(loss: float, reference: float) -> float:
    """``(loss - reference) / |reference|``."""
    return (loss - reference) / abs(reference) if reference else loss - reference


# ----------------------------------------------------------------------------- results

@dataclasses.dataclass(frozen=True)
class FormatError:
    """What one 8-bit format does to one op, the rest of the model in the reference precision.

    ``*_sqnr`` in dB and ``*_cosine`` of the op's output, its lhs (input) gradient and its
    rhs gradient (the weight's, for dense, einsum and head ops) against the reference ones,
    summed over the batches and the op's calls; ``loss_change``: the relative change of the
    mean loss with only this op in 8 bits; ``loss_change_rest``: with every other op in 8
    bits and this one in the reference precision, against the reference loss. ``saturated``
    / ``flushed``: fractions of the (lhs, rhs, output gradient) elements an FP8 cast clips
    or rounds to zero (zeros for int8).
    """

    out_sqnr: float
    lhs_grad_sqnr: float
    rhs_grad_sqnr: float
    out_cosine: float
    lhs_grad_cosine: float
    rhs_grad_cosine: float
    loss_change: float
    loss_change_rest: float
    saturated: tuple[float, float, float]
    flushed: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class OpSensitivity:
    """One matmul: its GEMM (M, K, N per call), calls per step, share of the matmul flops,
    estimated gain (`SpeedModel.gain`), the error of each format measured, and what the
    suggestion made of it (``precision``, ``reason``: one of `REASONS`)."""

    path: str
    kind: str
    gemm: tuple[int, int, int]
    calls: int
    flops_share: float
    gain: float
    errors: tuple[tuple[str, FormatError], ...]
    precision: str
    reason: str

    def error(self, fmt: str) -> FormatError:
        return dict(self.errors)[fmt]


@dataclasses.dataclass(frozen=True)
class SensitivityReport:
    """`sensitivity`'s result. ``ops`` most sensitive first (the target format's loss change
    alone); ``losses``: mean loss of ``reference``, ``all <format>`` and ``suggested``;
    ``policy``: the suggested policy string, whose measured loss change is ``loss_change``
    and estimated gain ``gain`` (fraction of the matmul time saved). ``traces``: programs
    compiled (one per format); ``runs``: calls of them (one per batch and variant)."""

    reference: str
    target: str
    budget: float
    batches: int
    speed: SpeedModel
    ops: tuple[OpSensitivity, ...]
    losses: tuple[tuple[str, float], ...]
    policy: str
    loss_change: float
    gain: float
    traces: int
    runs: int

    def loss(self, name: str) -> float:
        return dict(self.losses)[name]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (inf SQNRs as strings)."""
        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return str(x)
            if isinstance(x, (list, tuple)):
                return [clean(v) for v in x]
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            return x
        d = dataclasses.asdict(self)
        d["losses"] = dict(self.losses)
        d["ops"] = [{**dataclasses.asdict(o), "errors": {f: dataclasses.asdict(e) for f, e in o.errors}}
                    for o in self.ops]
        return clean(d)

    def __str__(self) -> str:
        formats = [f for f, _ in self.ops[0].errors] if self.ops else []
        header = ["path", "kind", "MxKxN", "flops"]
        for f in formats:
            header += [f"{f} dloss", f"{f} out dB", f"{f} dx dB", f"{f} dw dB"]
        header += ["flushed", f"rest {self.target} dloss", "gain", "precision", "why"]
        rows = []
        for o in self.ops:
            row = [o.path, o.kind, "x".join(map(str, o.gemm)), f"{o.flops_share:.1%}"]
            for f in formats:
                e = o.error(f)
                row += [f"{e.loss_change:+.3%}", _db(e.out_sqnr), _db(e.lhs_grad_sqnr), _db(e.rhs_grad_sqnr)]
            fp8 = dict(o.errors).get("fp8")
            row += [f"{max(fp8.flushed):.2%}" if fp8 else "-", f"{o.error(self.target).loss_change_rest:+.3%}",
                    f"{o.gain:.1%}", o.precision, o.reason]
            rows.append(row)
        lines = format_table(header, rows)
        ref = self.loss("reference")
        lines.append(f"loss over {self.batches} batches: {self.reference} {ref:.5g}, all {self.target} "
                     f"{self.loss('all ' + self.target):.5g} ({relative_change(self.loss('all ' + self.target), ref):+.3%}), "
                     f"suggested {self.loss('suggested'):.5g} ({self.loss_change:+.3%}, budget {self.budget:.2%})")
        lines.append(f"speed model: 8 bits gain {self.speed.speedup:g}x at min(M, K, N) >= {self.speed.min_size} "
                     f"({self.speed.source}); suggested policy saves an estimated {self.gain:.1%} of the matmul time")
        lines.append(f"suggested policy: {self.policy}")
        return "\n".join(lines)


def _db(x: float) -> str:
    return "inf" if x == math.inf else f"{x:.1f}"


# ----------------------------------------------------------------------------- measurement

class _Runner:
    """The probed loss of one model, one compiled function per format (``traces`` counts them).
    ``loss(state, batch)``: the model's loss from its ``state`` (a pytree, the jitted argument)."""

    def __init__(self, state, loss: Callable[[Any, Any], jax.Array], batches, reference: Policy,
                 ops: dict[str, int]):
        self.state, self.batches, self.index = state, batches, ops
        self.traces = 0  # compiled programs
        self.runs = 0  # calls of them
        self._reference, self._fns, self._loss = reference, {}, loss

    def _fn(self, fmt: str):
        if fmt not in self._fns:
            def run(state, batch, mask, taps):
                self.traces += 1  # at trace time only

                def loss_of(taps):
                    probe = _probe.Probe(self.index, mask, taps, fmt, self._reference.compute_dtype,
                                         self._reference.fp8, self._reference.int8)
                    with _probe.probing(probe):
                        return jnp.asarray(self._loss(state, batch), jnp.float32)

                return jax.value_and_grad(loss_of)(taps)

            self._fns[fmt] = jax.jit(run)
        return self._fns[fmt]

    def __call__(self, fmt: str, on: Iterable[int]) -> tuple[float, np.ndarray]:
        """Mean loss over the batches with the ops ``on`` in ``fmt``, and the summed statistics."""
        n = len(self.index)
        mask = np.zeros((n,), np.float32)
        mask[list(on)] = 1.0
        taps = jnp.zeros((n, len(_probe.STATS)), jnp.float32)
        losses, stats = [], np.zeros((n, len(_probe.STATS)))
        for batch in self.batches:
            loss, s = self._fn(fmt)(self.state, batch, jnp.asarray(mask), taps)
            self.runs += 1
            losses.append(float(loss))
            stats += np.asarray(s, np.float64)
        return float(np.mean(losses)), stats


def discover(loss: Callable[[Any, Any], jax.Array], state, batch) -> list[tuple[str, str, tuple, tuple, Any]]:
    """The matmuls ``loss(state, batch)`` traces, first call of each path in trace order:
    (path, kind, lhs shape, rhs shape, dimension numbers). Nothing is computed."""
    probe = _probe.Probe({}, jnp.zeros((0,)), jnp.zeros((0, len(_probe.STATS))), "fp8", jnp.float32)

    def run(state, batch):
        with _probe.probing(probe):
            return loss(state, batch)

    jax.eval_shape(run, state, batch)
    first: dict[str, tuple] = {}
    for call in probe.seen:
        first.setdefault(call[0], call)
    return list(first.values())


def _under_reference(model, loss_fn, variables, reference: Policy) -> tuple[Any, Callable[[Any, Any], jax.Array]]:
    """``model`` under ``reference`` as (state, ``loss(state, batch)``): what the measurement
    differentiates and jits; the model itself is not changed."""
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise TypeError("variables= is for a linen module; an NNX module holds its own state: "
                            "sensitivity(model, loss_fn, batches)")
        copy = nnx.clone(model)
        apply_policy(copy, reference, kinds=kinds_of(model) or None)
        graphdef, state = nnx.split(copy)
        return state, lambda state, batch: loss_fn(nnx.merge(graphdef, state), batch)
    if isinstance(model, (linen.Module, PolicyModule)):
        if not (isinstance(variables, Mapping) and "params" in variables):
            got = "none" if variables is None else f"a {type(variables).__name__} without 'params'"
            raise TypeError(f"sensitivity of a linen module needs its variables (got {got}): "
                            f"sensitivity(model, loss_fn, batches, variables=model.init(key, x)); "
                            f"loss_fn(apply, batch) then gets apply(*inputs), the module applied with them")
        # A bf16/fp32 reference reads no FP8 state (the probe makes its own), so params suffice.
        under = apply_policy(model, reference, kinds=kinds_of(model) or None)

        def loss(variables, batch):
            return loss_fn(lambda *args, **kwargs: under.apply(variables, *args, **kwargs), batch)

        return variables, loss
    raise TypeError(f"sensitivity takes an NNX module or a linen module (or the mpx.linen.PolicyModule "
                    f"mpx.apply_policy made of one), got {type(model).__name__}")


def _errors(stats_row: np.ndarray, loss_change: float, loss_change_rest: float) -> FormatError:
    s = {name: float(stats_row[i]) for i, name in enumerate(_probe.STATS)}
    calls = max(s["calls"], 1.0)
    sq = {t: sqnr_db(s[f"{t}_ref2"], s[f"{t}_err2"]) for t in _probe.TENSORS}
    cos = {t: cosine(s[f"{t}_dot"], s[f"{t}_ref2"], s[f"{t}_q2"]) for t in _probe.TENSORS}
    frac = lambda what: tuple(s[f"{t}_{what}"] / calls for t in _probe.FP8_TENSORS)  # noqa: E731
    return FormatError(sq["out"], sq["lhs_grad"], sq["rhs_grad"], cos["out"], cos["lhs_grad"], cos["rhs_grad"],
                       loss_change, loss_change_rest, frac("saturated"), frac("flushed"))


def sensitivity(model: nnx.Module | linen.Module | PolicyModule, loss_fn: Callable[[Any, Any], jax.Array],
                batches: Sequence[Any], *, variables: Mapping[str, Any] | None = None, reference: str = "bf16",
                formats: Sequence[str] = ("fp8", "int8"), target: str = "fp8", budget: float = 0.005,
                speed: SpeedModel = SpeedModel()) -> SensitivityReport:
    """How much each matmul of ``model`` suffers in 8 bits, and the fastest policy that stays
    within ``budget``.

    ``model`` is measured under the ``reference`` policy (a preset name or compact policy
    string with no 8-bit matmul, e.g. ``"bf16"`` or ``"fp32"``) and not changed:

    - an NNX module: a copy is put under the reference; ``loss_fn(model, batch)``.
    - a linen module (or the `mpx.linen.PolicyModule` `mpx.apply_policy` made of one, for
      its ``kinds``): ``variables`` (what ``model.init`` returns; an ``fp8_meta``
      collection in them is not needed) is required, and ``loss_fn(apply, batch)`` gets
      ``apply``, with the module's call signature: ``apply(*args, **kwargs)`` is
      ``model.apply(variables, *args, **kwargs)`` under the reference policy::

          report = sensitivity(MLP(), lambda apply, b: jnp.mean((apply(b["x"]) - b["y"]) ** 2),
                               batches, variables=MLP().init(key, x))

    ``loss_fn`` returns a scalar loss; ``batches``: a few fixed batches (the same
    batches give the same report). For each format in ``formats`` and each matmul (the kinds
    `mpx.policy.MATMUL_KINDS`; attention runs its explicit path so that its two matmuls are
    ops), with only that op in 8 bits: the SQNR and cosine of its output, input gradient and
    weight gradient, the relative loss change, the FP8 saturated and flushed fractions; and
    the loss change with every op but that one in 8 bits.

    FP8 here is *current* scaling: each tensor scaled from its own amax (a fresh meta under
    the bootstrap rule, `mpx.fp8._meta.bootstrap`), which saturates at most the amax itself (by
    rounding); what a measurement in one shot can say honestly, without a delayed-scaling
    history. Under delayed scaling an op can saturate where its amax grows, which this does not
    see. A scanned stack of layers is one op (all its layers at once, ``calls`` of them).

    The suggestion (``target``: fp8 or int8): among the ops that gain under ``speed``
    (`SpeedModel`), those whose loss change alone is within ``budget`` (relative, 0.005 =
    0.5%) are added greedily, most gain per loss change first, each kept only if the
    *measured* loss change of the whole set stays within ``budget``. The report's ``policy``
    is that set as a policy string (the reference plus one rule per op or per group of
    layers, or the 8-bit preset plus exceptions, whichever is shorter), checked to give each
    op the precision the report says.

    One compiled function per format serves every variant (the mask is an argument), so the
    cost is about ``(2 * ops + 2 + candidates) * len(batches)`` runs of a probed step (each
    op computes both precisions, forward and backward).
    """
    formats = tuple(formats)
    for f in formats:
        if f not in _probe.FORMATS:
            raise ValueError(f"formats: unknown format {f!r}; expected some of {', '.join(_probe.FORMATS)}")
    if target not in formats:
        raise ValueError(f"target {target!r} must be one of the measured formats {formats}")
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 0):
        raise ValueError(f"budget must be a relative loss change >= 0 (0.005 = 0.5%), got {budget!r}")
    if not isinstance(reference, str):
        raise TypeError(f"reference must be a preset name or a compact policy string ('bf16', 'fp32', "
                        f"'bf16; fp8.margin=1'): the suggested policy is written from it; got {type(reference).__name__}")
    batches = list(batches)
    if not batches:
        raise ValueError("sensitivity needs at least one batch")
    ref_policy = parse(reference)
    state, loss = _under_reference(model, loss_fn, variables, ref_policy)
    found = [f for f in discover(loss, state, batches[0]) if f[1] in MATMUL_KINDS]
    if not found:
        raise ValueError("the loss traces no policy matmul: is the model's matmul in a layer mpx knows (nnx.Linear, "
                         "nnx.Einsum, nn.Dense, mpx.nn) or put under a policy with example inputs (mpx.apply_policy)?")
    for path, kind, *_ in found:
        if ref_policy.for_op(path, kind).is_quantized:
            raise ValueError(f"reference {reference!r} puts {path} ({kind}) in "
                             f"{ref_policy.for_op(path, kind).precision}; the reference must keep every matmul in a "
                             f"float precision, e.g. 'bf16' or 'fp32'")
    index = {f[0]: i for i, f in enumerate(found)}
    run = _Runner(state, loss, batches, ref_policy, index)
    n = len(found)
    base, stats0 = run(target, ())
    calls = stats0[:, _probe.STAT["calls"]] / len(batches)

    single: dict[str, list[tuple[float, np.ndarray]]] = {}
    rest: dict[str, list[float]] = {}
    all_on: dict[str, float] = {}
    for f in formats:
        single[f] = [run(f, [i]) for i in range(n)]
        rest[f] = [run(f, [j for j in range(n) if j != i])[0] for i in range(n)]
        all_on[f] = run(f, range(n))[0]

    flops = []
    for (path, kind, lhs, rhs, dims), c in zip(found, calls):
        m, k, nn_ = gemm_dims(lhs, rhs, dims)
        batch = int(np.prod([lhs[a] for a in dims[1][0]])) if dims[1][0] else 1
        flops.append(3 * 2 * m * k * nn_ * batch * c)  # forward and both gradients
    total = sum(flops) or 1.0
    gemms = [gemm_dims(lhs, rhs, dims) for _, _, lhs, rhs, dims in found]
    gains = [speed.gain(g, fl / total) for g, fl in zip(gemms, flops)]
    alone = [relative_change(single[target][i][0], base) for i in range(n)]

    chosen, reasons = _choose(run, target, base, budget, gains, alone)
    suggested_loss = run(target, sorted(chosen))[0]
    ref_precisions = {path: ref_policy.for_op(path, kind).precision for path, kind, *_ in found}
    decided = {path: (target if i in chosen else ref_precisions[path]) for i, (path, *_) in enumerate(found)}
    policy = policy_string(reference, target, [(p, k) for p, k, *_ in found], decided)

    ops = []
    for i, (path, kind, *_) in enumerate(found):
        errors = tuple((f, _errors(single[f][i][1][i], relative_change(single[f][i][0], base),
                                   relative_change(rest[f][i], base))) for f in formats)
        ops.append(OpSensitivity(path, kind, gemms[i], int(round(calls[i])), flops[i] / total, gains[i], errors,
                                 decided[path], reasons[i]))
    ops.sort(key=lambda o: (-o.error(target).loss_change, o.error(target).out_sqnr))
    losses = (("reference", base), *((f"all {f}", all_on[f]) for f in formats), ("suggested", suggested_loss))
    return SensitivityReport(reference, target, float(budget), len(batches), speed, tuple(ops), losses, policy,
                             relative_change(suggested_loss, base), sum(gains[i] for i in chosen), run.traces,
                             run.runs)


def _choose(run, target: str, base: float, budget: float, gains: Sequence[float],
            alone: Sequence[float]) -> tuple[set[int], list[str]]:
    """The greedy choice (see `sensitivity`): the set of ops in ``target`` and a reason per op."""
    n = len(gains)
    reasons = ["" for _ in range(n)]
    candidates = []
    for i in range(n):
        if gains[i] <= 0:
            reasons[i] = "too small to gain"
        elif alone[i] > budget:
            reasons[i] = "too sensitive"
        else:
            candidates.append(i)
    # Most gain per unit of loss change first; a change at or below zero costs nothing.
    candidates.sort(key=lambda i: -gains[i] / max(alone[i], 1e-9))
    chosen: set[int] = set()
    if candidates and relative_change(run(target, candidates)[0], base) <= budget:
        chosen = set(candidates)  # all of them fit: one run
    else:
        for i in candidates:
            if relative_change(run(target, sorted(chosen | {i}))[0], base) <= budget:
                chosen.add(i)
            else:
                reasons[i] = "over budget together"
    for i in chosen:
        reasons[i] = "chosen"
    return chosen, reasons


# ----------------------------------------------------------------------------- the policy string

def _escape(path: str) -> str:
    return "/".join(s if s == "*" else "".join("\\" + c if c in ".^$+?()[]{}|\\" else c for c in s)
                    for s in path.split("/"))


def _generalise(path: str) -> str:
    return "/".join("*" if s.isdigit() else s for s in path.split("/"))


def _rules(ops: Sequence[tuple[str, str]], want: dict[str, str], given: Callable[[str, str], str]) -> list[str]:
    """Rules that give each op ``want[path]`` where ``given(path, kind)`` differs: one per
    kind whose ops all want the same, else one per pattern (layer indices as ``*``) whose
    ops all want the same, else one per op."""
    differing = [(p, k) for p, k in ops if want[p] != given(p, k)]
    rules, done = [], set()
    for path, kind in differing:
        if path in done:
            continue
        same_kind = [p for p, k in ops if k == kind]
        pattern = _generalise(path)
        group = [p for p, _ in ops if _generalise(p) == pattern]
        if len(same_kind) > 1 and all(want[p] == want[path] for p in same_kind):
            rules.append(f"@{kind}->{want[path]}")
            done.update(same_kind)
        elif pattern != path and len(group) > 1 and all(want[p] == want[path] for p in group):
            rules.append(f"{_escape(pattern)}->{want[path]}")
            done.update(group)
        else:
            rules.append(f"{_escape(path)}->{want[path]}")
            done.add(path)
    return rules


def policy_string(reference: str, target: str, ops: Sequence[tuple[str, str]], want: dict[str, str]) -> str:
    """The shortest policy string that gives each (path, kind) of ``ops`` the precision
    ``want`` says: the reference with rules for the 8-bit ops, or (for a ``bf16``
    reference) the ``target`` preset with exceptions. Checked with `mpx.policy.parse`."""
    ref = parse(reference)
    candidates = [_join(reference, _rules(ops, want, lambda p, k: ref.for_op(p, k).precision))]
    if reference.strip() == "bf16":
        preset = parse(target)
        candidates.append(_join(target, _rules(ops, want, lambda p, k: preset.for_op(p, k).precision)))
    for spec in sorted(candidates, key=len):
        policy = parse(spec)
        if all(policy.for_op(p, k).precision == want[p] for p, k in ops):
            return spec
    raise AssertionError(f"no policy string gives the chosen precisions: {candidates}")  # a bug, not a user error


def _join(base: str, rules: list[str]) -> str:
    return "; ".join([base.strip(), *rules])
