"""mpx.int8 against independent numpy (float64) references: codes, scales, the int8 matmul's
values and gradients, the s8 x s8 -> s32 program, and int8 as a policy precision."""

import functools
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import mpx
import mpx.linen as ml
import mpx.nn as mn
from mpx.fp8 import Fp8Meta
from mpx.int8 import Int8Config, absmax_scale, dequantize, int8_dot_general, quantize, quantize_with_scale
from mpx.int8._dot import MAX_EXACT_K, int_dot
from mpx.int8._numerics import MIN_SCALE
from mpx.policy import Policy, Rule, parse

from helpers import settled

MATMUL = (((1,), (0,)), ((), ()))
EPS32 = 2.0**-24  # unit roundoff of f32
INV127 = np.float32(1 / 127)  # scale = amax * INV127 (127 * INV127 is exactly 1)


# ----------------------------------------------------------------------------- numpy references


def np_scale(x, axes=None) -> np.ndarray:
    """max(amax * f32(1 / 127), f32 tiny) with kept dims, the product rounded to f32 once
    (amax and the product of two f32 numbers are exact in float64)."""
    amax = np.max(np.abs(np.asarray(x, np.float64)), axis=axes, keepdims=True)
    return np.maximum((amax * np.float64(INV127)).astype(np.float32), np.float32(MIN_SCALE))


def np_codes(x, scale) -> np.ndarray:
    """round-half-to-even(x / scale) (an f32 division, as IEEE rounds it), clipped to ±127."""
    y = np.asarray(x, np.float32) / np.asarray(scale, np.float32)
    return np.clip(np.round(y), -127, 127).astype(np.int8)  # np.round: half to even


def np_dot_general(a, b, dims) -> np.ndarray:
    """``lax.dot_general`` in numpy (an einsum): output axes batch, lhs free, rhs free."""
    (lc, rc), (lb, rb) = dims
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    la, lr = [None] * a.ndim, [None] * b.ndim
    for i, j in (*zip(lb, rb), *zip(lc, rc)):
        la[i] = lr[j] = next(letters)
    la = [c or next(letters) for c in la]
    lr = [c or next(letters) for c in lr]
    out = ([la[i] for i in lb] + [la[i] for i in range(a.ndim) if i not in lc and i not in lb]
           + [lr[j] for j in range(b.ndim) if j not in rc and j not in rb])
    return np.einsum(f"{''.join(la)},{''.join(lr)}->{''.join(out)}", a, b)


