"""`Wrapped`: an object that applies a linen module itself (a model hub's class) under a policy."""

from __future__ import annotations

from collections.abc import Mapping

import jax
from flax import linen

from mpx import capture
from mpx.fp8 import Fp8Meta
from mpx.linen._active import Supplied
from mpx.linen._context import activate
from mpx.policy import Policy


class Wrapped:
    """An object that holds a linen module and calls its ``apply`` itself (a model hub's
    model class, called as ``obj(input_ids, params=params)``), under ``policy``.

    `mpx.apply_policy` returns one for such an object. The object is used as it is; every
    matmul of the module's ``apply`` is captured (see `mpx.capture`), and the FP8 state,
    which the object's own variables cannot hold, is passed in by the caller::

        model = mpx.apply_policy(hub_model, policy, kinds={"lm_head": "head"})
        fp8_meta = model.init_fp8(input_ids, params=params)   # a dict by matmul path
        logits = model(fp8_meta, input_ids, params=params).logits   # in loss_fn

    ``kinds``: path pattern -> op kind, as for `policy_context`.
    """

    def __init__(self, obj, policy: Policy, *, kinds: Mapping[str, str] | None = None):
        if isinstance(obj, linen.Module):
            raise TypeError("Wrapped is for objects that call a linen module's apply themselves; a linen module "
                            "itself goes under the policy with mpx.apply_policy(module, policy), whose init and "
                            "apply run under mpx.linen.policy_context (its FP8 state in its variables)")
        if not callable(obj):
            raise TypeError(f"Wrapped needs a callable model object, got {type(obj).__name__}")
        self.obj, self.policy, self.kinds = obj, policy, dict(kinds or {})

    def _traced(self, record, *args, **kwargs) -> dict:
        supplied = Supplied(None)
        with activate(self.policy, self.kinds, record, supplied):
            jax.eval_shape(lambda: [self.obj(*args, **kwargs), None][1])  # any output type: only the trace counts
        return supplied.created

    def init_fp8(self, *args, **kwargs) -> dict:
        """Fresh FP8 metas of the object's fp8 matmuls on these example inputs."""
        specs = self._traced(None, *args, **kwargs)
        return capture.create_metas(specs)

    def matmuls(self, *args, **kwargs) -> list[capture.Matmul]:
        """Every matmul of a call on these inputs (see `mpx.capture.Matmul`)."""
        record: list = []
        self._traced(record, *args, **kwargs)
        return record

    def __call__(self, fp8_meta: Mapping[str, Fp8Meta], *args, **kwargs):
        """``obj(*args, **kwargs)`` with every matmul under the policy, FP8 state ``fp8_meta``."""
        with activate(self.policy, self.kinds, None, Supplied(fp8_meta)):
            return self.obj(*args, **kwargs)
