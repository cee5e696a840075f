"""The linen entry points' old names, kept for one release: `mpx.split` and `mpx.matmuls`
do the same for every kind of model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import linen

from mpx import capture
from mpx.linen._context import matmuls_linen
from mpx.linen._module import split_linen
from mpx.policy import Policy


def split_variables(variables: Mapping[str, Any]) -> tuple[Any, Any]:
    """Alias of `mpx.split` for linen variables, kept for one release."""
    return split_linen(variables)


def linen_matmuls(model: linen.Module, policy: Policy, *args, kinds: Mapping[str, str] | None = None,
                  **kwargs) -> list[capture.Matmul]:
    """Alias of `mpx.matmuls` for a linen module, kept for one release."""
    return matmuls_linen(model, policy, *args, kinds=kinds, **kwargs)


def linen_ops(model: linen.Module, policy: Policy, *args, kinds: Mapping[str, str] | None = None, **kwargs):
    """Alias of the ``(path, kind)`` pairs of `mpx.matmuls` (ops under the policy, each once), kept for one
    release."""
    found = matmuls_linen(model, policy, *args, kinds=kinds, **kwargs)
    return list(dict.fromkeys((m.path, m.kind) for m in found if m.op is not None))
