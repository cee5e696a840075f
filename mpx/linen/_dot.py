"""`PolicyDotGeneral`: a linen ``dot_general`` that obeys a policy, FP8 state in its variables."""

from __future__ import annotations

from flax import errors as flax_errors
from flax import linen

from mpx import ops
from mpx.fp8 import Fp8Meta
from mpx.linen._active import ACTIVE, FP8_COLLECTION
from mpx.policy import Policy


class PolicyDotGeneral(linen.Module):
    """A ``lax.dot_general`` that obeys ``policy``: a ``dot_general_cls`` for ``nn.Dense`` /
    ``nn.DenseGeneral`` (bind ``policy`` and ``kind`` with ``functools.partial``).

    The op's path is that of the layer that owns this module (``"encoder/fc1"``), its kind
    ``kind``. In fp8 it keeps an `Fp8Meta` as variable ``meta`` of `FP8_COLLECTION` and,
    when that collection is mutable, writes back the meta the FP8 matmul returns, so a
    second call in the same step combines by max in the backward pass. Other precisions
    cast both operands to the op's dtype. ``precision`` and ``preferred_element_type``
    are ignored: the policy decides.
    """

    policy: Policy
    kind: str = "dense"

    @linen.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
        path = "/".join(str(p) for p in self.path[:-1])
        active = ACTIVE.get()
        if active is not None:
            active.layer_kinds[path] = self.kind
        op = self.policy.for_op(path, self.kind)
        if not op.is_fp8:
            return ops.dot_general(lhs, rhs, dimension_numbers, op)[0]
        try:
            present = self.has_variable(FP8_COLLECTION, "meta")
            if not present and not self.is_initializing():
                raise ValueError(
                    f"op {path!r} ({self.kind}) runs in fp8 but the variables have no "
                    f"{FP8_COLLECTION}/{'/'.join(self.path)}/meta; init the model under the same policy "
                    f"(mpx.apply_policy(model, policy).init, which runs inside mpx.linen.policy_context) and "
                    f"pass {{'params': ..., {FP8_COLLECTION!r}: ...}} to apply"
                )
            meta = self.variable(FP8_COLLECTION, "meta", Fp8Meta.init, op.fp8)
        except flax_errors.ScopeCollectionNotFound:
            raise ValueError(
                f"op {path!r} ({self.kind}) runs in fp8 inside a lifted transform (nn.scan, nn.vmap, ...) "
                f"that does not carry the {FP8_COLLECTION!r} collection; add {FP8_COLLECTION!r}: 0 to its "
                f"variable_axes, next to 'params': 0, so that each layer keeps its own FP8 state"
            ) from None
        out, new_meta = ops.dot_general(lhs, rhs, dimension_numbers, op, meta.value)
        if self.is_mutable_collection(FP8_COLLECTION):
            meta.value = new_meta
        return out
