"""The program XLA compiles: for a device this machine may not have, read kernel by kernel.

    compiled = mpx.program.compile_for(step, state, batch, target="h100")   # no GPU needed
    print(mpx.program.read(compiled, "h100"))   # GEMMs by kind, other kernels, bytes, roofline
"""

from mpx.program._hlo import Kernel, kernels, shape_bytes
from mpx.program._report import ProgramReport, read, report
from mpx.program._target import (
    CUBLAS_ONLY,
    H100,
    TARGETS,
    Target,
    compile_for,
    ensure_compiler,
    get_target,
    make_mesh,
    platform_of,
    topology,
    use_plugin,
)

__all__ = [
    "CUBLAS_ONLY",
    "H100",
    "Kernel",
    "ProgramReport",
    "TARGETS",
    "Target",
    "compile_for",
    "ensure_compiler",
    "kernels",
    "get_target",
    "make_mesh",
    "platform_of",
    "read",
    "report",
    "shape_bytes",
    "topology",
    "use_plugin",
]
