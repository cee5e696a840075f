"""mpx.fp8 against independent ml_dtypes / numpy (float64) references: quantization,
scales and amax histories, and fp8_dot_general's values, gradients and observations."""

import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax

import mpx
from helpers import fp8_gpu, ref_scale
from mpx.fp8 import E4M3, E5M2, Fp8Config, Fp8Meta, Fp8Scale, dequantize, fp8_dot_general, quantization_stats, quantize
from mpx.fp8._meta import advance, advance_tree, combine_metas, observation, scale_for_use
from mpx.fp8._numerics import observe, scale_from_amax

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


def unit_meta(config: Fp8Config) -> Fp8Meta:
    """A meta past its first step whose delayed scales are all 1 (so small integers stay exact)."""
    s = Fp8Scale.init(config.amax_history).replace(amax_history=jnp.zeros(config.amax_history).at[0].set(1.0))
    return Fp8Meta(s, s, s, config=config)


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
    """Finite values beyond ±fp8_max (also past the rounding midpoint) become exactly
    ±fp8_max; ±inf and NaN become NaN: an overflow is never laundered into a finite number.
    A finite value whose scaled product overflows f32 (1e30 at scale 1e30) is a blow-up 1e35
    times past the scale's range: NaN as well, and `observe` does not count it saturated."""
    limit = float(ml_dtypes.finfo(np_dtype).max)
    x = jnp.array([1e30, -1e30, limit * 1.03, limit * 1.07, -limit * 4, np.inf, -np.inf, np.nan], jnp.float32)
    q = np.asarray(quantize(x, dtype, jnp.float32(1.0))).astype(np.float64)
    np.testing.assert_array_equal(q[:5], [limit, -limit, limit, limit, -limit])
    assert np.isnan(q[5:]).all()
    assert np.isnan(float(quantize(jnp.float32(1e30), dtype, jnp.float32(1e30)).astype(jnp.float32)))
    seen = observe(jnp.float32([1e30, 1.0, 0.0, 0.0]), dtype, jnp.float32(1e30))  # 1.0 saturates, 1e30 overflows
    assert [float(v) for v in seen] == [float(np.float32(1e30)), 0.25, 0.0]
    # A scale that pushes an in-range value over the edge saturates as well.
    assert float(quantize(jnp.float32(100.0), dtype, jnp.float32(1e4)).astype(jnp.float32)) == limit


def test_statistics_thresholds_decide_as_the_f32_product():
    """`observe` compares |x| with scalars instead of computing |x| * scale per element: for
    20000 random scales over 2**-60..2**60 and the three limits it uses (fp8_max, the flush
    threshold, f32's max), the scalar t is the largest f32 with t * scale <= limit in numpy's
    f32 arithmetic: t passes and the next float up does not."""
    from mpx.fp8._numerics import _largest_scaling_to, flush_threshold, fp8_max

    rng = np.random.default_rng(11)
    scales = (2.0 ** rng.uniform(-60, 60, 20000) * rng.uniform(1, 2, 20000)).astype(np.float32)
    for limit in (fp8_max(E4M3), fp8_max(E5M2), flush_threshold(E4M3), flush_threshold(E5M2), 3.4028235e38):
        t = np.asarray(jax.jit(lambda s: jax.vmap(lambda one: _largest_scaling_to(limit, one))(s))(scales))
        lim = np.float32(limit)
        with np.errstate(over="ignore"):  # a product past f32's max is inf: above the limit, as meant
            assert (t * scales <= lim).all()
            assert (np.nextafter(t, np.float32(np.inf)) * scales > lim).all()


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


