"""int8 numerics and matmul.

* `mpx.int8._numerics`: symmetric quantize (nearest or stochastic) / dequantize / scales,
  per tensor or per row.
* `mpx.int8._config`: `Int8Config` (recipe, backward, granularities, min_size).
* `mpx.int8._dot`: `int8_dot_general` (s8 x s8 -> s32 GEMMs, or fake quantization for QAT).

Unlike FP8, int8 keeps no state: its scales are computed from each tensor when it is
quantized.
"""

from mpx.int8._config import Int8Config
from mpx.int8._dot import int8_dot_general
from mpx.int8._numerics import INT8_MAX, absmax_scale, dequantize, fake_quantize, quantize, quantize_with_scale

__all__ = [
    "INT8_MAX",
    "Int8Config",
    "absmax_scale",
    "dequantize",
    "fake_quantize",
    "int8_dot_general",
    "quantize",
    "quantize_with_scale",
]
