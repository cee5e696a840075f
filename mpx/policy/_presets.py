"""The named policies: ``fp32``; ``bf16`` and ``fp16`` (softmax, norms and the loss in fp32;
fp16 with a dynamic loss scale); ``fp8`` and ``int8`` (bf16 compute, dense and einsum
matmuls in FP8 / int8, embeddings and the head in bf16, softmax, norms and loss in fp32);
``8bit``: whichever of the two the chip runs natively. The FP8 scaling recipes beyond one
scale per tensor are ``fp8`` with another `Fp8Config` (`RECIPES`): ``fp8-rowwise`` (a scale per
row), ``fp8-rowwise-gw-hp`` (the same, the weight gradient in bf16), ``fp8-block``
(DeepSeek-V3's 1x128 tiles and 128x128 weight blocks, E4M3 everywhere) and ``mxfp8`` (OCP
MXFP8: 1x32 tiles with power-of-two scales, E4M3 everywhere)."""

from __future__ import annotations

from mpx.fp8 import Fp8Config
from mpx.loss_scale import LossScaleConfig
from mpx.policy._core import Policy, Rule
from mpx.policy._vocabulary import suggest

RECIPES = {
    "fp8-rowwise": Fp8Config(granularity="row"),
    "fp8-rowwise-gw-hp": Fp8Config(granularity="row", weight_grad="compute"),
    "fp8-block": Fp8Config(granularity="block", format="e4m3"),
    "mxfp8": Fp8Config(granularity="mx", format="e4m3"),
}
PRESETS = ("fp32", "bf16", "fp16", "fp8", "int8", *RECIPES)

FASTEST_8BIT = "8bit"
"""The preset that means "the 8-bit format this chip multiplies natively": ``fp8`` where the
matrix units have it (H100-class GPUs, TPU v7x), else ``int8`` with int8 gradients too
(``int8.backward=int8``: TPU v5e, v5p, v6e, older GPUs), ``fp8`` where neither is native (a CPU).
`mpx.policy.resolve` turns it into one of those for a device."""


def fastest_8bit(native: frozenset[str]) -> dict:
    """What `FASTEST_8BIT` stands for (a policy dict's ``preset`` and ``int8`` keys) on a chip
    whose native 8-bit formats are ``native`` (`mpx.program.native_8bit`)."""
    if "int8" in native and "fp8" not in native:
        return {"preset": "int8", "int8": {"backward": "int8"}}
    return {"preset": "fp8"}

_STABLE_IN_FP32 = Rule(kind="softmax|norm|loss", use="fp32")


def preset(name: str) -> Policy:
    """The policy called ``name`` (one of `PRESETS`)."""
    if name == "fp32":
        return Policy()
    if name == "bf16":
        return Policy(compute="bf16", rules=(_STABLE_IN_FP32,))
    if name == "fp16":
        return Policy(compute="fp16", rules=(_STABLE_IN_FP32,), loss_scale=LossScaleConfig(kind="dynamic"))
    if name in ("fp8", "int8", *RECIPES):  # the 8-bit presets differ only in the dense matmuls' precision
        return Policy(
            compute="bf16",
            rules=(
                _STABLE_IN_FP32,
                Rule(kind="embed|head", use="bf16"),
                Rule(kind="dense|einsum", use="int8" if name == "int8" else "fp8"),
            ),
            fp8=RECIPES.get(name, Fp8Config()),
        )
    if name == FASTEST_8BIT:
        raise ValueError(f"the {FASTEST_8BIT!r} preset stands for the 8-bit format of a chip: resolve it first "
                         f"(mpx.policy.resolve(spec, device); mpx.parse_policy does, for this process's device)")
    raise ValueError(f"unknown policy preset {name!r}; expected one of {', '.join(PRESETS)}, or {FASTEST_8BIT} (the "
                     f"8-bit format the chip has){suggest(name, (*PRESETS, FASTEST_8BIT))}")