@pytest.mark.parametrize("in_dtype", [np.float32, ml_dtypes.bfloat16])
@pytest.mark.parametrize("dtype, np_dtype, _", FORMATS, ids=FORMAT_IDS)
def test_quantization_stats_count_what_ml_dtypes_saturates_and_flushes(dtype, np_dtype, _, in_dtype):
    """The statistics are computed from x and the scale alone (so they fuse into the quantize
    pass); they must still equal a recount on ml_dtypes' quantization of the same values:
    saturated = finite |x * scale| > fp8_max, flushed = x != 0 whose FP8 value is 0. The
    data covers ~2**-40..2**20 and the exact tie at half the smallest subnormal (rounds to
    the even neighbour 0) and just above it (rounds away); inf/NaN are neither."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(20000) * np.exp2(rng.uniform(-40, 20, 20000))).astype(np.float32)
    scale = np.float32(0.75)
    tie = float(ml_dtypes.finfo(np_dtype).smallest_subnormal) / 2 / scale
    x[:6] = [tie, -tie, np.nextafter(np.float32(tie), np.float32(1)), np.inf, -np.inf, np.nan]
    x = x.astype(in_dtype)
    y = x.astype(np.float32) * scale
    limit = float(ml_dtypes.finfo(np_dtype).max)
    q = np.clip(y, -limit, limit).astype(np_dtype).astype(np.float32)
    expected_saturated = np.mean(np.isfinite(y) & (np.abs(y) > limit))
    expected_flushed = np.mean((x != 0) & (q == 0))
    got = jax.jit(quantization_stats, static_argnums=1)(jnp.asarray(x), dtype, jnp.float32(scale))
    # Means of 0/1 in f32 over 20000 elements: exact up to f32 rounding of the sum.
    np.testing.assert_allclose([float(g) for g in got], [expected_saturated, expected_flushed], rtol=1e-6)
    assert 0.05 < expected_saturated < 0.9 and 0.05 < expected_flushed < 0.9  # both cases well populated
    if in_dtype is np.float32:  # the tie and its neighbour survive only in f32
        assert q[0] == q[1] == 0 and q[2] != 0


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
def test_scale_from_amax_formula(limit, margin):
    """The scale is `ref_scale` (float64: the largest power of two s with amax * 2**margin * s
    <= limit) exactly, over 20 binades of amaxes and amaxes that land exactly on the limit:
    a power of two; within a factor 2 below fp8_max / (amax * 2**margin), never above (the amax
    never saturates); and the inverse scales' product of two tensors is exact in bf16 (what
    the GEMM's output is multiplied by)."""
    rng = np.random.default_rng(5)
    on_limit = limit / 2.0 ** np.arange(-3, 4) / 2.0**margin  # quotient exactly a power of two
    amaxes = np.concatenate([[0.5, 3.0, 1000.0, 1e-30], on_limit, np.exp2(rng.uniform(-10, 10, 200))])
    amaxes = amaxes.astype(np.float32)
    got = np.asarray(scale_from_amax(jnp.asarray(amaxes), jnp.float32(7.0), limit, margin=margin))
    np.testing.assert_array_equal(got, [ref_scale(a, limit, margin) for a in amaxes])
    mantissa, _ = np.frexp(got)
    assert np.all(mantissa == 0.5)
    ratio = got / (limit / (amaxes.astype(np.float64) * 2.0**margin))
    assert np.all(ratio <= 1) and np.all(ratio > 0.5)
    assert np.all(ratio[4:4 + len(on_limit)] == 1)  # an exact power of two is kept, not halved
    inverse = (1 / got[:-1].astype(np.float64)) * (1 / got[1:].astype(np.float64))
    np.testing.assert_array_equal(inverse.astype(ml_dtypes.bfloat16).astype(np.float64), inverse)