def normal(shape, seed, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# ----------------------------------------------------------------------------- codes and scales


TIES = np.array([[127, 2.5, -2.5, 0.5, -0.5, 1.5, -1.5, 3.5],  # amax 127: scale 1, x / scale exact
                 [254, 5, -5, 3, 1, -1, 7, -7],  # amax 254: scale 2, so 2.5, 1.5, 0.5, 3.5 again
                 [0, 0, 0, 0, 0, 0, 0, 0],  # all zero: tiny scale, codes 0
                 [-0.0, 0, 0, -3, 0, 0, 0, 0]], np.float32)  # negative amax element


def test_ties_round_to_even_and_zero_rows_stay_zero():
    """Hand-computed codes: exact .5 ties go to the even neighbour, a zero row keeps zeros."""
    q, s = jax.jit(quantize, static_argnums=1)(jnp.asarray(TIES), (1,))
    assert q.dtype == jnp.int8 and s.dtype == jnp.float32 and s.shape == (4, 1)
    np.testing.assert_array_equal(np.asarray(q), [[127, 2, -2, 0, 0, 2, -2, 4],
                                                  [127, 2, -2, 2, 0, 0, 4, -4],
                                                  [0, 0, 0, 0, 0, 0, 0, 0],
                                                  [0, 0, 0, -127, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(s)[:, 0], [1, 2, MIN_SCALE, np.float32(3) * INV127])
    np.testing.assert_array_equal(np.asarray(dequantize(q, s))[2], 0.0)


CODE_CASES = {
    "ties per row": (TIES, (1,)),
    "ties per tensor": (TIES, None),
    "all zero": (np.zeros((3, 5), np.float32), None),
    "normal f32 per tensor": (normal((16, 32), 0) * 3, None),
    "normal f32 per column": (normal((16, 32), 1), (0,)),
    "normal bf16 per row": (normal((16, 32), 2).astype(jnp.bfloat16), (1,)),
    "3-d over two axes": (normal((4, 6, 8), 3) * np.geomspace(1e-3, 1e3, 8, dtype=np.float32), (0, 2)),
    # amax * (1 / 127) below f32's smallest normal: the scale floor MIN_SCALE. The values
    # stay normal numbers: XLA flushes subnormal inputs to zero (CPU and GPU), numpy not.
    "scale floor": (np.sign(normal((8, 8), 4)) * np.linspace(1, 120, 64, dtype=np.float32).reshape(8, 8)
                    * np.float32(MIN_SCALE), (1,)),
}


@pytest.mark.parametrize("x, axes", CODE_CASES.values(), ids=CODE_CASES.keys())
def test_codes_and_scales_match_numpy_bit_for_bit(x, axes):
    q, s = jax.jit(quantize, static_argnums=1)(jnp.asarray(x), axes)
    ref_s = np_scale(x, axes)
    np.testing.assert_array_equal(np.asarray(s), ref_s)
    np.testing.assert_array_equal(np.asarray(q), np_codes(x, ref_s))
    assert np.abs(np.asarray(q, np.int32)).max() <= 127


def test_saturation_clips_to_plus_minus_127_and_the_grid_is_symmetric():
    """With a given scale, values beyond the grid clip to ±127 (never -128); codes are odd
    in x: negating a tensor negates its codes exactly."""
    x = jnp.float32([200, -200, 127.5, -127.5, -128, 126.5, -126.5, -1e30, 1e30])
    np.testing.assert_array_equal(np.asarray(quantize_with_scale(x, jnp.float32(1.0))),
                                  [127, -127, 127, -127, -127, 126, -126, -127, 127])
    y = normal((32, 64), 5) * 10
    q, _ = quantize(jnp.asarray(y), 1)
    q_neg, _ = quantize(jnp.asarray(-y), 1)
    np.testing.assert_array_equal(np.asarray(q_neg), -np.asarray(q))
    assert np.asarray(q).min() == -127 and np.asarray(q).max() == 127


def test_per_channel_and_per_token_scales_are_the_hand_computed_ones():
    """A weight (K=3, N=4) gets one scale per output channel (over K); an activation
    (B=2, T=2, K=3) one per token (over K)."""
    w = np.float32([[1, -254, 0, 0.5], [-127, 2, 0, -0.25], [63.5, 100, 0, 0.125]])
    assert absmax_scale(jnp.asarray(w), 0).shape == (1, 4)
    np.testing.assert_array_equal(np.asarray(absmax_scale(jnp.asarray(w), 0))[0],
                                  np.float32([1.0, 2.0, MIN_SCALE, np.float32(0.5) * INV127]))
    x = np.float32([[[-3, 1.5, 0.3], [0, 0, 0]], [[12.7, -127, 1], [0.25, 0, -0.5]]])
    s = np.asarray(absmax_scale(jnp.asarray(x), -1))
    assert s.shape == (2, 2, 1)
    np.testing.assert_array_equal(s[..., 0], np.float32([[3 * INV127, MIN_SCALE], [1.0, 0.5 * INV127]]))


@pytest.mark.parametrize("weight, activation, small_channel_kept, small_token_kept", [
    ("channel", "token", True, True), ("tensor", "token", False, True),
    ("channel", "tensor", True, False), ("tensor", "tensor", False, False)])
def test_granularity_decides_which_values_share_a_scale(weight, activation, small_channel_kept, small_token_kept):
    """x = diag(127 * 8, 127 * 2**-10): a large and a small token; w: a large and a small
    output channel (steps 8 and 2**-10 when scaled on their own).

    Per channel / per token every value is on its own row's grid (the row's amax is 127
    steps, the others whole steps), so the products are exact; per tensor the small
    channel (token) is below half the large one's step of 8 and rounds to zero."""
    x = np.float32([[127 * 8, 0], [0, 127 * 2.0**-10]])  # token 1 is 8192x smaller than token 0
    w = np.float32([[127 * 8, 127 * 2.0**-10], [-127 * 8, -3 * 2.0**-10]])  # channel 1 is small
    config = Int8Config(weight_granularity=weight, activation_granularity=activation)
    got = np.asarray(jax.jit(lambda x, w: int8_dot_general(x, w, MATMUL, config))(x, w))
    exact = x.astype(np.float64) @ w
    assert got[0, 1] == (exact[0, 1] if small_channel_kept else 0.0) and exact[0, 1] != 0
    assert got[1, 0] == (exact[1, 0] if small_token_kept else 0.0) and exact[1, 0] != 0
    assert got[0, 0] == exact[0, 0]  # the large token times the large channel: exact either way


def test_dequantization_error_is_at_most_half_a_step():
    """|x - deq(q(x))| <= scale / 2 in exact arithmetic (round to nearest on a grid of step
    ``scale``, nothing clipped as the scale comes from the amax); the f32 division and
    product add at most 2 ulps of |x| (2**-23 |x|)."""
    x = normal((64, 48), 6) * np.geomspace(1e-4, 1e4, 48, dtype=np.float32)
    for axes in (None, (0,), (1,)):
        q, s = quantize(jnp.asarray(x), axes)
        err = np.abs(np.asarray(dequantize(q, s), np.float64) - x)
        step = np.broadcast_to(np.asarray(s, np.float64), x.shape)
        assert np.all(err <= step / 2 + 2**-23 * np.abs(x))
        assert np.max(err / step) > 0.45  # rounding happened: some value sits near a midpoint


def test_non_finite_values_stay_visible():
    """An inf or NaN makes its row's scale non-finite; the dequantized row and the matmul
    row that used it are non-finite, never plausible finite numbers. Other rows are exact
    as before."""
    x = normal((4, 8), 7)
    x[1, 3], x[2, 0] = np.inf, np.nan
    w = normal((8, 5), 8)
    q, s = quantize(jnp.asarray(x), 1)
    deq = np.asarray(dequantize(q, s))
    assert np.isnan(deq[1]).all() and np.isnan(deq[2]).all() and np.isfinite(deq[[0, 3]]).all()
    out = np.asarray(int8_dot_general(jnp.asarray(x), jnp.asarray(w), MATMUL))
    assert not np.isfinite(out[1]).any() and not np.isfinite(out[2]).any() and np.isfinite(out[[0, 3]]).all()


# ----------------------------------------------------------------------------- the int8 matmul: values

DIMENSION_NUMBERS = {
    "matmul": (MATMUL, (6, 40), (40, 5)),
    "weight (N, K)": ((((1,), (1,)), ((), ())), (6, 40), (5, 40)),
    "attention logits (B,T,D)x(B,S,D)": ((((2,), (2,)), ((0,), (0,))), (2, 4, 16), (2, 5, 16)),
    "attention values (B,H,T,S)x(B,S,H,D)": ((((3,), (1,)), ((0, 1), (0, 2))), (2, 3, 4, 5), (2, 5, 3, 8)),
    "unsorted batch dims (T,H,B,D)x(B,S,H,D)": ((((3,), (3,)), ((2, 1), (0, 2))), (4, 3, 2, 8), (2, 5, 3, 8)),
    "two contractions in different orders": ((((0, 2), (2, 0)), ((), ())), (8, 4, 3), (3, 5, 8)),
}
DIMS_IDS = list(DIMENSION_NUMBERS)


@pytest.mark.parametrize("dims, a_shape, b_shape", DIMENSION_NUMBERS.values(), ids=DIMS_IDS)
def test_int8_dot_is_the_float64_product_of_the_dequantized_operands(dims, a_shape, b_shape):
    """Per-row scales over each operand's contracted axes, random data.

    Against the float64 product of the (numpy-quantized) dequantized operands: the int32
    sum is exact and converts to f32 exactly (|sum| <= 127**2 * 40 < 2**24), then two f32
    products with the scales round by at most 2**-24 each: |out - ref| <= 3 * 2**-24
    |ref| element-wise (2**-40 sum|a||b| covers float64's own rounding).

    Against the unquantized float64 product: each operand moved by at most half its step
    (``da = s_a / 2``), so |out - a b| <= da|b| + |a|db + da db summed over the contraction.
    """
    a, b = normal(a_shape, 10) * 2, normal(b_shape, 11)
    (ac, bc), _ = dims
    got = np.asarray(jax.jit(lambda a, b: int8_dot_general(a, b, dims, out_dtype=jnp.float32))(a, b), np.float64)
    sa, sb = np_scale(a, ac), np_scale(b, bc)
    da, db = np_codes(a, sa) * sa.astype(np.float64), np_codes(b, sb) * sb.astype(np.float64)
    ref = np_dot_general(da, db, dims)
    size = np_dot_general(np.abs(da), np.abs(db), dims)
    assert np.all(np.abs(got - ref) <= 3 * EPS32 * np.abs(ref) + 2.0**-40 * size)

    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ha, hb = np.broadcast_to(sa / 2.0, a.shape), np.broadcast_to(sb / 2.0, b.shape)
    bound = np_dot_general(ha, np.abs(b64), dims) + np_dot_general(np.abs(a64), hb, dims) + np_dot_general(ha, hb, dims)
    err = np.abs(got - np_dot_general(a64, b64, dims))
    assert np.all(err <= bound + 1e-6 * np_dot_general(np.abs(a64), np.abs(b64), dims))
    assert err.max() > 0  # it was quantized


def integers_with_127(shape, seed) -> np.ndarray:
    """Integers in [-127, 127] whose amax is 127: a per-tensor scale of exactly 1."""
    x = np.random.default_rng(seed).integers(-127, 128, shape).astype(np.float32)
    x.flat[0] = 127.0
    return x


@pytest.mark.parametrize("backward", ["compute", "int8"])
@pytest.mark.parametrize("dims, a_shape, b_shape", DIMENSION_NUMBERS.values(), ids=DIMS_IDS)
def test_exact_inputs_give_the_exact_product_and_gradients(dims, a_shape, b_shape, backward):
    """Per-tensor scales of 1 (integers with amax 127, output-gradient weights too): every
    quantization is exact and every sum is an integer below 2**24, so the forward and
    both gradients (int8 GEMMs with ``backward="int8"``) equal plain f32 autodiff bit for
    bit, whatever the dimension numbers (batch axes, unsorted, two contractions)."""
    config = Int8Config(backward=backward, weight_granularity="tensor", activation_granularity="tensor")
    a, b = integers_with_127(a_shape, 0), integers_with_127(b_shape, 1)
    w = integers_with_127(lax.dot_general(a, b, dims).shape, 2)

    def int8_loss(a, b):
        return jnp.sum(int8_dot_general(a, b, dims, config) * w)

    def ref_loss(a, b):
        return jnp.sum(lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST) * w)

    (got, got_g), (ref, ref_g) = jax.jit(
        lambda a, b: (jax.value_and_grad(int8_loss, (0, 1))(a, b), jax.value_and_grad(ref_loss, (0, 1))(a, b)))(a, b)
    assert float(got) == float(ref) != 0.0
    for g, r, x in zip(got_g, ref_g, (a, b)):
        assert g.shape == x.shape and g.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(r))


def test_long_contractions_are_split_so_int32_never_overflows():
    """127 * 127 * K fits int32 for K <= MAX_EXACT_K; a longer contraction is summed in
    int32 pieces (here forced with a small ``max_k``, over two contracted axes) that add
    up to the same integers."""
    assert 127 * 127 * MAX_EXACT_K < 2**31 <= 127 * 127 * (MAX_EXACT_K + 1)
    rng = np.random.default_rng(0)
    qa = jnp.asarray(rng.integers(-127, 128, (3, 7, 5)), jnp.int8)
    qb = jnp.asarray(rng.integers(-127, 128, (5, 7, 4)), jnp.int8)
    dims = (((1, 2), (1, 0)), ((), ()))
    ref = np.einsum("ajk,kjb->ab", np.asarray(qa, np.int64), np.asarray(qb, np.int64))
    for max_k in (35, 12, 5, 3, 1):  # K = 35: one piece, then pieces of the longer axis (7), then of both
        np.testing.assert_array_equal(np.asarray(int_dot(qa, qb, dims, max_k=max_k)), ref)


# ----------------------------------------------------------------------------- the program XLA gets

I8_DOT = re.compile(r"stablehlo\.dot_general[^\n]*:\s*\(tensor<[0-9x]*xi8>, tensor<[0-9x]*xi8>\)\s*->\s*"
                    r"tensor<[0-9x]*xi32>")
ANY_DOT = re.compile(r"stablehlo\.dot_general")


@pytest.mark.parametrize("config, int8_dots, all_dots", [
    (Int8Config(), 1, 3),  # forward s8 x s8 -> s32; both gradients in the compute dtype
    (Int8Config(backward="int8"), 3, 3),  # forward and both gradients are int8 GEMMs
    (Int8Config(recipe="qat"), 0, 3),  # fake quantization: every matmul in the compute dtype
], ids=["int8", "int8 backward", "qat"])
def test_lowered_program_has_s8_s8_s32_dot_generals(config, int8_dots, all_dots):
    """The StableHLO of forward + backward holds an s8 x s8 -> s32 ``dot_general`` for each
    int8 GEMM: the form XLA maps to integer GEMMs on GPU."""
    x, w = jnp.ones((8, 16), jnp.bfloat16), jnp.ones((16, 32), jnp.float32)

    def loss(x, w):
        return jnp.sum(int8_dot_general(x, w, MATMUL, config).astype(jnp.float32))

    text = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(x, w).as_text()
    assert len(I8_DOT.findall(text)) == int8_dots
    assert len(ANY_DOT.findall(text)) == all_dots


# ----------------------------------------------------------------------------- gradients


def np_fake_quant(x, axes, dtype) -> jnp.ndarray:
    s = np_scale(x, axes)
    return jnp.asarray((np_codes(x, s) * s).astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_qat_gradients_are_the_straight_through_estimator(dtype):
    """STE: d loss / d x is d loss / d fq(x), the gradient of the plain matmul evaluated at
    the fake-quantized operands (fq from the numpy reference), cast to x's dtype. The int8
    recipe's default backward is the same definition, so its gradients equal QAT's bit for
    bit; both differ from the unquantized matmul's."""
    x, w, t = normal((8, 32), 20).astype(dtype), normal((32, 16), 21), normal((8, 16), 22)

    def loss(config):
        return lambda x, w: jnp.sum(int8_dot_general(x, w, MATMUL, config, out_dtype=dtype).astype(jnp.float32) * t)

    def plain(a, b):
        return jnp.sum(lax.dot_general(a, b, MATMUL).astype(jnp.float32) * t)

    grads = jax.jit(lambda x, w, a, b: (jax.grad(loss(Int8Config(recipe="qat")), (0, 1))(x, w),
                                        jax.grad(loss(Int8Config()), (0, 1))(x, w),
                                        jax.grad(plain, (0, 1))(a, b),
                                        jax.grad(plain, (0, 1))(x.astype(dtype), w.astype(dtype))))
    qat, int8, ste, unquantized = grads(x, w, np_fake_quant(x, (1,), dtype), np_fake_quant(w, (0,), dtype))
    for g, i, s, u, operand in zip(qat, int8, ste, unquantized, (x, w)):
        assert g.dtype == operand.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(s.astype(operand.dtype)))
        np.testing.assert_array_equal(np.asarray(i), np.asarray(g))
        assert not np.array_equal(np.asarray(g), np.asarray(u.astype(operand.dtype)))


def test_int8_backward_gradients_are_within_their_quantization_bound():
    """backward="int8": d x = g w^T with g quantized per row m (over n) and w per row k
    (over n); d w = x^T g with x per column k and g per column n (both over m). Each GEMM
    is bounded like the forward: sum of da|b| + |a|db + da db (half steps), plus f32."""
    x, w, t = normal((16, 24), 30) * 2, normal((24, 12), 31), normal((16, 12), 32)
    config = Int8Config(backward="int8")
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(int8_dot_general(x, w, MATMUL, config) * t), (0, 1)))(x, w)
    x64, w64, g64 = x.astype(np.float64), w.astype(np.float64), t.astype(np.float64)

    def bound(a, a_axes, b, b_axes, spec):
        ha = np.broadcast_to(np_scale(a, a_axes) / 2.0, a.shape)
        hb = np.broadcast_to(np_scale(b, b_axes) / 2.0, b.shape)
        return (np.einsum(spec, ha, np.abs(b)) + np.einsum(spec, np.abs(a), hb) + np.einsum(spec, ha, hb)
                + 1e-6 * np.einsum(spec, np.abs(a), np.abs(b)))

    assert np.all(np.abs(np.asarray(dx, np.float64) - g64 @ w64.T) <= bound(g64, (1,), w64, (1,), "mn,kn->mk"))
    assert np.all(np.abs(np.asarray(dw, np.float64) - x64.T @ g64) <= bound(x64, (0,), g64, (0,), "mk,mn->kn"))
    assert not np.allclose(np.asarray(dx), g64 @ w64.T, rtol=1e-6, atol=0)  # it was quantized


