"""Post-training quantization (mpx.ptq): weight codes and scales against numpy / ml_dtypes,
calibrated matmul inputs against the inputs computed independently, and the static input
grids a policy puts on a model."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import mpx
import mpx.nn as mn
from mpx import ptq
from mpx.policy import StaticInputs

TINY = np.finfo(np.float32).tiny


def int8_reference(x: np.ndarray, axes: tuple[int, ...]):
    """Symmetric int8 per slice, in numpy: scale = amax * f32(1/127) (floored at the
    smallest normal), codes = round half to even of x / scale, clipped to +-127."""
    amax = np.max(np.abs(x), axis=axes, keepdims=True).astype(np.float32)
    scale = np.maximum(amax * np.float32(1 / 127), np.float32(TINY))
    codes = np.clip(np.round(x.astype(np.float32) / scale), -127, 127).astype(np.int8)
    return codes, scale


def test_int8_weights_have_one_scale_per_output_channel_bit_exact():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(8, 5)).astype(np.float32)
    kernel[0, 0] = 0.0
    kernel[:, 2] = 0.0  # an all-zero channel: smallest scale, codes 0
    q = ptq.quantize_weight(jnp.asarray(kernel), "int8", channel_axis=-1)
    codes, scale = int8_reference(kernel, axes=(0,))
    assert q.scale.shape == (1, 5) and q.codes.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    np.testing.assert_array_equal(np.asarray(q.scale), scale)
    # Exact ties round to even: a channel whose amax is 127 has scale 1, so 0.5 -> 0, 1.5 -> 2, -2.5 -> -2.
    ties = np.array([[127.0], [0.5], [1.5], [-2.5], [3.5]], np.float32)
    tq = ptq.quantize_weight(jnp.asarray(ties), "int8", channel_axis=-1)
    assert np.asarray(tq.scale).item() == 1.0
    assert np.asarray(tq.codes).ravel().tolist() == [127, 0, 2, -2, 4]
    # An embedding (V, D): one scale per row (per token, the tied head's output channel).
    emb = rng.normal(size=(6, 4)).astype(np.float32)
    eq = ptq.quantize_weight(jnp.asarray(emb), "int8", channel_axis=0)
    codes, scale = int8_reference(emb, axes=(1,))
    assert eq.scale.shape == (6, 1)
    np.testing.assert_array_equal(np.asarray(eq.codes), codes)


def test_fp8_weights_are_e4m3_codes_of_x_over_amax_over_448():
    """Reference: ml_dtypes' E4M3 cast (round to nearest even, saturating here by the clip)
    of x / scale with scale = amax * f32(1/448): each channel's largest value is 448 (the
    f32 product and quotient round, but E4M3's steps near 448 are 32 wide)."""
    rng = np.random.default_rng(1)
    kernel = (rng.normal(size=(16, 3)) * np.array([1e-3, 1.0, 300.0])).astype(np.float32)
    q = ptq.quantize_weight(jnp.asarray(kernel), "fp8", channel_axis=1)
    scale = np.max(np.abs(kernel), axis=0, keepdims=True).astype(np.float32) * np.float32(1 / 448)
    codes = np.clip(kernel / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    assert q.codes.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(q.scale), scale)
    np.testing.assert_array_equal(np.asarray(q.codes).view(np.uint8), codes.view(np.uint8))
    assert np.max(np.abs(np.asarray(q.codes, np.float32)), axis=0).tolist() == [448.0] * 3
    # E4M3 keeps 3 mantissa bits: relative error at most 2^-4 for values in its normal range.
    deq = np.asarray(q.dequantize())
    big = np.abs(kernel) > scale * 2.0**-6
    assert np.all(np.abs(deq - kernel)[big] <= np.abs(kernel)[big] * 2.0**-4)


@pytest.fixture(scope="module")
def lm():
    shape = mn.TransformerConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=2, d_ff=64, max_len=16)
    model = mn.TransformerLM(shape, policy=mpx.parse_policy("fp32"), rngs=nnx.Rngs(0))
    return mn.split(model)


