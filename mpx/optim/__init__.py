"""AdamW with low-precision optimizer state: moments in f32, bf16 or 8 bits.

* `mpx.optim._adam`: `scale_by_adam` and `adamw` (optax transformations for any params
  pytree), their `ScaleByAdamState`.
* `mpx.optim._blocks`: the 8-bit storage: `BlockQuantized` (E4M3 codes in the array's own
  shape, one f32 scale per block of the last axis; the first moment) and `BlockExpanded`
  (the same after a per-block power that fills E4M3's range; the second moment).
* `mpx.optim._rounding`: low-precision master weights: `stochastic_round` (f32 to bf16 or
  fp16, unbiased) and `apply_updates` (`optax.apply_updates`, or with a key, the narrow
  params' sums rounded stochastically; `mpx.train_step(..., stochastic_rounding=True)`).

    opt = mpx.optim.adamw(3e-4, weight_decay=0.1, moments="fp8")
    state = opt.init(params)    # about 2 bytes a parameter instead of 8
"""

from mpx.optim._adam import MOMENTS, ScaleByAdamState, adamw, scale_by_adam
from mpx.optim._blocks import BlockExpanded, BlockQuantized
from mpx.optim._rounding import apply_updates, stochastic_round

__all__ = [
    "MOMENTS",
    "BlockExpanded",
    "BlockQuantized",
    "ScaleByAdamState",
    "adamw",
    "apply_updates",
    "scale_by_adam",
    "stochastic_round",
]
