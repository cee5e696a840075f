"""The TPU program, without a TPU: train steps compiled for Cloud TPU v5e, v6e and v7x (libtpu's
compile-only devices) and what each chip's matrix units really multiply in.

The optimized HLO of a TPU program shows every matmul as a ``convolution`` whose operands keep
their s8 / f8 types whatever the chip does with them; libtpu's low-level dump of each kernel
says what the matrix unit runs (``vmatmul.s8``: int8 in 8 bits; fp8 operands unpacked to
``vmatmul.f32``: widened, at the f32 rate). `mpx.program.report` reads it as it compiles
(``Kernel.runs_as``). libtpu comes from PyPI (`make` installs it into .venv/tpu-compiler, apart
from the CPU jax, so that no other process loads it)."""

import functools
import warnings

import jax
import jax.numpy as jnp
import pytest

import mpx
from mpx.inspect import Widened8Bit, describe

from helpers import CONFIG, lm_step, require_compiler

CHIPS = ("v5e", "v6e", "v7x")


@pytest.fixture(scope="module", autouse=True)
def libtpu():
    require_compiler("v5e", "tpu-compiler", "TPU")  # libtpu, one for every chip


@functools.cache
def step_report(chip: str, spec: str) -> mpx.program.ProgramReport:
    """A one-layer TransformerLM train step (AdamW) under ``spec``, compiled once for ``chip``."""
    _, _, step, args = lm_step(spec, layers=1)
    return mpx.program.report(step, *args, target=chip)


def eight_bit_ops(report, fmt: str) -> dict[str, dict[str, int]]:
    """``{op: {kind the matrix unit runs: GEMMs}}`` for the ops whose GEMMs have ``fmt`` operands."""
    ops = {k.op for k in report.kernels if k.kind == "gemm" and k.gemm == fmt}
    return {op: dict(c) for op, c in report.gemms_by_op(runs_as=True).items() if op in ops}


# ----------------------------------------------------------------------------- one matmul


@pytest.mark.parametrize("chip", ("v5e", "v5p", "v6e", "v7x"))
@pytest.mark.parametrize("fmt, dtype, out", [("int8", jnp.int8, jnp.int32), ("fp8", jnp.float8_e4m3fn, jnp.bfloat16)])
def test_each_chip_multiplies_its_own_8bit_format_natively_and_widens_the_other(chip, fmt, dtype, out):
    """A 256x512 @ 512x1024 matmul with 8-bit operands is one GEMM on every chip; the matrix
    unit multiplies it in 8 bits where the chip has the format (int8 on v5e, v5p, v6e; fp8 on
    v7x) and in f32 where it does not. The HLO says ``fp8``/``int8`` either way: only the
    dump tells them apart. `Target.native_8bit`, which the policy decisions use, must agree."""
    lhs = jax.ShapeDtypeStruct((256, 512), dtype)
    rhs = jax.ShapeDtypeStruct((512, 1024), dtype)
    report = mpx.program.report(lambda a, b: jnp.dot(a, b, preferred_element_type=out), lhs, rhs, target=chip)
    (gemm,) = [k for k in report.kernels if k.kind == "gemm"]
    assert gemm.gemm == fmt and gemm.engine == "tpu"
    native = fmt in mpx.program.get_target(chip).native_8bit
    assert gemm.runs_as == (fmt if native else "f32") and gemm.native is native
    assert report.widened == (() if native else (gemm,))


def test_the_chips_8bit_formats_are_the_ones_the_docs_name():
    """The table the tests above check against the compiler."""
    assert {c: set(mpx.program.native_8bit(c)) for c in ("h100", "b200", "v5e", "v5p", "v6e", "v7x")} == {
        "h100": {"fp8", "int8"}, "b200": {"fp8", "int8"}, "v5e": {"int8"}, "v5p": {"int8"}, "v6e": {"int8"}, "v7x": {"fp8"}}


# ----------------------------------------------------------------------------- train steps


