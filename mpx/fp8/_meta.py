"""The FP8 state of a matmul and every rule that changes it, in one place.

An `Fp8Meta` holds one `Fp8Scale` for each of a matmul's three FP8 tensors (lhs, rhs,
output gradient) and carries its `Fp8Config` as a static field, so the state knows how
it is to be updated and nothing else has to be told.

One step of FP8 state, whatever the model's structure:

1. the forward and backward passes quantize with `scale_for_use` (the stored, delayed
   scale; a tensor whose history is still empty is scaled from its own amax);
2. each call *observes* its tensors: an `observation` (this step's amax, a call count,
   saturation statistics) is returned as the cotangent of the meta. Observations never
   contain a history, so however autodiff combines them (a sum, when one meta feeds
   several calls without being threaded), the result is bounded by the number of calls;
3. the calls of one op that pass the meta on (threading) merge with `combine`: amaxes by
   max, calls counted. A sum from un-threaded reuse is kept as it is (an upper bound of
   the max, so the scale errs on the safe side) and reported through ``fanout``;
4. once per step, `advance` rolls the history by one with the observed amax and
   recomputes the scale. A step whose observations hold a non-finite amax must not
   advance (`observations_finite`; `mpx.train_step` skips the whole update).

Every array may carry leading axes (a scanned stack of layers keeps one meta per layer,
stacked along axis 0); all rules act elementwise over them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mpx._checks import check_choice, check_int, did_you_mean
from mpx.fp8._numerics import E4M3, E5M2, amax, fp8_max, power_of_two_floor, scale_from_amax

Recipe = Literal["delayed", "current"]
Format = Literal["hybrid", "e4m3"]
AmaxCompute = Literal["max", "most_recent"]

_RECIPES = ("delayed", "current")
GRANULARITIES = ("tensor", "row", "block", "mx")
ROLES = ("forward", "input_grad", "weight_grad")
_ROLE_CHOICES = (*GRANULARITIES, "compute")
_FORMATS = ("hybrid", "e4m3")
_GRAD_FORMATS = ("e4m3", "e5m2")
_AMAX_COMPUTE = ("max", "most_recent")


@dataclasses.dataclass(frozen=True)
class Fp8Config:
    """How FP8 tensors are scaled. Static: hashable, safe as a jit static argument.

    Attributes:
      recipe: ``delayed`` (scale from the amax history) or ``current`` (from this amax).
      format: ``hybrid`` (E4M3 forward, E5M2 gradients) or ``e4m3`` (E4M3 everywhere).
      amax_history: length N of the amax history kept per tensor.
      amax_compute: ``max`` over the history, or its ``most_recent`` entry.
      margin: extra headroom; the scale is divided by ``2**margin``.
      min_size: a matmul whose smallest dimension (M, K or N) is below this runs in the
        compute dtype instead: FP8 GEMMs only pay off when they are large (``python -m
        train bench CONFIG --mode crossover`` measures the size on a device). 0: no limit.
      granularity: how finely the three GEMMs of a matmul scale their operands
        (`mpx.fp8._granular`): ``tensor`` (one scale per tensor, ``recipe`` decides how it is
        found), ``row`` (one per row along the contraction: per token, per output channel),
        ``block`` (DeepSeek-V3: ``1 x block_size`` tiles of activations and gradients,
        ``block_size x block_size`` blocks of weights) or ``mx`` (OCP MXFP8: ``1 x 32`` tiles,
        power-of-two scales). ``row``, ``block`` and ``mx`` scale from this step's amaxes
        (current scaling; the amax history still records each tensor's amax for the logs).
      forward, input_grad, weight_grad: a granularity for one GEMM alone (x.w, dy.w^T and
        x^T.dy), or ``compute`` to run that GEMM in the compute dtype; empty: ``granularity``.
      input_grad_format, weight_grad_format: the FP8 format of the output gradient in that
        GEMM (``e4m3`` or ``e5m2``; empty: ``format``'s, E5M2 under ``hybrid``). Different
        formats quantize the gradient once per GEMM; under delayed scaling both scales come
        from its one amax history (`scale_for_use`).
      block_size: the tile and block length of ``block`` (MX fixes its own, 32).
      saved_activations: what an op's neighbours keep for the backward besides its FP8
        operands: ``compute`` (their own dtype) or ``fp8`` (E4M3 copies, `saved_in_fp8`; in
        `mpx.nn`'s decoder, the MLP's activation input when its first matmul is fp8).
    """

    recipe: Recipe = "delayed"
    format: Format = "hybrid"
    amax_history: int = 1024
    amax_compute: AmaxCompute = "max"
    margin: int = 0
    min_size: int = 0
    granularity: str = "tensor"
    forward: str = ""
    input_grad: str = ""
    weight_grad: str = ""
    input_grad_format: str = ""
    weight_grad_format: str = ""
    block_size: int = 128
    saved_activations: str = "compute"

    def __post_init__(self):
        check_choice("fp8 recipe", self.recipe, _RECIPES)
        check_choice("fp8 format", self.format, _FORMATS)
        check_choice("fp8 amax_compute", self.amax_compute, _AMAX_COMPUTE)
        check_int("fp8 amax_history", self.amax_history, low=1)
        check_int("fp8 margin", self.margin, low=0, high=32)
        check_int("fp8 min_size", self.min_size, low=0)
        check_choice("fp8 granularity", self.granularity, GRANULARITIES)
        for role in ROLES:
            value = getattr(self, role)
            if value != "" and value not in _ROLE_CHOICES:  # empty: the op's granularity
                hint = " (did you mean 'compute'?: the GEMM in the op's compute dtype)" if value in (
                    "bf16", "fp16", "fp32", "high", "hp") else did_you_mean(value, _ROLE_CHOICES)
                raise ValueError(f"fp8 {role} {value!r} is not supported; expected one of "
                                 f"{', '.join(_ROLE_CHOICES)}{hint}")
        for role in ("input_grad", "weight_grad"):
            value = getattr(self, f"{role}_format")
            if value != "":  # empty: the op's format
                check_choice(f"fp8 {role}_format", value, _GRAD_FORMATS)
                if self.gemm(role) == "compute":
                    raise ValueError(f"fp8 {role}_format {value!r} sets the gradient's FP8 format in a GEMM that "
                                     f"{role}='compute' runs in the compute dtype: drop one of the two")
        check_int("fp8 block_size", self.block_size, low=1)
        check_choice("fp8 saved_activations", self.saved_activations, ("compute", "fp8"))
        if set(self.gemms) == {"compute"}:
            raise ValueError("fp8 forward, input_grad and weight_grad are all 'compute': no GEMM of the op is FP8; "
                             "give the op the compute precision instead (a rule '<path>->bf16')")

    def gemm(self, role: str) -> str:
        """The granularity of one GEMM (`ROLES`), or ``compute``.

        >>> Fp8Config(granularity="row", weight_grad="compute").gemm("weight_grad")
        'compute'
        """
        return getattr(self, role) or self.granularity

    @property
    def gemms(self) -> tuple[str, ...]:
        """`gemm` of each of `ROLES`: forward, input gradient, weight gradient."""
        return tuple(self.gemm(role) for role in ROLES)

    @property
    def per_tensor(self) -> bool:
        """Every GEMM in FP8 with one scale per tensor (the delayed-scaling program)."""
        return set(self.gemms) == {"tensor"}

    @property
    def label(self) -> str:
        """The recipe as `mpx.inspect.describe` shows it: empty for one scale per tensor, else
        each GEMM's granularity (``row``, ``block; weight_grad compute``).

        >>> Fp8Config(granularity="row", weight_grad="compute").label
        'row; weight_grad compute'
        >>> Fp8Config(weight_grad_format="e4m3").label       # one scale per tensor, dy in E4M3 for x^T.dy
        'weight_grad e4m3'
        """
        formats = [f"{role} {getattr(self, f'{role}_format')}" for role in ("input_grad", "weight_grad")
                   if getattr(self, f"{role}_format") and self.gemm(role) != "compute"]
        if self.per_tensor:
            return "; ".join(formats)
        odd = [f"{role} {g}" for role, g in zip(ROLES, self.gemms) if g != self.granularity]
        return "; ".join([self.granularity, *odd, *formats])

    @property
    def forward_dtype(self):
        """FP8 dtype of the forward operands (activations and weights)."""
        return E4M3

    @property
    def grad_dtype(self):
        """FP8 dtype of the output gradient in the backward pass (its scale is kept for it)."""
        return E5M2 if self.format == "hybrid" else E4M3

    def grad_dtype_of(self, role: str):
        """FP8 dtype of the output gradient in the GEMM of ``role`` (``input_grad`` or
        ``weight_grad``): its ``*_format``, else `grad_dtype`.

        >>> Fp8Config(weight_grad_format="e4m3").grad_dtype_of("weight_grad") == E4M3
        True
        """
        fmt = getattr(self, f"{role}_format")
        return {"e4m3": E4M3, "e5m2": E5M2}[fmt] if fmt else self.grad_dtype


def _zero():
    return jnp.zeros((), jnp.float32)


@struct.dataclass
class Fp8Scale:
    """Scaling state of one tensor, or (as a cotangent) what one step observed of it.

    State: ``scale`` in use and ``amax_history`` (newest first). Observation fields, in
    the state those of the last step that ran: ``amax`` (this step's absolute maximum),
    ``calls`` (how many calls quantized the tensor), ``fanout`` (1 when all calls were
    threaded; k when k un-threaded uses added their observations up), ``saturated`` /
    ``flushed`` (fractions clipped to ±fp8_max / nonzero but rounded to 0).

    Shapes: ``amax_history`` f32[*S, N], every other field f32[*S], where S are the
    leading (layer) axes of a stacked meta, () otherwise.
    """

    scale: jax.Array
    amax_history: jax.Array
    amax: jax.Array = struct.field(default_factory=_zero)
    calls: jax.Array = struct.field(default_factory=_zero)
    fanout: jax.Array = struct.field(default_factory=_zero)
    saturated: jax.Array = struct.field(default_factory=_zero)
    flushed: jax.Array = struct.field(default_factory=_zero)

    @classmethod
    def init(cls, history_len: int, *, stack: tuple[int, ...] = ()) -> Fp8Scale:
        """Scale 1, an empty (all-zero) history, no observations."""
        # A buffer of its own per field: a donated state must not alias one array twice.
        observed = (jnp.zeros(stack, jnp.float32) for _ in range(5))
        return cls(jnp.ones(stack, jnp.float32), jnp.zeros((*stack, history_len), jnp.float32), *observed)


@struct.dataclass
class Fp8Meta:
    """FP8 state of one matmul: its two operands and its output gradient, and its config."""

    lhs: Fp8Scale
    rhs: Fp8Scale
    grad: Fp8Scale
    config: Fp8Config = struct.field(pytree_node=False, default=Fp8Config())

    @classmethod
    def init(cls, config: Fp8Config = Fp8Config(), *, stack: tuple[int, ...] = ()) -> Fp8Meta:
        """A fresh meta; ``stack`` adds leading axes (one meta per layer of a scanned stack)."""
        if not isinstance(config, Fp8Config):
            raise TypeError(f"Fp8Meta.init takes an Fp8Config, got {config!r}; e.g. Fp8Meta.init(Fp8Config(amax_history=16))")
        return cls(*(Fp8Scale.init(config.amax_history, stack=tuple(stack)) for _ in range(3)), config=config)

    @property
    def stack(self) -> tuple[int, ...]:
        """The leading (layer) axes: () for the meta of a single matmul."""
        return tuple(self.lhs.scale.shape)

    def tensors(self) -> tuple[tuple[str, Fp8Scale, object], ...]:
        """``(name, state, fp8 dtype)`` for lhs, rhs and grad."""
        fwd, grad = self.config.forward_dtype, self.config.grad_dtype
        return (("lhs", self.lhs, fwd), ("rhs", self.rhs, fwd), ("grad", self.grad, grad))

    def advance(self, observed: Fp8Meta, *, apply=True) -> Fp8Meta:
        """The state after one step that made the observations ``observed`` (see `advance`)."""
        return Fp8Meta(*(advance(s, o, dt, self.config, apply=apply) for (_, s, dt), o in
                         zip(self.tensors(), (observed.lhs, observed.rhs, observed.grad))), config=self.config)


def is_fp8_meta(x) -> bool:
    return isinstance(x, Fp8Meta)


def metas_of(tree) -> list[Fp8Meta]:
    """The `Fp8Meta` leaves of a pytree, in leaf order."""
    return [m for m in jax.tree.leaves(tree, is_leaf=is_fp8_meta) if is_fp8_meta(m)]


# ----------------------------------------------------------------------------- the rules


def history_is_empty(state: Fp8Scale) -> jax.Array:
    """True where no positive amax was ever recorded (a fresh meta, or only zero tensors so far)."""
    return jnp.max(state.amax_history, axis=-1) <= 0


_BOOTSTRAP: contextvars.ContextVar[bool] = contextvars.ContextVar("mpx_fp8_bootstrap", default=True)
_STATISTICS: contextvars.ContextVar[bool] = contextvars.ContextVar("mpx_fp8_statistics", default=True)


@contextlib.contextmanager
def _switched(setting: contextvars.ContextVar[bool], enabled: bool) -> Iterator[None]:
    token = setting.set(bool(enabled))
    try:
        yield
    finally:
        setting.reset(token)


def bootstrap(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Whether FP8 matmuls traced inside may scale a tensor whose history is empty from its
    own amax (`scale_for_use`). On by default; `mpx.train_step` turns it off for the steps
    after the first (``fp8_bootstrap=False``), whose program then quantizes every tensor with
    its stored scale and never waits for this step's amax: the amax and the statistics are
    read in the pass that reads the tensor anyway, instead of one pass more before the
    quantize. A context manager."""
    return _switched(_BOOTSTRAP, enabled)


def bootstrapping() -> bool:
    """The `bootstrap` setting in force where this is traced."""
    return _BOOTSTRAP.get()


def statistics(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Whether FP8 matmuls (one scale per tensor) traced inside count the fractions of each
    tensor they saturate and flush. On by default. Off, they observe the amax alone (it scales
    the next steps and guards the step against overflow, so it is never left out) and the step
    keeps each tensor's stored fractions, those of the last step that counted: a program for the
    steps whose statistics nobody reads (`mpx.train_step`'s ``fp8_statistics``). The counts cost
    a pass: XLA fuses one reduction into the kernel that produces a tensor, not the amax and
    two counts. (The row, block and MX recipes always count.) A context manager."""
    return _switched(_STATISTICS, enabled)


def counting() -> bool:
    """The `statistics` setting in force where this is traced."""
    return _STATISTICS.get()


#: The saturated / flushed fraction of an observation that did not count them (`statistics`).
NOT_COUNTED = float("nan")


def scale_for_use(state: Fp8Scale, x_amax: jax.Array, dtype, config: Fp8Config, *, bootstrap: bool = True,
                  stored_dtype=None) -> jax.Array:
    """The scale that quantizes a tensor of absolute maximum ``x_amax`` into ``dtype`` now.

    ``current``: from ``x_amax``. ``delayed``: the stored scale; with ``bootstrap``, a tensor
    whose history is still empty is scaled from ``x_amax`` too, so the first step neither
    saturates nor flushes (a stored scale of 1 would flush most small gradients to zero).
    Without ``bootstrap`` the result does not depend on ``x_amax`` (which may then be
    computed after the quantize, in the same pass). ``stored_dtype``: the format the stored
    scale was set for (default ``dtype``); for another, it is moved by the ratio of the two
    formats' largest values (E4M3 / E5M2: 448 / 57344 = 2**-7, exact), so the same amax lands
    in (fp8_max / 2, fp8_max] of either. A stored scale that is not a power of two (set by hand, or
    by an earlier version) is used as the power of two below it, as `scale_from_amax` would
    have set it: the rescale of an FP8 GEMM's output is exact only for powers of two.
    """
    stored = power_of_two_floor(state.scale)
    if stored_dtype is not None and jnp.dtype(stored_dtype) != jnp.dtype(dtype):
        stored = stored * jnp.float32(fp8_max(dtype) / fp8_max(stored_dtype))
    if config.recipe == "delayed" and not bootstrap:
        return stored
    current = scale_from_amax(x_amax, stored, fp8_max(dtype), margin=config.margin)
    if config.recipe == "current":
        return current
    return jnp.where(history_is_empty(state), current, stored)


def scale_for_tensor(x: jax.Array, state: Fp8Scale, dtype, config: Fp8Config, *, bootstrap: bool,
                     stored_dtype=None) -> jax.Array:
    """`scale_for_use` for the tensor ``x`` itself: its amax is computed only where the scale
    depends on it (``current`` scaling, or a bootstrapping step), so a delayed scale never waits
    for a reduction over ``x``."""
    needs_amax = bootstrap or config.recipe == "current"
    return scale_for_use(state, amax(x) if needs_amax else None, dtype, config, bootstrap=bootstrap,
                         stored_dtype=stored_dtype)


def needs_bootstrap(meta) -> bool:
    """Whether the pytree ``meta`` holds FP8 tensors and none of them has recorded an amax:
    no step has been applied to it yet (host-side: reads the histories back). Once a step
    has been applied, every tensor it saw nonzero has a history; one that was exactly zero
    (or not used) keeps an empty history but does not make the state fresh again, so that a
    restored run chooses the program the uninterrupted run would have."""
    histories = jax.device_get([s.amax_history for m in metas_of(meta) for s in (m.lhs, m.rhs, m.grad)])
    return bool(histories) and all(bool((np.asarray(h) <= 0).all()) for h in histories)


def observation(state: Fp8Scale, x_amax: jax.Array, stats: tuple[jax.Array, jax.Array]) -> Fp8Scale:
    """What one call saw of a tensor, shaped like ``state`` (its state fields are zero)."""
    one = jnp.ones_like(state.scale)
    saturated, flushed = stats
    return Fp8Scale(
        scale=jnp.zeros_like(state.scale), amax_history=jnp.zeros_like(state.amax_history),
        amax=x_amax * one, calls=one, fanout=one, saturated=saturated * one, flushed=flushed * one,
    )


def combine(a: Fp8Scale, b: Fp8Scale) -> Fp8Scale:
    """Observations of two calls of one op in one step: amax by max, calls added.

    For calls that pass the meta on (threading) and for the micro-batches of gradient
    accumulation. ``fanout`` keeps the larger one: threading adds no fan-out.
    """
    return Fp8Scale(
        scale=a.scale + b.scale, amax_history=a.amax_history + b.amax_history,  # zero in observations
        amax=jnp.maximum(a.amax, b.amax), calls=a.calls + b.calls, fanout=jnp.maximum(a.fanout, b.fanout),
        saturated=jnp.maximum(a.saturated, b.saturated), flushed=jnp.maximum(a.flushed, b.flushed),
    )


def advance(state: Fp8Scale, observed: Fp8Scale, dtype, config: Fp8Config, *, apply=True) -> Fp8Scale:
    """One step of a tensor's state: roll the observed amax into the history once, rescale.

    Where the tensor was not used (``calls == 0``) or its amax is not finite, the state is
    kept exactly: an idle op must not roll its history, and an overflow must not enter it.
    ``apply`` (bool[], or a bool): False keeps every state (a skipped step). Statistics
    summed by un-threaded reuse are divided by ``fanout`` (their mean); the amax is kept as
    summed, which bounds the max from above.

    >>> config = Fp8Config(amax_history=3)
    >>> state = Fp8Scale.init(config.amax_history)
    >>> for amax in (3.0, 1.5, 0.75, 0.375):    # delayed: 448 / max of the last 3 amaxes, a power of two
    ...     seen = observation(state, jnp.float32(amax), (0.0, 0.0))
    ...     state = advance(state, seen, E4M3, config)
    ...     print(state.amax_history.tolist(), float(state.scale))
    [3.0, 0.0, 0.0] 128.0
    [1.5, 3.0, 0.0] 128.0
    [0.75, 1.5, 3.0] 128.0
    [0.375, 0.75, 1.5] 256.0
    """
    history = jnp.concatenate([observed.amax[..., None], state.amax_history[..., :-1]], axis=-1)
    if config.recipe == "delayed" and config.amax_compute == "max":
        reduced = jnp.max(history, axis=-1)
    else:  # `current` keeps the newest amax as its reference scale
        reduced = history[..., 0]
    fanout = jnp.maximum(observed.fanout, 1.0)
    counted = jnp.logical_not(jnp.isnan(observed.saturated))  # NOT_COUNTED: keep the stored fractions
    new = Fp8Scale(
        scale=scale_from_amax(reduced, state.scale, fp8_max(dtype), margin=config.margin),
        amax_history=history, amax=observed.amax, calls=observed.calls, fanout=observed.fanout,
        saturated=jnp.where(counted, observed.saturated / fanout, state.saturated),
        flushed=jnp.where(counted, observed.flushed / fanout, state.flushed),
    )
    keep_going = (observed.calls > 0) & jnp.isfinite(observed.amax) & apply

    def pick(n, o):
        cond = jnp.reshape(keep_going, keep_going.shape + (1,) * (n.ndim - keep_going.ndim))
        return jnp.where(cond, n, o)

    return jax.tree.map(pick, new, state)


# ----------------------------------------------------------------------------- pytrees of metas


def combine_metas(a: Fp8Meta, b: Fp8Meta) -> Fp8Meta:
    """`combine` for each tensor of two observations of the same op."""
    return Fp8Meta(combine(a.lhs, b.lhs), combine(a.rhs, b.rhs), combine(a.grad, b.grad), config=a.config)


def combine_trees(a, b):
    """`combine_metas` over two pytrees of observations with the same structure."""
    return jax.tree.map(combine_metas, a, b, is_leaf=is_fp8_meta)


def advance_tree(meta, observed, *, apply=True):
    """`Fp8Meta.advance` for every meta of a pytree (a dict, an NNX state, a linen collection);
    ``apply`` False (a traced bool[] of a skipped step) keeps them all, inside the same
    elementwise update (no select over the tree afterwards).

    Per meta on purpose: concatenating the tensors of all metas into one array per field
    saves ~40 tiny kernels on a 2-layer model, but XLA then compiles the step 1.7x slower
    (4 layers: 16 s instead of 9.6 s)."""
    return jax.tree.map(lambda m, o: m.advance(o, apply=apply), meta, observed, is_leaf=is_fp8_meta)


def observations_finite(observed) -> jax.Array:
    """bool[]: every amax observed in this step of an operand or output gradient that the
    step cannot see otherwise (``lhs`` and ``grad``) is finite (True for a tree without metas).

    The ``rhs`` (in a layer, the weight) is left out: a non-finite element there is NaN in
    its FP8 copy (`quantize`), and an FP8 GEMM spreads it over a whole column of the output
    (0 * NaN is NaN), so the loss or the gradients are not finite either. Leaving it out
    keeps the optimizer's pass over the weights independent of the weights' amax, so that
    the compiler can read that amax in the same pass."""
    amaxes = [s.amax.reshape(-1) for m in metas_of(observed) for s in (m.lhs, m.grad)]
    if not amaxes:
        return jnp.array(True)
    return jnp.all(jnp.isfinite(jnp.concatenate(amaxes)))


def max_fanout(observed) -> jax.Array:
    """f32[]: the largest ``fanout`` observed (0 without metas, 1 when every reuse was threaded)."""
    values = [jnp.max(s.fanout) for m in metas_of(observed) for s in (m.lhs, m.rhs, m.grad)]
    return jnp.max(jnp.stack(values)) if values else jnp.float32(0)