def test_stochastic_rounding_is_unbiased():
    """floor(y + u), u ~ U[0, 1): each code is floor(y) or floor(y) + 1 and its mean over n
    draws approaches y. One draw is Bernoulli(frac(y)) plus floor(y): variance <= 1/4, so
    the mean of n = 4096 draws has std <= 0.5 / 64; the bound is 5 of those (a miss
    anywhere among 64 values has probability < 64 * 6e-7). Nearest rounding is biased by
    up to 0.5: fractional parts 0.3 miss that bound by far."""
    scale = jnp.float32(0.25)
    y = np.linspace(-100.3, 100.7, 64, dtype=np.float32)  # fractional parts spread over [0, 1)
    x = jnp.asarray(y * np.float32(0.25))  # exact: a power-of-two step
    n = 4096
    keys = jax.random.split(jax.random.key(0), n)
    codes = np.asarray(jax.jit(jax.vmap(lambda k: quantize_with_scale(x, scale, key=k)))(keys), np.float64)
    assert np.all((codes == np.floor(y)) | (codes == np.floor(y) + 1))
    bound = 5 * 0.5 / np.sqrt(n)
    assert np.all(np.abs(codes.mean(0) - y) <= bound), np.abs(codes.mean(0) - y).max()
    nearest = np.asarray(quantize_with_scale(x, scale), np.float64)
    assert np.abs(nearest - y).max() > 10 * bound


