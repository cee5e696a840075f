"""The policy in force while a linen model is traced, and where its FP8 state lives."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from collections.abc import Mapping

from mpx.fp8 import Fp8Meta
from mpx.policy import Policy, kind_overrides

FP8_COLLECTION = "fp8_meta"
"""The variable collection of FP8 state: one variable ``meta`` (an `Fp8Meta`) per fp8 matmul."""

CAPTURED = "captured"
"""The variable of `FP8_COLLECTION` (at the root) holding the FP8 metas of the captured
matmuls (those that no layer hook reached), by matmul path."""


@dataclasses.dataclass
class Supplied:
    """FP8 metas given from outside the variables (``metas``), or, when None, where to
    record what to create (``created``: path -> (Fp8Config, stack))."""

    metas: Mapping[str, Fp8Meta] | None
    created: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Active:
    """The policy of `mpx.linen.policy_context` and what the trace under it collects."""

    policy: Policy
    kinds_spec: Mapping[str, str] | None  # path pattern -> kind, as the user gave it
    record: list | None  # every matmul of the traced root call, for `matmuls_linen`
    layer_kinds: dict = dataclasses.field(default_factory=dict)  # path -> kind of the layer ops seen
    supplied: Supplied | None = None  # a `Wrapped` model's FP8 state, passed by its caller

    @functools.cached_property
    def kinds(self) -> list:  # (compiled path pattern, kind), first match wins
        return kind_overrides(self.kinds_spec)

    def layer_op(self, path: str):
        """The policy op of the layer op at ``path`` (seen while tracing), or None."""
        kind = self.layer_kinds.get(path)
        return None if kind is None else self.policy.for_op(path, kind)


ACTIVE: contextvars.ContextVar[Active | None] = contextvars.ContextVar("mpx_linen_policy", default=None)
