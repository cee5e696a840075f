"""FP8 numerics: quantize, scales, amax histories, and an FP8 `dot_general`.

Convention: ``scale`` multiplies into the FP8 domain.

    q = saturate(x * scale)          quantize
    x ~= q / scale                   dequantize
    scale = fp8_max / (amax * 2**margin)

so a tensor whose absolute maximum is ``amax`` just fills the FP8 range. A zero,
non-finite or vanishing amax keeps the previous scale (a fresh meta starts at 1).

Recipes (`Fp8Config.recipe`):

* ``delayed``: quantize with the scale computed from the amax *history* of earlier
  steps; this step's amax is pushed into the history (length N) afterwards and the
  scale recomputed from it (``max`` over the window or the ``most_recent`` entry).
* ``current``: quantize with the scale of this tensor's own amax, now. The history
  and scale are still recorded, for statistics.

Formats: ``hybrid`` quantizes activations and weights to E4M3 and gradients to E5M2;
``e4m3`` uses E4M3 for all three.

The state of one FP8 matmul is an `Fp8Meta` (one `Fp8Scale` each for lhs, rhs and the
output gradient). `fp8_dot_general` hands the updated meta back as the *cotangent* of
its meta argument, because the output gradient's amax only exists in the backward
pass; a train step then overwrites the meta with that cotangent (see `mpx.step`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2

Recipe = Literal["delayed", "current"]
Format = Literal["hybrid", "e4m3"]
AmaxCompute = Literal["max", "most_recent"]

_RECIPES = ("delayed", "current")
_FORMATS = ("hybrid", "e4m3")
_AMAX_COMPUTE = ("max", "most_recent")


def fp8_max(dtype) -> float:
    """Largest finite value of an FP8 dtype (448 for E4M3, 57344 for E5M2)."""
    return float(jnp.finfo(dtype).max)


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """How FP8 tensors are scaled. Static: hashable, safe as a jit static argument.

    Attributes:
      recipe: ``delayed`` (scale from the amax history) or ``current`` (from this amax).
      format: ``hybrid`` (E4M3 forward, E5M2 gradients) or ``e4m3`` (E4M3 everywhere).
      amax_history: length N of the amax history kept per tensor.
      amax_compute: ``max`` over the history, or its ``most_recent`` entry.
      margin: extra headroom; the scale is divided by ``2**margin``.
    """

    recipe: Recipe = "delayed"
    format: Format = "hybrid"
    amax_history: int = 1024
    amax_compute: AmaxCompute = "max"
    margin: int = 0

    def __post_init__(self):
        _check_choice("recipe", self.recipe, _RECIPES)
        _check_choice("format", self.format, _FORMATS)
        _check_choice("amax_compute", self.amax_compute, _AMAX_COMPUTE)
        if not isinstance(self.amax_history, int) or isinstance(self.amax_history, bool) or self.amax_history < 1:
            raise ValueError(f"fp8 amax_history must be an integer >= 1, got {self.amax_history!r}")
        if not isinstance(self.margin, int) or isinstance(self.margin, bool) or not 0 <= self.margin <= 32:
            raise ValueError(f"fp8 margin must be an integer in [0, 32], got {self.margin!r}")

    @property
    def forward_dtype(self):
        """FP8 dtype of the forward operands (activations and weights)."""
        return E4M3

    @property
    def grad_dtype(self):
        """FP8 dtype of the output gradient in the backward pass."""
        return E5M2 if self.format == "hybrid" else E4M3


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"fp8 {name} {value!r} is not supported; expected one of {', '.join(choices)}")


# ----------------------------------------------------------------------------- state


def _zero():
    return jnp.zeros((), jnp.float32)


@struct.dataclass
class Fp8Scale:
    """Scaling state of one tensor: the scale in use and the amax history (newest first).

    ``saturated`` / ``flushed``: fractions of the tensor's elements that were clipped to
    ±fp8_max / nonzero but rounded to 0 when it was last quantized (statistics only).
    Shapes: ``scale``, ``saturated``, ``flushed`` f32[]; ``amax_history`` f32[N].
    """

    scale: jax.Array
    amax_history: jax.Array
    saturated: jax.Array = struct.field(default_factory=_zero)
    flushed: jax.Array = struct.field(default_factory=_zero)

    @classmethod
    def init(cls, history_len: int) -> Fp8Scale:
        return cls(scale=jnp.ones((), jnp.float32), amax_history=jnp.zeros((history_len,), jnp.float32))


@struct.dataclass
class Fp8Meta:
    """FP8 state of one matmul: the scales of its two operands and of its output gradient."""

    lhs: Fp8Scale
    rhs: Fp8Scale
    grad: Fp8Scale

    @classmethod
    def init(cls, history_len: int) -> Fp8Meta:
        return cls(*(Fp8Scale.init(history_len) for _ in range(3)))


def is_fp8_scale(x) -> bool:
    return isinstance(x, Fp8Scale)


# ----------------------------------------------------------------------------- pure math


def quantize(x: jax.Array, dtype, scale: jax.Array) -> jax.Array:
    """Saturating cast of ``x * scale`` to the FP8 ``dtype`` (round to nearest even).

    Values beyond the FP8 range (infinities included) become ``±fp8_max``; NaN stays NaN
    so that a finite check downstream still sees it.
    """
    limit = fp8_max(dtype)
    y = x.astype(jnp.float32) * scale.astype(jnp.float32)
    return jnp.clip(y, -limit, limit).astype(dtype)


def quantization_stats(x: jax.Array, q: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fractions of ``x`` that `quantize` saturated (|x * scale| > fp8_max) and flushed (x != 0, q == 0)."""
    limit = fp8_max(q.dtype)
    y = jnp.abs(x.astype(jnp.float32) * scale.astype(jnp.float32))
    saturated = jnp.mean((y > limit).astype(jnp.float32))
    flushed = jnp.mean(((x != 0) & (q.astype(jnp.float32) == 0)).astype(jnp.float32))
    return saturated, flushed


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Inverse of `quantize`: ``q / scale`` in ``dtype``."""
    return (q.astype(jnp.float32) / scale.astype(jnp.float32)).astype(dtype)


def amax(x: jax.Array) -> jax.Array:
    """Absolute maximum of ``x`` as f32[]."""
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def compute_scale(amax: jax.Array, prev_scale: jax.Array, fp8_max: float, *, margin: int = 0) -> jax.Array:
    """``fp8_max / (amax * 2**margin)``; ``prev_scale`` when that is not a finite positive number.

    Keeping the previous scale covers an all-zero tensor (amax 0), a non-finite amax and
    an amax so small that the quotient overflows f32.
    """
    amax = jnp.asarray(amax, jnp.float32)
    scale = jnp.float32(fp8_max) / amax / jnp.float32(2.0**margin)
    ok = (amax > 0) & jnp.isfinite(amax) & jnp.isfinite(scale) & (scale > 0)
    return jnp.where(ok, scale, prev_scale.astype(jnp.float32))


def update_amax_history(history: jax.Array, amax: jax.Array) -> jax.Array:
    """Push ``amax`` into slot 0 and drop the oldest entry: one roll per step."""
    return jnp.concatenate([jnp.reshape(amax, (1,)).astype(history.dtype), history[:-1]])


def reduce_amax_history(history: jax.Array, amax_compute: AmaxCompute) -> jax.Array:
    """The amax a delayed scale is computed from: the window's ``max`` or its ``most_recent``."""
    if amax_compute == "max":
        return jnp.max(history)
    if amax_compute == "most_recent":
        return history[0]
    raise ValueError(f"amax_compute {amax_compute!r} is not supported; expected one of {', '.join(_AMAX_COMPUTE)}")