@pytest.mark.parametrize("amax", [0.0, -1.0, np.inf, -np.inf, np.nan, 1e-45])
def test_scale_from_amax_keeps_previous_scale_when_amax_is_unusable(amax):
    """Zero, negative, ±inf, NaN, and 1e-45 (448/1e-45 overflows f32): the quotient is not a
    finite positive number, so the previous scale is kept."""
    assert float(scale_from_amax(jnp.float32(amax), jnp.float32(7.0), 448.0)) == 7.0


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_scale_from_amax_never_returns_zero():
    """prev_scale when the quotient is not a finite *positive* number: a margin of 200 makes
    2**margin inf in f32, and a huge amax with a margin underflows the quotient to 0.
    (Fp8Config caps the margin at 32; scale_from_amax itself must still hold.)"""
    assert float(scale_from_amax(jnp.float32(1.0), jnp.float32(7.0), 448.0, margin=200)) == 7.0
    assert float(scale_from_amax(jnp.float32(1e38), jnp.float32(7.0), 448.0, margin=10)) == 7.0


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
    and the scale after each step, reduced by `max` over the window or `most_recent` (hand
    values of fp8_max / amax, as `ref_scale` rounds them: exact)."""
    config = Fp8Config(amax_history=4, amax_compute=amax_compute, margin=margin)
    step = jax.jit(lambda s, a: advance(s, observation(s, a, (jnp.float32(0), jnp.float32(0))), E4M3, config))
    state = Fp8Scale.init(4)
    for amax, history, scale in zip(AMAXES, HISTORIES, expected_scales):
        state = step(state, jnp.float32(amax))
        np.testing.assert_array_equal(np.asarray(state.amax_history), np.float32(history))
        assert float(state.scale) == ref_scale(448 / scale, 448.0)


def test_scale_for_use_delayed_vs_current():
    """delayed: the stored scale once the history holds an amax, fp8_max / amax(x) while it is
    empty; current: fp8_max / (amax(x) * 2**margin) now (`ref_scale` of each); both keep the
    stored scale when x is all zero. A stored scale that is not a power of two (5: set by hand)
    is used as the one below it (4)."""
    x_amax = jnp.float32(2.0)
    fresh = Fp8Scale.init(4).replace(scale=jnp.float32(5.0))
    seen = fresh.replace(amax_history=jnp.float32([0.0, 3.0, 0.0, 0.0]))
    delayed, current = Fp8Config(recipe="delayed", amax_history=4), Fp8Config(recipe="current", amax_history=4)
    assert float(scale_for_use(seen, x_amax, E4M3, delayed)) == 4.0
    assert float(scale_for_use(fresh, x_amax, E4M3, delayed)) == ref_scale(2.0, 448.0)
    assert float(scale_for_use(fresh, jnp.float32(0.0), E4M3, delayed)) == 4.0
    assert float(scale_for_use(seen, x_amax, E4M3, current)) == ref_scale(2.0, 448.0)
    assert float(scale_for_use(seen, x_amax, E5M2, Fp8Config(recipe="current", amax_history=4, margin=1))) == ref_scale(2.0, 57344.0, 1)
    assert float(scale_for_use(seen, jnp.float32(0.0), E4M3, current)) == 4.0


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
    in E5M2, and all sums are small integers (exact in f32). With delayed scales of 1,
    forward and both gradients must equal plain f32 autodiff bit for bit."""
    meta = unit_meta(Fp8Config(amax_history=4))
    a, b = small_ints(a_shape, 0), small_ints(b_shape, 1)
    w = small_ints(lax.dot_general(a, b, dims).shape, 2, -2, 3)

    def fp8_loss(a, b):
        return jnp.sum(fp8_dot_general(a, b, dims, meta, out_dtype=jnp.float32)[0] * w)

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
    """The meta after one step of loss = sum(fp8_dot(a, b) * w) from a fresh meta."""
    meta = Fp8Meta.init(config)
    loss = lambda m: jnp.sum(fp8_dot_general(a, b, dims, m, out_dtype=jnp.float32)[0] * w)  # noqa: E731
    return meta.advance(jax.jit(jax.grad(loss))(meta))


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
        out, _ = fp8_dot_general(a, b, MATMUL, meta, out_dtype=jnp.float32)
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
    """Inputs of magnitude ~1000 saturate E4M3 (max 448) under a delayed scale of 1 (a meta
    whose history saw amax 448: norm-wise error ~0.7 measured; > 0.3), while `current`
    scales by their own amax at once and meets the forward bound 0.06 of the test above;
    so does `delayed` on a fresh meta, whose empty history scales from the amax too."""
    rng = np.random.default_rng(6)
    a = (rng.standard_normal((16, 64)) * 1000).astype(np.float32)
    b = rng.standard_normal((64, 8)).astype(np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    current, delayed = Fp8Config(amax_history=4, recipe="current"), Fp8Config(amax_history=4)
    dot = jax.jit(lambda a, b, m: fp8_dot_general(a, b, MATMUL, m)[0])
    assert norm_rel(dot(a, b, unit_meta(current)), ref) < 0.06
    assert norm_rel(dot(a, b, Fp8Meta.init(delayed)), ref) < 0.06
    assert norm_rel(dot(a, b, unit_meta(delayed)), ref) > 0.3


@pytest.mark.parametrize("fmt, grad_max", [("hybrid", 57344.0), ("e4m3", 448.0)])
def test_meta_cotangent_holds_true_amaxes_and_scales(fmt, grad_max):
    """After one step, slot 0 of each history = numpy amax of lhs, rhs and of the output
    gradient (= w for loss = sum(out * w)); the rest rolled from zeros; scale = fp8_max / amax
    as `ref_scale` rounds it (exact)."""
    config = Fp8Config(amax_history=4, format=fmt)
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)
    w = (rng.standard_normal((8, 4)) * 3).astype(np.float32)
    new = calibrated(a, b, w, MATMUL, config)
    for s, x, limit in ((new.lhs, a, 448.0), (new.rhs, b, 448.0), (new.grad, w, grad_max)):
        amax = np.float32(np.abs(x).max())
        np.testing.assert_array_equal(np.asarray(s.amax_history), [amax, 0, 0, 0])
        assert float(s.scale) == ref_scale(amax, limit)