def test_int8_backward_takes_a_key_for_stochastic_gradients():
    """With a key the output gradient is rounded stochastically: the same key gives the same
    gradients, another key others; the forward does not depend on the key."""
    x, w = normal((8, 16), 40), normal((16, 8), 41)
    config = Int8Config(backward="int8")

    @jax.jit
    def run(key):
        return jax.value_and_grad(lambda x: jnp.sum(int8_dot_general(x, w, MATMUL, config, key=key) ** 2))(x)

    (l1, g1), (l2, g2), (l3, g3) = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
    assert float(l1) == float(l2) == float(l3)
    np.testing.assert_array_equal(np.asarray(g1), np.asarray(g2))
    assert not np.array_equal(np.asarray(g1), np.asarray(g3))


# ----------------------------------------------------------------------------- through the policy


def test_ops_dot_general_returns_the_meta_untouched_and_small_matmuls_fall_back():
    """int8 keeps no state: a meta given to an int8 op comes back as the same object. A
    matmul smaller than ``int8.min_size`` runs in the compute dtype, as fp8's does."""
    x, w = jnp.asarray(normal((8, 16), 50)), jnp.asarray(normal((16, 4), 51))
    policy = parse("int8; compute=fp32")
    meta = Fp8Meta.init(policy.fp8)
    out, back = mpx.ops.dot_general(x, w, MATMUL, policy.for_op("fc", "dense"), meta)
    assert back is meta
    np.testing.assert_array_equal(np.asarray(out), np.asarray(int8_dot_general(x, w, MATMUL, policy.int8)))
    small = parse("int8; compute=fp32; int8.min_size=8").for_op("fc", "dense")  # N = 4 < 8
    out, back = mpx.ops.dot_general(x, w, MATMUL, small, None)
    assert back is None
    np.testing.assert_array_equal(np.asarray(out), np.asarray(lax.dot_general(x, w, MATMUL)))


