"""Read an optimized XLA program: its kernels, GEMMs by kind, bytes and flops.

``cost_analysis()`` is empty for a program compiled without its device, so everything here
comes from the optimized HLO text: each launched kernel (a fusion, a library call, a
collective, a standalone op) with the bytes it reads and writes (its operands' and results'
shapes) and, for a GEMM, ``2 * M * N * K`` flops. Kernels inside a ``while`` loop count once per
iteration where XLA knows the trip count (a scan over layers). The bytes are those a kernel
touches in device memory if nothing stays in cache: an upper bound on its traffic, and the
figure that changes when a pass is removed.
"""

from __future__ import annotations

import dataclasses
import math
import re

from mpx._naming import op_paths

_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
          "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e8m0fnu": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_GEMM_KIND = {"f8e4m3fn": "fp8", "f8e5m2": "fp8", "f8e4m3": "fp8", "f8e4m3fnuz": "fp8", "f8e5m2fnuz": "fp8",
              "s8": "int8", "u8": "int8", "bf16": "bf16", "f16": "f16", "f32": "f32", "f64": "f64"}
# Ops that launch nothing: views, tuples, control flow (its bodies are read instead), the
# second half of an asynchronous pair.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call",
         "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain", "async-done",
         "async-update", "all-reduce-done", "all-gather-done", "collective-permute-done", "copy-done",
         "send-done", "recv-done", "iota"}
_COLLECTIVE = re.compile(r"^(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|collective-broadcast"
                         r"|ragged-all-to-all)(-start)?$")

_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \((.*)\) -> (.*) \{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|[\w]+\[[^\]]*\](?:\{[^}]*\})?|[\w]+\[\]|token\[\]|\S+) "
                    r"([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel the program launches.

    ``kind``: ``gemm``, ``attention`` (a fused-attention library call), ``collective`` or
    ``other``. ``gemm``: the GEMM's operand kind (``fp8``, ``int8``, ``bf16``, ...) and
    ``engine`` what runs it (``cublas``, ``triton``, ``cudnn``, ``xla``, ``tpu``). ``mxu``: the
    kind the matrix unit really multiplies in, where the program's HLO does not say it (a TPU
    widens 8-bit operands its matrix unit lacks: read from libtpu's low-level dump; None where
    unknown or where the GEMM runs its operand kind, as every GPU GEMM does). ``op``: the policy op
    it computes for (the innermost ``mpx[<path>]`` name scope), if any. ``launches``: how many
    times one run of the program launches it (loop trip counts); ``bytes`` and ``flops`` are
    per launch."""

    name: str
    kind: str
    gemm: str | None
    engine: str
    op: str | None
    bytes: float
    flops: float
    launches: int
    line: str = dataclasses.field(repr=False, compare=False, default="")
    mxu: str | None = None

    @property
    def runs_as(self) -> str | None:
        """The operand kind the hardware multiplies in: ``mxu`` where read, else ``gemm``."""
        return self.mxu or self.gemm

    @property
    def native(self) -> bool | None:
        """Whether a GEMM runs in its operand kind (False: an 8-bit GEMM widened by the chip);
        None for a TPU GEMM whose matrix unit was not read."""
        if self.kind != "gemm":
            return None
        if self.engine == "tpu" and self.mxu is None:
            return None
        return self.runs_as == self.gemm


@dataclasses.dataclass(frozen=True)
class Collective:
    """One buffer a collective moves between devices in a run of the program, per device.

    ``kind``: the collective (``all-gather``, ``reduce-scatter``, ``all-reduce``,
    ``all-to-all``, ``collective-permute``, ``collective-broadcast``, ``ragged-all-to-all``),
    an asynchronous start/done pair counted once. ``dtype``: the buffer's element type as HLO
    writes it (``bf16``, ``f8e4m3fn``, ``f32``). ``bytes``: the buffer's whole size on one
    device, the figure the collective is usually quoted by: for an all-gather its *result*
    (the gathered array each device ends with), for every other kind its *operand*
    (reduce-scatter: the unreduced input; all-reduce: the array reduced; all-to-all and
    collective-permute: the array sent). On n devices a ring all-gather, reduce-scatter or
    all-to-all sends (n-1)/n of it from each device, an all-reduce twice that.
    ``result_bytes``: the buffer's result on one device. ``launches``: how many times a run
    does it (loop trip counts); ``bytes`` is per launch. XLA combines collectives into one
    instruction of several buffers: each buffer is its own entry, under the instruction's
    ``name``."""

    name: str
    kind: str
    dtype: str
    bytes: float
    result_bytes: float
    launches: int
    op: str | None = None


@dataclasses.dataclass
class _Instr:
    name: str
    type: str
    opcode: str
    operands: list[str]
    attrs: str
    line: str


def shape_bytes(type_text: str) -> float:
    """Bytes of an HLO type: an array ``bf16[8,128]{1,0}`` or a tuple of them."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_text):
        total += _BYTES.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _dims(type_text: str) -> tuple[str, list[int]]:
    m = _ARRAY.search(type_text)
    if not m:
        return "", []
    return m.group(1), [int(d) for d in m.group(2).split(",") if d]


