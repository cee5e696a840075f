"""`Int8Config`: how an int8 matmul quantizes and differentiates."""

from __future__ import annotations

import dataclasses
from typing import Literal

from mpx._checks import check_choice, check_int

Recipe = Literal["int8", "qat"]
Backward = Literal["compute", "int8"]

RECIPES = ("int8", "qat")
BACKWARDS = ("compute", "int8")
WEIGHT_GRANULARITIES = ("channel", "tensor")
ACTIVATION_GRANULARITIES = ("token", "tensor")


@dataclasses.dataclass(frozen=True)
class Int8Config:
    """How int8 matmuls run. Static: hashable, safe as a jit static argument.

    Scales are *current*: computed from each tensor when it is quantized, so an int8 op
    keeps no state between steps (no meta, nothing for the train step to advance).

    Attributes:
      recipe: ``int8``: both operands quantized to int8, an s8 x s8 -> s32 ``dot_general``
        (integer GEMMs on GPUs), scales applied to its output in f32. ``qat``:
        quantization-aware training, the operands fake-quantized (quantize, dequantize)
        and multiplied in the compute dtype; for models meant to be served in int8.
      backward: ``compute``: both gradients are ``dot_general`` transposes in the compute
        dtype on the dequantized operands (the straight-through estimator; ``qat`` always
        differentiates this way). ``int8`` (``recipe=int8`` only): the output gradient and
        the operands are quantized again, for each gradient matmul along its own
        contraction, and both gradient matmuls are int8 GEMMs too.
      weight_granularity: ``channel`` (one scale per output channel: per index of the
        weight's free axes) or ``tensor``. The weight is the rhs of ``dense``, ``einsum``
        and ``head`` ops (``x @ kernel``, as every Flax layer writes it).
      activation_granularity: ``token`` (one scale per row: per index of the free and
        batch axes) or ``tensor``. Both operands of the attention matmuls are activations.
      min_size: a matmul whose smallest dimension (M, K or N) is below this runs in the
        compute dtype instead (int8 GEMMs only pay off when they are large). 0: no limit.
    """

    recipe: Recipe = "int8"
    backward: Backward = "compute"
    weight_granularity: str = "channel"
    activation_granularity: str = "token"
    min_size: int = 0

    def __post_init__(self):
        check_choice("int8 recipe", self.recipe, RECIPES)
        check_choice("int8 backward", self.backward, BACKWARDS)
        check_choice("int8 weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES)
        check_choice("int8 activation_granularity", self.activation_granularity, ACTIVATION_GRANULARITIES)
        check_int("int8 min_size", self.min_size, low=0)
        if self.recipe == "qat" and self.backward == "int8":
            raise ValueError(
                "int8 backward='int8' needs recipe='int8' (int8 GEMMs); the qat recipe fake-quantizes the "
                "forward and differentiates in the compute dtype: set int8.backward=compute or int8.recipe=int8"
            )

    @property
    def label(self) -> str:
        """How `mpx.inspect.describe` shows an op in this config: ``int8``, ``int8 (qat)``,
        ``int8 (int8 bwd)``."""
        if self.recipe == "qat":
            return "int8 (qat)"
        return "int8 (int8 bwd)" if self.backward == "int8" else "int8"
