"""mpx.inspect: the precision table of a model under a policy, and FP8 statistics."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import mpx
import mpx.nn as mn
from mpx.fp8 import Fp8Config, Fp8Meta, Fp8Scale, fp8_dot_general
from mpx.inspect import describe, fp8_stats, format_fp8_stats
from helpers import fp8_gpu, lm_step, ref_scale


def gpt2_small(policy):
    """The GPT-2-small shape, built abstractly (no 124M-parameter allocation)."""
    return nnx.eval_shape(lambda: mn.TransformerLM(mn.GPT2_SMALL, policy=policy, rngs=nnx.Rngs(0)))


def test_gpt2_small_under_the_fp8_preset_lists_exactly_the_expected_ops():
    policy = mpx.parse_policy("fp8")
    table = describe(gpt2_small(policy), policy)
    blocks = range(12)
    expected = {
        "fp8": {f"blocks/{i}/{op}" for i in blocks for op in ("attn/qkv", "attn/out", "mlp/fc", "mlp/proj")},
        "bf16": {f"blocks/{i}/attn/{op}" for i in blocks for op in ("logits", "values")}
        | {"embed", "pos_embed", "head"},
        "fp32": {f"blocks/{i}/{op}" for i in blocks for op in ("attn/softmax", "ln1", "ln2")} | {"ln_f", "loss"},
    }
    got = {k: set(v) for k, v in table.by_precision().items()}
    assert got == expected
    assert len(table.rows) == 48 + 27 + 38
    rows = {r.path: r for r in table.rows}
    assert (rows["blocks/3/mlp/fc"].kind, rows["blocks/3/mlp/fc"].dtype) == ("dense", "bfloat16")
    assert rows["blocks/3/mlp/fc"].rule == "2: @dense|einsum->fp8"
    assert rows["blocks/0/attn/logits"].rule == "default (compute dtype)"
    assert rows["head"].rule == "1: @embed|head->bf16"
    assert (rows["ln_f"].precision, rows["ln_f"].dtype) == ("fp32", "float32")
    assert table.unmatched_rules == ()
    text = str(table)
    assert "113 ops (bf16: 27, fp32: 38, fp8: 48)" in text
    assert "blocks/11/mlp/proj" in text


def test_user_rules_change_the_table_and_unmatched_rules_are_reported():
    """A rule keeping the first block in bf16 moves its four matmuls out of fp8; a rule
    whose path matches nothing (blocks/12 does not exist, and 'mlp/fc1' is a typo) is
    reported, while a rule that only lost to an earlier one is not."""
    policy = mpx.parse_policy("fp8; blocks/0/**->bf16; blocks/*/mlp/fc1->fp32; blocks/0/mlp/fc->fp32")
    table = describe(gpt2_small(policy), policy)
    fp8 = set(table.by_precision()["fp8"])
    assert len(fp8) == 44 and not any(p.startswith("blocks/0/") for p in fp8)
    assert [str(r) for r in table.unmatched_rules] == ["blocks/*/mlp/fc1->fp32"]
    assert "warning: rule 'blocks/*/mlp/fc1->fp32' matches no op" in str(table)


def test_fp8_stats_report_amax_scale_and_saturation_against_ml_dtypes():
    """One FP8 matmul with a delayed scale of 1 (a history holding amax 1): the statistics
    equal a numpy/ml_dtypes recount of the values that E4M3 saturates (|x| > 448) and
    flushes to zero (|x| < 2**-10, half the smallest subnormal 2**-9); the new scale is
    448 over the max of the history, down to a power of two (`ref_scale`)."""
    config = Fp8Config(amax_history=4)
    lhs = np.array([[1000.0, -500.0, 3.0, 1e-4], [0.5, 2e-3, 0.0, -7e-4]], np.float32)
    rhs = np.ones((4, 3), np.float32)
    seen_once = Fp8Scale.init(4).replace(amax_history=jnp.float32([1.0, 0, 0, 0]))
    meta = Fp8Meta(seen_once, seen_once, seen_once, config=config)
    dims = (((1,), (0,)), ((), ()))
    observed = jax.grad(lambda m: jnp.sum(fp8_dot_general(lhs, rhs, dims, m, out_dtype=jnp.float32)[0]))(meta)
    stats = {s.tensor: s for s in fp8_stats({"layer": meta.advance(observed)})}
    q = np.clip(lhs, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert stats["lhs"].saturated == np.mean(np.abs(lhs) > 448) == 2 / 8
    assert stats["lhs"].flushed == np.mean((lhs != 0) & (q == 0)) == 2 / 8
    assert stats["lhs"].amax == 1000.0
    assert stats["lhs"].scale == ref_scale(1000.0, 448.0) == 0.25
    assert stats["rhs"].saturated == stats["rhs"].flushed == 0.0
    assert stats["grad"].amax == 1.0 and stats["grad"].scale == ref_scale(1.0, 57344.0) == 32768.0
    assert all(s.calls == 1.0 and s.fanout == 1.0 for s in stats.values())
    assert {s.path for s in stats.values()} == {"layer"}
    text = format_fp8_stats(list(stats.values()))
    assert "25.00%" in text and "layer" in text


# ----------------------------------------------------------------------------- FP8 GEMMs


def check_every_fp8_op_is_reported(model, policy, report):
    """Every op the policy marks fp8 has its forward and both gradients as FP8 dot_generals
    (3), and no other op has any."""
    fp8_ops = set(describe(model, policy).by_precision()["fp8"])
    rows = {r.path: r for r in report.rows}
    assert fp8_ops and fp8_ops <= set(rows), fp8_ops - set(rows)
    for path, row in rows.items():
        assert row.fp8_dots == (3 if path in fp8_ops else 0), row


def test_fp8_gemms_on_cpu_finds_the_emitted_fp8_matmuls_and_no_gemm():
    """On CPU: the traced train step of an unrolled and a scanned LM has three FP8
    dot_generals for each fp8 op (forward and both gradients), named by its path; the
    backend compiles no FP8 GEMM, and the report says so without failing. (One layer
    each: compiling a train step dominates this test's time.)"""
    for scan in (False, True):
        model, policy, step, args = lm_step("fp8; fp8.amax_history=4", scan=scan, layers=1)
        report = mpx.inspect.fp8_gemms(step, *args)
        check_every_fp8_op_is_reported(model, policy, report)
        if jax.default_backend() == "cpu":
            assert report.fp8_gemms == 0 and report.backend == "cpu"
            assert set(report.missing()) == set(describe(model, policy).by_precision()["fp8"])
        assert "FP8 GEMMs for" in str(report)


@pytest.mark.skipif(not fp8_gpu(), reason="needs an FP8-capable GPU (compute capability >= 8.9)")
def test_every_fp8_matmul_of_a_train_step_is_an_fp8_gemm():
    """On an FP8 GPU every FP8 dot_general of the full train step (unrolled and scanned
    LM), forward and backward, compiles to a cuBLASLt FP8 GEMM attributed to its op."""
    for scan in (False, True):
        model, policy, step, args = lm_step("fp8; fp8.amax_history=4", scan=scan)
        report = mpx.inspect.fp8_gemms(step, *args)
        check_every_fp8_op_is_reported(model, policy, report)
        assert report.missing() == [], str(report)