def test_quantized_params_are_about_4x_smaller_and_within_half_a_step(lm):
    _, params, _, _ = lm
    pure = params.to_pure_dict()
    qparams = ptq.quantize_params(pure, "int8")
    paths = set(ptq.quantized_paths(qparams))
    assert paths == {"embed/embedding", "pos_embed/embedding"} | {
        f"blocks/{i}/{m}/kernel" for i in range(2) for m in ("attn/qkv", "attn/out", "mlp/fc", "mlp/proj")}
    # Codes are 1 byte for 4; the scales (one f32 per channel) and the float biases and
    # norms add the rest: 78848 bytes of float32 params become 24128.
    assert ptq.nbytes(pure) == 78848 and ptq.nbytes(qparams) == 24128
    deq = ptq.dequantize_params(qparams)
    for path, leaf in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=lambda x: isinstance(x, ptq.QuantizedWeight))[0]:
        original = _at(pure, path)
        back = np.asarray(_at(deq, path))
        if isinstance(leaf, ptq.QuantizedWeight):
            assert np.all(np.abs(back - original) <= np.asarray(leaf.scale) / 2 * (1 + 1e-6))
        else:
            np.testing.assert_array_equal(back, original)  # biases and norms untouched


def _at(tree, path):
    for k in path:
        tree = tree[k.key if hasattr(k, "key") else k.idx]
    return tree


def test_an_unknown_format_is_an_error():
    with pytest.raises(ValueError, match="unknown quantization format 'int4'; expected one of int8, fp8"):
        ptq.quantize_weight(jnp.ones((2, 2)), "int4", channel_axis=-1)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_static_input_grid_matches_numpy_and_saturates_at_the_clip(fmt):
    x = np.array([-9.0, -3.0, -0.01, 0.0, 0.004, 1.234, 2.9, 3.0, 7.5], np.float32)
    clip = 3.0
    got = np.asarray(ptq.fake_quantize_input(jnp.asarray(x), clip, fmt))
    limit = 127 if fmt == "int8" else 448
    scale = np.float32(clip / limit)
    y = np.clip(x / scale, -limit, limit)
    codes = np.round(y) if fmt == "int8" else y.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(got, (codes * scale).astype(np.float32))
    assert got[0] == -3.0 * np.float32(1) and got[-1] == got[-2]  # beyond the clip: saturated


