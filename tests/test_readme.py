"""The README's code runs as written and does what the README says."""

import pathlib
import re

import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"

BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^\n]*?) -->\n)?```python\n(?P<code>.*?)```", flags=re.S)
_scopes: dict[str, dict] = {}


def python_blocks() -> list[tuple[int, str, str | None]]:
    """``(line, code, why not run or None)`` for each ```python block of the README."""
    text = README.read_text()
    return [(text.count("\n", 0, m.start("code")), m["code"], m["why"]) for m in BLOCK.finditer(text)]


def run_block(code: str) -> dict:
    """The namespace ``code`` leaves, run on its own (once per session: several tests read it)."""
    if code not in _scopes:
        text, scope = README.read_text(), {}
        above = "\n" * text.count("\n", 0, text.index(code))  # tracebacks name README's own lines
        exec(compile(above + code, str(README), "exec"), scope)
        _scopes[code] = scope
    return _scopes[code]


@pytest.mark.parametrize("line, code, why", python_blocks(), ids=[f"line{b[0] + 1}" for b in python_blocks()])
def test_every_python_block_runs_as_written(line, code, why):
    """Each block on its own, in a fresh namespace: a reader copies one block, not the page,
    so every block states its own imports and inputs. A block that cannot run here (it needs
    a GPU's compiler, or continues another) says why in an ``<!-- not run: ... -->`` comment
    just above it."""
    if why is not None:
        pytest.skip(f"README line {line}: {why}")
    run_block(code)


def test_few_readme_blocks_are_left_unrun():
    """Two fragments of the benchmark section (a compiled step, an H100 compiler) are the
    only ones: a third 'not run' is a block that should be made to run."""
    assert sum(why is not None for _, _, why in python_blocks()) <= 2


def test_library_example_runs_and_updates_fp8_meta():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "train_step" in b)
    scope = run_block(example)
    metrics, state, batch = scope["metrics"], scope["state"], scope["batch"]
    assert not bool(metrics.skipped)
    assert np.isfinite(float(metrics.loss)) and float(metrics.loss) > 0
    meta = state.fp8_meta["fc1"]
    # The meta now holds the true amax of the input (all ones -> 1.0) and the scale that
    # the next step quantizes the input with: 448 (E4M3 max) / 1.0, down to a power of two.
    assert float(meta.lhs.amax_history[0]) == float(np.max(np.abs(batch["x"])))
    assert float(meta.lhs.scale) == 256.0
    assert float(meta.grad.amax_history[0]) > 0
    assert int(state.step) == 1


def test_own_model_example_puts_every_matmul_under_the_policy():
    """The README's own-model example runs as written: the model's ``@`` is captured and
    trained in FP8 (its meta observed a real amax), the head stays bf16, and the table
    lists both with those precisions."""
    import mpx

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "apply_policy" in b and "describe" in b)
    scope = run_block(example)
    table = mpx.inspect.describe(scope["model"], scope["policy"], scope["x"])
    precisions = {r.path: r.precision for r in table.rows}
    assert precisions["dot_general_0"] == "fp8" and precisions["out"] == "bf16"
    assert not bool(scope["metrics"].skipped)
    captured = scope["state"].fp8_meta["mpx_fp8"].get_value()["dot_general_0"]
    assert float(captured.lhs.amax_history[0]) == 1.0  # x is all ones


def test_linen_example_is_under_the_policy_as_its_comment_says():
    """The README's linen block: the ``@`` is captured in fp8 (its FP8 state in the
    ``fp8_meta`` collection), the head is bf16, as the printed list says."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "nn.Module" in b and "mpx.apply_policy" in b)
    scope = run_block(example)
    listed = [(m.path, m.precision) for m in scope["mpx"].matmuls(scope["model"], scope["policy"], scope["x"])]
    assert f"# {listed}" in example and listed == [("dot_general_0", "fp8"), ("out", "bf16")]
    assert list(scope["fp8_meta"]["captured"]) == ["dot_general_0"]
    assert scope["y"].dtype.name == "bfloat16" and scope["y"].shape == (8, 4)


def test_post_training_quantization_example_quantizes_weights_and_inputs():
    """The README's PTQ example runs as written: its int8 model stays close to the float
    one and is not the float model. Each of its 9 quantized matmuls rounds both operands to
    steps of 1/127 of a channel's or an input's range (~0.2% RMS relative each, clipped at
    the 99.99th percentile); through two blocks that compounds to a few percent of the
    logits' RMS (measured: 3.0%): bound 5%, and above 0.01% (the rounding shows)."""
    import jax.numpy as jnp

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "ptq.calibrate" in b)
    scope = run_block(example)
    logits, batches = scope["logits"], scope["batches"]
    model = scope["mn"].TransformerLM(scope["shape"], policy=scope["mpx"].parse_policy("fp32"),
                                      rngs=scope["nnx"].Rngs(0))
    float_logits = model(batches[0])
    relative = float(jnp.sqrt(jnp.mean((logits - float_logits) ** 2) / jnp.mean(float_logits**2)))
    assert 1e-4 < relative < 0.05, relative
    assert len(scope["policy"].inputs.clip) == 9  # 2 blocks x (qkv, out, fc, proj) + the tied head


def test_the_policy_key_table_lists_every_key_and_preset():
    """The README's key reference cannot fall behind the code: every top-level policy key,
    every field of the fp8 / int8 / loss-scale configs and every preset and op kind is in
    the "Every policy key" section."""
    import dataclasses

    import mpx
    from mpx.int8 import Int8Config
    from mpx.policy import FASTEST_8BIT, KINDS, PRESETS, TOP_KEYS

    text = README.read_text()
    section = text[text.index("### Every policy key"):text.index("### How FP8 state flows")]
    for key in TOP_KEYS:
        assert f"`{key}" in section, key
    for prefix, cls in (("fp8", mpx.Fp8Config), ("int8", Int8Config)):
        for f in dataclasses.fields(cls):
            assert f"`{prefix}.{f.name}`" in section, (prefix, f.name)
    for f in dataclasses.fields(mpx.LossScaleConfig):
        assert f.name in section, f.name
    for name in (*PRESETS, FASTEST_8BIT, *KINDS):
        assert f"`{name}`" in section, name


def test_the_cli_table_lists_every_command_and_flag():
    """Every command of python -m train and every one of its flags is in the README's table."""
    import argparse

    from train.__main__ import _parser

    text = README.read_text()
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{name}` |")), None)
        assert row is not None, name
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert flag in row, (name, flag)
