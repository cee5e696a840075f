"""Compile a program for an accelerator this machine does not have.

XLA's GPU compiler runs without a GPU: given a target description (a text-format
``GpuTargetConfigProto``), the CUDA PJRT plugin builds *compile-only* devices, and a program
lowered on them goes through the whole GPU pipeline (GEMM rewriter, fusion, scheduling,
ptxas). What comes out is the program that GPU would run, less autotuning: with no device
to time candidates on, XLA takes the first GEMM backend that applies (Triton). ``CUBLAS_ONLY``
(the default here) turns Triton GEMMs off so that every dot shows what the GEMM rewriter makes
of it (cuBLASLt FP8, int8, bf16 calls, with their scale operands and epilogues).

    compiled = mpx.program.compile_for(step, state, batch, target="h100")
    print(mpx.program.read(compiled, target="h100"))

The plugin (``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` of the installed jaxlib's version,
and ``nvidia-cuda-nvcc-cu12`` for ptxas) is needed, not a GPU. Installed next to a CPU jax it
makes every ``import jax`` print CUDA driver lines; kept in a directory of its own
(``pip install --target DIR ...``) and loaded with `use_plugin` only where a program is
compiled for a GPU target, ordinary runs stay quiet.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import math
import os
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mpx.program import _tpu

CUBLAS_ONLY: Mapping[str, object] = {"xla_gpu_enable_triton_gemm": False}
"""Compiler options under which a deviceless compile shows the GEMM rewriter's choice for every
dot (cuBLAS / cuBLASLt calls). XLA's defaults ({}) give Triton GEMM fusions instead: what it
falls back to without autotuning, not a prediction of what the GPU would pick."""

_H100_SXM_CONFIG = r"""
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
    feature_extension: ACCELERATED_FEATURES
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  scalar_unit_description {
    rate_infos { key: 4 value { clock_rate_ghz: 1.98 units_per_core: 64 ops_per_clock: 1 } }
    rate_infos { key: 8 value { clock_rate_ghz: 1.98 units_per_core: 64 ops_per_clock: 1 } }
    rate_infos { key: 10 value { clock_rate_ghz: 1.98 units_per_core: 128 ops_per_clock: 2 } }
    rate_infos { key: 11 value { clock_rate_ghz: 1.98 units_per_core: 128 ops_per_clock: 1 } }
    rate_infos { key: 12 value { clock_rate_ghz: 1.98 units_per_core: 64 ops_per_clock: 1 } }
    rate_infos { key: 16 value { clock_rate_ghz: 1.98 units_per_core: 128 ops_per_clock: 2 } }
  }
  matrix_unit_description {
    rate_infos { key: 2 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 1024 } }
    rate_infos { key: 6 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 1024 } }
    rate_infos { key: 10 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 512 } }
    rate_infos { key: 11 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 256 } }
    rate_infos { key: 12 value { clock_rate_ghz: 1.98 units_per_core: 4 ops_per_clock: 32 } }
    rate_infos { key: 16 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 512 } }
    rate_infos { key: 19 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 1024 } }
    rate_infos { key: 20 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 1024 } }
    rate_infos { key: 23 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 1024 } }
    rate_infos { key: 24 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 1024 } }
    rate_infos { key: 25 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 1024 } }
    rate_infos { key: 28 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 1024 } }
    rate_infos { key: 29 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 1024 } }
    rate_infos { key: 33 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 1024 } }
    rate_infos { key: 35 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 1024 } }
    rate_infos { key: 36 value { clock_rate_ghz: 1.8295201 units_per_core: 4 ops_per_clock: 1024 } }
  }
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  platform_version: "Compute Capability 9.0a"
  model_str: "sm_9.0a with 84942979072B RAM, 132 cores, 1980000KHz clock, 2619000KHz mem clock, 52428800B L2$"
  device_address_bits: 64
  pcie_bandwidth: 34359738368
  ecc_enabled: true
  name: "NVIDIA H100 80GB HBM3"
  driver_version: "13.0.0"
  runtime_version: "12.8.0"
  compile_time_toolkit_version: "12.8.0"
  dnn_version: "9.10.0"
  cub_version: "3.1.2"
  device_interconnect_info {
    active_links: 18
  }
}
platform_name: "CUDA"
dnn_version_info {
  major: 8
  minor: 9
  patch: 4
}
device_description_str: "NVIDIA H100 80GB HBM3"
"""# GpuTargetConfigProto of an H100 SXM 80GB: XLA's xla/backends/gpu/target_config/specs/h100_sxm.txtpb
# less `collective_memory_granularity`, a field jaxlib 0.10's proto rejects.


def _b200_config(h100: str) -> str:
    """A B200's description: the H100's, with the fields that differ set from NVIDIA's B200
    (HGX, SXM) datasheet: compute capability 10.0 (sm_100a), 148 SMs, 1.965 GHz, 180 GB of HBM3e
    at 8 TB/s, 126 MB of L2, and cuDNN 9.10 (which XLA's block-scaled GEMM needs: with the H100
    description's 8.9 it dequantizes instead). The H100's per-unit rate tables are dropped: they
    are Hopper's, and XLA only estimates costs from them."""
    replace = {
        "core_count: 132": "core_count: 148",
        "memory_bandwidth: 3352320000000": "memory_bandwidth: 8000000000000",
        "l2_cache_size: 52428800": "l2_cache_size: 132120576",
        "clock_rate_ghz: 1.98\n": "clock_rate_ghz: 1.965\n",
        "device_memory_size: 84942979072": "device_memory_size: 193273528320",
        "major: 9\n": "major: 10\n",
        "Compute Capability 9.0a": "Compute Capability 10.0a",
        "sm_9.0a with 84942979072B RAM, 132 cores, 1980000KHz clock, 2619000KHz mem clock, 52428800B L2$":
            "sm_10.0a with 193273528320B RAM, 148 cores, 1965000KHz clock, 3996000KHz mem clock, 132120576B L2$",
        '"NVIDIA H100 80GB HBM3"': '"NVIDIA B200"',
        "major: 8\n  minor: 9\n  patch: 4": "major: 9\n  minor: 10\n  patch: 0",
    }
    config = h100
    for old, new in replace.items():
        if old not in config:
            raise AssertionError(f"the H100 description has no {old!r}")
        config = config.replace(old, new)
    for table in ("scalar_unit_description", "matrix_unit_description"):
        start = config.index(f"  {table} {{")
        config = config[:start] + config[config.index("\n  }\n", start) + len("\n  }\n"):]
    return config


_B200_CONFIG = _b200_config(_H100_SXM_CONFIG)


@dataclasses.dataclass(frozen=True)
class Target:
    """An accelerator programs can be compiled for without it.

    ``bandwidth`` (bytes/s of device memory) and ``peak_flops`` (dense matrix-unit rates by GEMM
    kind: ``fp8``, ``int8``, ``bf16``, ``f16``, ``f32``) are the datasheet figures a roofline
    estimate uses; they bound, not predict, a kernel's time. ``cudnn_version``: the cuDNN the
    target's programs are built against (jax's version number, 91000 for 9.10), which decides
    whether jax emits cuDNN fused attention. ``native_8bit``: the 8-bit formats (``fp8``,
    ``int8``) its matrix units multiply in 8 bits; the others it widens, at the rate of the
    wider type. ``block_scaled``: the block granularities (``mx``) whose scales its GEMMs take
    themselves (`block_scaled_gemms`). ``config``: a GPU's target description, a TPU's topology
    name."""

    name: str
    platform: str
    config: str
    bandwidth: float
    peak_flops: Mapping[str, float]
    native_8bit: frozenset[str] = frozenset()
    cudnn_version: int | None = None
    block_scaled: frozenset[str] = frozenset()

    def roofline_s(self, bytes_accessed: float, flops: float = 0.0, gemm: str | None = None) -> float:
        """A kernel's lower bound in seconds: its memory traffic at full bandwidth, or its GEMM
        flops at the matrix units' peak, whichever takes longer."""
        compute = flops / self.peak_flops.get(gemm, self.peak_flops["f32"]) if gemm else 0.0
        return max(bytes_accessed / self.bandwidth, compute)


H100 = Target(
    name="h100",
    platform="cuda",
    config=_H100_SXM_CONFIG,
    bandwidth=3.35e12,  # HBM3, 3.35 TB/s
    # Dense tensor-core peaks of the SXM part (no sparsity); f32 GEMMs run as TF32 at best.
    peak_flops={"fp8": 1979e12, "int8": 1979e12, "bf16": 989e12, "f16": 989e12, "f32": 495e12},
    native_8bit=frozenset({"fp8", "int8"}),
    cudnn_version=91000,  # the config's dnn_version, 9.10.0
)

B200 = Target(
    name="b200",
    platform="cuda",
    config=_B200_CONFIG,
    bandwidth=8.0e12,  # HBM3e, 8 TB/s
    # Dense tensor-core peaks (no sparsity); MXFP8 runs at the FP8 rate; f32 GEMMs as TF32.
    peak_flops={"fp8": 4.5e15, "int8": 4.5e15, "bf16": 2.25e15, "f16": 2.25e15, "f32": 1.1e15},
    native_8bit=frozenset({"fp8", "int8"}),
    cudnn_version=91000,
    block_scaled=frozenset({"mx"}),  # cuDNN's block-scaled GEMM: 1x32 tiles, E8M0 scales
)


def _tpu_target(name: str, topology: str, bandwidth: float, bf16: float, eight_bit: str, rate_8bit: float) -> Target:
    # Datasheet HBM bandwidth and dense bf16 / 8-bit peaks per chip. No figure is published for
    # an f32 matmul (8-bit operands the chip lacks are unpacked to f32): taken as half the bf16
    # rate, a bound the widened GEMMs cannot beat.
    return Target(name=name, platform="tpu", config=topology, bandwidth=bandwidth,
                  peak_flops={"bf16": bf16, eight_bit: rate_8bit, "f32": bf16 / 2},
                  native_8bit=frozenset({eight_bit}))


# int8 runs natively on the matrix units of v5e, v5p and v6e, fp8 on v7x (Ironwood); the other
# 8-bit format is widened to f32 (tests/test_tpu.py reads it from libtpu's dump).
V5E = _tpu_target("v5e", "v5e:2x2", 819e9, 197e12, "int8", 394e12)
V5P = _tpu_target("v5p", "v5p:2x2x1", 2765e9, 459e12, "int8", 918e12)
V6E = _tpu_target("v6e", "v6e:2x2", 1640e9, 918e12, "int8", 1836e12)
V7X = _tpu_target("v7x", "tpu7x:2x2x1", 7370e9, 2307e12, "fp8", 4614e12)
TARGETS: Mapping[str, Target] = {t.name: t for t in (H100, B200, V5E, V5P, V6E, V7X)}


# jax's device_kind of each chip the targets describe.
_DEVICE_KINDS = {"TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v6 lite": "v6e",
                 "TPU v6e": "v6e", "TPU7x": "v7x", "TPU v7x": "v7x"}


def target_of(device=None) -> Target | None:
    """The `Target` a device is (default: this process's first device), by jax's device kind;
    None for a CPU or a chip without one."""
    device = device if device is not None else jax.devices()[0]
    kind = str(getattr(device, "device_kind", ""))
    if kind in _DEVICE_KINDS:
        return TARGETS[_DEVICE_KINDS[kind]]
    return H100 if "H100" in kind else B200 if "B200" in kind else None


def _known(device) -> tuple[Target | None, tuple[int, int] | None]:
    """(`Target`, None) of a target, its name or a jax device the targets describe (default:
    this process's first device); (None, compute capability) of another GPU; (None, None)."""
    if isinstance(device, (str, Target)):
        return get_target(device), None
    device = device if device is not None else jax.devices()[0]
    known = target_of(device)
    capability = getattr(device, "compute_capability", None)
    if known is None and getattr(device, "platform", "") == "gpu" and capability:
        major, minor = (int(v) for v in str(capability).split(".")[:2])
        return None, (major, minor)
    return known, None


def native_8bit(device=None) -> frozenset[str]:
    """The 8-bit formats (``fp8``, ``int8``) the matrix units of ``device`` (a `Target`, its
    name, or a jax device; default: this process's first device) multiply in 8 bits. A GPU
    not among the targets by its compute capability: FP8 tensor cores from 8.9 (Ada, Hopper,
    Blackwell), int8 from 7.5. A CPU: none."""
    known, capability = _known(device)
    if known is not None:
        return known.native_8bit
    if capability is not None:
        return frozenset({"fp8", "int8"} if capability >= (8, 9) else {"int8"} if capability >= (7, 5) else ())
    return frozenset()


def block_scaled(device=None) -> frozenset[str]:
    """The block granularities (``mx``) whose scales the GEMMs of ``device`` (as for
    `native_8bit`) take themselves: a target's `Target.block_scaled`; ``mx`` on a GPU not among
    the targets of compute capability 10 and up (Blackwell: cuDNN's block-scaled GEMM,
    ``jax.nn.scaled_matmul``); none elsewhere."""
    known, capability = _known(device)
    if known is not None:
        return known.block_scaled
    return frozenset({"mx"}) if capability is not None and capability >= (10, 0) else frozenset()


def get_target(name: str | Target) -> Target:
    """The `Target` called ``name`` (or ``name`` itself)."""
    if isinstance(name, Target):
        return name
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; expected one of {', '.join(TARGETS)}")
    return TARGETS[name]


def use_plugin(directory: str | os.PathLike) -> None:
    """Make the CUDA compiler plugin installed in ``directory`` (``pip install --target``)
    available to this process, after jax has started. Idempotent. Its ptxas is put first on
    PATH so that XLA runs the one that matches the plugin."""
    directory = os.fspath(directory)
    jax.devices()  # jax discovers plugins once, as its backends start: let that happen without this one
    plugins = os.path.join(directory, "jax_plugins")
    if not os.path.isdir(plugins):
        raise FileNotFoundError(f"no CUDA compiler plugin in {directory}: {_install_hint(directory)}")
    if directory not in sys.path:
        sys.path.append(directory)
    import jax_plugins

    if plugins not in list(jax_plugins.__path__):
        jax_plugins.__path__.append(plugins)
    ptxas = os.path.join(directory, "nvidia", "cuda_nvcc", "bin")
    if os.path.isdir(ptxas) and ptxas not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = ptxas + os.pathsep + os.environ.get("PATH", "")
    _initialize_cuda_plugin()


@functools.cache
def _initialize_cuda_plugin() -> None:
    # jax discovers plugins once, when its backends start; a plugin added later registers itself
    # when asked. Registering it does not change the default backend or jax.devices().
    # The plugin checks the CUDA runtime's version as it registers, unless told not to: there is
    # no runtime on a machine without a GPU, and compiling needs none.
    skip = "JAX_SKIP_CUDA_CONSTRAINTS_CHECK"
    before = os.environ.get(skip)
    os.environ[skip] = "1"
    try:
        importlib.import_module("jax_plugins.xla_cuda12").initialize()
    finally:
        if before is None:
            del os.environ[skip]
        else:
            os.environ[skip] = before
    # jax hands every plugin it discovers to callbacks its modules registered at import (custom
    # partitioning's, which cuDNN attention needs on a sharded mesh); one registered late has to
    # be handed to them here. (jax internals: where they are absent, nothing is run.)
    from jax._src import xla_bridge

    factory = getattr(xla_bridge, "_backend_factories", {}).get("cuda")
    for callback in list(getattr(xla_bridge, "_plugin_callbacks", [])) if factory is not None else []:
        callback(c_api=factory.c_api)


@functools.cache
def topology(name: str = "h100", count: int = 1):
    """The compile-only topology of ``count`` devices of the target on one host."""
    t = get_target(name)
    if t.platform == "tpu":
        return _tpu_topology(t, count)
    try:
        return topologies.get_topology_desc(platform=t.platform, topology=f"1x1x{count}", target_config=t.config)
    except Exception as e:  # the plugin's absence shows as NotImplementedError, RuntimeError or ValueError
        raise RuntimeError(
            f"cannot compile for {t.name} here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
            f"the CUDA compiler plugin is missing: {_install_hint('DIR')}") from None


def _tpu_topology(t: Target, count: int):
    try:
        chips = topologies.get_topology_desc(topology_name=t.config, platform="tpu").devices
    except Exception as e:  # libtpu absent or refusing: RuntimeError / JaxRuntimeError from jax
        missing = "not installed" in str(e)
        raise RuntimeError(f"cannot compile for {t.name} here ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})" + (f": libtpu is missing: {_TPU_HINT}"
                                                                               if missing else "")) from None
    if count > len(chips):
        raise ValueError(f"{t.name}: the compile-only topology {t.config} has {len(chips)} chips; {count} asked")
    return topologies.TopologyDescription(list(chips[:count]))


_TPU_HINT = ("install it with `pip install --target DIR libtpu` (the version jax[tpu] of this jax asks for; "
             "`make tpu-compiler` does it), then call mpx.program.ensure_compiler(target, DIR)")


def ensure_compiler(target: str = "h100", overlay: str | os.PathLike | None = None) -> None:
    """Make sure this process can compile for ``target``.

    GPU: a GPU build of jax can already; else the plugin is loaded from ``overlay`` (default
    ``sys.prefix/cuda-compiler``, where ``make cuda-compiler`` installs it). TPU: libtpu from
    an installed ``libtpu`` package or from ``overlay`` (default ``sys.prefix/tpu-compiler``,
    ``make tpu-compiler``); this must come before anything else in the process loads libtpu,
    for libtpu's low-level dump (what `read` learns the matrix units from) to be switched on.
    RuntimeError, with the install hint, when the compiler is not there."""
    if get_target(target).platform == "tpu":
        overlay = overlay if overlay is not None else os.path.join(sys.prefix, "tpu-compiler")
        library = _tpu.libtpu_path(overlay)
        if library is None:
            raise RuntimeError(f"cannot compile for {target} here: libtpu is missing from {os.fspath(overlay)}: "
                               f"{_TPU_HINT}")
        _tpu.prepare(library)
        topology(target)
        return
    try:
        topology(target)
    except RuntimeError as missing:
        overlay = os.fspath(overlay) if overlay is not None else os.path.join(sys.prefix, "cuda-compiler")
        if not os.path.isdir(overlay):
            raise RuntimeError(f"{missing} (`make cuda-compiler` installs it into {overlay})") from None
        use_plugin(overlay)


def _install_hint(directory: str) -> str:
    import jaxlib  # the plugin is built against jaxlib, whose version can trail jax's

    v = jaxlib.__version__
    return (f"install it with `pip install --target {directory} jax-cuda12-plugin=={v} jax-cuda12-pjrt=={v} "
            f"nvidia-cuda-nvcc-cu12`, then call mpx.program.use_plugin({directory!r})")


def make_mesh(shape: tuple[int, ...] = (1,), axis_names: tuple[str, ...] = ("data",), *,
              target: str = "h100") -> Mesh:
    """A mesh of compile-only devices of ``target`` (one host), for sharded programs."""
    devices = topology(target, math.prod(shape)).devices
    if get_target(target).platform == "tpu":  # the first chips of the topology, in order
        return Mesh(np.asarray(devices, dtype=object).reshape(shape), axis_names)
    return topologies.make_mesh(topology(target, math.prod(shape)), shape, axis_names)


def _named_device(x):
    """The (abstract) device the sharding of ``x`` names, where the trace knows it; else None."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    return getattr(mesh, "abstract_device", None)


def platform_of(x) -> str:
    """The platform the program holding ``x`` is compiled for (``gpu``, ``cpu``, ``tpu``): that
    of the devices its sharding names where the trace knows them (a program compiled for a GPU
    on a machine without one, `compile_for`), else this process's default backend. For choices
    a trace makes by platform, such as cuDNN fused attention."""
    return getattr(_named_device(x), "platform", None) or jax.default_backend()


# The target a `compile_for` is tracing for, while it traces.
_TRACING_FOR: contextvars.ContextVar[Target | None] = contextvars.ContextVar("mpx_tracing_for", default=None)


def block_scaled_gemms(x) -> frozenset[str]:
    """`block_scaled` of the program holding ``x``: of the `Target` it is compiled for
    (`compile_for`), else of the device its sharding names (else this process's first)."""
    tracing_for = _TRACING_FOR.get()
    if tracing_for is not None:  # a compile for a target (`compile_for`): intermediates may not name it
        return tracing_for.block_scaled
    return block_scaled(_named_device(x))


def _abstract(x, sharding):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x if x.sharding is not None else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding,
                                                                     weak_type=x.weak_type)
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding, weak_type=getattr(x, "weak_type", False))
    a = jnp.asarray(x)  # Python scalars
    return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding, weak_type=True)


