"""Post-training quantization: a trained model's weights in int8 or FP8, its matmul inputs
on calibrated static scales.

    qparams = quantize_params(params, "int8")            # weights per channel, the rest float
    params_q = dequantize_params(qparams)                # what an int8-weight model computes with
    stats = calibrate(lambda batch: model(batch), batches)   # matmul inputs' |x|, per op
    policy = dataclasses.replace(policy, inputs=stats.static_inputs("int8", "percentile"))
    # a model built under this policy takes each weight matmul's input on its int8 grid

Weights. One scale per output channel: per column of a ``kernel`` (the last axis: the
output features of a dense layer) and per row of an ``embedding`` (one per token: the
output channel of a tied head). Biases and norm parameters stay float: they are a sliver
of the bytes and their errors are not averaged out by a sum. Both formats store codes
and the size of one code step, ``x ~= codes * scale``:

- int8: symmetric, ``scale = amax / 127``, codes round to nearest even in [-127, 127]
  (`mpx.int8._numerics`);
- fp8: E4M3, ``scale = amax * f32(1 / 448)`` so the channel's largest value lands on (or
  within a rounding of) E4M3's largest, codes ``x / scale`` rounded by the cast (ties to
  even), saturating.

Activations. `calibrate` runs the model on a few batches with a recorder on every matmul
whose rhs is a weight (kinds `mpx.policy.WEIGHT_RHS_KINDS`, through `mpx.ops.dot_general`)
and keeps, per op path, the absolute maximum of its input and a histogram of ``|x|``
(`HIST_EDGES`: 32 bins per octave, so a percentile is read to within 2.2%). A policy with
``inputs`` (`mpx.policy.StaticInputs`) makes those ops snap their input to the int8 or E4M3
grid of a static per-tensor scale, ``amax / 127`` or ``amax / 448``, values beyond ``amax`` saturating: the
matmul then sees exactly what an int8 (or FP8) GEMM with a calibrated input scale would
multiply. The product itself is taken in the op's dtype (f32 sums of grid values), which
a GEMM with an int32 (or f32) accumulator matches up to the sum's rounding.

Scanned layer stacks share one op path for every layer, so they share one calibrated
scale (the statistics of every layer pooled).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from mpx.fp8._numerics import E4M3, fp8_max
from mpx.int8 import _numerics as int8_numerics
from mpx.policy import StaticInputs, key_name

# `record` and `fake_quantize_input` are the hooks `mpx.ops.dot_general` calls, not a user's.
__all__ = [
    "FORMATS",
    "ActivationStats",
    "QuantizedWeight",
    "calibrate",
    "dequantize_params",
    "nbytes",
    "quantize_params",
    "quantize_weight",
    "quantized_paths",
]

Format = Literal["int8", "fp8"]
FORMATS = ("int8", "fp8")
_CODE_MAX = {"int8": float(int8_numerics.INT8_MAX), "fp8": fp8_max(E4M3)}
_CODE_DTYPE = {"int8": jnp.int8, "fp8": E4M3}

# Histogram of |x| for percentile calibration: 32 bins per octave from 2^-24 to 2^24.
HIST_EDGES = np.exp2(np.arange(-24 * 32, 24 * 32 + 1) / 32).astype(np.float32)


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown quantization format {format!r}; expected one of {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------- weights


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A weight as ``codes`` (int8 or float8_e4m3fn) and ``scale`` (f32, the size of one
    code step, kept dims: broadcasts against ``codes``); ``format`` is static."""

    codes: jax.Array
    scale: jax.Array
    format: str = dataclasses.field(metadata={"static": True}, default="int8")

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        return (self.codes.astype(jnp.float32) * self.scale.astype(jnp.float32)).astype(dtype)


def quantize_weight(w: jax.Array, format: Format, channel_axis: int) -> QuantizedWeight:
    """``w`` with one scale per slice along ``channel_axis`` (the amax taken over every
    other axis)."""
    _check_format(format)
    channel_axis %= w.ndim
    axes = tuple(a for a in range(w.ndim) if a != channel_axis)
    if format == "int8":
        return QuantizedWeight(*int8_numerics.quantize(w, axes), "int8")
    x = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
    limit = _CODE_MAX["fp8"]
    scale = jnp.maximum(amax * np.float32(1.0 / limit), np.float32(int8_numerics.MIN_SCALE))  # see int8's absmax_scale
    return QuantizedWeight(jnp.clip(x / scale, -limit, limit).astype(E4M3), scale, "fp8")


def weight_channel_axis(path: tuple[str, ...], leaf: Any) -> int | None:
    """The output-channel axis of a matmul weight at ``path``, None for a parameter that
    stays float: a ``kernel`` of rank >= 2 -> its last axis (a dense layer's output
    features), an ``embedding`` of rank 2 -> its rows (one scale per token)."""
    if not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.floating):
        return None
    name = str(path[-1]) if path else ""
    if name == "kernel" and leaf.ndim >= 2:
        return leaf.ndim - 1
    if name == "embedding" and leaf.ndim == 2:
        return 0
    return None


def quantize_params(
    params: Any,
    format: Format,
    *,
    channel_axis: Callable[[tuple[str, ...], Any], int | None] = weight_channel_axis,
) -> Any:
    """``params`` with each matmul weight (``channel_axis`` says which, and along which
    axis its scales run) replaced by a `QuantizedWeight`; every other leaf as it was."""
    _check_format(format)

    def one(path, leaf):
        axis = channel_axis(tuple(key_name(k) for k in path), leaf)
        return leaf if axis is None else quantize_weight(leaf, format, axis)

    return jax.tree_util.tree_map_with_path(one, params)