def _split_operands(rest: str) -> tuple[list[str], str]:
    """``a, b, c), attrs...`` -> (operand names, attrs)."""
    depth, i = 1, 0
    while i < len(rest) and depth:
        depth += {"(": 1, ")": -1}.get(rest[i], 0)
        i += 1
    inside, attrs = rest[: i - 1], rest[i:]
    inside = re.sub(r"/\*[^*]*\*/", "", inside)
    names = [tok.strip().split(" ")[-1].lstrip("%") for tok in inside.split(",") if tok.strip()]
    return names, attrs


def _computations(text: str) -> tuple[dict[str, list[_Instr]], str]:
    comps: dict[str, list[_Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
            continue
        if current is None:
            continue
        if line.startswith("}"):
            current = None
            continue
        m = _INSTR.match(line)
        if m:
            operands, attrs = _split_operands(m.group(4))
            comps[current].append(_Instr(m.group(1), m.group(2), m.group(3), operands, attrs, line.strip()))
    return comps, entry


def _attr(attrs: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    return m.group(1) if m else None


def _trip_count(instr: _Instr) -> int:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
    return int(m.group(1)) if m else 1


def _op_path(instr: _Instr) -> str | None:
    m = re.search(r'op_name="([^"]*)"', instr.attrs)
    scopes = op_paths(m.group(1)) if m else []
    return scopes[-1] if scopes else None


def _gemm(instr: _Instr, types: dict[str, str], contracting: re.Match | None) -> tuple[str | None, float]:
    """(operand kind, 2*M*N*K) of a GEMM: its two operands' types, the lhs contracting dims
    (the first group of ``contracting``) and its result (a library call's first array)."""
    lhs_dtype, lhs = _dims(types.get(instr.operands[0], ""))
    rhs_dtype, _ = _dims(types.get(instr.operands[1], "")) if len(instr.operands) > 1 else ("", [])
    dims = [int(d.strip('" ')) for d in contracting.group(1).split(",") if d.strip('" ')] if contracting else []
    k = math.prod(lhs[d] for d in dims) if dims and lhs else 0
    _, out = _dims(instr.type)
    return _gemm_kind(lhs_dtype, rhs_dtype), 2.0 * math.prod(out) * k


def _dot_flops(dot: _Instr, types: dict[str, str]) -> tuple[str | None, float]:
    """(operand kind, flops) of a ``dot``, or of a ``convolution`` (a TPU's matmuls)."""
    if dot.opcode == "convolution":
        return _convolution_flops(dot, types)
    return _gemm(dot, types, re.search(r"lhs_contracting_dims=\{([\d,]*)\}", dot.attrs))


def _convolution_flops(conv: _Instr, types: dict[str, str]) -> tuple[str | None, float]:
    """(operand kind, 2 * output elements * terms each sums) of a ``convolution``: the rhs's
    input features (``i`` of ``dim_labels``) times the window's taps that meet the input. A TPU
    lowers a weight gradient's sum over sequences to a window over them (every tap real); a
    batched matmul to a window over an input dilated as wide (``lhs_dilate``: one real tap)."""
    lhs_dtype, _ = _dims(types.get(conv.operands[0], ""))
    rhs_dtype, rhs = _dims(types.get(conv.operands[1], "")) if len(conv.operands) > 1 else ("", [])
    labels = re.search(r"dim_labels=\w+_(\w+)->", conv.attrs)
    k = rhs[labels.group(1).index("i")] if labels and "i" in labels.group(1) and rhs else 0
    window = re.search(r"window=\{([^}]*)\}", conv.attrs)
    fields = dict(f.split("=", 1) for f in window.group(1).split()) if window else {}
    sizes = [int(v) for v in fields.get("size", "").split("x") if v]
    dilate = [int(v) for v in fields.get("lhs_dilate", "").split("x") if v] or [1] * len(sizes)
    taps = math.prod(-(-size // d) for size, d in zip(sizes, dilate))
    _, out = _dims(conv.type)
    return _gemm_kind(lhs_dtype, rhs_dtype), 2.0 * math.prod(out) * k * taps


def matrix_unit_kind(types: set[str]) -> str | None:
    """The GEMM kind of a set of HLO / matrix-unit operand types (``{"s8"}`` -> ``int8``):
    the widest, or None when none is a matmul type."""
    return _widest({_GEMM_KIND[t] for t in types if t in _GEMM_KIND})


def _widest(kinds) -> str | None:
    for kind in ("f64", "f32", "f16", "bf16", "int8", "fp8"):
        if kind in kinds:
            return kind
    return None


def _gemm_kind(lhs: str, rhs: str) -> str | None:
    return _widest({_GEMM_KIND.get(lhs), _GEMM_KIND.get(rhs)})  # the wider operand decides


def _library_gemm(instr: _Instr, types: dict[str, str]) -> tuple[str | None, float]:
    """(operand kind, flops) of a cuBLAS custom call, from its operands and its backend config."""
    return _gemm(instr, types, re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instr.attrs))


def _block_scaled_gemm(instr: _Instr, types: dict[str, str]) -> tuple[str | None, float]:
    """(operand kind, flops) of cuDNN's block-scaled GEMM (MXFP8 on Blackwell): lhs (B, M, K)
    times rhs (B, N, K), the contraction last; its other two operands are the tiles' scales."""
    lhs_dtype, lhs = _dims(types.get(instr.operands[0], ""))
    rhs_dtype, _ = _dims(types.get(instr.operands[1], ""))
    _, out = _dims(instr.type)
    return _gemm_kind(lhs_dtype, rhs_dtype), 2.0 * math.prod(out) * (lhs[-1] if lhs else 0)


def _io_bytes(instr: _Instr, types: dict[str, str], *, library: bool) -> float:
    out = instr.type
    if library and out.startswith("("):  # (result, ..., s8[workspace]): scratch, not traffic
        out = out.rsplit(",", 1)[0] + ")"
    return shape_bytes(out) + sum(shape_bytes(types.get(o, "")) for o in instr.operands)


_SLICES = {"dynamic-slice", "slice", "gather"}


def _fusion_bytes(instr: _Instr, comps: dict[str, list[_Instr]], types: dict[str, str]) -> float:
    """Bytes a fusion touches. A parameter read only through (dynamic-)slices counts the slices
    (a scan body reading layer i of a stacked weight reads one layer, not the stack); a
    dynamic-update-slice into a parameter writes in place (its update, not the whole buffer)."""
    body = comps.get(_attr(instr.attrs, "calls") or "", [])
    if not body:
        return _io_bytes(instr, types, library=False)
    local = {i.name: i for i in body}
    params = {int(i.operands[0]): i.name for i in body if i.opcode == "parameter"}
    uses: dict[str, list[_Instr]] = {}
    for i in body:
        for o in i.operands:
            uses.setdefault(o, []).append(i)

    def through_views(name: str) -> str:  # a bitcast is a view of the same buffer
        while name in local and local[name].opcode == "bitcast" and local[name].operands:
            name = local[name].operands[0]
        return name

    def slice_bytes(name: str) -> float | None:
        """Bytes read from ``name`` if it is only ever sliced (through views), else None."""
        total = 0.0
        for use in uses.get(name, []):
            if use.opcode == "bitcast":
                inner = slice_bytes(use.name)
                if inner is None:
                    return None
                total += inner
            elif use.opcode in _SLICES and use.operands[0] == name:
                total += shape_bytes(use.type)
            else:
                return None
        return total if uses.get(name) else None

    in_place: set[str] = set()
    written = 0.0
    root = next((i for i in body if i.line.startswith("ROOT")), body[-1])
    outputs = [local[o] for o in root.operands if o in local] if root.opcode == "tuple" else [root]
    for out in outputs:
        out = local.get(through_views(out.name), out)
        target = through_views(out.operands[0]) if out.opcode == "dynamic-update-slice" else None
        if target in params.values():
            in_place.add(target)
            written += shape_bytes(local[out.operands[1]].type) if out.operands[1] in local else 0.0
        else:
            written += shape_bytes(out.type)
    read = 0.0
    for index, operand in enumerate(instr.operands):
        name = params.get(index)
        if name in in_place:
            continue
        sliced = slice_bytes(name) if name is not None else None
        read += sliced if sliced is not None else shape_bytes(types.get(operand, ""))
    return read + written


def _launched(comps: dict[str, list[_Instr]], entry: str):
    """``(instruction, its computation's types, launches per run)`` of every instruction that
    launches work, from the entry computation down through loops (times their trip count),
    conditionals (each branch once), calls and asynchronous wrappers."""

    def walk(name: str, launches: int):
        types = {i.name: i.type for i in comps.get(name, [])}  # names repeat between computations
        for instr in comps.get(name, []):
            op = instr.opcode
            if op == "while":
                n = launches * _trip_count(instr)
                for key in ("condition", "body"):
                    yield from walk(_attr(instr.attrs, key), n)
                continue
            if op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", instr.attrs)
                names = [b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else [
                    _attr(instr.attrs, "true_computation"), _attr(instr.attrs, "false_computation")]
                for branch in filter(None, names):
                    yield from walk(branch, launches)
                continue
            if op == "call" or (op == "async-start" and "custom-call" not in instr.attrs):
                yield from walk(_attr(instr.attrs, "to_apply") or _attr(instr.attrs, "calls"), launches)
                continue
            if op in _FREE or op.endswith("-done"):
                continue
            yield instr, types, launches

    yield from walk(entry, 1)


def kernels(text: str, *, platform: str = "gpu", matrix_units: dict[str, str] | None = None) -> list[Kernel]:
    """Every kernel an optimized HLO module (``compiled.as_text()``) launches.

    ``platform``: what the program was compiled for (``gpu``, ``tpu``, ``cpu``): a TPU's GEMMs
    run on its matrix unit (engine ``tpu``). ``matrix_units``: ``{kernel name: kind}`` its
    matrix unit really multiplies in (`mpx.program` reads them from libtpu's dump). libtpu
    compiles a kernel once for all its identical copies (the same layer's matmul in every
    block) and dumps it under one name; the others take its kind."""
    comps, entry = _computations(text)
    engine = "tpu" if platform == "tpu" else None
    found = [_kernel(instr, comps, types, launches, engine) for instr, types, launches in _launched(comps, entry)]
    if matrix_units is not None:
        found = _with_matrix_units(found, comps, matrix_units)
    return found


def collectives(text: str) -> list[Collective]:
    """Every buffer an optimized HLO module's collectives move (see `Collective`)."""
    comps, entry = _computations(text)
    found = []
    for instr, types, launches in _launched(comps, entry):
        m = _COLLECTIVE.match(instr.opcode)
        if m:
            found += _collective_buffers(instr, m.group(1), types, launches)
    return found


def _collective_buffers(instr: _Instr, kind: str, types: dict[str, str], launches: int) -> list[Collective]:
    # A permute's operands after the first are offsets (its in-place form), not data.
    operands = [_ARRAY.findall(types.get(o, "")) for o in instr.operands[: 1 if kind == "collective-permute" else None]]
    sent = [a for arrays in operands for a in arrays]
    results = _ARRAY.findall(instr.type)
    if instr.opcode.endswith("-start"):  # (operands..., results..., context): the results follow the operands
        results = results[len(sent):]
    out = []
    for (dtype, dims), result in zip(sent, results + [None] * (len(sent) - len(results))):
        operand_bytes = shape_bytes(f"{dtype}[{dims}]")
        result_bytes = shape_bytes(f"{result[0]}[{result[1]}]") if result else operand_bytes
        out.append(Collective(instr.name, kind, dtype, result_bytes if kind == "all-gather" else operand_bytes,
                              result_bytes, launches, _op_path(instr)))
    return out


def _with_matrix_units(found: list[Kernel], comps: dict[str, list[_Instr]], units: dict[str, str]) -> list[Kernel]:
    lines = {i.name: i for body in comps.values() for i in body}
    by_signature = {_signature(lines[k.name], comps): units[k.name] for k in found if k.name in units}
    out = []
    for k in found:
        mxu = (units.get(k.name) or by_signature.get(_signature(lines[k.name], comps))) if k.kind == "gemm" else None
        out.append(dataclasses.replace(k, mxu=mxu) if mxu else k)
    return out


_METADATA = re.compile(r",? ?(metadata|frontend_attributes)=\{[^{}]*\}")
_REFERENCE = re.compile(r"\b(calls|to_apply)=%?([\w.\-]+)")


def _signature(instr: _Instr, comps: dict[str, list[_Instr]], depth: int = 0) -> str:
    """The instruction with its names abstracted: its type, opcode, operand types and
    attributes, and the computations it calls in the same form (operands by position). Two
    kernels with equal signatures are the same kernel to a compiler."""
    attrs = _METADATA.sub("", instr.attrs)
    if depth < 6:
        attrs = _REFERENCE.sub(lambda m: f"{m.group(1)}=<{_body_signature(m.group(2), comps, depth + 1)}>", attrs)
    return f"{instr.type} {instr.opcode} {attrs}"


def _body_signature(name: str, comps: dict[str, list[_Instr]], depth: int) -> str:
    body = comps.get(name, [])
    index = {i.name: n for n, i in enumerate(body)}
    return "; ".join(f"{_signature(i, comps, depth)} ({','.join(str(index.get(o, o)) for o in i.operands)})"
                     for i in body)


def _kernel(instr: _Instr, comps: dict[str, list[_Instr]], types: dict[str, str], launches: int,
            gemm_engine: str | None) -> Kernel:
    path = _op_path(instr)
    if instr.opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]+)"', instr.attrs)
        target = target.group(1) if target else ""
        if target.startswith("__cublas"):
            gemm, flops = _library_gemm(instr, types)
            return Kernel(instr.name, "gemm", gemm, "cublas", path, _io_bytes(instr, types, library=True), flops,
                          launches, instr.line)
        if target == "__cudnn$blockScaledDot":
            gemm, flops = _block_scaled_gemm(instr, types)
            return Kernel(instr.name, "gemm", gemm, "cudnn", path, _io_bytes(instr, types, library=True), flops,
                          launches, instr.line)
        if target.startswith("__cudnn$fmha"):
            return Kernel(instr.name, "attention", None, "cudnn", path, _io_bytes(instr, types, library=True), 0.0,
                          launches, instr.line)
        return Kernel(instr.name, "other", None, target, path, _io_bytes(instr, types, library=False), 0.0,
                      launches, instr.line)
    if instr.opcode in ("dot", "convolution"):
        gemm, flops = _dot_flops(instr, types)
        return Kernel(instr.name, "gemm", gemm, gemm_engine or "xla", path, _io_bytes(instr, types, library=False), flops,
                      launches, instr.line)
    if instr.opcode == "fusion":
        dot = _find_dot(_attr(instr.attrs, "calls"), comps)
        if dot is not None:
            gemm, flops = _dot_flops(dot[0], {i.name: i.type for i in comps[dot[1]]})
            engine = gemm_engine or ("triton" if '"kind":"__triton' in instr.attrs else (
                "cudnn" if '"kind":"__cudnn' in instr.attrs else "xla"))
            return Kernel(instr.name, "gemm", gemm, engine, path or _op_path(dot[0]),
                          _fusion_bytes(instr, comps, types), flops, launches, instr.line)
        return Kernel(instr.name, "other", None, "xla", path, _fusion_bytes(instr, comps, types), 0.0, launches,
                      instr.line)
    kind = "collective" if _COLLECTIVE.match(instr.opcode) else "other"
    return Kernel(instr.name, kind, None, "xla", path, _io_bytes(instr, types, library=False), 0.0, launches,
                  instr.line)


def _find_dot(name: str | None, comps: dict[str, list[_Instr]], depth: int = 0) -> tuple[_Instr, str] | None:
    """The ``dot`` (or TPU ``convolution``) a fusion computes and the computation holding it,
    looking through nested fusions (Triton's nested GEMMs). Operand types are looked up in that
    computation: parameter names repeat between computations."""
    if name is None or depth > 4:
        return None
    for instr in comps.get(name, []):
        if instr.opcode in ("dot", "convolution"):
            return instr, name
    for instr in comps.get(name, []):
        if instr.opcode == "fusion":
            inner = _find_dot(_attr(instr.attrs, "calls"), comps, depth + 1)
            if inner is not None:
                return inner
    return None