def scale_for_use(state: Fp8Scale, x: jax.Array, dtype, config: Fp8Config) -> jax.Array:
    """The scale that quantizes ``x`` now: from the history (delayed) or from ``x`` (current)."""
    if config.recipe == "delayed":
        return state.scale
    return compute_scale(amax(x), state.scale, fp8_max(dtype), margin=config.margin)


def next_scale_state(state: Fp8Scale, history: jax.Array, dtype, config: Fp8Config, *, stats=None) -> Fp8Scale:
    """The state after this step, given its already-rolled ``history`` and optional
    ``(saturated, flushed)`` statistics of this step's quantization."""
    if config.recipe == "delayed":
        reduced = reduce_amax_history(history, config.amax_compute)
    else:
        reduced = history[0]
    scale = compute_scale(reduced, state.scale, fp8_max(dtype), margin=config.margin)
    saturated, flushed = stats if stats is not None else (_zero(), _zero())
    return Fp8Scale(scale=scale, amax_history=history, saturated=saturated, flushed=flushed)


def update_scale_state(state: Fp8Scale, amax: jax.Array, dtype, config: Fp8Config, *, stats=None) -> Fp8Scale:
    """One step of scaling state: roll ``amax`` into the history, recompute the scale."""
    return next_scale_state(state, update_amax_history(state.amax_history, amax), dtype, config, stats=stats)


