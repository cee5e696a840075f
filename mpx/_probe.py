"""A trace-time switch in the op dispatch that measures what 8 bits do to each matmul.

Inside `probing`, every policy matmul whose path the `Probe` lists computes its reference
result (both operands cast to the reference dtype) *and* its 8-bit result, and passes on
one of them by a runtime mask (``mask[i]`` for the op in row ``i``), forward and backward.
One traced program therefore serves "only op i in 8 bits", "all but op i" and any other
choice, by changing the mask it is called with. Each op also reports, through the
cotangent of its row of ``taps`` (as an FP8 meta reports its amaxes), how far its 8-bit
output and gradients are from the reference ones (`STATS`). Outside `probing` nothing of
this is traced: `mpx.ops.dot_general` builds the program it always builds.

The 8-bit side is scaled from each tensor's own amax (a fresh `Fp8Meta` under the
bootstrap rule; int8 scales are current anyway): an honest one-shot measurement, free of
any delayed-scaling history.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from mpx._dims import normalize_dims
from mpx.fp8 import Fp8Config, Fp8Meta, fp8_dot_general
from mpx.fp8._meta import bootstrap
from mpx.fp8._numerics import current_scale, observe
from mpx.int8 import Int8Config, int8_dot_general

FORMATS = ("fp8", "int8")

# One row of taps per op: for the output, the lhs (input) gradient and the rhs (weight)
# gradient, sum(ref^2), sum((q - ref)^2), sum(ref * q), sum(q^2); then the saturated and
# flushed fractions of the lhs, the rhs and the output gradient under FP8 (0 under int8);
# then the number of calls (a row sums over the calls of its op: a scan, a module called twice).
TENSORS = ("out", "lhs_grad", "rhs_grad")
SUMS = ("ref2", "err2", "dot", "q2")
FP8_TENSORS = ("lhs", "rhs", "grad")
STATS = tuple(f"{t}_{s}" for t in TENSORS for s in SUMS) + tuple(
    f"{t}_{s}" for t in FP8_TENSORS for s in ("saturated", "flushed")) + ("calls",)
STAT = {name: i for i, name in enumerate(STATS)}


@dataclasses.dataclass(frozen=True)
class Probe:
    """What `probing` measures. ``index``: op path -> row (ops not listed run as usual);
    ``mask`` (n,) float, 1 where the op passes on its 8-bit result; ``taps`` (n, len(STATS))
    zeros to differentiate with respect to (their cotangent is the statistics); ``format``
    fp8 or int8 with its config; ``reference``: the dtype of the reference matmuls.
    ``seen``: filled at trace time with (path, kind, lhs shape, rhs shape, dims) per call."""

    index: Mapping[str, int]
    mask: jax.Array
    taps: jax.Array
    format: str
    reference: object
    fp8: Fp8Config = Fp8Config()
    int8: Int8Config = Int8Config()
    seen: list = dataclasses.field(default_factory=list, compare=False)


_PROBE: contextvars.ContextVar[Probe | None] = contextvars.ContextVar("mpx_probe", default=None)


@contextlib.contextmanager
def probing(probe: Probe) -> Iterator[Probe]:
    """Trace the policy matmuls listed in ``probe`` as probed ones (see the module doc)."""
    token = _PROBE.set(probe)
    try:
        yield probe
    finally:
        _PROBE.reset(token)


def active() -> Probe | None:
    """The `Probe` in force where this is traced, or None (the normal case)."""
    return _PROBE.get()


def probed(probe: Probe, lhs, rhs, dimension_numbers, path: str, kind: str, rhs_is_weight: bool):
    """The op's output under ``probe``: reference or 8-bit by its mask entry; its row of
    ``taps`` collects the statistics. An op not listed in ``probe.index`` returns None."""
    dims = normalize_dims(dimension_numbers)
    probe.seen.append((path, kind, tuple(lhs.shape), tuple(rhs.shape), dims))
    i = probe.index.get(path)
    if i is None:
        return None
    quant = probe.fp8 if probe.format == "fp8" else probe.int8
    return _probed_dot(lhs, rhs, probe.taps[i], probe.mask[i], dims, probe.format, quant,
                       jnp.dtype(probe.reference), rhs_is_weight)


def _reference_dot(lhs, rhs, dims, dtype):
    return lax.dot_general(lhs.astype(dtype), rhs.astype(dtype), dims)


def _quantized_dot(lhs, rhs, dims, fmt, config, dtype, rhs_is_weight):
    if fmt == "fp8":
        with bootstrap(True):  # a fresh meta: every tensor scaled from its own amax
            meta = Fp8Meta.init(config)
            return fp8_dot_general(lhs, rhs, dims, meta, out_dtype=dtype, rhs_is_weight=rhs_is_weight)[0]
    return int8_dot_general(lhs, rhs, dims, config, rhs_is_weight=rhs_is_weight, out_dtype=dtype)


def _sums(ref, q) -> jax.Array:
    """sum(ref^2), sum((q - ref)^2), sum(ref q), sum(q^2), in f32."""
    r, x = ref.astype(jnp.float32), q.astype(jnp.float32)
    return jnp.stack([jnp.sum(r * r), jnp.sum((x - r) ** 2), jnp.sum(r * x), jnp.sum(x * x)])


def _fp8_fractions(x, dtype, config: Fp8Config) -> jax.Array:
    """(saturated, flushed) of ``x`` quantized to ``dtype`` with a scale from its own amax."""
    return jnp.stack(observe(x, dtype, current_scale(x, dtype, margin=config.margin))[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _probed_dot(lhs, rhs, tap, select, dims, fmt, config, dtype, rhs_is_weight):
    return _probed_fwd(lhs, rhs, tap, select, dims, fmt, config, dtype, rhs_is_weight)[0]


def _probed_fwd(lhs, rhs, tap, select, dims, fmt, config, dtype, rhs_is_weight):
    ref, ref_vjp = jax.vjp(functools.partial(_reference_dot, dims=dims, dtype=dtype), lhs, rhs)
    q, q_vjp = jax.vjp(functools.partial(_quantized_dot, dims=dims, fmt=fmt, config=config, dtype=dtype,
                                         rhs_is_weight=rhs_is_weight), lhs, rhs)
    on = select > 0.5
    if fmt == "fp8":
        fractions = jnp.concatenate([_fp8_fractions(lhs, config.forward_dtype, config),
                                     _fp8_fractions(rhs, config.forward_dtype, config)])
    else:
        fractions = jnp.zeros((4,), jnp.float32)
    return jnp.where(on, q, ref), (ref_vjp, q_vjp, on, _sums(ref, q), fractions, tap, select)


def _probed_bwd(dims, fmt, config, dtype, rhs_is_weight, residuals, g):
    ref_vjp, q_vjp, on, out_sums, fractions, tap, select = residuals
    ref_lhs, ref_rhs = ref_vjp(g)
    q_lhs, q_rhs = q_vjp(g)
    grad_fractions = (_fp8_fractions(g, config.grad_dtype, config) if fmt == "fp8" else jnp.zeros((2,), jnp.float32))
    stats = jnp.concatenate([out_sums, _sums(ref_lhs, q_lhs), _sums(ref_rhs, q_rhs), fractions, grad_fractions,
                             jnp.ones((1,), jnp.float32)])
    return (jnp.where(on, q_lhs, ref_lhs), jnp.where(on, q_rhs, ref_rhs), stats.astype(tap.dtype),
            jnp.zeros_like(select))


_probed_dot.defvjp(_probed_fwd, _probed_bwd)