@pytest.mark.parametrize("chip", CHIPS)
def test_fp8_train_step_runs_fp8_only_where_the_chip_has_it(chip):
    """Every fp8 op's three GEMMs (forward, input and weight gradients) run in fp8 on v7x; on
    v5e and v6e all three are widened to f32 (the fp8 preset there is slower than bf16)."""
    report = step_report(chip, "fp8")
    ops = eight_bit_ops(report, "fp8")
    assert set(ops) == {f"blocks/0/{op}" for op in ("attn/qkv", "attn/out", "mlp/fc", "mlp/proj")}
    runs = "fp8" if chip == "v7x" else "f32"
    assert all(counts == {runs: 3} for counts in ops.values()), ops
    assert len(report.widened) == (0 if chip == "v7x" else 12)


@pytest.mark.parametrize("chip", CHIPS)
def test_int8_train_step_with_int8_gradients_is_native_s8_on_v5e_and_v6e(chip):
    """The int8 recipe with ``backward=int8``: forward and both gradient matmuls of every
    dense op are s8 x s8 GEMMs, native on v5e and v6e (the 8-bit path there), widened on v7x."""
    report = step_report(chip, "int8; int8.backward=int8")
    ops = eight_bit_ops(report, "int8")
    assert len(ops) == 4 * 1
    runs = "f32" if chip == "v7x" else "int8"
    assert all(counts == {runs: 3} for counts in ops.values()), ops
    assert report.gemms("fp8") == 0


@pytest.mark.parametrize("chip, resolved", [("v5e", "int8; int8.backward=int8"), ("v6e", "int8; int8.backward=int8"),
                                            ("v7x", "fp8")])
def test_the_8bit_preset_resolves_to_the_chips_native_format_and_nothing_is_widened(chip, resolved):
    """``8bit`` is int8 (with int8 gradients) on v5e and v6e, fp8 on v7x; compiled for the chip,
    the resolved step has 8-bit GEMMs and not one widened."""
    assert mpx.policy.resolve("8bit", chip) == resolved
    assert mpx.parse_policy("8bit", device=chip) == mpx.parse_policy(resolved)
    report = step_report(chip, resolved)
    assert report.gemms(runs_as="int8") + report.gemms(runs_as="fp8") == 12  # 4 dense ops x 3 GEMMs
    assert report.widened == ()


def test_describe_marks_each_8bit_op_and_warns_of_fp8_on_v5e():
    """describe for a device: the fp8 ops are "widened on v5e" and a `Widened8Bit` warning
    names the chip's own format; the resolved preset's ops are "native on v5e", no warning."""
    model, policy, _, _ = lm_step("fp8", layers=1)
    with pytest.warns(Widened8Bit, match="4 ops run in fp8, which v5e's matrix units do not multiply in 8 bits.*int8"):
        table = describe(model, policy, device="v5e")
    notes = {r.path: r.note for r in table.rows if r.precision == "fp8"}
    assert len(notes) == 4 and all(n == "widened on v5e" for n in notes.values())
    model, policy, _, _ = lm_step("8bit", layers=1)  # on this CPU: fp8 (no chip has a say)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Widened8Bit)
        table = describe(model, mpx.parse_policy("8bit", device="v5e"), device="v5e")
    assert {r.note for r in table.rows if r.precision.startswith("int8")} == {"native on v5e"}


def test_a_tpu_report_counts_kernels_bytes_and_a_roofline_at_the_chips_rates():
    """The report of a TPU step has what the H100 one has: GEMM flops (2*M*N*K of every
    matmul, convolutions included), bytes, a roofline at the chip's bandwidth and peaks."""
    report = step_report("v5e", "int8; int8.backward=int8")
    d, f, tokens = CONFIG.d_model, CONFIG.d_ff, 4 * 32  # helpers.BATCH: 4 sequences of 32 predicted tokens
    dense = 2 * tokens * (d * 3 * d + d * d + d * f + f * d)  # qkv, out, fc, proj forward flops
    int8_flops = sum(k.flops * k.launches for k in report.kernels if k.gemm == "int8")
    assert int8_flops == 3 * dense  # forward and two gradients, each 2*M*N*K
    assert report.bytes_accessed > report.bytes_outside_gemms > 0 and report.temp_bytes >= 0
    assert report.roofline_s() >= report.bytes_accessed / mpx.program.get_target("v5e").bandwidth
