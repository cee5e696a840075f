"""Flax NNX layers that obey a precision policy. Any NNX model goes under a policy with
`mpx.apply_policy`; ``apply_policy`` and ``split`` here are its old names.

* `mpx.nn.discover`: `find_ops`, the ops of any NNX model a policy decides;
* `mpx.nn.op_modules`: the modules where a precision decision is applied (`DotGeneral`,
  `Softmax`, `CrossEntropy`) and the FP8 state they hold (`Fp8MetaVariable`);
* `mpx.nn.layers`: `Linear` and `Einsum` with a policy ``kind``;
* `mpx.nn.transformer`: a GPT-style decoder (`TransformerLM`, `SequenceClassifier`) and its parts.
"""

from mpx.nn.apply import apply_policy, split
from mpx.nn.discover import FoundOp, find_ops
from mpx.nn.layers import Einsum, Linear
from mpx.nn.op_modules import CrossEntropy, DotGeneral, Fp8MetaVariable, Softmax
from mpx.nn.transformer import GPT2_MEDIUM, GPT2_SMALL, Attention, SequenceClassifier, TransformerConfig, TransformerLM

__all__ = [
    "GPT2_MEDIUM",
    "GPT2_SMALL",
    "Attention",
    "CrossEntropy",
    "DotGeneral",
    "Einsum",
    "FoundOp",
    "Fp8MetaVariable",
    "Linear",
    "SequenceClassifier",
    "Softmax",
    "TransformerConfig",
    "TransformerLM",
    "apply_policy",
    "find_ops",
    "split",
]