def test_int8_keys_parse_round_trip_and_are_static():
    """Every int8 key from the compact string lands in Int8Config; to_dict round-trips; the
    policy (with its Int8Config) is hashable, a jit static argument."""
    p = parse("bf16; blocks/*/mlp/*->int8; int8.recipe=qat; int8.weight_granularity=tensor; "
              "int8.activation_granularity=tensor; int8.min_size=64")
    assert p.int8 == Int8Config(recipe="qat", weight_granularity="tensor", activation_granularity="tensor",
                                min_size=64)
    assert parse({"preset": "bf16", "rules": [{"match": "blocks/*/mlp/*", "use": "int8"}],
                  "int8": {"recipe": "qat", "weight_granularity": "tensor", "activation_granularity": "tensor",
                           "min_size": 64}}) == p
    assert parse(p.to_dict()) == p and hash(parse(p.to_dict())) == hash(p)
    assert parse("int8; int8.backward=int8").int8 == Int8Config(backward="int8")
    op = p.for_op("blocks/0/mlp/fc", "dense")
    assert (op.precision, op.dtype, op.fp8, op.int8, op.is_int8, op.is_quantized, op.is_fp8) == (
        "int8", jnp.bfloat16, None, p.int8, True, True, False)
    assert op.label == "int8 (qat)"
    assert jax.jit(lambda x, policy: x * policy.int8.min_size, static_argnums=1)(jnp.float32(1), p) == 64


