"""python -m train quantize / eval --quantized / generate --quantized on a trained tiny LM:
the quantized model is ~4x smaller, stays within a stated margin of the float model, is
restored and generates; bad input is a clear error."""

import json
import pathlib

import pytest

from train.__main__ import main

CONFIG = """
name: ptq
precision: fp8
model: {{d_model: 64, num_heads: 2, num_layers: 2, d_ff: 128, max_len: 64}}
optim: {{lr: 3.0e-3, warmup_steps: 10}}
data: {{task: lm, tokenizer: byte, seq_len: 64, batch_size: 16, data_dir: {data}}}
train: {{steps: 120, log_every: 60, eval_every: 0, eval_batches: 8}}
checkpoint: {{every: 0, keep: 1, async_save: false}}
logging: {{tensorboard: false, progress: false}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
    """120 steps of a 2-layer byte-level LM on Shakespeare: enough to be well below the
    unigram baseline, so that quantization error shows in its loss."""
    tmp = tmp_path_factory.mktemp("ptq")
    (tmp / "ptq.yaml").write_text(CONFIG.format(data=tmp / "data"))
    config = tmp / "ptq.yaml"
    assert main(["train", str(config), f"run_dir={tmp / 'run'}"]) == 0
    return tmp


def cli(run, *args) -> int:
    return main([args[0], str(run / "ptq.yaml"), f"run_dir={run / 'run'}", *args[1:]])


def rows(directory: pathlib.Path) -> dict[str, dict]:
    return {r["model"]: r for r in json.loads((directory / "comparison.json").read_text())}


def test_int8_weight_only_is_4x_smaller_and_as_good_as_float(run, capsys):
    """int8 per-channel weights move each weight by at most half a step (amax / 254): the
    validation loss changes by well under 0.02 nats (measured: < 0.0001); the params shrink
    from 4 bytes to 1 per matmul weight (the f32 scales, biases and norms keep it above
    1/4: 3.0x at least)."""
    out = run / "int8"
    assert cli(run, "quantize", "--format", "int8", "--out", str(out)) == 0
    said = capsys.readouterr().out
    r = rows(out)
    float_row, q = r["float32"], r["int8 weights"]
    assert float_row["loss"] < float_row["unigram_baseline"] - 0.3  # a trained model (see the fixture)
    assert abs(q["loss"] - float_row["loss"]) < 0.02
    assert float_row["param_bytes"] > 3.0 * q["param_bytes"]
    info = json.loads((out / "quantization.json").read_text())
    assert info["bytes"]["params_quantized"] == q["param_bytes"] and info["activation_amax"] is None
    assert f"{float_row['param_bytes'] / q['param_bytes']:.2f}x smaller" in said
    assert q["gen_tokens_per_s"] > 0 and float_row["gen_tokens_per_s"] > 0
    # Restored from the directory: eval on the run's data gives the same row.
    assert cli(run, "eval", "--quantized", str(out)) == 0
    table = capsys.readouterr().out
    assert "int8 weights" in table and f"{q['loss']:.4f}" in table
    # and samples text.
    assert cli(run, "generate", "--quantized", str(out), "--tokens", "40", "--prompt", "ROMEO:") == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text.strip()) > len("ROMEO:") + 20


def test_weight_and_input_quantization_int8_and_fp8(run, capsys):
    """Calibrated int8 inputs (99.99th percentile of |x|) and E4M3 inputs (absmax) add the
    input rounding to the weights': within 0.1 nats of float (measured: 0.0001 and 0.002);
    the clip values are saved with the model and the rows say how they were calibrated."""
    for fmt, calibration, label in (("int8", "percentile", "int8 weights+inputs (p99.99)"),
                                    ("fp8", "absmax", "fp8 weights+inputs (absmax)")):
        out = run / f"{fmt}-wa"
        assert cli(run, "quantize", "--format", fmt, "--mode", "weight_activation", "--calibration", calibration,
                   "--batches", "4", "--out", str(out)) == 0
        r = rows(out)
        assert abs(r[label]["loss"] - r["float32"]["loss"]) < 0.1, r
        clips = json.loads((out / "quantization.json").read_text())["activation_amax"]
        assert set(clips) == {f"blocks/{i}/{m}" for i in range(2) for m in ("attn/qkv", "attn/out", "mlp/fc", "mlp/proj")} | {"head"}
    # The cached sampler runs on the quantized weights with the calibrated input grids too.
    capsys.readouterr()
    assert cli(run, "generate", "--quantized", str(out), "--tokens", "24", "--temperature", "0", "--prompt", "ROMEO:") == 0
    said = capsys.readouterr()
    assert said.out.startswith("ROMEO:") and len(said.out.strip()) > len("ROMEO:") + 8 and "tokens in" in said.err


def test_bad_quantization_input_is_a_clear_error(run, capsys):
    assert cli(run, "quantize", "--format", "int4", "--out", str(run / "bad")) == 2
    assert "--format: expected one of int8, fp8, got 'int4'" in capsys.readouterr().err
    assert not (run / "bad").exists()
    # A directory that is not a quantized model.
    (run / "empty").mkdir()
    assert cli(run, "eval", "--quantized", str(run / "empty")) == 2
    assert "is not a quantized model (no quantization.json)" in capsys.readouterr().err
    # A weight_activation model whose calibration data is gone.
    out = run / "int8-wa-broken"
    assert cli(run, "quantize", "--mode", "weight_activation", "--batches", "1", "--out", str(out)) == 0
    info = json.loads((out / "quantization.json").read_text())
    (out / "quantization.json").write_text(json.dumps({**info, "activation_amax": None}))
    capsys.readouterr()
    assert cli(run, "generate", "--quantized", str(out)) == 2
    assert "holds no calibration data" in capsys.readouterr().err
    # An existing output directory is never written over.
    assert cli(run, "quantize", "--out", str(out)) == 2
    assert "exists; give a new one" in capsys.readouterr().err
