"""Precision policies: which precision each op of a model runs in.

A `Policy` has three dtypes (parameter storage, compute, output), an ordered tuple of
`Rule`s, the `Fp8Config` that fp8 ops use, the `Int8Config` that int8 ops use and the
`LossScaleConfig` of the run. An op is named by its module path (``"blocks/0/mlp/fc1"``)
and its kind (`KINDS`); the first rule that matches decides, and an op no rule matches
runs in the compute dtype.

Rule paths are matched against the whole path: ``*`` is one path segment, ``**`` any
number of segments, and the rest is a regular expression (``(qkv|out)``). Kinds are a
``|``-separated list. A rule that says ``fp8`` or ``int8`` applies only to matmul kinds
(`MATMUL_KINDS`); other ops pass over it to the next rule.

Presets (`PRESETS`): ``fp32``; ``bf16`` and ``fp16`` (softmax, norms and the loss in fp32;
fp16 with a dynamic loss scale); ``fp8`` and ``int8`` (bf16 compute, dense and einsum
matmuls in FP8 / int8, embeddings and the head in bf16, softmax, norms and loss in fp32);
``8bit``, the one of those two the chip multiplies natively (fp8 on H100-class GPUs and TPU
v7x, int8 with int8 gradients on TPU v5e, v5p and v6e), which `resolve` spells out for a device.

``inputs`` (`StaticInputs`, dict key ``inputs``) puts the input of each listed weight
matmul (kinds `WEIGHT_RHS_KINDS`) on the int8 or E4M3 grid of a calibrated static clip
value: post-training quantization of activations (`mpx.ptq`). Being part of the policy,
the grids are part of every model built and every program traced under it.

Build a policy from a preset name, a compact string or a dict (YAML-ready) with
`parse`::

    parse("fp8")
    parse("bf16; blocks/*/mlp/*->fp8; fp8.amax_history=16")
    parse("fp8; blocks/*/mlp/*->int8; int8.recipe=qat")
    parse({"preset": "fp16", "rules": [{"kind": "head", "use": "fp32"}]})

Rules given next to a preset come before the preset's own, so they take precedence.

Where each part lives:

* `mpx.policy._vocabulary`: precisions, dtypes and op kinds;
* `mpx.policy._paths`: op paths and the patterns that match them;
* `mpx.policy._core`: `Policy`, `Rule`, `StaticInputs` and the decision for one op, `OpPrecision`;
* `mpx.policy._presets`: the named policies;
* `mpx.policy._parsing`: `parse` (compact strings and dicts; `as_dict`), `resolve` (the ``8bit`` preset for a device).
"""

from mpx.policy._core import OpPrecision, Policy, Rule, StaticInputs
from mpx.policy._parsing import TOP_KEYS, as_dict, parse, resolve
from mpx.policy._paths import key_name, kind_overrides
from mpx.policy._presets import FASTEST_8BIT, PRESETS
from mpx.policy._vocabulary import DTYPES, KINDS, MATMUL_KINDS, PRECISIONS, WEIGHT_RHS_KINDS

__all__ = [
    "DTYPES",
    "FASTEST_8BIT",
    "KINDS",
    "MATMUL_KINDS",
    "OpPrecision",
    "PRECISIONS",
    "PRESETS",
    "Policy",
    "Rule",
    "StaticInputs",
    "TOP_KEYS",
    "WEIGHT_RHS_KINDS",
    "as_dict",
    "key_name",
    "kind_overrides",
    "parse",
    "resolve",
]
