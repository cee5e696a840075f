"""The named policies: ``fp32``; ``bf16`` and ``fp16`` (softmax, norms and the loss in fp32;
fp16 with a dynamic loss scale); ``fp8`` and ``int8`` (bf16 compute, dense and einsum
matmuls in FP8 / int8, embeddings and the head in bf16, softmax, norms and loss in fp32)."""

from __future__ import annotations

from mpx.loss_scale import LossScaleConfig
from mpx.policy._core import Policy, Rule
from mpx.policy._vocabulary import suggest

PRESETS = ("fp32", "bf16", "fp16", "fp8", "int8")

_STABLE_IN_FP32 = Rule(kind="softmax|norm|loss", use="fp32")


def preset(name: str) -> Policy:
    """The policy called ``name`` (one of `PRESETS`)."""
    if name == "fp32":
        return Policy()
    if name == "bf16":
        return Policy(compute="bf16", rules=(_STABLE_IN_FP32,))
    if name == "fp16":
        return Policy(compute="fp16", rules=(_STABLE_IN_FP32,), loss_scale=LossScaleConfig(kind="dynamic"))
    if name in ("fp8", "int8"):  # the 8-bit presets differ only in the dense matmuls' precision
        return Policy(
            compute="bf16",
            rules=(
                _STABLE_IN_FP32,
                Rule(kind="embed|head", use="bf16"),
                Rule(kind="dense|einsum", use=name),
            ),
        )
    raise ValueError(f"unknown policy preset {name!r}; expected one of {', '.join(PRESETS)}{suggest(name, PRESETS)}")
