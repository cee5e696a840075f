"""The README's library example runs as written and does what the README says."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_library_example_runs_and_updates_fp8_meta():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "train_step" in b)
    scope: dict = {}
    exec(compile(example, str(README), "exec"), scope)
    metrics, state, batch = scope["metrics"], scope["state"], scope["batch"]
    assert not bool(metrics.skipped)
    assert np.isfinite(float(metrics.loss)) and float(metrics.loss) > 0
    meta = state.fp8_meta["fc1"]
    # The meta now holds the true amax of the input (all ones -> 1.0) and the scale that
    # the next step quantizes the input with: 448 (E4M3 max) / 1.0.
    assert float(meta.lhs.amax_history[0]) == float(np.max(np.abs(batch["x"])))
    assert float(meta.lhs.scale) == 448.0
    assert float(meta.grad.amax_history[0]) > 0
    assert int(state.step) == 1


def test_three_line_example_on_a_plain_nnx_model():
    """The README's three lines, run on a plain NNX model: fp8 meta appears and the table
    lists the model's ops with their precisions."""
    import jax
    from flax import nnx

    import mpx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 8, rngs=rngs)
            self.out = nnx.Linear(8, 2, rngs=rngs)

        def __call__(self, x):
            return self.out(jax.nn.relu(self.fc(x)))

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "apply_policy" in b and "describe" in b)
    scope = {"mpx": mpx, "model": Model(nnx.Rngs(0))}
    exec(compile(example, str(README), "exec"), scope)
    table = mpx.inspect.describe(scope["model"], scope["policy"])
    assert {r.path: r.precision for r in table.rows} == {"fc": "fp8", "out": "bf16"}
    assert scope["model"].fc.dot_general.fp8_meta is not None
    assert scope["model"].out.dot_general.fp8_meta is None
