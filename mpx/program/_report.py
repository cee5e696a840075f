"""What a compiled program runs, in one report: GEMMs by kind and policy op, the kernels around
them, bytes, flops, memory, the bytes its collectives move and a roofline estimate."""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Mapping

import jax

from mpx.program._hlo import Collective, Kernel, collectives, kernels
from mpx.program._target import CUBLAS_ONLY, TARGETS, Target, _compile, get_target


@dataclasses.dataclass(frozen=True)
class ProgramReport:
    """The kernels of one compiled program and what they add up to.

    ``temp_bytes`` / ``argument_bytes`` / ``output_bytes`` / ``alias_bytes``: XLA's memory
    analysis, per device (intermediates, inputs, outputs, outputs that reuse a donated input's
    buffer). ``peak_bytes``: XLA's peak (``peak_memory_in_bytes``: the most live at once in the
    schedule its buffer assignment simulated; 0 where the backend gives none; the CPU backend's
    leaves its temporaries out); `total_bytes` bounds it. ``compile_s``:
    seconds to compile, when this report compiled the program. ``collectives``: every buffer
    the program's collectives move (`Collective`)."""

    target: str
    kernels: tuple[Kernel, ...]
    temp_bytes: int
    argument_bytes: int
    output_bytes: int
    compile_s: float | None = None
    collectives: tuple[Collective, ...] = ()
    alias_bytes: int = 0
    peak_bytes: int = 0

    # --------------------------------------------------------------- GEMMs
    def gemms(self, gemm: str | None = None, *, op: str | None = None, engine: str | None = None,
              runs_as: str | None = None) -> int:
        """GEMM kernels in the program (each once, however often a loop runs it), optionally of
        one operand kind (``fp8``, ``int8``, ``bf16``, ...), for one policy op, on one engine,
        multiplied in one kind by the hardware (``runs_as``: a TPU widens 8-bit operands its
        matrix unit lacks to f32)."""
        return sum(1 for k in self.kernels if k.kind == "gemm" and (gemm is None or k.gemm == gemm)
                   and (op is None or k.op == op) and (engine is None or k.engine == engine)
                   and (runs_as is None or k.runs_as == runs_as))

    def gemms_by_op(self, *, runs_as: bool = False) -> dict[str | None, Counter]:
        """``{policy op path (None: outside any op): Counter(gemm kind -> GEMMs)}``; with
        ``runs_as`` the kind the hardware multiplies in instead of the operands'."""
        out: dict[str | None, Counter] = {}
        for k in self.kernels:
            if k.kind == "gemm":
                out.setdefault(k.op, Counter())[k.runs_as if runs_as else k.gemm] += 1
        return out

    @property
    def widened(self) -> tuple[Kernel, ...]:
        """The 8-bit GEMMs the hardware does not multiply in 8 bits (they run at a wider type's
        rate, slower than bf16 on a TPU)."""
        return tuple(k for k in self.kernels if k.gemm in ("fp8", "int8") and k.native is False)

    @property
    def total_bytes(self) -> int:
        """Arguments + outputs - aliased outputs + temporaries: the device memory the program
        needs if every buffer were live at once, a bound on `peak_bytes`."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    # --------------------------------------------------------------- collectives
    def collective_bytes(self, kind: str | None = None, *, dtype: str | None = None) -> float:
        """Bytes the collectives of one ``kind`` (``all-gather``, ``reduce-scatter``, ...; None:
        all) move per run and device, optionally of one element type (``f8e4m3fn``, ``bf16``):
        `Collective.bytes` times its launches."""
        return sum(c.bytes * c.launches for c in self.collectives
                   if (kind is None or c.kind == kind) and (dtype is None or c.dtype == dtype))

    def collective_bytes_by_kind(self) -> dict[str, float]:
        """``{kind: bytes moved per run and device}`` of every kind the program has."""
        return {kind: self.collective_bytes(kind) for kind in sorted({c.kind for c in self.collectives})}

    def collectives_of(self, kind: str) -> tuple[Collective, ...]:
        """The buffers of one kind, each with its element type: ``[c.dtype for c in
        report.collectives_of("all-gather")]`` says in what the weights travel."""
        return tuple(c for c in self.collectives if c.kind == kind)

    # --------------------------------------------------------------- everything around them
    @property
    def non_gemm_kernels(self) -> int:
        """Kernels launched per run other than GEMMs and fused attention (loops counted per trip)."""
        return sum(k.launches for k in self.kernels if k.kind not in ("gemm", "attention"))

    @property
    def attention(self) -> str:
        """``cudnn`` when attention runs as a fused library kernel, else ``xla`` (unfused ops)."""
        return "cudnn" if any(k.kind == "attention" for k in self.kernels) else "xla"

    @property
    def bytes_accessed(self) -> float:
        return sum(k.bytes * k.launches for k in self.kernels)

    @property
    def bytes_outside_gemms(self) -> float:
        """Bytes of every kernel but the GEMMs and fused attention: the passes around them."""
        return sum(k.bytes * k.launches for k in self.kernels if k.kind not in ("gemm", "attention"))

    @property
    def gemm_flops(self) -> float:
        return sum(k.flops * k.launches for k in self.kernels if k.kind == "gemm")

    def roofline_s(self, target: str | Target | None = None) -> float:
        """Sum over kernels of max(bytes / bandwidth, GEMM flops / peak of its kind): the step's
        time if every kernel ran at the device's limit. Fused attention counts its bytes only.
        A program read for this process's own backend (``target=None`` in `read`) names no
        target: pass one."""
        t = get_target(target or self.target)
        return sum(k.launches * t.roofline_s(k.bytes, k.flops, k.runs_as if k.kind == "gemm" else None)
                   for k in self.kernels)

    def summary(self) -> dict:
        """The report's figures as a JSON-ready dict."""
        kinds = Counter(k.gemm for k in self.kernels if k.kind == "gemm")
        return {"target": self.target, "gemms": dict(sorted(kinds.items(), key=lambda kv: str(kv[0]))),
                "widened_8bit_gemms": len(self.widened),
                "non_gemm_kernels": self.non_gemm_kernels, "bytes_accessed": self.bytes_accessed,
                "bytes_outside_gemms": self.bytes_outside_gemms, "gemm_flops": self.gemm_flops,
                "roofline_ms": 1e3 * self.roofline_s() if self.target in TARGETS else None,
                "temp_bytes": self.temp_bytes,
                "argument_bytes": self.argument_bytes, "peak_bytes": self.peak_bytes, "total_bytes": self.total_bytes,
                "collective_bytes": self.collective_bytes_by_kind(), "attention": self.attention,
                "compile_s": self.compile_s}

    def __str__(self) -> str:
        s = self.summary()
        gemms = ", ".join(f"{n} {k}" for k, n in s["gemms"].items()) or "none"
        if self.widened:
            gemms += f" ({len(self.widened)} 8-bit widened by the chip)"
        roofline = f"roofline {s['roofline_ms']:.2f} ms; " if s["roofline_ms"] is not None else ""
        moved = s["collective_bytes"]
        collectives = f"collectives {sum(moved.values()) / 2**20:.1f} MiB; " if moved else ""
        return (f"{self.target}: GEMMs {gemms}; {s['non_gemm_kernels']} other kernels; "
                f"{s['bytes_accessed'] / 1e9:.2f} GB accessed ({s['bytes_outside_gemms'] / 1e9:.2f} GB outside "
                f"GEMMs); {s['gemm_flops'] / 1e12:.3f} GEMM TFLOP; {roofline}{collectives}"
                f"temp {s['temp_bytes'] / 2**20:.1f} MiB; peak {s['peak_bytes'] / 2**20:.1f} MiB; "
                f"attention {s['attention']}")


