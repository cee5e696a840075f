"""Flax NNX layers that obey a precision policy. Any NNX model goes under a policy with
`mpx.apply_policy`; ``apply_policy`` and ``split`` here are its old names."""

from mpx.nn.apply import apply_policy, split
from mpx.nn.discover import FoundOp, find_ops
from mpx.nn.layers import Einsum, Embed, LayerNorm, Linear, RMSNorm
from mpx.nn.op import CrossEntropy, DotGeneral, EinsumOp, Fp8MetaVariable, Op, Softmax
from mpx.nn.transformer import (
    GPT2_MEDIUM,
    GPT2_SMALL,
    MLP,
    Attention,
    Block,
    Decoder,
    SequenceClassifier,
    TransformerConfig,
    TransformerLM,
)

__all__ = [
    "GPT2_MEDIUM", "GPT2_SMALL", "MLP", "Attention", "Block", "CrossEntropy", "Decoder", "DotGeneral",
    "Einsum", "EinsumOp", "Embed", "FoundOp", "Fp8MetaVariable", "LayerNorm", "Linear", "Op", "RMSNorm",
    "SequenceClassifier", "Softmax", "TransformerConfig", "TransformerLM", "apply_policy", "find_ops", "split",
]