@pytest.mark.parametrize("spec, message", [
    ("bf16; @softmax->int8", r"rule @softmax->int8 asks for int8 on kinds softmax, which are not matmuls; "
                             r"int8 applies to dense, einsum, attention_logits, attention_values, head"),
    ("bf16; int8.recipie=qat", r"unknown key 'recipie' in int8; accepted keys: recipe, backward, "
                               r"weight_granularity, activation_granularity, min_size \(did you mean 'recipe'\?\)"),
    ({"int8": {"granularity": "channel"}}, r"unknown key 'granularity' in int8"),
    ("bf16; int8.recipe=int4", r"int8 recipe 'int4' is not supported; expected one of int8, qat"),
    ("bf16; int8.weight_granularity=token", r"int8 weight_granularity 'token' is not supported; "
                                            r"expected one of channel, tensor"),
    ("bf16; int8.recipe=qat; int8.backward=int8", r"backward='int8' needs recipe='int8'.*int8.backward=compute"),
    ("bf16; int8.min_size=-1", r"int8 min_size must be an integer >= 0, got -1"),
    ("bf16; @dense->int4", r"unknown precision 'int4' .*expected one of fp8, bf16, fp16, fp32, int8 "
                           r"\(did you mean 'int8'\?\)"),
])
def test_bad_int8_specs_name_the_cause(spec, message):
    with pytest.raises(ValueError, match=message):
        parse(spec)


