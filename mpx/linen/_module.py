"""`PolicyModule`: a linen module with its ``init`` and ``apply`` under a policy, and the
split of its variables for `mpx.train_step`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import linen

from mpx import capture
from mpx.linen._active import FP8_COLLECTION
from mpx.linen._context import matmuls_linen, policy_context
from mpx.policy import Policy


class PolicyModule:
    """A linen module under ``policy``: what `mpx.apply_policy` returns for one. Its
    ``init`` and ``apply`` are the module's, run inside `policy_context` (so inside the
    jitted function that calls them, where the context acts); the variables are the plain
    module's plus the FP8 collection::

        model = mpx.apply_policy(MyModel(), policy, kinds={"head": "head"})
        params, fp8_meta = mpx.split(model.init(key, x))
        y = model.apply({"params": params, "fp8_meta": fp8_meta}, x)   # in loss_fn

    ``module``, ``policy`` and ``kinds`` are what it was made with. A module used inside
    a bigger one is under the policy when the bigger one is.
    """

    def __init__(self, module: linen.Module, policy: Policy, *, kinds: Mapping[str, str] | None = None):
        self.module, self.policy, self.kinds = module, policy, dict(kinds or {})

    def __repr__(self) -> str:
        return f"PolicyModule({type(self.module).__name__}, kinds={self.kinds})"

    def init(self, rngs, *args, **kwargs):
        """``module.init(rngs, *args, **kwargs)`` under the policy: params and FP8 state."""
        with policy_context(self.policy, kinds=self.kinds):
            return self.module.init(rngs, *args, **kwargs)

    def init_with_output(self, rngs, *args, **kwargs):
        """``module.init_with_output(rngs, *args, **kwargs)`` under the policy."""
        with policy_context(self.policy, kinds=self.kinds):
            return self.module.init_with_output(rngs, *args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        """``module.apply(variables, *args, **kwargs)`` under the policy."""
        with policy_context(self.policy, kinds=self.kinds):
            return self.module.apply(variables, *args, **kwargs)

    def matmuls(self, *args, **kwargs) -> list[capture.Matmul]:
        """Every matmul of a call on these inputs (see `mpx.capture.Matmul`)."""
        return matmuls_linen(self.module, self.policy, *args, kinds=self.kinds, **kwargs)


def split_linen(variables: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(params, fp8_meta)`` of linen ``variables``: what `mpx.init_train_state` and the
    ``loss_fn`` of `mpx.train_step` take. ``fp8_meta`` is ``{}`` when no op runs in fp8."""
    other = sorted(set(variables) - {"params", FP8_COLLECTION})
    if other:
        raise ValueError(
            f"variables hold collections {other} besides params and {FP8_COLLECTION}; mpx.train_step "
            f"carries only those two. Keep the others yourself (e.g. close over them in loss_fn) and "
            f"pass the variables without them"
        )
    return variables["params"], variables.get(FP8_COLLECTION, {})
