"""What 8 bits would gain per matmul: a static model from GEMM sizes and a crossover.

The model, kept simple on purpose: an op whose smallest GEMM dimension (M, K or N, as
`mpx.ops.gemm_dims` counts them) is below ``min_size`` gains nothing (that is what
``fp8.min_size`` does to it anyway); any other op runs ``speedup`` times faster. Matmul time
is taken to be proportional to flops at the bf16 rate, so an op's estimated gain is the
fraction of the step's matmul time saved: ``share * (1 - 1 / speedup)``, ``share`` being its
fraction of the matmul flops (forward and both gradients). Attention softmax, norms,
elementwise work and the quantize passes themselves are not in it: the gains are an upper
bound on the fraction of the step saved, not a prediction of it.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

# ../shared/FP8_ON_XLA.md (one H100, jax 0.11.2): dense forward+backward, bf16 against FP8
# direct dots, 16384x2048->8192 1.41x and 16384x8192->2048 1.45x; 16384x2048->2048 only 1.09x
# (within reach of the +-5-8% noise). No crossover was measured on this project's H100 yet:
# 2048 is where the measured gains begin, an assumption to replace with a bench record.
DEFAULT_MIN_SIZE = 2048
DEFAULT_SPEEDUP = 1.4
DEFAULT_SOURCE = ("assumed from H100 measurements (FP8_ON_XLA.md): dense fwd+bwd 1.41-1.45x with one dimension "
                  "8192 and the smallest 2048, 1.09x at 2048x2048 weights; no crossover measured")


@dataclasses.dataclass(frozen=True)
class SpeedModel:
    """An op gains ``speedup`` if its smallest GEMM dimension is at least ``min_size``,
    else nothing; ``source`` says where the two numbers come from (see the module doc;
    default: the assumption for the default numbers, ``"given"`` for others)."""

    min_size: int = DEFAULT_MIN_SIZE
    speedup: float = DEFAULT_SPEEDUP
    source: str | None = None

    def __post_init__(self):
        if self.source is None:
            defaults = (self.min_size, self.speedup) == (DEFAULT_MIN_SIZE, DEFAULT_SPEEDUP)
            object.__setattr__(self, "source", DEFAULT_SOURCE if defaults else "given")
        if not isinstance(self.min_size, int) or isinstance(self.min_size, bool) or self.min_size < 0:
            raise ValueError(f"min_size must be an integer >= 0 (0: every matmul gains), got {self.min_size!r}")
        if not isinstance(self.speedup, (int, float)) or not math.isfinite(self.speedup) or self.speedup < 1:
            raise ValueError(f"speedup must be a finite number >= 1 (8-bit matmul time / bf16 time, inverted), "
                             f"got {self.speedup!r}")

    def gains(self, gemm: Sequence[int]) -> bool:
        """Whether a matmul of these (M, K, N) runs faster in 8 bits."""
        return min(gemm) >= self.min_size and self.speedup > 1

    def gain(self, gemm: Sequence[int], share: float) -> float:
        """The fraction of the matmul time saved by this op in 8 bits (``share``: its
        fraction of the matmul flops)."""
        return share * (1.0 - 1.0 / self.speedup) if self.gains(gemm) else 0.0

    @classmethod
    def from_bench(cls, record: Mapping[str, Any]) -> SpeedModel:
        """The crossover of a ``python -m train bench --mode crossover`` JSON record, with the
        median FP8 speedup (forward+backward) of the sizes at or above it. A record whose FP8
        never beat bf16 gives a model in which nothing gains."""
        crossover = record.get("crossover")
        if not isinstance(crossover, Mapping) or "min_size" not in crossover:
            raise ValueError("this bench record has no crossover; write one with: python -m train bench CONFIG "
                             "--mode crossover --out bench.json")
        device = record.get("device") or record.get("platform") or "the bench's device"
        size = crossover["min_size"]
        if size is None:
            return cls(min_size=0, speedup=1.0, source=f"bench record ({device}): FP8 never beat bf16")
        speedups = [r["speedup_vs_bf16"] for r in record.get("rows", ())
                    if r.get("mode") == "crossover" and r.get("variant") == "mpx_fp8" and r.get("pass") == "fwd+bwd"
                    and min(r["shape"]) >= size]
        speedup = statistics.median(speedups) if speedups else DEFAULT_SPEEDUP
        return cls(min_size=int(size), speedup=max(float(speedup), 1.0),
                   source=f"bench record ({device}): crossover {size}, median speedup {speedup:.2f}x above it")
