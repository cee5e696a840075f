"""Compile for a Cloud TPU without one, and read what its matrix units really run.

libtpu (the ``libtpu`` package from PyPI, which ``jax[tpu]`` brings) builds *compile-only* TPU
devices for a named topology on any machine. A program compiled on them is what the chip would
run. Its optimized HLO is not enough to say whether an 8-bit matmul runs in 8 bits: every
matmul is a ``convolution`` whose operands keep their s8 / f8 types whatever the chip does with
them. libtpu's low-level (LLO) dump of each kernel shows the matrix-unit instructions, whose
operand type is the truth: ``vmatmul.s8`` is an int8 matmul in 8 bits; fp8 operands unpacked
to ``vmatmul.f32`` run at the f32 rate, slower than bf16.

The dump is switched on through ``LIBTPU_INIT_ARGS`` (flags libtpu reads once, when it loads),
into a directory of this process's own; `compile_and_read` takes the files one compile wrote,
reads each kernel's matrix-unit types and deletes them.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Callable

from mpx.program._hlo import matrix_unit_kind

_PASS = "post-constant-materializer"  # the last LLO pass of every kernel: its final instructions
_FILE = re.compile(rf"^\d+-(.+)-(\d+)-{_PASS}\.txt$")
_VMATMUL = re.compile(r"\bvmatmul((?:\.\w+)+)")


def libtpu_path(overlay: str | os.PathLike | None) -> str | None:
    """Where libtpu.so is: the installed ``libtpu`` package (``jax[tpu]``), else ``overlay``
    (``pip install --target DIR libtpu``), else None."""
    if os.environ.get("TPU_LIBRARY_PATH"):
        return os.environ["TPU_LIBRARY_PATH"]
    spec = importlib.util.find_spec("libtpu")
    candidates = [os.path.join(os.path.dirname(spec.origin), "libtpu.so")] if spec and spec.origin else []
    if overlay is not None:
        candidates.append(os.path.join(os.fspath(overlay), "libtpu", "libtpu.so"))
    return next((c for c in candidates if os.path.isfile(c)), None)


_DUMP: dict[str, str] = {}  # "dir": this process's LLO dump directory, once `prepare` set one


def prepare(library: str) -> None:
    """Before libtpu loads: point jax at ``library`` and ask libtpu for the per-kernel LLO text
    of its last pass. Quiet a deviceless start: no cloud metadata query, and the accelerator type
    and worker list that libtpu otherwise warns it cannot find (compile-only devices take their
    chip from the topology name, not from these)."""
    from jax._src.lib import xla_client

    if "dir" in _DUMP or xla_client.pjrt_plugin_loaded("tpu"):
        return  # too late to change libtpu's flags; a TPU machine's own backend is up
    os.environ["TPU_LIBRARY_PATH"] = library
    # Compile-only devices touch no chip: several processes may load libtpu at once (libtpu's
    # lock file is for a TPU machine's chips).
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
                       ("TPU_WORKER_HOSTNAMES", "localhost"), ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(key, value)
    directory = tempfile.mkdtemp(prefix="mpx-tpu-llo-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    # libtpu compiles on fibers whose default stack overflows on some train steps for tpu7x
    # (a SIGSEGV in its layout code, the whole process lost): 64 MiB stacks.
    flags = (f"--xla_jf_dump_to={directory} --xla_jf_dump_llo_text=true --xla_jf_dump_llo_pass_label_regex={_PASS} "
             "--fibers_default_thread_stack_size=67108864")
    os.environ["LIBTPU_INIT_ARGS"] = f"{os.environ.get('LIBTPU_INIT_ARGS', '')} {flags}".strip()
    _DUMP["dir"] = directory


def compile_and_read(compile_fn: Callable[[], object]) -> tuple[object, dict[str, str] | None]:
    """``(compile_fn(), {kernel name: matrix-unit kind})``: the kinds (``int8``, ``fp8``, ``bf16``,
    ``f32``) each kernel's matmul instructions run, read from the LLO files this compile wrote.
    A kernel whose matmuls mix kinds gets the widest. None when no dump is configured."""
    directory = _DUMP.get("dir")
    if directory is None:
        return compile_fn(), None
    before = set(os.listdir(directory))
    compiled = compile_fn()
    latest: dict[str, tuple[int, str]] = {}
    for name in set(os.listdir(directory)) - before:
        m = _FILE.match(name)
        if m and int(m.group(2)) >= latest.get(m.group(1), (-1, ""))[0]:
            latest[m.group(1)] = (int(m.group(2)), name)
    kinds = {}
    for kernel, (_, name) in latest.items():
        with open(os.path.join(directory, name)) as f:
            kind = matrix_unit_kind(_types(f.read()))
        if kind is not None:
            kinds[kernel] = kind
    for name in set(os.listdir(directory)) - before:
        os.remove(os.path.join(directory, name))
    return compiled, kinds


def _types(llo: str) -> set[str]:
    """Operand types of an LLO text's matrix-unit instructions (``vmatmul.msk.f32.gmra`` -> f32)."""
    return {part for suffix in _VMATMUL.findall(llo) for part in suffix.split(".")[1:]}
