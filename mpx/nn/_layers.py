"""Layers whose kind a policy can name: thin subclasses of the Flax NNX ones."""

from __future__ import annotations

from flax import nnx


class Linear(nnx.Linear):
    """``nnx.Linear`` with a policy ``kind`` (``dense`` by default, ``head`` for an output layer).

    x (..., in_features) -> (..., out_features).
    """

    def __init__(self, in_features: int, out_features: int, *, kind: str = "dense", **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        self.kind = kind


class Einsum(nnx.Einsum):
    """``nnx.Einsum`` with a policy ``kind`` (``einsum`` by default)."""

    def __init__(self, einsum_str: str, kernel_shape, bias_shape=None, *, kind: str = "einsum", **kwargs):
        super().__init__(einsum_str, kernel_shape, bias_shape, **kwargs)
        self.kind = kind


Embed = nnx.Embed
LayerNorm = nnx.LayerNorm
RMSNorm = nnx.RMSNorm