def merge_meta_updates(old: Fp8Meta, a: Fp8Meta, b: Fp8Meta, config: Fp8Config) -> Fp8Meta:
    """Combine two updates of the same op in one step: amaxes by max, never by sum.

    ``a`` and ``b`` are metas updated from the same ``old`` (each rolled once), or all-zero
    (an op that did not run). Their histories differ only in slot 0, so the elementwise
    max is the history of a single roll with the larger amax; the scale is recomputed.
    Used for an op called several times in one differentiation and for gradient
    accumulation over micro-batches.
    """

    def merge(o: Fp8Scale, x: Fp8Scale, y: Fp8Scale, dtype) -> Fp8Scale:
        history = jnp.maximum(x.amax_history, y.amax_history)
        ran = (x.scale > 0) | (y.scale > 0)
        stats = (jnp.maximum(x.saturated, y.saturated), jnp.maximum(x.flushed, y.flushed))
        merged = next_scale_state(o, history, dtype, config, stats=stats)
        return jax.tree.map(lambda m, z: jnp.where(ran, m, z), merged, x)

    fwd, grad = config.forward_dtype, config.grad_dtype
    return Fp8Meta(
        lhs=merge(old.lhs, a.lhs, b.lhs, fwd),
        rhs=merge(old.rhs, a.rhs, b.rhs, fwd),
        grad=merge(old.grad, a.grad, b.grad, grad),
    )


def apply_meta_updates(meta, updates):
    """Overwrite every `Fp8Scale` in ``meta`` with its update, where its op ran.

    ``updates`` is what differentiating with respect to ``meta`` returned: the new state
    for every op that ran, zeros for one that did not (its history must not roll). A
    state that ran always has a positive scale, so ``scale > 0`` tells the two apart.
    """

    def apply(old: Fp8Scale, new: Fp8Scale) -> Fp8Scale:
        ran = new.scale > 0
        return jax.tree.map(lambda n, o: jnp.where(ran, n, o), new, old)

    return jax.tree.map(apply, meta, updates, is_leaf=is_fp8_scale)


# ----------------------------------------------------------------------------- dot_general


def _dot_transpose_dims(dims, x_ndim: int, y_ndim: int, *, wrt: Literal["lhs", "rhs"]):
    """Dimension numbers and output permutation for the gradient of a ``dot_general``.

    For ``out = dot_general(x, y, dims)`` (out axes: batch, x free, y free) the gradient
    wrt x is ``transpose(dot_general(g, y, dims_g), perm)``; wrt y, swap the roles.
    Returns ``(dims_g, perm)``.
    """
    (xc, yc), (xb, yb) = dims
    if wrt == "rhs":
        xc, yc, xb, yb, x_ndim, y_ndim = yc, xc, yb, xb, y_ndim, x_ndim
        first_free = "y"
    else:
        first_free = "x"
    x_free = [a for a in range(x_ndim) if a not in xc and a not in xb]
    y_free = [a for a in range(y_ndim) if a not in yc and a not in yb]
    nb = len(xb)
    # Output axes of the forward dot: batch, then lhs free, then rhs free.
    if first_free == "x":
        g_x = list(range(nb, nb + len(x_free)))
        g_y = list(range(nb + len(x_free), nb + len(x_free) + len(y_free)))
    else:  # roles swapped: "x" is the forward rhs, whose free axes come second
        g_y = list(range(nb, nb + len(y_free)))
        g_x = list(range(nb + len(y_free), nb + len(y_free) + len(x_free)))
    dims_g = ((tuple(g_y), tuple(y_free)), (tuple(range(nb)), tuple(yb)))
    # Result axes: batch, g's x-free axes, then y's contracting axes in increasing order.
    y_contract_sorted = sorted(yc)
    perm = []
    for a in range(x_ndim):
        if a in xb:
            perm.append(xb.index(a))
        elif a in x_free:
            perm.append(nb + x_free.index(a))
        else:
            partner = yc[xc.index(a)]
            perm.append(nb + len(x_free) + y_contract_sorted.index(partner))
    return dims_g, tuple(perm)


def _scaled_dot(qa, qb, dims, inv_scale, out_dtype):
    """FP8 x FP8 ``dot_general`` with the combined inverse scale applied to its output.

    FP8 arrays go straight into ``lax.dot_general`` so XLA emits an FP8 GEMM on GPUs
    that have one; a dequantize-then-dot would not be rewritten.
    """
    out = lax.dot_general(qa, qb, dims, preferred_element_type=out_dtype)
    return out * inv_scale.astype(out_dtype)


def _normalize_dims(dimension_numbers):
    (lc, rc), (lb, rb) = dimension_numbers
    return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


