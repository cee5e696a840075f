"""The bench command: every mode runs end to end on tiny shapes and writes a JSON record
of the documented schema. (Speed itself is measured by the command, not asserted here.)"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

import mpx
import mpx.nn as mn
from train import bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
SHAPE = mn.TransformerConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=1, d_ff=64, max_len=16)


@pytest.fixture(scope="module")
def record():
    settings = bench.BenchSettings(shapes=((32, 16, 48),), sizes=(16,), layers=1, repeats=2, warmup=0)
    return bench.run(SHAPE, batch=2, seq=16, settings=settings)


def check_timing(row):
    assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"], row


def test_record_has_device_versions_and_settings(record):
    assert set(record) >= {"device", "backend", "versions", "date", "settings", "model", "batch", "seq", "rows",
                           "crossover"}
    assert set(record["versions"]) == {"jax", "flax", "optax", "python"}
    assert tuple(record["settings"]["modes"]) == bench.TIMED_MODES and record["model"]["d_model"] == 32
    json.dumps(record)  # JSON-ready as it is


def test_gemm_rows_cover_every_variant_and_pass(record):
    """bf16, raw FP8 (forward only: its operands are quantized outside), mpx and Flax's
    FP8 dot, forward and forward+backward; ratios are relative to bf16's own time."""
    rows = [r for r in record["rows"] if r["mode"] == "gemm"]
    assert {(r["variant"], r["pass"]) for r in rows} == {
        ("bf16", "fwd"), ("bf16", "fwd+bwd"), ("fp8_raw", "fwd"), ("mpx_fp8", "fwd"), ("mpx_fp8", "fwd+bwd"),
        ("flax_fp8_direct", "fwd"), ("flax_fp8_direct", "fwd+bwd"), ("int8_raw", "fwd"), ("mpx_int8", "fwd"),
        ("mpx_int8", "fwd+bwd")}
    for r in rows:
        check_timing(r)
        assert r["shape"] == [32, 16, 48] and r["tflops"] > 0
        if r["variant"] == "bf16":
            assert r["speedup_vs_bf16"] == 1.0


def test_layer_step_and_crossover_rows(record):
    layer = {r["variant"]: r for r in record["rows"] if r["mode"] == "layer"}
    assert set(layer) == {"mpx_bf16", "flax_bf16", "mpx_fp8", "flax_fp8_direct"}
    assert layer["mpx_bf16"]["speedup_vs_mpx_bf16"] == 1.0
    step = {r["variant"]: r for r in record["rows"] if r["mode"] == "step"}
    assert set(step) == {"fp32", "bf16", "fp8", "fp16", "int8"}
    for r in [*layer.values(), *step.values()]:
        check_timing(r)
    for r in step.values():
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / (r["median_ms"] * 1e-3))
        assert r["memory_bytes"] is None or r["memory_bytes"] > 0
        assert r["mfu"] is None  # no known peak on a CPU
    cross = record["crossover"]
    assert cross["min_size"] in (16, None)
    assert cross["policy_override"] == (f"fp8.min_size={cross['min_size']}" if cross["min_size"] else None)


def test_bf16_baseline_that_is_really_f32_is_refused():
    """The classic benchmark trap: a "bf16" baseline whose matmuls run in f32."""
    import jax.numpy as jnp

    with pytest.raises(RuntimeError, match="not bf16"):
        bench._require_bf16("oops", lambda a, b: a @ b, jnp.ones((4, 4)), jnp.ones((4, 4)))