def compile_for(fn, *args, target: str = "h100", mesh: Mesh | None = None,
                options: Mapping[str, object] = CUBLAS_ONLY, **jit_kwargs) -> jax.stages.Compiled:
    """``jax.jit(fn, **jit_kwargs)`` compiled for ``target`` without that device.

    ``args``: arrays, ``jax.ShapeDtypeStruct``s or pytrees of them (only shapes and dtypes are
    used). A ``ShapeDtypeStruct`` that carries a sharding keeps it (build them on `mesh` for a
    sharded program); everything else is replicated over ``mesh`` (one device by default).
    ``options``: XLA compiler options (`CUBLAS_ONLY`, or ``{}`` for XLA's defaults)."""
    return _compile(fn, *args, target=target, mesh=mesh, options=options, **jit_kwargs)[0]


def _compile(fn, *args, target: str, mesh: Mesh | None, options: Mapping[str, object],
             **jit_kwargs) -> tuple[jax.stages.Compiled, dict[str, str] | None]:
    """`compile_for`, and for a TPU what each kernel's matrix unit multiplies in (None where
    that could not be read; `mpx.program.read` takes it)."""
    t = get_target(target)
    mesh = mesh if mesh is not None else make_mesh(target=target)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract = jax.tree.map(lambda x: _abstract(x, replicated), args)
    token = _TRACING_FOR.set(t)
    try:
        with _target_cudnn(t):
            lowered = jax.jit(fn, **jit_kwargs).trace(*abstract).lower()
    finally:
        _TRACING_FOR.reset(token)
    options = dict(options) if t.platform == "cuda" else {k: v for k, v in options.items() if not k.startswith("xla_gpu")}
    if t.platform == "tpu":
        return _tpu.compile_and_read(lambda: lowered.compile(compiler_options=options))
    return lowered.compile(compiler_options=options), None


@contextlib.contextmanager
def _target_cudnn(t: Target):
    """While tracing for ``t``: jax asks this machine's cuDNN for its version before it emits
    cuDNN fused attention, and a machine without a GPU has none; the target's is the one that
    decides. (A jax-internal hook: where it is absent or a local cuDNN answers, nothing changes.)"""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as attention
    except ImportError:
        attention = None
    check = getattr(attention, "check_cudnn_version", None)
    if t.cudnn_version is None or check is None:
        yield
        return
    try:
        check()
        yield  # a cuDNN is installed here: its answer stands
        return
    except Exception:
        pass
    attention.check_cudnn_version = lambda: t.cudnn_version
    try:
        yield
    finally:
        attention.check_cudnn_version = check
