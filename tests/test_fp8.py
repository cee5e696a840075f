"""mpx.fp8 against independent ml_dtypes / numpy (float64) references: quantization,
scales and amax histories, and fp8_dot_general's values, gradients and meta cotangent."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

from mpx.fp8 import (E4M3, E5M2, Fp8Config, Fp8Meta, Fp8Scale, apply_meta_updates, compute_scale, dequantize,
                     fp8_dot_general, merge_meta_updates, quantize, scale_for_use,
                     update_scale_state)

NP_E4M3, NP_E5M2 = (ml_dtypes.float8_e4m3fn, 3), (ml_dtypes.float8_e5m2, 2)  # (ml_dtypes type, mantissa bits)
FORMATS = [(E4M3, *NP_E4M3), (E5M2, *NP_E5M2)]
FORMAT_IDS = ["e4m3", "e5m2"]
MATMUL = (((1,), (0,)), ((), ()))


def all_finite_values(np_dtype) -> np.ndarray:
    """Every finite value of an FP8 format, from its 256 bit patterns."""
    values = np.arange(256, dtype=np.uint8).view(np_dtype).astype(np.float32)
    return values[np.isfinite(values)]


def bits(a) -> np.ndarray:
    return np.asarray(a).view(np.uint8)  # compare FP8 arrays by bit pattern (also tells -0 from 0)


def tree_equal(a, b) -> bool:
    """Same structure and, leaf by leaf, same dtype, shape and values."""
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y) for x, y in pairs)


# ----------------------------------------------------------------------------- quantize / dequantize


@pytest.mark.parametrize("dtype, np_dtype, _", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("scale", [1.0, 2.0**-3, 2.0**4])
def test_every_finite_value_round_trips_exactly(dtype, np_dtype, _, scale):
    """x = v / scale for each of the format's finite values v: quantize gives v's exact bit
    pattern and dequantize gives x back (power-of-two scales are exact in f32)."""
    v = all_finite_values(np_dtype)
    assert v.size == {ml_dtypes.float8_e4m3fn: 254, ml_dtypes.float8_e5m2: 248}[np_dtype]  # 256 - NaN/inf codes
    x = v / np.float32(scale)
    q = jax.jit(quantize, static_argnums=1)(jnp.asarray(x), dtype, jnp.float32(scale))
    assert q.dtype == dtype
    assert np.array_equal(bits(q), bits(v.astype(np_dtype)))
    np.testing.assert_array_equal(np.asarray(dequantize(q, jnp.float32(scale))), x)


@pytest.mark.parametrize("dtype, np_dtype, _", FORMATS, ids=FORMAT_IDS)
def test_saturation_and_nan(dtype, np_dtype, _):
    """Anything beyond ±fp8_max (inf included, also past the rounding midpoint) becomes exactly
    ±fp8_max, never inf/NaN; NaN stays NaN."""
    limit = float(ml_dtypes.finfo(np_dtype).max)
    x = jnp.array([1e30, -1e30, np.inf, -np.inf, limit * 1.03, limit * 1.07, -limit * 4, np.nan], jnp.float32)
    q = np.asarray(quantize(x, dtype, jnp.float32(1.0))).astype(np.float64)
    np.testing.assert_array_equal(q[:7], [limit, -limit, limit, -limit, limit, limit, -limit])
    assert np.isnan(q[7])
    # A scale that pushes an in-range value over the edge saturates as well.
    assert float(quantize(jnp.float32(100.0), dtype, jnp.float32(1e4)).astype(jnp.float32)) == limit


@pytest.mark.parametrize("in_dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("dtype, np_dtype, _", FORMATS, ids=FORMAT_IDS)
def test_quantize_matches_ml_dtypes_bit_for_bit(dtype, np_dtype, _, in_dtype):
    """Random data over ~2**-30..2**20 (FP8 subnormals, normals and overflow) quantizes to
    exactly ml_dtypes' round-to-nearest-even of clip(x * scale, ±max)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(20000) * np.exp2(rng.uniform(-30, 20, 20000))).astype(in_dtype)
    x[:4] = [0.0, -0.0, 1e-40, -1e-40]  # zeros and f32 subnormal inputs (bf16 casts them as well)
    scale = np.float32(3.7)
    limit = float(ml_dtypes.finfo(np_dtype).max)
    ref = np.clip(x.astype(np.float32) * scale, -limit, limit).astype(np_dtype)
    got = jax.jit(quantize, static_argnums=1)(jnp.asarray(x), dtype, jnp.float32(scale))
    assert np.array_equal(bits(got), bits(ref))
    assert (np.abs(ref.astype(np.float32)) < ml_dtypes.finfo(np_dtype).smallest_normal).sum() > 100  # subnormals hit


