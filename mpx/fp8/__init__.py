"""FP8 numerics, state and matmul.

* `mpx.fp8.numerics`: quantize / dequantize / amax / compute_scale on arrays.
* `mpx.fp8.meta`: `Fp8Config`, the state types `Fp8Scale` / `Fp8Meta` and every rule
  that updates them (observe, combine, advance once per step).
* `mpx.fp8.dot`: `fp8_dot_general`, FP8 GEMMs forward and backward.
"""

from mpx.fp8.dot import Fp8FanoutWarning, fp8_dot_general
from mpx.fp8.meta import (
    Fp8Config,
    Fp8Meta,
    Fp8Scale,
    advance,
    advance_tree,
    bootstrap,
    bootstrapping,
    combine,
    combine_metas,
    combine_trees,
    history_is_empty,
    is_fp8_meta,
    max_fanout,
    metas_of,
    needs_bootstrap,
    observation,
    observations_finite,
    scale_for_use,
)
from mpx.fp8.numerics import E4M3, E5M2, amax, compute_scale, dequantize, fp8_max, observe, quantization_stats, quantize

__all__ = [
    "E4M3", "E5M2", "Fp8Config", "Fp8FanoutWarning", "Fp8Meta", "Fp8Scale", "advance", "advance_tree", "amax",
    "bootstrap", "bootstrapping", "combine", "combine_metas", "combine_trees", "compute_scale", "dequantize",
    "fp8_dot_general", "fp8_max", "history_is_empty", "is_fp8_meta", "max_fanout", "metas_of", "needs_bootstrap",
    "observation", "observations_finite", "observe", "quantization_stats", "quantize", "scale_for_use",
]