def test_cli_writes_the_record_and_rejects_a_bad_mode(tmp_path, capsys):
    """``python -m train bench`` in a process of its own writes the record; the refusals go
    through the same entry point (`train.__main__.main`, which the process exits with) in this
    one: a fresh interpreter for each would only import everything again to print one line."""
    from train.__main__ import main

    config = ROOT / "configs" / "quickstart.yaml"
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "train", "bench", str(config), "--mode", "gemm", "--shapes", "32x16x32",
                          "--repeats", "1", "--warmup", "0", "--out", str(out)], cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "[gemm]" in run.stdout and "mpx_fp8" in run.stdout
    assert {r["variant"] for r in json.loads(out.read_text())["rows"]} == {"bf16", "fp8_raw", "mpx_fp8", "flax_fp8_direct",
                                                                          "int8_raw", "mpx_int8"}
    assert main(["bench", str(config), "--mode", "gemmm"]) == 2
    assert "unknown bench mode 'gemmm'" in capsys.readouterr().err
    assert main(["bench", str(config), "--mode", "static", "--target", "h1000"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: unknown target 'h1000'; expected one of h100, b200, v5e, v5p, v6e, v7x"], err


def test_generate_mode_times_the_cached_and_the_recomputing_sampler():
    """A row per length: tokens/s with the key/value cache and without, their ratio; the
    record names the CPU. Not part of ``all`` (minutes at 1024 tokens on a CPU)."""
    settings = bench.BenchSettings(modes=("generate",), new_tokens=(4,))
    record = bench.run(SHAPE, batch=1, seq=16, settings=settings)
    [row] = record["rows"]
    assert row["mode"] == "generate" and row["new_tokens"] == row["max_len"] == 4
    assert row["cached_tokens_per_s"] > 0 and row["recompute_tokens_per_s"] > 0
    assert row["speedup"] == pytest.approx(row["cached_tokens_per_s"] / row["recompute_tokens_per_s"])
    assert record["cpu"] and "generate" not in bench.TIMED_MODES
    with pytest.raises(ValueError, match="--new-tokens must be positive integers, got 0"):
        bench.BenchSettings(modes=("generate",), new_tokens=(0,))


# The quickstart config shrunk to a one-layer model of d_model 32 (a byte vocabulary of 256).
TINY = ["model.d_model=32", "model.num_heads=2", "model.num_layers=1", "model.d_ff=64", "model.max_len=32",
        "data.seq_len=32", "data.batch_size=8", "data.tokenizer=byte", "model.vocab_size=256"]


def test_memory_mode_splits_the_state_over_8_devices_and_gathers_it_back():
    """`bench --mode memory`: the app's step compiled for 1 and 8 compile-only H100s (FSDP 8).
    Per device the 8-way params are 1/8 of the whole (every tensor of this model splits 8
    ways), AdamW's two f32 moments twice the f32 params; the FP8 meta (replicated) is there
    under fp8 only; 8 devices gather weights and reduce gradients, 1 device moves nothing.
    The 8-device CPU row says why it is missing in a process of one CPU device."""
    from helpers import require_compiler
    from train import bench_memory as bm
    from train.config import load_config

    require_compiler("h100", "cuda-compiler", "H100")
    config = load_config(ROOT / "configs" / "quickstart.yaml", TINY)
    bf16 = bm.Variant.parse(["bf16"])
    one, eight = (bm.row(bf16, bm.variant_config(config, bf16), "h100", n, target="h100") for n in (1, 8))
    assert one["params_gb"] == pytest.approx(8 * eight["params_gb"])
    for r in (one, eight):
        assert r["optimizer_gb"] == pytest.approx(2 * r["params_gb"], rel=1e-3)  # + AdamW's step counts
        assert r["fp8_meta_gb"] == 0 and r["arguments_gb"] >= r["params_gb"] + r["optimizer_gb"]
        assert r["total_gb"] >= r["peak_gb"] > 0 and r["temp_gb"] > 0 and r["compile_s"] > 0
    assert sum(one[f"{k.replace('-', '_')}_gb"] for k in bm.COLLECTIVES) == 0 and one["all_gather_by_dtype_gb"] == {}
    assert eight["all_gather_gb"] > 0 and eight["reduce_scatter_gb"] + eight["all_reduce_gb"] > 0
    assert eight["all_gather_by_dtype_gb"]["bf16"] > 0

    fp8 = bm.Variant.parse(["fp8"])
    mesh = mpx.program.make_mesh((1, 8), ("data", "fsdp"))
    _, state, _, _ = bm.abstract_step(bm.variant_config(config, fp8), mesh)
    assert bm.per_device_bytes(state.fp8_meta) > 0
    # 8-bit moments: one byte of E4M3 code per moment and element (half the f32 param's four),
    # plus 12 bytes of block statistics a block (at most a row of this tiny model's tensors)
    moments = bm.Variant.parse(["fp8_moments_fp8"])
    _, state, _, _ = bm.abstract_step(bm.variant_config(config, moments), mesh)
    assert 0.5 < bm.per_device_bytes(state.opt_state) / bm.per_device_bytes(state.params) < 1.0

    if len(jax.devices("cpu")) < 8:
        skipped = bm.row(bf16, config, "cpu", 8, target="h100")
        assert "xla_force_host_platform_device_count=8" in skipped["skipped"]
    assert "bf16 " in bench.format_record({"device": "cpu", "backend": "cpu", "versions": {"jax": "0"}, "date": "",
                                           "rows": [one, eight]})


def test_memory_variants_are_names_or_config_overrides():
    from train import bench_memory as bm
    from train.config import load_config

    config = load_config(ROOT / "configs" / "quickstart.yaml", TINY)
    named = ["bf16", "fp8", "fp8_moments_bf16", "fp8_moments_fp8", "fp8_moments_fp8_master_bf16",
             "fp8_moments_fp8_remat_fp8"]
    assert [v.name for v in bm.default_variants(config)] == named  # quickstart's precision is fp8
    assert [v.name for v in bm.default_variants(bm.variant_config(config, bm.Variant("x", ("precision=fp16",))))] == [
        "config", *named]
    custom = bm.Variant.parse(["b1", "precision=bf16", "optim.b1=0.8"])
    varied = bm.variant_config(config, custom)
    assert (varied.precision, varied.optim.b1) == ("bf16", 0.8)
    with pytest.raises(ValueError, match="unknown variant 'fp9'; expected one of bf16, fp8, "):
        bench.BenchSettings(modes=("memory",), variants=(("fp9",),))
    with pytest.raises(Exception, match="variant 'bad': .*optim.b1"):
        bm.variant_config(config, bm.Variant("bad", ("optim.b1=2",)))