@pytest.mark.parametrize("dtype, np_dtype, mantissa", FORMATS, ids=FORMAT_IDS)
def test_scaled_quantization_relative_error_bound(dtype, np_dtype, mantissa):
    """scale = fp8_max / amax: every element whose scaled value is in the normal range has
    |dequant(quant(x)) - x| <= 2**-(mantissa+1) |x| (round to nearest, half an ulp of a
    mantissa with `mantissa` bits: 2**-4 for E4M3, 2**-3 for E5M2). The bound is nearly
    attained on 50k samples, so we also require max error > half of it (not vacuous)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(50000).astype(np.float32)
    scale = np.float32(ml_dtypes.finfo(np_dtype).max) / np.abs(x).max()
    y = np.asarray(dequantize(quantize(jnp.asarray(x), dtype, jnp.float32(scale)), jnp.float32(scale)), np.float64)
    normal = np.abs(x * scale) >= float(ml_dtypes.finfo(np_dtype).smallest_normal)
    assert normal.mean() > 0.9
    rel = np.abs(y[normal] - x[normal]) / np.abs(x[normal].astype(np.float64))
    bound = 2.0 ** -(mantissa + 1)
    assert bound / 2 < rel.max() <= bound


# ----------------------------------------------------------------------------- scales and histories


@pytest.mark.parametrize("margin", [0, 1, 2])
@pytest.mark.parametrize("limit", [448.0, 57344.0])
def test_compute_scale_formula(limit, margin):
    """fp8_max / (amax * 2**margin) vs float64: f32 rounds the quotient once (dividing by a
    power of two is exact), so the relative error is <= 2**-24."""
    for amax in (0.5, 3.0, 1000.0, 1e-30):
        a32 = np.float32(amax)
        expected = limit / (float(a32) * 2.0**margin)
        got = float(compute_scale(jnp.float32(a32), jnp.float32(7.0), limit, margin=margin))
        assert abs(got - expected) <= 2.0**-24 * expected


@pytest.mark.parametrize("amax", [0.0, -1.0, np.inf, -np.inf, np.nan, 1e-45])
def test_compute_scale_keeps_previous_scale_when_amax_is_unusable(amax):
    """Zero, negative, ±inf, NaN, and 1e-45 (448/1e-45 overflows f32): the quotient is not a
    finite positive number, so the previous scale is kept."""
    assert float(compute_scale(jnp.float32(amax), jnp.float32(7.0), 448.0)) == 7.0


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_compute_scale_never_returns_zero():
    """prev_scale when the quotient is not a finite *positive* number: a margin of 200 makes
    2**margin inf in f32, and a huge amax with a margin underflows the quotient to 0.
    (Fp8Config caps the margin at 32; compute_scale itself must still hold.)"""
    assert float(compute_scale(jnp.float32(1.0), jnp.float32(7.0), 448.0, margin=200)) == 7.0
    assert float(compute_scale(jnp.float32(1e38), jnp.float32(7.0), 448.0, margin=10)) == 7.0


AMAXES = [1.0, 3.0, 2.0, 0.5, 0.25, 0.1]
# History (length 4, newest first) after each step of AMAXES.
HISTORIES = [[1, 0, 0, 0], [3, 1, 0, 0], [2, 3, 1, 0], [0.5, 2, 3, 1], [0.25, 0.5, 2, 3], [0.1, 0.25, 0.5, 2]]


@pytest.mark.parametrize(
    "amax_compute, margin, expected_scales",
    [
        ("max", 0, [448 / 1, 448 / 3, 448 / 3, 448 / 3, 448 / 3, 448 / 2]),
        ("most_recent", 0, [448 / 1, 448 / 3, 448 / 2, 448 / 0.5, 448 / 0.25, 448 / 0.1]),
        ("max", 1, [448 / 2, 448 / 6, 448 / 6, 448 / 6, 448 / 6, 448 / 4]),
        ("most_recent", 1, [448 / 2, 448 / 6, 448 / 4, 448 / 1, 448 / 0.5, 448 / 0.2]),
    ],
)
def test_delayed_scale_trajectory(amax_compute, margin, expected_scales):
    """Six delayed-scaling steps: roll order of the history (newest in slot 0, oldest dropped)
    and the scale after each step, reduced by `max` over the window or `most_recent` (float64
    hand values; one f32 rounding of the quotient plus the f32 rounding of 0.1: rel <= 2**-23)."""
    config = Fp8Config(amax_history=4, amax_compute=amax_compute, margin=margin)
    step = jax.jit(lambda s, a: update_scale_state(s, a, E4M3, config))
    state = Fp8Scale.init(4)
    for amax, history, scale in zip(AMAXES, HISTORIES, expected_scales):
        state = step(state, jnp.float32(amax))
        np.testing.assert_array_equal(np.asarray(state.amax_history), np.float32(history))
        assert abs(float(state.scale) - scale) <= 2.0**-23 * scale


def test_scale_for_use_delayed_vs_current():
    """delayed: the stored scale; current: fp8_max / (amax(x) * 2**margin) now, or the stored
    scale when x is all zero."""
    x = jnp.array([0.5, -2.0, 1.0])
    state = Fp8Scale.init(4).replace(scale=jnp.float32(5.0))
    assert float(scale_for_use(state, x, E4M3, Fp8Config(recipe="delayed", amax_history=4))) == 5.0
    assert float(scale_for_use(state, x, E4M3, Fp8Config(recipe="current", amax_history=4))) == 448 / 2
    assert float(scale_for_use(state, x, E5M2, Fp8Config(recipe="current", amax_history=4, margin=1))) == 57344 / 4
    assert float(scale_for_use(state, jnp.zeros(3), E4M3, Fp8Config(recipe="current", amax_history=4))) == 5.0


@pytest.mark.parametrize(
    "kwargs, field",
    [({"recipe": "later"}, "recipe"), ({"format": "e5m2"}, "format"), ({"amax_history": 0}, "amax_history"),
     ({"amax_history": 2.0}, "amax_history"), ({"margin": -1}, "margin"), ({"amax_compute": "mean"}, "amax_compute")],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Fp8Config(**kwargs)


# ----------------------------------------------------------------------------- fp8_dot_general: exactness


DIMENSION_NUMBERS = {
    "matmul": (MATMUL, (6, 8), (8, 5)),
    "weight (N, K)": ((((1,), (1,)), ((), ())), (6, 8), (5, 8)),
    "vector": ((((0,), (0,)), ((), ())), (8,), (8, 5)),
    "attention logits (B,T,D)x(B,S,D)": ((((2,), (2,)), ((0,), (0,))), (2, 4, 8), (2, 5, 8)),
    "attention values (B,H,T,S)x(B,S,H,D)": ((((3,), (1,)), ((0, 1), (0, 2))), (2, 3, 4, 5), (2, 5, 3, 8)),
    "unsorted batch dims (T,H,B,D)x(B,S,H,D)": ((((3,), (3,)), ((2, 1), (0, 2))), (4, 3, 2, 8), (2, 5, 3, 8)),
    "two contractions in different orders": ((((0, 2), (2, 0)), ((), ())), (8, 4, 3), (3, 5, 8)),
}


def small_ints(shape, seed, lo=-4, hi=5):
    return np.random.default_rng(seed).integers(lo, hi, shape).astype(np.float32)


@pytest.mark.parametrize("dims, a_shape, b_shape", DIMENSION_NUMBERS.values(), ids=DIMENSION_NUMBERS.keys())
def test_representable_inputs_are_exact(dims, a_shape, b_shape):
    """Integers in [-4, 4] are exact in E4M3, the output-gradient weights in [-2, 2] are exact
    in E5M2, and all sums are small integers (exact in f32). With a fresh meta (scales 1),
    forward and both gradients must equal plain f32 autodiff bit for bit."""
    config = Fp8Config(amax_history=4)
    a, b = small_ints(a_shape, 0), small_ints(b_shape, 1)
    w = small_ints(lax.dot_general(a, b, dims).shape, 2, -2, 3)

    def fp8_loss(a, b):
        return jnp.sum(fp8_dot_general(a, b, dims, Fp8Meta.init(4), config=config, out_dtype=jnp.float32)[0] * w)

    def ref_loss(a, b):
        return jnp.sum(lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST) * w)

    (got, got_g), (ref, ref_g) = jax.jit(
        lambda a, b: (jax.value_and_grad(fp8_loss, (0, 1))(a, b), jax.value_and_grad(ref_loss, (0, 1))(a, b))
    )(a, b)
    assert float(got) == float(ref) and float(ref) != 0.0
    for g, r, x in zip(got_g, ref_g, (a, b)):
        assert g.shape == x.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))
        assert np.any(np.asarray(r) != 0)


# ----------------------------------------------------------------------------- fp8_dot_general: accuracy


def calibrated(a, b, w, dims, config):
    """The meta cotangent of loss = sum(fp8_dot(a, b) * w) at a fresh meta: the meta after one step."""
    meta = Fp8Meta.init(config.amax_history)
    loss = lambda m: jnp.sum(fp8_dot_general(a, b, dims, m, config=config, out_dtype=jnp.float32)[0] * w)  # noqa: E731
    return jax.jit(jax.grad(loss))(meta)


def quant_err(x, scale, np_dtype, mantissa):
    """Per-element bound on |dequant(quant(x)) - x| in float64: half an ulp (2**-(m+1)|x|)
    in the normal range, half the smallest subnormal (in the scaled domain) below it."""
    return 2.0 ** -(mantissa + 1) * np.abs(x) + float(ml_dtypes.finfo(np_dtype).smallest_subnormal) / 2 / float(scale)


def norm_rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def check_dot(got, a, da, b, db, slack):
    """Asserts |got - a @ b| <= sum(da|b| + |a|db + da db) + slack * sum|a||b| element-wise (the
    propagated bound for |a~ - a| <= da, |b~ - b| <= db); returns the norm-wise relative error."""
    bound = np.abs(a) @ db + da @ np.abs(b) + da @ db + slack * (np.abs(a) @ np.abs(b))
    assert np.all(np.abs(np.asarray(got, np.float64) - a @ b) <= bound)
    return norm_rel(got, a @ b)


@pytest.mark.parametrize("fmt", ["hybrid", "e4m3"])
def test_random_inputs_within_bounds_of_float64(fmt):
    """Calibrated meta (scales from the true amaxes), random normal data, K = 128.

    Element-wise (rigorous): the error is at most the per-element quantization bounds of the
    operands propagated through the sum (`product_bound`), plus 1e-5 * sum|a||b| for f32
    accumulation and rescaling (K * 2**-24 ~ 8e-6). Norm-wise (statistical): a rounding error
    uniform in +-half an ulp has relative rms ~0.7 * 2**-(m+1)/sqrt(3) over a binade: ~0.026
    for E4M3, ~0.052 for E5M2. With K independent terms the errors add like the signal, so the
    output's relative error is ~sqrt(sum of squares): 0.037 forward and e4m3 gradients, 0.058
    hybrid gradients (measured 0.039 / 0.037 / 0.057). Bounds: 0.06 / 0.06 / 0.09; > 0.01
    shows that quantization did happen.
    """
    config = Fp8Config(amax_history=4, format=fmt)
    rng = np.random.default_rng(3)
    a = rng.standard_normal((32, 128)).astype(np.float32)
    b = (rng.standard_normal((128, 16)) * 0.1).astype(np.float32)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    meta = calibrated(a, b, w, MATMUL, config)

    def loss(a, b):
        out, _ = fp8_dot_general(a, b, MATMUL, meta, config=config, out_dtype=jnp.float32)
        return jnp.sum(out * w), out

    (_, out), (ga, gb) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(a, b)
    a64, b64, w64 = (x.astype(np.float64) for x in (a, b, w))
    da, db = quant_err(a64, meta.lhs.scale, *NP_E4M3), quant_err(b64, meta.rhs.scale, *NP_E4M3)
    dw = quant_err(w64, meta.grad.scale, *(NP_E5M2 if fmt == "hybrid" else NP_E4M3))
    grad_bound = 0.09 if fmt == "hybrid" else 0.06
    assert 0.01 < check_dot(out, a64, da, b64, db, 1e-5) < 0.06
    assert 0.01 < check_dot(ga, w64, dw, b64.T, db.T, 1e-5) < grad_bound
    assert 0.01 < check_dot(gb, a64.T, da.T, w64, dw, 1e-5) < grad_bound


def test_current_recipe_scales_on_the_fly():
    """Inputs of magnitude ~1000 saturate E4M3 (max 448) with a fresh meta's scale 1 under
    delayed scaling (norm-wise error ~0.7 measured; > 0.3), while `current` scales by their
    own amax on the first call and meets the forward bound 0.06 of the test above."""
    rng = np.random.default_rng(6)
    a = (rng.standard_normal((16, 64)) * 1000).astype(np.float32)
    b = rng.standard_normal((64, 8)).astype(np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    err = {}
    for recipe in ("current", "delayed"):
        config = Fp8Config(amax_history=4, recipe=recipe)
        out = jax.jit(lambda a, b: fp8_dot_general(a, b, MATMUL, Fp8Meta.init(4), config=config)[0])(a, b)
        err[recipe] = norm_rel(out, ref)
    assert err["current"] < 0.06 and err["delayed"] > 0.3


@pytest.mark.parametrize("fmt, grad_max", [("hybrid", 57344.0), ("e4m3", 448.0)])
def test_meta_cotangent_holds_true_amaxes_and_scales(fmt, grad_max):
    """Slot 0 of each history = numpy amax of lhs, rhs and of the output gradient (= w for
    loss = sum(out * w)); the rest rolled from zeros; scale = f32(fp8_max) / f32(amax)
    (one correctly rounded IEEE division, so equality is exact)."""
    config = Fp8Config(amax_history=4, format=fmt)
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)
    w = (rng.standard_normal((8, 4)) * 3).astype(np.float32)
    new = calibrated(a, b, w, MATMUL, config)
    for s, x, limit in ((new.lhs, a, 448.0), (new.rhs, b, 448.0), (new.grad, w, grad_max)):
        amax = np.float32(np.abs(x).max())
        np.testing.assert_array_equal(np.asarray(s.amax_history), [amax, 0, 0, 0])
        assert float(s.scale) == np.float32(limit) / amax


def test_bf16_compute_under_jit():
    """bf16 activations, f32 weights, out_dtype bf16: output bf16, gradients in the input
    dtypes. Error bound as in the f32 test plus bf16 roundings (GEMM output, inverse scale,
    product: 3 * 2**-9 relative of sum|a~||b~|, bounded with 4 * 2**-9 * sum|a||b|)."""
    config = Fp8Config(amax_history=4)
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.standard_normal((16, 64)), jnp.bfloat16)
    b = rng.standard_normal((64, 8)).astype(np.float32)
    a64, b64 = np.asarray(a, np.float64), b.astype(np.float64)
    meta = calibrated(a, b, np.ones((16, 8), np.float32), MATMUL, config)
    f = jax.jit(lambda a, b, m: fp8_dot_general(a, b, MATMUL, m, config=config, out_dtype=jnp.bfloat16)[0])
    out = f(a, b, meta)
    assert out.dtype == jnp.bfloat16
    da, db = quant_err(a64, meta.lhs.scale, *NP_E4M3), quant_err(b64, meta.rhs.scale, *NP_E4M3)
    assert 0.01 < check_dot(out, a64, da, b64, db, 4 * 2.0**-9) < 0.06
    ga, gb = jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b, meta).astype(jnp.float32)), argnums=(0, 1)))(a, b)
    assert ga.dtype == jnp.bfloat16 and gb.dtype == jnp.float32
    # d/da sum(a @ b) = row sums of b, d/db = column sums of a (broadcast). The output
    # gradient (ones) is exact in E5M2, so only one operand's E4M3 error (~0.026) plus bf16
    # roundings remain (measured 0.027 / 0.023); bound 0.06 as above.
    assert norm_rel(ga, np.broadcast_to(b64.sum(1), (16, 64))) < 0.06
    assert norm_rel(gb, np.broadcast_to(a64.sum(0)[:, None], (64, 8))) < 0.06


# ----------------------------------------------------------------------------- meta threading and updates


OLD_HISTORY = np.float32([0.5, 0.25, 0.125, 0.0625])


def old_meta():
    """Scale 1 (so small integers stay exact) and a non-zero history, to see a single roll."""
    s = Fp8Scale(jnp.float32(1.0), jnp.asarray(OLD_HISTORY))
    return Fp8Meta(s, s, s)


def test_threaded_calls_combine_amaxes_by_max():
    """y1 = x1 @ w, y2 = x2 @ w with the meta threaded: slot 0 holds max (not sum) of the
    two lhs amaxes and of the two output-gradient amaxes, the rhs amax once; the history
    rolled exactly once; input gradients are still exact (integer data, see above)."""
    config = Fp8Config(amax_history=4)
    x1, x2, w = small_ints((3, 6), 10, -2, 3), small_ints((3, 6), 11), small_ints((6, 4), 12)
    c1, c2 = small_ints((3, 4), 13, -2, 3), small_ints((3, 4), 14, -1, 2) * 4  # output-grad weights

    def f(x1, x2, w, meta):
        y1, meta = fp8_dot_general(x1, w, MATMUL, meta, config=config, out_dtype=jnp.float32)
        y2, _ = fp8_dot_general(x2, w, MATMUL, meta, config=config, out_dtype=jnp.float32)
        return jnp.sum(y1 * c1) + jnp.sum(y2 * c2)

    returned = jax.jit(lambda m: fp8_dot_general(x1, w, MATMUL, m, config=config)[1])(old_meta())
    assert tree_equal(returned, old_meta())  # the forward hands the meta back unchanged
    gx1, gx2, gw, new = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(x1, x2, w, old_meta())
    amax = lambda x: np.float32(np.abs(x).max())  # noqa: E731
    for s, expected, limit in ((new.lhs, max(amax(x1), amax(x2)), 448.0), (new.rhs, amax(w), 448.0),
                               (new.grad, max(amax(c1), amax(c2)), 57344.0)):
        np.testing.assert_array_equal(np.asarray(s.amax_history), [expected, *OLD_HISTORY[:3]])
        assert float(s.scale) == np.float32(limit) / expected
    assert amax(x1) != amax(x2) and amax(c1) != amax(c2)
    np.testing.assert_array_equal(gx1, c1 @ w.T)
    np.testing.assert_array_equal(gx2, c2 @ w.T)
    np.testing.assert_array_equal(gw, x1.T @ c1 + x2.T @ c2)


def test_meta_carried_through_scan_combines_by_max():
    """Three steps of lax.scan with the meta in the carry: lhs slot 0 = max over the three
    inputs' amaxes, grad slot 0 = max over the three output-gradient weights' amaxes."""
    config = Fp8Config(amax_history=4)
    xs = np.stack([np.full((2, 4), v, np.float32) for v in (1.0, -7.0, 3.0)])
    cs = np.stack([np.full((2, 2), v, np.float32) for v in (2.0, 0.5, -5.0)])
    w = np.ones((4, 2), np.float32)

    def f(meta):
        def body(meta, xc):
            y, meta = fp8_dot_general(xc[0], w, MATMUL, meta, config=config, out_dtype=jnp.float32)
            return meta, jnp.sum(y * xc[1])

        return jnp.sum(lax.scan(body, meta, (xs, cs))[1])

    new = jax.jit(jax.grad(f))(old_meta())
    for s, expected in ((new.lhs, 7.0), (new.rhs, 1.0), (new.grad, 5.0)):
        np.testing.assert_array_equal(np.asarray(s.amax_history), [expected, *OLD_HISTORY[:3]])
    assert float(new.lhs.scale) == np.float32(448.0) / np.float32(7.0)
    assert float(new.grad.scale) == np.float32(57344.0) / np.float32(5.0)


@pytest.mark.parametrize("amax_compute", ["max", "most_recent"])
def test_merge_meta_updates(amax_compute):
    """Two updates of one old meta merge into a single roll with the larger amax (scale
    recomputed); an update merged with zeros (op did not run) is returned unchanged; two
    zero updates stay zero."""
    config = Fp8Config(amax_history=4, amax_compute=amax_compute)
    old = old_meta()

    def update(amax):
        stats = (jnp.float32(amax / 100), jnp.float32(0))
        up = lambda s, dt: update_scale_state(s, jnp.float32(amax), dt, config, stats=stats)  # noqa: E731
        return Fp8Meta(up(old.lhs, E4M3), up(old.rhs, E4M3), up(old.grad, E5M2))

    a, b = update(0.2), update(8.0)
    merged = merge_meta_updates(old, a, b, config)
    for s, limit in ((merged.lhs, 448.0), (merged.rhs, 448.0), (merged.grad, 57344.0)):
        np.testing.assert_array_equal(np.asarray(s.amax_history), [8.0, *OLD_HISTORY[:3]])
        assert float(s.scale) == limit / 8.0 and float(s.saturated) == np.float32(0.08)
    # a's own amax 0.2 is below the history max 0.5: the two reductions differ.
    assert float(merge_meta_updates(old, a, a, config).lhs.scale) == (
        np.float32(448.0) / np.float32(0.5) if amax_compute == "max" else np.float32(448.0) / np.float32(0.2)
    )
    zeros = jax.tree.map(jnp.zeros_like, old)
    assert tree_equal(merge_meta_updates(old, a, zeros, config), a)
    assert tree_equal(merge_meta_updates(old, zeros, a, config), a)
    assert tree_equal(merge_meta_updates(old, zeros, zeros, config), zeros)


def test_apply_meta_updates_keeps_unused_ops():
    """Differentiate through one of two metas: the unused one gets a zero cotangent and keeps
    its (non-trivial) old state exactly; the used one becomes its cotangent."""
    config = Fp8Config(amax_history=4)
    idle = jax.tree.map(lambda x: x + 3.0, old_meta())
    metas = {"used": old_meta(), "idle": idle}
    x, w = small_ints((2, 4), 20), small_ints((4, 3), 21)

    def loss(metas):
        return jnp.sum(fp8_dot_general(x, w, MATMUL, metas["used"], config=config, out_dtype=jnp.float32)[0])

    updates = jax.jit(jax.grad(loss))(metas)
    assert tree_equal(updates["idle"], jax.tree.map(jnp.zeros_like, idle))
    applied = apply_meta_updates(metas, updates)
    assert tree_equal(applied["idle"], idle)
    assert tree_equal(applied["used"], updates["used"])
    assert float(applied["used"].lhs.amax_history[0]) == np.abs(x).max()


def test_history_length_mismatch_says_how_to_fix_it():
    with pytest.raises(ValueError, match=r"Fp8Meta\.init\(16\)"):
        fp8_dot_general(jnp.ones((2, 2)), jnp.ones((2, 2)), MATMUL, Fp8Meta.init(4), config=Fp8Config(amax_history=16))


def test_meta_round_trips_through_jit():
    """Every leaf of an Fp8Meta (3 tensors x scale, history, saturated, flushed) comes back
    from jit unchanged: same values, dtypes and shapes."""
    meta = Fp8Meta.init(5).replace(lhs=Fp8Scale(jnp.float32(3.0), jnp.arange(5.0), jnp.float32(0.25), jnp.float32(0.5)))
    back = jax.jit(lambda m: m)(meta)
    assert isinstance(back, Fp8Meta) and tree_equal(back, meta)
    assert len(jax.tree.leaves(meta)) == 12
    assert [x.shape for x in jax.tree.leaves(back)[:4]] == [(), (5,), (), ()]


# ----------------------------------------------------------------------------- GPU: real FP8 GEMMs


def fp8_gpu() -> bool:
    """The first device is a GPU of compute capability >= 8.9 (Ada/Hopper: FP8 tensor cores)."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return False
    major, minor = (int(p) for p in str(getattr(dev, "compute_capability", "0.0")).split(".")[:2])
    return (major, minor) >= (8, 9)


@pytest.mark.skipif(not fp8_gpu(), reason="needs an FP8-capable GPU (compute capability >= 8.9)")
def test_fp8_dense_compiles_to_cublaslt_fp8_gemms():
    """XLA rewrites each FP8 x FP8 dot_general into a cuBLASLt FP8 GEMM custom call: forward,
    input gradient and weight gradient give at least three."""
    config = Fp8Config(amax_history=16)
    x = jnp.ones((256, 512), jnp.bfloat16)
    w = jnp.ones((512, 256), jnp.float32)

    def f(x, w, meta):
        out, _ = fp8_dot_general(x, w, MATMUL, meta, config=config, out_dtype=jnp.bfloat16)
        return jnp.sum(out.astype(jnp.float32))

    hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, w, Fp8Meta.init(16)).compile().as_text()
    assert hlo.count("__cublas$lt$matmul$f8") >= 3