def test_an_int8_rule_without_kind_passes_non_matmuls_on():
    """``blocks/**->int8`` takes the matmuls under blocks; a norm there goes on to the next rule."""
    p = Policy(compute="bf16", rules=(Rule("int8", match="blocks/**"), Rule("fp32", kind="norm")))
    assert p.for_op("blocks/0/fc", "attention_logits").precision == "int8"
    assert (p.for_op("blocks/0/ln", "norm").precision, p.for_op("blocks/0/ln", "norm").rule) == ("fp32", 1)
    assert p.for_op("blocks/0/embed", "embed").precision == "bf16"


TINY = mn.TransformerConfig(vocab_size=256, d_model=32, num_heads=2, num_layers=1, d_ff=64, max_len=32)


def test_mixed_fp8_int8_policy_describes_and_builds_each_op_its_own_way():
    """``fp8; blocks/*/mlp/*->int8``: the MLP projections are int8 (no FP8 meta), the
    attention projections fp8 (one meta each); the table says so row by row."""
    policy = parse("fp8; blocks/*/mlp/*->int8")
    model = mn.TransformerLM(TINY, policy=policy, rngs=nnx.Rngs(0))
    rows = {r.path: (r.precision, r.dtype, r.rule) for r in mpx.inspect.describe(model, policy).rows}
    assert rows["blocks/0/mlp/fc"] == rows["blocks/0/mlp/proj"] == ("int8", "bfloat16", "0: blocks/*/mlp/*->int8")
    assert rows["blocks/0/attn/qkv"] == rows["blocks/0/attn/out"] == ("fp8", "bfloat16", "3: @dense|einsum->fp8")
    assert rows["blocks/0/attn/logits"][0] == "bf16" and rows["head"][0] == "bf16"
    _, _, meta = nnx.split(model, nnx.Param, mn.Fp8MetaVariable)
    with_meta = {"/".join(map(str, path[:-2])) for path, _ in nnx.to_flat_state(meta)}  # .../dot_general/fp8_meta
    assert with_meta == {"blocks/0/attn/qkv", "blocks/0/attn/out"}
    qat = parse("int8; int8.recipe=qat")
    assert {r.precision for r in mpx.inspect.describe(mn.TransformerLM(TINY, policy=qat, rngs=nnx.Rngs(0)), qat).rows
            if r.kind == "dense"} == {"int8 (qat)"}


# ----------------------------------------------------------------------------- training

CORPUS = (pathlib.Path(__file__).parent / "data" / "tiny_corpus.txt").read_bytes()


def lm_batch(step, batch=16, length=32):
    data = np.frombuffer(CORPUS, np.uint8).astype(np.int32)
    starts = np.random.default_rng(step).integers(0, len(data) - length - 1, batch)
    return {"tokens": jnp.asarray(np.stack([data[s: s + length + 1] for s in starts]))}


def train_lm(spec: str, steps: int = 150) -> np.ndarray:
    policy = parse(spec)
    model = mn.TransformerLM(TINY, policy=policy, rngs=nnx.Rngs(0))
    graphdef, params, meta = nnx.split(model, nnx.Param, mn.Fp8MetaVariable)

    def loss_fn(params, meta, batch, rng):
        m = nnx.merge(graphdef, params, meta)
        return m.loss(m(batch["tokens"][:, :-1]), batch["tokens"][:, 1:])

    opt = optax.adamw(1e-2)
    state = mpx.init_train_state(params, opt, policy=policy, fp8_meta=meta)
    lowered = jax.jit(functools.partial(mpx.train_step, loss_fn=loss_fn, optimizer=opt)).lower(state, lm_batch(0))
    int8_dots = len(I8_DOT.findall(lowered.as_text()))
    step = lowered.compile()
    losses = []
    for i in range(steps):
        state, m = step(state, lm_batch(i))
        assert not bool(m.skipped)
        losses.append(float(m.loss))
    return np.array(losses), int8_dots


def test_int8_lm_trains_like_bf16():
    """A 1-layer byte LM, 150 AdamW steps on a 1 KB text, under bf16, int8 and int8 QAT.

    int8 runs its 4 dense matmuls (qkv, out, fc, proj) as s8 x s8 -> s32 dots (4 in the
    step: forward; the gradients in bf16); QAT and bf16 have none. From ln(256) = 5.5
    every run must end below half its start, and each int8 run within 0.05 nats of bf16
    (median of the last 20 steps, helpers.settled; measured gaps 0.003, and 0.003 with ``backward=int8`` too:
    per-row int8 rounding, at most 2**-8 of a row's amax, is small next to bf16's own
    rounding noise at this size)."""
    runs = {spec: train_lm(spec) for spec in ("bf16", "int8", "int8; int8.recipe=qat")}
    assert [dots for _, dots in runs.values()] == [0, 4, 0]
    bf16 = settled(runs["bf16"][0], 20)
    for spec, (losses, _) in runs.items():
        assert losses[0] > 5.0 and settled(losses, 20) < 0.5 * losses[0], (spec, losses[-20:])
        assert abs(settled(losses, 20) - bf16) < 0.05, (spec, settled(losses, 20), bf16)


