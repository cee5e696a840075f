"""FP8 numerics, state and matmul.

* `mpx.fp8._numerics`: quantize / dequantize / amax / scale_from_amax on arrays.
* `mpx.fp8._meta`: `Fp8Config`, the state types `Fp8Scale` / `Fp8Meta` and every rule
  that updates them (observe, combine, advance once per step).
* `mpx.fp8._dot`: `fp8_dot_general`, FP8 GEMMs forward and backward.
* `mpx.fp8._saved`: `saved_in_fp8`, a function whose backward reads FP8 copies of its inputs;
  `remat_saving_fp8`, the remat policy that keeps every FP8 copy a backward reads, and
  `keeping_weights_whole`, under which the weights' copies are the gathered ones (FSDP).

This package exports what a user calls; the state's update rules, which `mpx.train_step`
applies, are imported from `mpx.fp8._meta`.
"""

from mpx.fp8._dot import Fp8FanoutWarning, fp8_dot_general
from mpx.fp8._meta import Fp8Config, Fp8Meta, Fp8Scale
from mpx.fp8._numerics import E4M3, E5M2, amax, dequantize, fp8_max, quantization_stats, quantize
from mpx.fp8._saved import keeping_weights_whole, remat_saving_fp8, saved_in_fp8

__all__ = [
    "E4M3",
    "E5M2",
    "Fp8Config",
    "Fp8FanoutWarning",
    "Fp8Meta",
    "Fp8Scale",
    "amax",
    "dequantize",
    "fp8_dot_general",
    "fp8_max",
    "keeping_weights_whole",
    "quantization_stats",
    "quantize",
    "remat_saving_fp8",
    "saved_in_fp8",
]