def test_bf16_compute_under_jit():
    """bf16 activations, f32 weights, out_dtype bf16: output bf16, gradients in the input
    dtypes. Error bound as in the f32 test plus bf16 roundings (GEMM output, rescaled
    product: 2 * 2**-9 relative of sum|a~||b~|, bounded with 4 * 2**-9 * sum|a||b|)."""
    config = Fp8Config(amax_history=4)
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.standard_normal((16, 64)), jnp.bfloat16)
    b = rng.standard_normal((64, 8)).astype(np.float32)
    a64, b64 = np.asarray(a, np.float64), b.astype(np.float64)
    meta = calibrated(a, b, np.ones((16, 8), np.float32), MATMUL, config)
    f = jax.jit(lambda a, b, m: fp8_dot_general(a, b, MATMUL, m, out_dtype=jnp.bfloat16)[0])
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


# ----------------------------------------------------------------------------- observations, threading, advance


OLD_HISTORY = np.float32([0.5, 0.25, 0.125, 0.0625])
CONFIG4 = Fp8Config(amax_history=4)


def old_meta(config=CONFIG4):
    """Scale 1 (so small integers stay exact) and a non-zero history, to see a single roll."""
    s = Fp8Scale.init(4).replace(scale=jnp.float32(1.0), amax_history=jnp.asarray(OLD_HISTORY))
    return Fp8Meta(s, s, s, config=config)


def np_amax(x):
    return np.float32(np.abs(x).max())