class RawNnx(nnx.Module):
    """A Linear and a matmul written with ``@`` (captured)."""

    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (16, 32)) * 0.2)
        self.out = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(x @ self.w))


class RawLinen(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.2), (32, 4))
        return jax.nn.relu(nn.Dense(32)(x)) @ w


def test_nnx_and_linen_models_run_int8_without_fp8_meta():
    """apply_policy (NNX) and policy_context (linen) put layer and captured matmuls in int8
    without creating FP8 state, and the train step runs them as s8 dots."""
    policy = parse("int8")
    x = jnp.asarray(normal((8, 16), 60))
    model = mn.apply_policy(RawNnx(nnx.Rngs(0)), policy, x)
    assert {r.path: r.precision for r in mpx.inspect.describe(model, policy, x).rows} == {
        "out": "int8", "dot_general_0": "int8"}
    graphdef, params, fp8_meta, rest = mn.split(model)
    assert jax.tree.leaves(fp8_meta) == []

    def loss_fn(params, fp8_meta, batch, rng):
        return jnp.mean(nnx.merge(graphdef, params, fp8_meta, rest)(batch).astype(jnp.float32) ** 2)

    state = mpx.init_train_state(params, optax.sgd(0.1), policy=policy, fp8_meta=fp8_meta)
    step = functools.partial(mpx.train_step, loss_fn=loss_fn, optimizer=optax.sgd(0.1))
    assert sum(d == ("int8", "int8") for _, d in mpx.inspect.dot_generals(step, state, x)) == 2
    _, metrics = jax.jit(step)(state, x)
    assert not bool(metrics.skipped) and np.isfinite(float(metrics.loss))

    with ml.policy_context(policy):
        variables = RawLinen().init(jax.random.key(0), x)
    params, meta = ml.split_variables(variables)
    assert jax.tree.leaves(meta) == []
    assert {r.path: r.precision for r in mpx.inspect.describe(RawLinen(), policy, x).rows} == {
        "Dense_0": "int8", "dot_general_0": "int8"}

    def linen_fn(params, x):
        with ml.policy_context(policy):
            return RawLinen().apply({"params": params, ml.FP8_COLLECTION: meta}, x)

    assert sum(d == ("int8", "int8") for _, d in mpx.inspect.dot_generals(linen_fn, params, x)) == 2
    assert np.isfinite(np.asarray(jax.jit(linen_fn)(params, x))).all()


def test_readme_int8_example_runs_as_written():
    """The README's INT8 example: the MLP op is int8 (qat), its output is the exact product
    (ones snap to 127 * (1 / 127) = 1 exactly), and the weight's scales are per channel."""
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)
    scope: dict = {}
    exec(compile(next(b for b in blocks if "mpx.int8.quantize" in b), str(readme), "exec"), scope)
    assert (scope["op"].precision, scope["op"].label) == ("int8", "int8 (qat)")
    assert scope["y"].dtype == jnp.bfloat16 and np.all(np.asarray(scope["y"], np.float32) == 64.0)
    assert scope["scale"].shape == (1, 32) and np.all(np.asarray(scope["q"]) == 127)


# ----------------------------------------------------------------------------- GPU: integer GEMMs


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_int8_matmul_compiles_to_an_integer_gemm_on_gpu():
    """On this GPU (autotuned), XLA runs the s8 x s8 -> s32 dot_general as an integer GEMM
    (cuBLASLt ``__cublas$lt$matmul`` on s8 operands, or a Triton GEMM on them), not a float
    GEMM on converted codes. (tests/test_h100.py checks the same deviceless on every run.)"""
    x = jnp.ones((256, 512), jnp.bfloat16)
    w = jnp.ones((512, 256), jnp.float32)

    def f(x, w):
        return int8_dot_general(x, w, (((1,), (0,)), ((), ())), Int8Config(), out_dtype=jnp.bfloat16)

    hlo = jax.jit(f).lower(x, w).compile().as_text()
    gemms = [k.gemm for k in mpx.program.kernels(hlo) if k.kind == "gemm"]
    assert gemms == ["int8"], gemms