def dequantize_params(qparams: Any, dtype=jnp.float32) -> Any:
    """Float params again: each `QuantizedWeight` as ``codes * scale`` in ``dtype``."""
    return jax.tree.map(lambda x: x.dequantize(dtype) if isinstance(x, QuantizedWeight) else x, qparams,
                        is_leaf=lambda x: isinstance(x, QuantizedWeight))


def quantized_paths(qparams: Any) -> list[str]:
    """The ``/``-joined paths of the `QuantizedWeight` leaves of ``qparams``."""
    flat = jax.tree_util.tree_flatten_with_path(qparams, is_leaf=lambda x: isinstance(x, QuantizedWeight))[0]
    return ["/".join(key_name(k) for k in path) for path, leaf in flat if isinstance(leaf, QuantizedWeight)]


def nbytes(tree: Any) -> int:
    """Bytes of the arrays of ``tree`` (codes and scales counted for quantized weights)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- activations

_RECORDER: contextvars.ContextVar[ActivationStats | None] = contextvars.ContextVar("mpx_ptq_recorder", default=None)


def record(path: str, x: jax.Array) -> None:
    """Under `calibrate`, add the weight matmul input ``x`` of op ``path`` to the statistics
    (`mpx.ops.dot_general` calls this for every weight matmul); otherwise nothing."""
    recorder = _RECORDER.get()
    if recorder is None:
        return
    a = jnp.abs(x.astype(jnp.float32)).ravel()
    bins = jnp.searchsorted(jnp.asarray(HIST_EDGES), a, side="right")
    counts = jnp.zeros(len(HIST_EDGES) + 1, jnp.int32).at[bins].add(1)
    # A host callback rather than an output: it works from inside jit, scan and the
    # re-evaluated traces of mpx.capture alike (a scanned stack reports every layer).
    jax.debug.callback(functools.partial(recorder.add, path), jnp.max(a), counts)


def fake_quantize_input(x: jax.Array, amax: float, format: Format) -> jax.Array:
    """``x`` on the grid of the static per-tensor scale ``amax / code_max`` (int8: codes
    round to nearest even in [-127, 127]; fp8: the E4M3 cast), saturating at ``amax``; in
    ``x``'s dtype."""
    _check_format(format)
    limit = _CODE_MAX[format]
    scale = np.float32(max(float(amax), int8_numerics.MIN_SCALE) / limit)
    y = jnp.clip(x.astype(jnp.float32) / scale, -limit, limit)
    codes = jnp.round(y) if format == "int8" else y.astype(E4M3).astype(jnp.float32)
    return (codes * scale).astype(x.dtype)


@dataclasses.dataclass
class ActivationStats:
    """Per op path: the absolute maximum of the matmul inputs seen, their ``|x|``
    histogram over `HIST_EDGES` (``counts[0]``: values below the first edge, zeros
    included; ``counts[-1]``: above the last) and how many values were seen."""

    amax: dict[str, float] = dataclasses.field(default_factory=dict)
    counts: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def add(self, path: str, amax: float, counts: np.ndarray) -> None:
        self.amax[path] = max(self.amax.get(path, 0.0), float(amax))
        self.counts[path] = self.counts.get(path, 0) + np.asarray(counts, np.int64)

    def percentile(self, path: str, q: float) -> float:
        """The ``q``-th percentile of ``|x|`` at ``path``: the upper edge of the histogram
        bin where the cumulative count reaches ``q`` percent (at most the amax)."""
        counts = self.counts[path]
        target = q / 100.0 * counts.sum()
        i = int(np.searchsorted(np.cumsum(counts), target))
        edge = float(HIST_EDGES[min(i, len(HIST_EDGES) - 1)])
        return min(edge, self.amax[path])

    def amaxes(self, method: Literal["absmax", "percentile"] = "absmax", percentile: float = 99.99) -> dict[str, float]:
        """The clipping value per op: the absolute maximum, or a percentile of ``|x|``
        (values above it saturate: a few outliers stop stretching everyone's step)."""
        if method == "absmax":
            return dict(self.amax)
        if method == "percentile":
            if not 0 < percentile <= 100:
                raise ValueError(f"percentile must be in (0, 100], got {percentile}")
            return {p: self.percentile(p, percentile) for p in self.amax}
        raise ValueError(f"unknown calibration method {method!r}; expected absmax or percentile")

    def static_inputs(self, format: Format, method: Literal["absmax", "percentile"] = "absmax",
                      percentile: float = 99.99) -> StaticInputs:
        """The policy setting that puts each calibrated op's input on its ``format`` grid:
        ``dataclasses.replace(policy, inputs=stats.static_inputs("int8"))``."""
        _check_format(format)
        return StaticInputs(format, self.amaxes(method, percentile))


def calibrate(fn: Callable[[Any], Any], batches: Iterable[Any]) -> ActivationStats:
    """Run ``fn(batch)`` (jitted) over ``batches`` and collect the inputs of every weight
    matmul it runs through `mpx.ops.dot_general`; an op called several times (a tied head,
    a layer called twice, every layer of a scanned stack) pools its inputs."""
    result = ActivationStats()

    def run(batch):
        token = _RECORDER.set(result)
        try:
            fn(batch)
        finally:
            _RECORDER.reset(token)

    step = jax.jit(run)
    for batch in batches:
        step(batch)
    jax.effects_barrier()  # every callback delivered
    if not result.amax:
        raise ValueError("calibration saw no weight matmul: the function runs none through mpx ops "
                         "(an mpx.nn model, or one under mpx.apply_policy), "
                         "or no batch was given")
    return result