class MLP(nnx.Module):
    """A model written without mpx: two nnx.Linear layers."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(4, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


def _mlp_numpy(model, x, grid=lambda v, path: v):
    w1, b1 = np.asarray(model.l1.kernel.value, np.float64), np.asarray(model.l1.bias.value, np.float64)
    w2, b2 = np.asarray(model.l2.kernel.value, np.float64), np.asarray(model.l2.bias.value, np.float64)
    h = np.maximum(grid(np.asarray(x, np.float64), "l1") @ w1 + b1, 0)
    return grid(h, "l2") @ w2 + b2, h


def test_calibration_sees_each_weight_matmul_input():
    """The recorded amax of each layer's input equals numpy's over all batches; a
    percentile is the upper edge of its histogram bin: at or above numpy's percentile
    (inverted CDF: an actual sample) and less than one bin (2^(1/32)) above it."""
    rng = np.random.default_rng(2)
    batches = [jnp.asarray(rng.normal(size=(16, 4)).astype(np.float32) * s) for s in (1.0, 3.0)]
    model = mpx.nn.apply_policy(MLP(nnx.Rngs(0)), mpx.parse_policy("fp32"), batches[0])
    stats = ptq.calibrate(lambda b: model(b), batches)
    hidden = np.concatenate([_mlp_numpy(model, b)[1] for b in batches])
    inputs = np.concatenate([np.asarray(b) for b in batches])
    assert sorted(stats.amax) == ["l1", "l2"]
    assert stats.amax["l1"] == pytest.approx(np.max(np.abs(inputs)), rel=1e-6)
    assert stats.amax["l2"] == pytest.approx(np.max(hidden), rel=1e-5)
    for q in (75.0, 95.0):  # above the relu's zeros (about half of the hidden values)
        want = np.percentile(np.abs(hidden), q, method="inverted_cdf")
        assert want > 0
        got = stats.percentile("l2", q)
        assert want * (1 - 1e-6) <= got < want * 2 ** (1 / 32) * (1 + 1e-6), (q, got, want)
    assert stats.amaxes("percentile", 100.0) == pytest.approx(stats.amaxes("absmax"), rel=2 ** (1 / 32) - 1)
    with pytest.raises(ValueError, match="unknown calibration method 'max'"):
        stats.amaxes("max")


def test_a_policy_with_static_inputs_puts_each_listed_input_on_its_grid():
    """Under ``inputs`` each listed weight matmul multiplies the fake-quantized input:
    equal to a float64 numpy forward with the same grid, and different from the float
    model (the grid is coarse enough to show)."""
    x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32))
    plain = MLP(nnx.Rngs(0))
    clips = {"l1": 1.5, "l2": 0.8}
    policy = dataclasses.replace(mpx.parse_policy("fp32"), inputs=StaticInputs("int8", clips))
    model = mpx.nn.apply_policy(MLP(nnx.Rngs(0)), policy, x)

    def grid(v, path):
        scale = np.float32(clips[path] / 127)
        return np.clip(np.round(v.astype(np.float32) / scale), -127, 127) * scale

    want, _ = _mlp_numpy(plain, x, grid)
    np.testing.assert_allclose(np.asarray(model(x)), want, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(np.asarray(plain(x)) - want)) > 1e-3
    table = mpx.inspect.describe(model, policy, x)
    assert {r.precision for r in table.rows} == {"fp32 (int8 inputs)"}


def test_static_inputs_round_trip_through_the_policy_dict_and_refuse_bad_values():
    spec = {"preset": "fp32", "inputs": {"format": "fp8", "clip": {"blocks/0/mlp/fc": 2.5, "head": 4}}}
    policy = mpx.parse_policy(spec)
    assert policy.inputs == StaticInputs("fp8", {"head": 4.0, "blocks/0/mlp/fc": 2.5})
    assert mpx.parse_policy(policy.to_dict()) == policy and hash(policy) == hash(mpx.parse_policy(policy.to_dict()))
    op = policy.for_op("blocks/0/mlp/fc", "dense")
    assert (op.input_clip, op.input_format) == (2.5, "fp8")
    assert policy.for_op("blocks/0/attn/logits", "attention_logits").input_clip is None  # two activations
    with pytest.raises(ValueError, match=r"inputs.clip\['head'\]: expected a positive finite number, got -1"):
        StaticInputs("int8", {"head": -1})
    with pytest.raises(ValueError, match="inputs.format: expected one of int8, fp8, got 'int4'"):
        mpx.parse_policy({"inputs": {"format": "int4", "clip": {}}})
    with pytest.raises(ValueError, match="unknown key 'clips' in inputs"):
        mpx.parse_policy({"inputs": {"clips": {}}})


def test_a_scanned_layer_stack_calibrates_with_every_layer_pooled():
    """Under nnx.scan one op path serves every layer; its statistics pool all of them: the
    recorded ops are exactly the model's weight matmuls (as describe lists them)."""
    shape = mn.TransformerConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=3, d_ff=64, max_len=16,
                                 scan_layers=True)
    model = mn.TransformerLM(shape, policy=mpx.parse_policy("fp32"), rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 64, size=(2, 16)), jnp.int32)
    stats = ptq.calibrate(lambda t: model(t), [tokens])
    weight_ops = {r.path for r in mpx.inspect.describe(model, mpx.parse_policy("fp32")).rows
                  if r.kind in mpx.policy.WEIGHT_RHS_KINDS}
    assert set(stats.amax) == weight_ops and len(weight_ops) == 5
    assert all(np.isfinite(v) and v > 0 for v in stats.amax.values())