def test_threaded_calls_combine_amaxes_by_max():
    """y1 = x1 @ w, y2 = x2 @ w with the meta threaded: the observation holds max (not sum)
    of the two lhs amaxes and of the two output-gradient amaxes, the rhs amax once, two
    calls, fan-out 1; advancing rolls the history exactly once; input gradients are still
    exact (integer data, see above)."""
    x1, x2, w = small_ints((3, 6), 10, -2, 3), small_ints((3, 6), 11), small_ints((6, 4), 12)
    c1, c2 = small_ints((3, 4), 13, -2, 3), small_ints((3, 4), 14, -1, 2) * 4  # output-grad weights

    def f(x1, x2, w, meta):
        y1, meta = fp8_dot_general(x1, w, MATMUL, meta, out_dtype=jnp.float32)
        y2, _ = fp8_dot_general(x2, w, MATMUL, meta, out_dtype=jnp.float32)
        return jnp.sum(y1 * c1) + jnp.sum(y2 * c2)

    returned = jax.jit(lambda m: fp8_dot_general(x1, w, MATMUL, m)[1])(old_meta())
    assert tree_equal(returned, old_meta())  # the forward hands the meta back unchanged
    gx1, gx2, gw, seen = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(x1, x2, w, old_meta())
    new = old_meta().advance(seen)
    for s, o, expected, limit in ((new.lhs, seen.lhs, max(np_amax(x1), np_amax(x2)), 448.0),
                                  (new.rhs, seen.rhs, np_amax(w), 448.0),
                                  (new.grad, seen.grad, max(np_amax(c1), np_amax(c2)), 57344.0)):
        assert (float(o.amax), float(o.calls), float(o.fanout)) == (expected, 2.0, 1.0)
        np.testing.assert_array_equal(np.asarray(s.amax_history), [expected, *OLD_HISTORY[:3]])
        assert float(s.scale) == ref_scale(expected, limit)
    assert np_amax(x1) != np_amax(x2) and np_amax(c1) != np_amax(c2)
    np.testing.assert_array_equal(gx1, c1 @ w.T)
    np.testing.assert_array_equal(gx2, c2 @ w.T)
    np.testing.assert_array_equal(gw, x1.T @ c1 + x2.T @ c2)


def test_meta_carried_through_scan_combines_by_max():
    """Three steps of lax.scan with the meta in the carry: lhs amax = max over the three
    inputs' amaxes, grad amax = max over the three output-gradient weights' amaxes."""
    xs = np.stack([np.full((2, 4), v, np.float32) for v in (1.0, -7.0, 3.0)])
    cs = np.stack([np.full((2, 2), v, np.float32) for v in (2.0, 0.5, -5.0)])
    w = np.ones((4, 2), np.float32)

    def f(meta):
        def body(meta, xc):
            y, meta = fp8_dot_general(xc[0], w, MATMUL, meta, out_dtype=jnp.float32)
            return meta, jnp.sum(y * xc[1])

        return jnp.sum(lax.scan(body, meta, (xs, cs))[1])

    seen = jax.jit(jax.grad(f))(old_meta())
    new = old_meta().advance(seen)
    for s, o, expected in ((new.lhs, seen.lhs, 7.0), (new.rhs, seen.rhs, 1.0), (new.grad, seen.grad, 5.0)):
        np.testing.assert_array_equal(np.asarray(s.amax_history), [expected, *OLD_HISTORY[:3]])
        assert (float(o.calls), float(o.fanout)) == (3.0, 1.0)
    assert float(new.lhs.scale) == ref_scale(7.0, 448.0) == 64.0  # 7 * 64 = 448 exactly: kept
    assert float(new.grad.scale) == ref_scale(5.0, 57344.0)


def test_unthreaded_reuse_is_bounded_reported_and_warned():
    """The same meta fed to two calls without threading (the second call ignores the meta
    the first returned): autodiff adds the two observations. The amax is then the sum,
    2 + 5 = 7: at least the true max 5 (no saturation) and at most twice it; fanout says
    2; the history still rolls once; a warning names the cause at trace time. A meta
    closed over by lax.scan (3 iterations) reports fanout 3, amax 1 + 7 + 3 = 11."""
    a, b, w = np.full((2, 4), 2.0, np.float32), np.full((2, 4), -5.0, np.float32), np.ones((4, 3), np.float32)

    def fanned(meta):
        y1, _ = fp8_dot_general(a, w, MATMUL, meta, out_dtype=jnp.float32)
        y2, _ = fp8_dot_general(b, w, MATMUL, meta, out_dtype=jnp.float32)
        return jnp.sum(y1) + jnp.sum(y2)

    with pytest.warns(mpx.fp8.Fp8FanoutWarning, match="without threading"):
        seen = jax.jit(jax.grad(fanned))(old_meta())
    assert (float(seen.lhs.amax), float(seen.lhs.calls), float(seen.lhs.fanout)) == (7.0, 2.0, 2.0)
    new = old_meta().advance(seen)
    np.testing.assert_array_equal(np.asarray(new.lhs.amax_history), [7.0, *OLD_HISTORY[:3]])

    xs = np.stack([np.full((2, 4), v, np.float32) for v in (1.0, -7.0, 3.0)])

    def closed_over(meta):
        body = lambda c, x: (c, jnp.sum(fp8_dot_general(x, w, MATMUL, meta, out_dtype=jnp.float32)[0]))  # noqa: E731
        return jnp.sum(lax.scan(body, 0.0, xs)[1])

    seen = jax.jit(jax.grad(closed_over))(old_meta())
    assert (float(seen.lhs.amax), float(seen.lhs.fanout), float(seen.rhs.amax)) == (11.0, 3.0, 3.0)

    with warnings.catch_warnings():  # a forward pass alone may reuse a meta freely
        warnings.simplefilter("error")
        jax.jit(fanned)(old_meta())