def read(compiled: jax.stages.Compiled, target: str | Target | None, *, compile_s: float | None = None,
         matrix_units: dict[str, str] | None = None) -> ProgramReport:
    """The report of an already compiled program (``jax.jit(f).lower(...).compile()`` or
    `compile_for`); ``target`` names the device it was compiled for (its roofline figures), None
    this process's own backend (a program of ``jax.jit`` on its devices: the report's target is
    the backend's name, ``cpu``, and it has no roofline).
    ``matrix_units``: for a TPU, ``{kernel: kind}`` its matrix units multiply in (`report`
    reads them from libtpu as it compiles; without them a TPU GEMM's ``native`` is None)."""
    t = get_target(target) if target is not None else None
    name, platform = (t.name, t.platform) if t is not None else (jax.default_backend(), jax.default_backend())
    memory = compiled.memory_analysis()
    get = (lambda key: int(getattr(memory, key, 0) or 0)) if memory is not None else (lambda key: 0)
    text = compiled.as_text()
    found = kernels(text, platform={"tpu": "tpu", "cpu": "cpu"}.get(platform, "gpu"), matrix_units=matrix_units)
    temp, argument, output, alias = (get(f"{k}_size_in_bytes") for k in ("temp", "argument", "output", "alias"))
    return ProgramReport(name, tuple(found), temp, argument, output, compile_s, tuple(collectives(text)),
                         alias, get("peak_memory_in_bytes"))


def report(fn, *args, target: str = "h100", options: Mapping[str, object] = CUBLAS_ONLY, **kwargs) -> ProgramReport:
    """Compile ``fn(*args)`` for ``target`` without that device (`compile_for`) and report it;
    for a TPU with what its matrix units really multiply in."""
    start = time.perf_counter()
    compiled, units = _compile(fn, *args, target=target, mesh=kwargs.pop("mesh", None), options=options, **kwargs)
    return read(compiled, target, compile_s=time.perf_counter() - start, matrix_units=units)
