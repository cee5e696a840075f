"""Op modules: the places inside an NNX model where a precision decision is applied.

Each op module has a ``kind`` (see `mpx.policy.KINDS`) and, once `apply_policy` has
run, an `OpPrecision`. Before that it computes like the plain op would.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from flax import errors as flax_errors
from flax import nnx
from jax import lax

from mpx import ops
from mpx.fp8 import Fp8FanoutWarning, Fp8Meta
from mpx.fp8._dot import under_differentiation
from mpx.policy import OpPrecision


class Fp8MetaVariable(nnx.Variable):
    """The FP8 state (an `mpx.fp8.Fp8Meta`) of one matmul.

    Select it with ``nnx.split(model, nnx.Param, Fp8MetaVariable, ...)``: it is not a
    parameter, the optimizer never sees it, and `mpx.train_step` advances it once per
    step from what its matmul observed.
    """


class Op(nnx.Module):
    """Base of the op modules: a ``kind`` and the `OpPrecision` the policy gave it."""

    def __init__(self, kind: str):
        self.kind = kind
        self.precision: OpPrecision | None = None

    def set_precision(self, op: OpPrecision, *, stack: tuple[int, ...] = ()) -> None:
        del stack  # only ops with FP8 state have per-layer state
        self.precision = op

    @property
    def dtype(self):
        """The dtype this op computes in, or ``None`` before a policy was applied."""
        return None if self.precision is None else self.precision.dtype


class DotGeneral(Op):
    """A ``lax.dot_general`` that obeys its `OpPrecision`; FP8 with a typed meta.

    Call-compatible with ``lax.dot_general`` (``precision`` and other keyword arguments
    are accepted and ignored under a policy), so it can be injected as the
    ``dot_general`` of ``nnx.Linear`` / ``nnx.LinearGeneral``. When it is injected,
    ``path`` names the layer it serves.
    """

    def __init__(self, kind: str, *, path: str | None = None):
        super().__init__(kind)
        self.path = path
        self.fp8_meta = nnx.data(None)

    def set_precision(self, op: OpPrecision, *, stack: tuple[int, ...] = ()) -> None:
        """Take ``op``'s precision; in fp8 with a fresh meta (``stack``: leading layer axes)."""
        super().set_precision(op)
        meta = Fp8MetaVariable(Fp8Meta.init(op.fp8, stack=stack)) if op.is_fp8 else None
        self.fp8_meta = nnx.data(meta)

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
        if self.precision is None:
            return lax.dot_general(
                lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
            )
        meta = None if self.fp8_meta is None else self.fp8_meta.get_value()
        out, new_meta = ops.dot_general(lhs, rhs, dimension_numbers, self.precision, meta)
        if self.fp8_meta is not None:
            self._thread(new_meta, differentiated=under_differentiation(meta))
        return out

    def _thread(self, meta, *, differentiated: bool) -> None:
        """Thread the meta: a second call of this op in the same step combines by max.

        Inside a plain JAX transform that does not carry the layer's state (a layer
        closed over by ``lax.scan`` / ``fori_loop``), NNX forbids the write; the calls of
        its iterations then add up their observations (a larger, safe amax, reported as
        ``fanout``) and a warning says so.
        """
        try:
            self.fp8_meta.set_value(meta)
        except flax_errors.TraceContextError:
            if not differentiated:
                return  # a forward pass alone has nothing to combine
            warnings.warn(
                f"FP8 op {self.path or self.kind!r} runs inside a JAX transform (lax.scan, fori_loop, ...) "
                "that does not carry its FP8 meta, so its calls cannot be threaded: their amaxes add up "
                "instead of taking the max (a larger amax, so a smaller scale: safe from overflow but "
                "coarser for small values; reported as `fanout` by mpx.inspect.fp8_stats). A loop that "
                "carries the layer's state combines them by max.",
                Fp8FanoutWarning,
                stacklevel=3,
            )


class EinsumOp(DotGeneral):
    """A two-operand einsum that obeys its `OpPrecision`; injectable as ``nnx.Einsum.einsum_op``.

    The einsum becomes one ``dot_general`` (see `mpx.ops.einsum`), so it runs as an FP8
    GEMM under an fp8 rule.
    """

    def __call__(self, subscripts, lhs, rhs, precision=None, preferred_element_type=None, **_):
        if self.precision is None:
            return jnp.einsum(subscripts, lhs, rhs, precision=precision, preferred_element_type=preferred_element_type)
        dims, perm = ops.einsum_dimension_numbers(subscripts, lhs.ndim, rhs.ndim)
        return jnp.transpose(super().__call__(lhs, rhs, dims), perm)


class Softmax(Op):
    """Softmax over the last axis in the op's dtype (fp32 under the presets)."""

    def __init__(self):
        super().__init__("softmax")

    def __call__(self, logits: jax.Array) -> jax.Array:
        dtype = self.dtype or logits.dtype
        return jax.nn.softmax(logits.astype(dtype), axis=-1)


class CrossEntropy(Op):
    """Mean token cross-entropy in the op's dtype; ``weights`` (0/1) select the tokens."""

    def __init__(self):
        super().__init__("loss")

    def __call__(self, logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
        dtype = self.dtype or jnp.float32
        logp = jax.nn.log_softmax(logits.astype(dtype), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        if weights is None:
            return jnp.mean(nll)
        weights = weights.astype(dtype)
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1)