def random_meta(rng, config, stack=()):
    """A meta whose every field is random (some histories empty, some amaxes non-finite,
    some tensors unused), as a state or as an observation."""
    def scale_state():
        f = lambda *shape: jnp.asarray(rng.uniform(0.0, 4.0, (*stack, *shape)), jnp.float32)  # noqa: E731
        amax = np.where(rng.random(stack) < 0.2, np.inf, rng.uniform(0, 4, stack)).astype(np.float32)
        history = rng.uniform(0, 4, (*stack, config.amax_history)) * (rng.random((*stack, 1)) < 0.7)
        return Fp8Scale(scale=f(), amax_history=jnp.asarray(history, jnp.float32), amax=jnp.asarray(amax),
                        calls=jnp.asarray(rng.integers(0, 3, stack), jnp.float32), fanout=f(), saturated=f(),
                        flushed=f())
    return Fp8Meta(scale_state(), scale_state(), scale_state(), config=config)


def test_advance_tree_applies_a_traced_flag_to_every_meta():
    """`advance_tree` with the step's finite flag inside: for a tree of plain and scanned
    (stacked (3,) and (2, 2)) metas under three configs, jitted with a traced flag, True gives
    `Fp8Meta.advance` of each meta on its own bit for bit, False keeps the whole tree (what a
    skipped step needs, with no select over the tree afterwards)."""
    rng = np.random.default_rng(7)
    configs = [Fp8Config(amax_history=4), Fp8Config(amax_history=4, format="e4m3", margin=1),
               Fp8Config(amax_history=3, amax_compute="most_recent")]
    layout = [(0, ()), (0, (3,)), (1, ()), (2, (2, 2)), (0, ()), (1, (3,))]
    tree = {f"op{i}": random_meta(rng, configs[c], stack) for i, (c, stack) in enumerate(layout)}
    seen = {k: random_meta(rng, m.config, m.stack) for k, m in tree.items()}
    batched = jax.jit(lambda t, o, apply: advance_tree(t, o, apply=apply))
    got = batched(tree, seen, True)
    for k in tree:
        want = tree[k].advance(seen[k])
        for a, b in zip(jax.tree.leaves(got[k]), jax.tree.leaves(want)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kept = batched(tree, seen, False)
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("amax_compute", ["max", "most_recent"])
def test_combine_then_advance(amax_compute):
    """Two calls' observations combine into one roll with the larger amax (the scale then
    follows amax_compute over the history); combining with zeros (an op that did not run)
    changes nothing; a state advanced with zero observations is kept exactly."""
    config = Fp8Config(amax_history=4, amax_compute=amax_compute)
    old = old_meta(config)

    def seen(amax):
        o = lambda s: observation(s, jnp.float32(amax), (jnp.float32(amax / 100), jnp.float32(0)))  # noqa: E731
        return Fp8Meta(o(old.lhs), o(old.rhs), o(old.grad), config=config)

    a, b = seen(0.2), seen(8.0)
    both = combine_metas(a, b)
    merged = old.advance(both)
    for s, limit in ((merged.lhs, 448.0), (merged.rhs, 448.0), (merged.grad, 57344.0)):
        np.testing.assert_array_equal(np.asarray(s.amax_history), [8.0, *OLD_HISTORY[:3]])
        assert float(s.scale) == ref_scale(8.0, limit) and float(s.saturated) == np.float32(0.08)
        assert (float(s.calls), float(s.fanout)) == (2.0, 1.0)
    # a's own amax 0.2 is below the history max 0.5: the two reductions differ.
    assert float(old.advance(a).lhs.scale) == (
        ref_scale(0.5, 448.0) if amax_compute == "max" else ref_scale(0.2, 448.0)
    )
    zeros = jax.tree.map(jnp.zeros_like, a)
    assert tree_equal(combine_metas(a, zeros), a)
    assert tree_equal(old.advance(zeros), old)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_advance_never_rolls_a_nonfinite_amax(bad):
    """An observation whose amax is inf or NaN leaves the state exactly as it was, however
    it is advanced (mpx.train_step also skips the whole step)."""
    old = old_meta()
    s = observation(old.lhs, jnp.float32(bad), (jnp.float32(0), jnp.float32(0)))
    assert tree_equal(advance(old.lhs, s, E4M3, CONFIG4), old.lhs)


def test_advance_tree_keeps_unused_ops():
    """Differentiate through one of two metas: the unused one observes nothing (zeros) and
    keeps its (non-trivial) old state exactly; the used one rolls once."""
    idle = jax.tree.map(lambda x: x + 3.0, old_meta())
    metas = {"used": old_meta(), "idle": idle}
    x, w = small_ints((2, 4), 20), small_ints((4, 3), 21)

    def loss(metas):
        return jnp.sum(fp8_dot_general(x, w, MATMUL, metas["used"], out_dtype=jnp.float32)[0])

    seen = jax.jit(jax.grad(loss))(metas)
    assert tree_equal(seen["idle"], jax.tree.map(jnp.zeros_like, idle))
    applied = advance_tree(metas, seen)
    assert tree_equal(applied["idle"], idle)
    assert float(applied["used"].lhs.amax_history[0]) == np.abs(x).max()
    np.testing.assert_array_equal(np.asarray(applied["used"].lhs.amax_history[1:]), OLD_HISTORY[:3])


def test_stacked_meta_advances_per_layer_and_refuses_a_single_matmul():
    """A meta stacked for 3 layers advances each layer from its own observation (layer 1
    did not run and keeps its state); a stacked meta given to one matmul is an error."""
    stacked = Fp8Meta.init(CONFIG4, stack=(3,))
    assert stacked.stack == (3,) and stacked.lhs.amax_history.shape == (3, 4)
    seen = jax.tree.map(jnp.zeros_like, stacked)
    seen = seen.replace(lhs=seen.lhs.replace(amax=jnp.float32([2.0, 0.0, 4.0]), calls=jnp.float32([1, 0, 1])))
    new = stacked.advance(seen)
    np.testing.assert_array_equal(np.asarray(new.lhs.amax_history[:, 0]), [2.0, 0.0, 4.0])
    np.testing.assert_array_equal(np.asarray(new.lhs.scale), np.float32([128.0, 1.0, 64.0]))  # 448 / 2, 448 / 4 down to powers of two
    with pytest.raises(ValueError, match=r"stacked with leading axes \(3,\)"):
        fp8_dot_general(jnp.ones((2, 2)), jnp.ones((2, 2)), MATMUL, stacked)


def test_history_length_mismatch_says_how_to_fix_it():
    s = Fp8Scale.init(4)
    with pytest.raises(ValueError, match=r"Fp8Meta\.init\(config\)"):
        fp8_dot_general(jnp.ones((2, 2)), jnp.ones((2, 2)), MATMUL, Fp8Meta(s, s, s, config=Fp8Config(amax_history=16)))


def test_meta_round_trips_through_jit():
    """Every leaf of an Fp8Meta (3 tensors x 7 fields) and its static config come back from
    jit unchanged: same values, dtypes and shapes."""
    config = Fp8Config(amax_history=5, margin=2)
    meta = Fp8Meta.init(config).replace(lhs=Fp8Scale(*(jnp.float32(v) for v in (3.0,)), jnp.arange(5.0),
                                                      *(jnp.float32(v) for v in (4.0, 2.0, 1.0, 0.25, 0.5))))
    back = jax.jit(lambda m: m)(meta)
    assert isinstance(back, Fp8Meta) and tree_equal(back, meta) and back.config == config
    assert len(jax.tree.leaves(meta)) == 21
    assert [x.shape for x in jax.tree.leaves(back)[:7]] == [(), (5,), (), (), (), (), ()]
    # A fresh meta can be donated: no two of its leaves share a buffer.
    fresh = Fp8Meta.init(config, stack=(2,))
    assert tree_equal(jax.jit(lambda m: m, donate_argnums=0)(fresh), Fp8Meta.init(config, stack=(2,)))


# ----------------------------------------------------------------------------- the emitted program


@pytest.mark.parametrize("out_dtype, gemm_out", [(jnp.bfloat16, "bf16"), (jnp.float32, "f32"), (jnp.float16, "f32")])
def test_fp8_operands_go_straight_into_dot_general(out_dtype, gemm_out):
    """The StableHLO of forward + both gradients has exactly three dot_generals, each taking
    two FP8 arrays (e4m3 x e4m3 forward, e5m2 x e4m3 backward) as its operands: the pattern
    XLA rewrites into cuBLASLt FP8 GEMMs (a dequantize before the dot would not be). The
    GEMM produces the compute dtype for bf16/f32 (its range holds the unscaled product),
    f32 for fp16 (448**2 * K overflows 65504); the f32 rescale follows it."""
    meta = Fp8Meta.init(Fp8Config(amax_history=4))

    def f(x, w):
        return jnp.sum(fp8_dot_general(x, w, MATMUL, meta, out_dtype=out_dtype)[0].astype(jnp.float32))

    text = jax.jit(jax.value_and_grad(f, (0, 1))).lower(jnp.ones((32, 64), out_dtype), jnp.ones((64, 16))).as_text()
    dots = [line.split(" : ")[-1] for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) == 3, dots
    operands = sorted(d.split(" -> ")[0] for d in dots)
    assert operands == sorted(["(tensor<32x64xf8E4M3FN>, tensor<64x16xf8E4M3FN>)",
                               "(tensor<32x16xf8E5M2>, tensor<64x16xf8E4M3FN>)",
                               "(tensor<32x16xf8E5M2>, tensor<32x64xf8E4M3FN>)"]), operands
    assert all(d.endswith(f"x{gemm_out}>") for d in dots), dots


# ----------------------------------------------------------------------------- GPU: real FP8 GEMMs


@pytest.mark.skipif(not fp8_gpu(), reason="needs an FP8-capable GPU (compute capability >= 8.9)")
def test_fp8_dense_compiles_to_three_fp8_gemms_on_this_gpu():
    """On this GPU (autotuned: cuBLASLt or Triton, whichever wins), the forward, the input
    gradient and the weight gradient of one FP8 matmul are three FP8 GEMMs and the only GEMMs.
    value_and_grad: with jax.grad alone the forward GEMM would be dead code. (tests/test_h100.py
    checks the same deviceless on every run.)"""
    x = jnp.ones((256, 512), jnp.bfloat16)
    w = jnp.ones((512, 256), jnp.float32)

    def f(x, w, meta):
        out, _ = fp8_dot_general(x, w, MATMUL, meta, out_dtype=jnp.bfloat16)
        return jnp.sum(out.astype(jnp.float32))

    step = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    hlo = step.lower(x, w, Fp8Meta.init(Fp8Config(amax_history=16))).compile().as_text()
    gemms = [k.gemm for k in mpx.program.kernels(hlo) if k.kind == "gemm"]
    assert gemms == ["fp8"] * 3, gemms
