"""The program XLA compiles: for a device this machine may not have, read kernel by kernel.

    print(mpx.program.report(step, state, batch, target="h100"))   # no GPU needed
    mpx.program.ensure_compiler("v5e")                             # libtpu, no TPU needed
    report = mpx.program.report(step, state, batch, target="v5e")
    report.widened   # 8-bit GEMMs the chip's matrix units do not run in 8 bits
    report.collective_bytes("all-gather")                          # bytes gathered per step and device

Targets (`TARGETS`): ``h100``, ``b200`` (Blackwell: MXFP8 block-scaled GEMMs,
`block_scaled_gemms`); the Cloud TPUs ``v5e``, ``v5p``, ``v6e`` (int8 native, fp8
widened to f32) and ``v7x`` (fp8 native, int8 widened). `native_8bit` says which 8-bit formats a
device multiplies natively, `target_of` which target a running device is.
"""

from mpx.program._hlo import Collective, Kernel, kernels, shape_bytes
from mpx.program._report import ProgramReport, read, report
from mpx.program._target import (
    B200,
    CUBLAS_ONLY,
    H100,
    TARGETS,
    Target,
    block_scaled,
    block_scaled_gemms,
    compile_for,
    ensure_compiler,
    get_target,
    make_mesh,
    native_8bit,
    platform_of,
    target_of,
    topology,
    use_plugin,
)

__all__ = [
    "B200",
    "CUBLAS_ONLY",
    "Collective",
    "H100",
    "Kernel",
    "ProgramReport",
    "TARGETS",
    "Target",
    "block_scaled",
    "block_scaled_gemms",
    "compile_for",
    "ensure_compiler",
    "kernels",
    "get_target",
    "make_mesh",
    "native_8bit",
    "platform_of",
    "read",
    "report",
    "shape_bytes",
    "target_of",
    "topology",
    "use_plugin",
]
