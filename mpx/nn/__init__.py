"""Flax NNX layers that obey a precision policy. Any NNX model goes under a policy with
`mpx.apply_policy`; ``apply_policy`` and ``split`` here are its old names.

* `mpx.nn._discover`: `find_ops`, the ops of any NNX model a policy decides;
* `mpx.nn._op_modules`: the modules where a precision decision is applied (`DotGeneral`,
  `Softmax`, `CrossEntropy`) and the FP8 state they hold (`Fp8MetaVariable`);
* `mpx.nn._layers`: `Linear` and `Einsum` with a policy ``kind``;
* `mpx.nn._transformer`: a decoder in the GPT-2 or the Llama layout (`TransformerLM`,
  `SequenceClassifier`) and its parts; `mpx.nn._rotary`: the Llama layout's rotary positions;
* `mpx.nn._kvcache`: `KVCache`, the keys and values `TransformerLM.decode` reads and extends;
* `mpx.nn._sharding`: the logical axis names the decoder marks its activations with, for
  flax's logical axis rules (the batch split under FSDP).
"""

from mpx.nn._apply import apply_policy, split
from mpx.nn._discover import FoundOp, find_ops
from mpx.nn._kvcache import KVCache
from mpx.nn._layers import Einsum, Linear
from mpx.nn._op_modules import CrossEntropy, DotGeneral, Fp8MetaVariable, Softmax
from mpx.nn._transformer import GPT2_MEDIUM, GPT2_SMALL, Attention, SequenceClassifier, TransformerConfig, TransformerLM

__all__ = [
    "GPT2_MEDIUM",
    "GPT2_SMALL",
    "Attention",
    "CrossEntropy",
    "DotGeneral",
    "Einsum",
    "FoundOp",
    "Fp8MetaVariable",
    "KVCache",
    "Linear",
    "SequenceClassifier",
    "Softmax",
    "TransformerConfig",
    "TransformerLM",
    "apply_policy",
    "find_ops",
    "split",
]