def fp8_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    meta: Fp8Meta,
    *,
    config: Fp8Config,
    out_dtype=None,
) -> tuple[jax.Array, Fp8Meta]:
    """``lax.dot_general`` with both operands quantized to FP8; returns ``(out, meta)``.

    Forward: lhs and rhs are quantized to E4M3 with the scales of ``meta`` (or of their
    own amax under the ``current`` recipe) and multiplied as FP8; the product is rescaled
    and returned in ``out_dtype`` (default: ``lhs.dtype``). Backward: the output
    gradient is quantized (E5M2 under ``hybrid``, E4M3 under ``e4m3``) and both input
    gradients are FP8 GEMMs too. The updated meta (amaxes of lhs, rhs and the output
    gradient rolled into their histories, scales recomputed) is the cotangent of
    ``meta``.

    The returned ``meta`` equals the input; pass it to the next call of the *same* op
    within the step (weight sharing, a loop) so that the backward pass combines the
    amaxes of all calls by max. Calls that fan one meta out instead get summed
    cotangents from autodiff. A single call can ignore it.

    Args:
      lhs, rhs: operands, any float dtype (e.g. bf16 activations, f32 master weights).
      dimension_numbers: as for ``lax.dot_general``; batch dimensions are supported.
      meta: the op's `Fp8Meta`.
      config: the `Fp8Config` (recipe, format, history length, margin).
      out_dtype: dtype of the result and of the GEMM's output.
    """
    dims = _normalize_dims(dimension_numbers)
    out_dtype = jnp.dtype(out_dtype if out_dtype is not None else lhs.dtype)
    history_len = meta.lhs.amax_history.shape[0]
    if history_len != config.amax_history:
        raise ValueError(
            f"Fp8Meta has an amax history of length {history_len} but the Fp8Config asks for "
            f"{config.amax_history}; create the meta with Fp8Meta.init({config.amax_history})."
        )
    return _fp8_dot(lhs, rhs, meta, dims, config, out_dtype, jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _fp8_dot(lhs, rhs, meta, dims, config, out_dtype, lhs_dtype, rhs_dtype):
    return _fp8_dot_fwd(lhs, rhs, meta, dims, config, out_dtype, lhs_dtype, rhs_dtype)[0]


def _fp8_dot_fwd(lhs, rhs, meta, dims, config, out_dtype, lhs_dtype, rhs_dtype):
    fwd = config.forward_dtype
    lhs_scale = scale_for_use(meta.lhs, lhs, fwd, config)
    rhs_scale = scale_for_use(meta.rhs, rhs, fwd, config)
    q_lhs = quantize(lhs, fwd, lhs_scale)
    q_rhs = quantize(rhs, fwd, rhs_scale)
    out = _scaled_dot(q_lhs, q_rhs, dims, 1.0 / (lhs_scale * rhs_scale), out_dtype)
    stats = (quantization_stats(lhs, q_lhs, lhs_scale), quantization_stats(rhs, q_rhs, rhs_scale))
    residuals = (q_lhs, q_rhs, lhs_scale, rhs_scale, amax(lhs), amax(rhs), stats, meta)
    return (out, meta), residuals


def _fp8_dot_bwd(dims, config, out_dtype, lhs_dtype, rhs_dtype, residuals, cotangents):
    q_lhs, q_rhs, lhs_scale, rhs_scale, lhs_amax, rhs_amax, (lhs_stats, rhs_stats), meta = residuals
    g, later_meta = cotangents
    gdt = config.grad_dtype
    g_scale = scale_for_use(meta.grad, g, gdt, config)
    q_g = quantize(g, gdt, g_scale)

    dims_l, perm_l = _dot_transpose_dims(dims, q_lhs.ndim, q_rhs.ndim, wrt="lhs")
    d_lhs = _scaled_dot(q_g, q_rhs, dims_l, 1.0 / (g_scale * rhs_scale), out_dtype)
    d_lhs = jnp.transpose(d_lhs, perm_l).astype(lhs_dtype)
    dims_r, perm_r = _dot_transpose_dims(dims, q_lhs.ndim, q_rhs.ndim, wrt="rhs")
    d_rhs = _scaled_dot(q_g, q_lhs, dims_r, 1.0 / (g_scale * lhs_scale), out_dtype)
    d_rhs = jnp.transpose(d_rhs, perm_r).astype(rhs_dtype)

    fwd = config.forward_dtype
    mine = Fp8Meta(
        lhs=update_scale_state(meta.lhs, lhs_amax, fwd, config, stats=lhs_stats),
        rhs=update_scale_state(meta.rhs, rhs_amax, fwd, config, stats=rhs_stats),
        grad=update_scale_state(meta.grad, amax(g), gdt, config, stats=quantization_stats(g, q_g, g_scale)),
    )
    # `later_meta` is the cotangent from calls of this op that consumed the returned meta:
    # zeros if none, else their updates, which are combined with ours by max.
    return d_lhs, d_rhs, merge_meta_updates(meta, mine, later_meta, config)


_fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)
