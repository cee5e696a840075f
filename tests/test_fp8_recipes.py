"""FP8 scaling recipes beyond one scale per tensor: per row, DeepSeek tiles and blocks, OCP MX,
and a granularity (or the compute dtype) per GEMM role.

The quantizers are checked bit for bit against numpy written here from the recipes' own
definitions (ml_dtypes for the FP8 casts); the matmuls against float64 with the same
quantization, and exactly on inputs each recipe represents without error.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import mpx
from mpx.fp8 import Fp8Config, Fp8Meta, Fp8Scale, fp8_dot_general
from mpx.fp8._granular import quantize_canonical

from helpers import ref_scale

F8 = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2}
JF8 = {"e4m3": jnp.float8_e4m3fn, "e5m2": jnp.float8_e5m2}
EMAX = {"e4m3": 8, "e5m2": 15}  # the element formats' largest normal exponents (OCP MX v1.0, table 1)
RECIPES = {
    "row": Fp8Config(granularity="row"),
    "block": Fp8Config(granularity="block", format="e4m3"),
    "block32": Fp8Config(granularity="block", block_size=32),
    "mx": Fp8Config(granularity="mx", format="e4m3"),
    "mx-hybrid": Fp8Config(granularity="mx"),
    "row-gw-hp": Fp8Config(granularity="row", weight_grad="compute"),
    "tensor-fwd-row-bwd": Fp8Config(recipe="current", input_grad="row", weight_grad="row"),
    "row-wgrad-e4m3": Fp8Config(granularity="row", weight_grad_format="e4m3"),  # E5M2 dy.w^T, E4M3 x^T.dy
}


# ----------------------------------------------------------------------------- numpy references


def np_cast(y: np.ndarray, fmt: str) -> np.ndarray:
    """Saturating cast of f32 values to FP8; a non-finite value becomes NaN."""
    limit = np.float32(ml_dtypes.finfo(F8[fmt]).max)
    clipped = np.where(np.isfinite(y), np.clip(y, -limit, limit), np.nan).astype(np.float32)
    return clipped.astype(F8[fmt])


def np_row_scale(peak: np.float32, fmt: str) -> np.float32:
    """`ref_scale` of the format's largest value (the largest power of two that keeps the amax
    within it); 1 for a zero or non-finite amax, or one whose scale overflows f32."""
    limit = float(ml_dtypes.finfo(F8[fmt]).max)
    if not (np.isfinite(peak) and peak > 0):
        return np.float32(1.0)
    with np.errstate(over="ignore"):
        scale = ref_scale(peak, limit)
    return scale if np.isfinite(scale) else np.float32(1.0)


def np_mx_scale(peak: float, fmt: str) -> np.float32:
    """OCP MX v1.0 section 6.3: X = 2**(floor(log2(amax)) - emax_elem), clamped to E8M0's
    exponents [-127, 127]; an all-zero block takes -127; a non-finite one is NaN. As a
    multiplier into the element format: 1 / X."""
    if not np.isfinite(peak):
        return np.float32(np.nan)
    if peak == 0:
        exponent = -127
    else:
        mantissa, e = math.frexp(float(peak))  # peak = mantissa * 2**e, mantissa in [0.5, 1)
        exponent = min(max(e - 1 - EMAX[fmt], -127), 127)
    return np.float32(2.0 ** -exponent)


def np_quantize(x: np.ndarray, granularity: str, fmt: str, *, weight=False, block=128):
    """(codes (F, K), scales (F, nb)) of a 2-D operand (rows F, contraction K), tile by tile;
    a tile holding inf or NaN has an infinite amax (row and block scales fall back to 1, MX's
    is NaN)."""
    x = np.asarray(x, np.float32)
    rows, k = x.shape
    size = {"row": k, "block": block, "mx": 32}[granularity]
    nb = -(-k // size)
    peaks = np.zeros((rows, nb), np.float32)
    for r in range(rows):
        for j in range(nb):
            tile = x[r, j * size:(j + 1) * size]
            peaks[r, j] = np.max(np.abs(tile)) if np.isfinite(tile).all() else np.inf
    if granularity == "block" and weight:  # a weight's block: `size` rows share their tiles' max
        for r0 in range(0, rows, size):
            with np.errstate(invalid="ignore"):
                peaks[r0:r0 + size] = np.max(peaks[r0:r0 + size], axis=0)
    scale_of = (lambda p: np_mx_scale(p, fmt)) if granularity == "mx" else (lambda p: np_row_scale(p, fmt))
    scales = np.vectorize(scale_of, otypes=[np.float32])(peaks)
    per_element = np.repeat(scales, size, axis=1)[:, :k]
    return np_cast(x * per_element, fmt), scales


def same_codes(a, b) -> bool:
    """Bit-equal FP8 arrays (NaN equal to NaN whatever its sign)."""
    a, b = np.asarray(a), np.asarray(b)
    nan_a, nan_b = np.isnan(a.astype(np.float32)), np.isnan(b.astype(np.float32))
    return np.array_equal(nan_a, nan_b) and np.array_equal(a.view(np.uint8)[~nan_a], b.view(np.uint8)[~nan_b])


def awkward(rows: int, k: int, seed: int) -> np.ndarray:
    """Values over 12 decades, a zero row, an inf in one tile, a NaN in another, a tile of
    subnormal-sized values (for flushes), and a ragged contraction length."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, k)) * 10.0 ** rng.integers(-6, 6, (rows, 1))).astype(np.float32)
    x[1] = 0.0
    x[2, 5] = np.inf
    x[3, 40] = np.nan
    x[4, :32] *= 1e-30
    return x


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("granularity, weight, block", [("row", False, 128), ("block", False, 128),
                                                        ("block", True, 128), ("block", True, 16), ("mx", False, 128)])
def test_quantize_matches_numpy_bit_for_bit(granularity, weight, block, fmt):
    """Codes and scales of 130 rows x a contraction of 200 (ragged for 128, 32 and 16; the
    weight's row blocks ragged too), with zeros, inf, NaN and a flushed tile."""
    x = awkward(130, 200, seed=3)
    got = quantize_canonical(jnp.asarray(x)[None], granularity, JF8[fmt], weight=weight, block_size=block)
    codes, scales = np_quantize(x, granularity, fmt, weight=weight, block=block)
    assert np.array_equal(np.asarray(got.scale[0]), scales, equal_nan=True)
    assert same_codes(np.asarray(got.q[0])[:, :200], codes)
    assert not np.asarray(got.q[0, :, 200:]).astype(np.float32).any()  # the padding quantizes to zeros
    if granularity == "mx":  # every scale a power of two (E8M0), an inf or NaN tile all NaN
        finite = scales[np.isfinite(scales)]
        assert (np.frexp(finite)[0] == 0.5).all()
        assert np.isnan(np.asarray(got.q[0, 2, :32]).astype(np.float32)).all()
    else:  # the non-finite element alone is NaN; the rest of its tile keeps a finite code
        assert np.isnan(np.asarray(got.q[0, 2, 5]).astype(np.float32))
        assert np.isfinite(np.asarray(got.q[0, 2, 6]).astype(np.float32))


def test_mx_rounds_the_shared_exponent_down_and_saturates_what_is_left():
    """A tile whose amax is 500 (= 1.95 * 2**8): X = 2**0, so 500 clamps to 448 (E4M3's largest
    normal), as the spec's floor(log2) makes it; 0.0039 (< 2**-9, E4M3's smallest subnormal is
    2**-9) rounds to 2**-9 or 0 by round-to-nearest-even on the element grid."""
    tile = np.zeros(32, np.float32)
    tile[:3] = [500.0, 3.0, 2.0**-9 * 0.75]
    got = quantize_canonical(jnp.asarray(tile)[None, None], "mx", jnp.float8_e4m3fn)
    assert float(got.scale[0, 0, 0]) == 1.0
    assert np.asarray(got.q[0, 0, :3]).astype(np.float32).tolist() == [448.0, 3.0, 2.0**-9]


def test_a_block_scaled_gemm_is_handed_the_codes_and_exact_e8m0_tile_scales():
    """What a Blackwell GPU's block-scaled GEMM gets under MX (`mx_operand`, for
    ``jax.nn.scaled_matmul``): the same E4M3 codes, and per 1x32 tile the E8M0 power of two
    ``2**X`` (OCP MX's X, written as numpy's bytes: exponent + 127; 255 is NaN) that brings them
    back. Their product (scaled_matmul's documented math, in float64) is the spelled-out
    product of the H100 / CPU program up to f32 accumulation order."""
    from mpx.fp8._granular import mx_operand, scaled_product

    x, w = awkward(6, 200, seed=4), np.random.default_rng(5).standard_normal((40, 200)).astype(np.float32)
    qx = quantize_canonical(jnp.asarray(x)[None], "mx", jnp.float8_e4m3fn)
    qw = quantize_canonical(jnp.asarray(w)[None], "mx", jnp.float8_e4m3fn)
    codes, e8m0 = mx_operand(qx)
    want_codes, want_scales = np_quantize(x, "mx", "e4m3")
    assert same_codes(codes[0, :, :200], want_codes) and e8m0.dtype == jnp.float8_e8m0fnu
    nan = np.isnan(want_scales)
    exponent = np.where(nan, 128, -np.log2(np.where(nan, 1, want_scales))).astype(np.int64)  # X of each tile
    assert np.array_equal(np.asarray(e8m0)[0].view(np.uint8).astype(np.int64), exponent + 127)
    # the documented math of scaled_matmul on clean rows (awkward()'s rows 2 and 3 hold inf / NaN)
    rows = [0, 1, 4, 5]
    (cw, sw) = mx_operand(qw)
    dequant = lambda c, e: np.asarray(c, np.float64) * np.repeat(np.asarray(e.astype(jnp.float32), np.float64), 32, -1)  # noqa: E731
    reference = dequant(codes[0], e8m0[0])[rows] @ dequant(cw[0], sw[0]).T
    spelled = np.asarray(scaled_product(qx, qw, jnp.float32))[0][rows]
    np.testing.assert_allclose(spelled, reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


# ----------------------------------------------------------------------------- the matmuls

# (einsum spec, lhs shape, rhs shape, rhs is a weight): a dense layer, a 3-D activation, an
# einsum weight with two output axes, and attention logits (batch axes, two activations).
LAYOUTS = {
    "dense": ("mk,kn->mn", (48, 200), (200, 40), True),
    "tokens": ("bsk,kn->bsn", (2, 24, 72), (72, 36), True),
    "einsum_weight": ("bsk,khd->bshd", (2, 16, 64), (64, 3, 16), True),
    "attention": ("bhqd,bhkd->bhqk", (2, 2, 16, 96), (2, 2, 24, 96), False),
}


def dims_of(spec: str):
    """lax.dot_general dimension numbers of a two-operand einsum."""
    ins, out = spec.split("->")
    a, b = ins.split(",")
    contract = [c for c in a if c in b and c not in out]
    batch = [c for c in a if c in b and c in out]
    return ((tuple(a.index(c) for c in contract), tuple(b.index(c) for c in contract)),
            (tuple(a.index(c) for c in batch), tuple(b.index(c) for c in batch)))


def on_grid(shape, seed) -> np.ndarray:
    """Integers in [-7, 7] with +-7 wherever the index sum is even: every tile along any axis
    holds a 7, so each per-row, tile, block or MX scale is a power of two (448 / 7 = 64,
    57344 / 7 = 8192; MX: 2**(2 - emax)) and every value is exact in E4M3 and E5M2."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-6, 7, shape).astype(np.float32)
    even = (np.indices(shape).sum(axis=0) % 2) == 0
    return np.where(even, 7.0 * rng.choice([-1.0, 1.0], shape), x).astype(np.float32)


def run(config, spec, lhs, rhs, g, *, weight):
    """(out, d_lhs, d_rhs) of fp8_dot_general in f32 with output cotangent ``g``."""
    meta = Fp8Meta.init(config)

    @jax.jit  # one program: op by op, the many small ops of the recipes take longer than a compile
    def forward_and_back(a, b, g):
        def f(a, b):
            return fp8_dot_general(a, b, dims_of(spec), meta, out_dtype=jnp.float32, rhs_is_weight=weight)[0]

        out, vjp = jax.vjp(f, a, b)
        return (out, *vjp(g))

    return forward_and_back(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(g))


def gradient_specs(spec: str):
    """The einsums of the input and the weight gradient of ``spec``: (g, rhs -> lhs), (g, lhs -> rhs)."""
    ins, out = spec.split("->")
    a, b = ins.split(",")
    return f"{out},{b}->{a}", f"{out},{a}->{b}"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_matmul_and_both_gradients_are_exact_on_representable_inputs(recipe, layout):
    """Inputs every recipe represents exactly (`on_grid`): the output and both gradients equal
    the float64 products bit for bit (integer sums below 2**24 are exact in f32), whatever the
    granularity of each GEMM, ragged contractions (200, 72) included."""
    spec, lhs_shape, rhs_shape, weight = LAYOUTS[layout]
    out_shape = jax.eval_shape(lambda a, b: jnp.einsum(spec, a, b), jnp.zeros(lhs_shape), jnp.zeros(rhs_shape)).shape
    x, w, g = on_grid(lhs_shape, 0), on_grid(rhs_shape, 1), on_grid(out_shape, 2)
    out, dx, dw = run(RECIPES[recipe], spec, x, w, g, weight=weight)
    dx_spec, dw_spec = gradient_specs(spec)
    f64 = lambda s, a, b: np.einsum(s, a.astype(np.float64), b.astype(np.float64))  # noqa: E731
    assert np.array_equal(np.asarray(out), f64(spec, x, w))
    assert np.array_equal(np.asarray(dx), f64(dx_spec, g, w))
    assert np.array_equal(np.asarray(dw), f64(dw_spec, g, x))


def emulate(spec_x, x, spec_y, y, spec_out, granularity, fmts, weights, block):
    """float64 einsum of two operands, each quantized by `np_quantize` along the contraction
    (the letters both share and the output drops) and dequantized."""
    contract = [c for c in spec_x if c in spec_y and c not in spec_out]

    def dequantized(s, v, fmt, weight):
        if granularity == "compute":
            return v.astype(np.float64)
        keep = [i for i, c in enumerate(s) if c not in contract]
        moved = np.transpose(v, keep + [s.index(c) for c in contract])
        flat = moved.reshape(math.prod(moved.shape[:len(keep)]), -1)
        codes, scales = np_quantize(flat, granularity, fmt, weight=weight, block=block)
        size = {"row": flat.shape[1], "block": block, "mx": 32}[granularity]
        values = codes.astype(np.float64) / np.repeat(scales, size, axis=1)[:, :flat.shape[1]]
        return np.transpose(values.reshape(moved.shape), np.argsort(keep + [s.index(c) for c in contract]))

    return np.einsum(f"{spec_x},{spec_y}->{spec_out}", dequantized(spec_x, x, fmts[0], weights[0]),
                     dequantized(spec_y, y, fmts[1], weights[1]))


@pytest.mark.parametrize("layout", ["dense", "einsum_weight", "attention"])
@pytest.mark.parametrize("recipe", ["row", "block", "mx-hybrid", "row-gw-hp", "row-wgrad-e4m3"])
def test_matmul_and_gradients_match_a_float64_emulation(recipe, layout):
    """Gaussian inputs (not on any grid): each GEMM against float64 of the same quantization.
    The FP8 products are exact in f32; what differs is f32 accumulation and the f32 rescale
    (a few ulps of the largest partial sums): bound 1e-5 of the output's largest magnitude.
    A GEMM left in the compute dtype (f32 here) is the plain product."""
    config = RECIPES[recipe]
    spec, lhs_shape, rhs_shape, weight = LAYOUTS[layout]
    rng = np.random.default_rng(5)
    x = rng.standard_normal(lhs_shape).astype(np.float32)
    w = (rng.standard_normal(rhs_shape) * 0.05).astype(np.float32)
    out_shape = jax.eval_shape(lambda a, b: jnp.einsum(spec, a, b), jnp.zeros(lhs_shape), jnp.zeros(rhs_shape)).shape
    g = (rng.standard_normal(out_shape) * 1e-3).astype(np.float32)
    out, dx, dw = run(config, spec, x, w, g, weight=weight)
    a, b = spec.split("->")[0].split(",")
    o = spec.split("->")[1]
    grad = {role: jnp.dtype(config.grad_dtype_of(role)).name.replace("float8_", "").replace("fn", "")
            for role in ("input_grad", "weight_grad")}  # each GEMM's gradient format: e4m3 or e5m2
    expected = {
        "out": emulate(a, x, b, w, o, config.gemm("forward"), ("e4m3", "e4m3"), (False, weight), config.block_size),
        "dx": emulate(o, g, b, w, a, config.gemm("input_grad"), (grad["input_grad"], "e4m3"), (False, weight),
                      config.block_size),
        "dw": emulate(o, g, a, x, b, config.gemm("weight_grad"), (grad["weight_grad"], "e4m3"), (False, False),
                      config.block_size),
    }
    for name, got in (("out", out), ("dx", dx), ("dw", dw)):
        ref = expected[name]
        err = np.max(np.abs(np.asarray(got, np.float64) - ref)) / np.max(np.abs(ref))
        assert err < 1e-5, (name, err)


def test_each_gradient_gemm_takes_its_own_format_under_delayed_scaling():
    """One scale per tensor, delayed, ``weight_grad_format=e4m3`` under ``hybrid``: the input
    gradient quantizes dy in E5M2 with the stored scale S, the weight gradient in E4M3 with
    S * 448 / 57344 (= S / 128: the same amax in (224, 448]), each against numpy /
    ml_dtypes in float64 (f32 accumulation: 1e-6 of the largest value); the hybrid default gives
    E5M2 to both, and the traced backward holds one dy of each format."""
    config = Fp8Config(weight_grad_format="e4m3", amax_history=4)
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((32, 64)).astype(np.float32), (rng.standard_normal((64, 16)) * 0.1).astype(np.float32)
    g = (rng.standard_normal((32, 16)) * 1e-3).astype(np.float32)
    scales = {"lhs": ref_scale(4.5, 448.0), "rhs": ref_scale(0.5, 448.0), "grad": ref_scale(4e-3, 57344.0)}
    meta = Fp8Meta.init(config)
    meta = meta.replace(**{k: getattr(meta, k).replace(scale=jnp.float32(v), amax_history=jnp.ones(4))
                           for k, v in scales.items()})  # a history: the stored scales are used as they are
    dims = dims_of("mk,kn->mn")

    def grads(config):
        m = meta.replace(config=config)
        _, vjp = jax.vjp(lambda a, b: fp8_dot_general(a, b, dims, m, out_dtype=jnp.float32)[0], x, w)
        return vjp(jnp.asarray(g))

    def q(v, scale, fmt):  # float64 value of v's code in fmt, dequantized
        return np_cast(v * scale, fmt).astype(np.float64) / np.float64(scale)

    qx, qw = q(x, scales["lhs"], "e4m3"), q(w, scales["rhs"], "e4m3")
    dx, dw = jax.jit(grads, static_argnums=0)(config)
    np.testing.assert_allclose(dx, q(g, scales["grad"], "e5m2") @ qw.T, rtol=0, atol=1e-6 * np.abs(dx).max())
    e4m3_scale = np.float32(scales["grad"] / 128)
    np.testing.assert_allclose(dw, qx.T @ q(g, e4m3_scale, "e4m3"), rtol=0, atol=1e-6 * np.abs(dw).max())
    hybrid_dw = jax.jit(grads, static_argnums=0)(Fp8Config(amax_history=4))[1]
    assert np.abs(np.asarray(hybrid_dw) - np.asarray(dw)).max() > 1e-3 * np.abs(dw).max()  # E5M2's dy is coarser
    backward = str(jax.make_jaxpr(lambda a, b: grads(config))(x, w))
    assert "f8_e4m3fn[32,16]" in backward and "f8_e5m2[32,16]" in backward


def test_finer_scales_keep_what_outlier_channels_flush():
    """An activation (64 tokens x 512 channels) whose channels 3, 5, 7, 9 are 1e6x the rest (the
    case finer scales are for). One scale per tensor, or per row (each token holds outliers),
    sets the scale by the outliers and flushes the small values (relative error of the small
    values ~1); 1x128 tiles lose only the first tile of each row (error sqrt(1/4) = 0.5), MX's
    1x32 tiles one in 16 (sqrt(1/16) = 0.25). Bounds: those fractions with 20% slack."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64, 512)).astype(np.float32) * 1e-3
    outliers = [3, 5, 7, 9]
    x[..., outliers] *= 1e6
    small = np.ones(512, bool)
    small[outliers] = False

    def error(granularity, **kw):
        q = quantize_canonical(jnp.asarray(x), granularity, jnp.float8_e4m3fn, **kw)
        scale = np.asarray(q.scale) if q.scale.ndim == 0 else np.repeat(np.asarray(q.scale), q.block, axis=-1)[..., :512]
        back = np.asarray(q.q[..., :512]).astype(np.float64) / scale
        return float(np.linalg.norm((back - x)[..., small]) / np.linalg.norm(x[..., small]))

    tensor = error("tensor", tensor_scale=jnp.float32(448.0) / jnp.max(jnp.abs(x)))
    row, block, mx = error("row"), error("block"), error("mx")
    assert tensor > 0.95 and row > 0.95, (tensor, row)
    assert 0.4 < block < 0.6 and 0.2 < mx < 0.3, (block, mx)


# ----------------------------------------------------------------------------- in models and steps


def fp8_dots(calls):
    """{op path: number of dot_generals with two FP8 operands} among a traced step's ``calls``
    (`mpx.inspect.dot_generals`), and the number of those with none."""
    fp8, other = {}, {}
    for where, dtypes in calls:
        paths = mpx._naming.op_paths(where)
        if paths:
            table = fp8 if all("float8" in d for d in dtypes) else other
            table[paths[-1]] = table.get(paths[-1], 0) + 1
    return fp8, other


@pytest.mark.parametrize("spec, per_op", [("fp8-rowwise", 3), ("fp8-rowwise-gw-hp", 2), ("mxfp8", 3),
                                          ("fp8-block; fp8.forward=compute", 2)])
def test_a_gemm_left_in_the_compute_dtype_is_not_fp8_in_the_program(spec, per_op):
    """The full TransformerLM step (scanned layers): each fp8 op has ``per_op`` FP8 GEMMs and
    the rest in bf16. A block or MX GEMM is one dot_general with the blocks as a batch axis."""
    from helpers import lm_step

    _, policy, step, args = lm_step(spec, scan=True)
    calls = mpx.inspect.dot_generals(step, *args)
    fp8, other = fp8_dots(calls)
    fp8_ops = [p for p in set(fp8) | set(other) if "attn/qkv" in p or "mlp" in p or "attn/out" in p]
    assert fp8_ops and all(fp8.get(p, 0) == per_op for p in fp8_ops), fp8
    assert all(other.get(p, 0) == 3 - per_op for p in fp8_ops), other
    assert all(d == ("bfloat16", "bfloat16") for p, d in calls
               if not all("float8" in x for x in d) and any(q in p for q in ("mlp", "attn/qkv")))


def train(spec, steps, *, scan=False):
    """Losses of a small TransformerLM on a fixed token stream, under ``spec``."""
    from helpers import lm_step

    _, _, step, (state, batch_abstract) = lm_step(spec, scan=scan)
    step = jax.jit(step)
    tokens = jax.random.randint(jax.random.key(0), batch_abstract.shape, 0, 64)
    losses = []
    for _ in range(steps):
        state, m = step(state, tokens)
        losses.append(float(m.loss))
    return losses, state


@pytest.fixture(scope="module")
def trained():
    """bf16 and two recipes trained on the scanned stack, one compile each: row scales with the
    weight gradient in bf16 (a per-row GEMM and a compute one) and MX (GEMMs per block, as
    DeepSeek's blocks are)."""
    return {name: train(name, 12, scan=True) for name in ("bf16", "fp8-rowwise-gw-hp", "mxfp8")}


def test_every_recipe_trains_a_scanned_stack_like_bf16(trained):
    """12 steps on a repeated batch (memorisation): every recipe's loss falls as bf16's does
    (ln 256 = 5.55 at the start) and ends within 2% of it: measured 0.1-0.6%; the recipes' FP8
    error (3-6% per GEMM) averages out over the steps. Every layer's meta observed its own
    tensors (the stack's metas differ)."""
    base = trained["bf16"][0]
    for name, (losses, state) in trained.items():
        assert losses[-1] < losses[0] - 0.5, (name, losses)
        assert abs(losses[-1] - base[-1]) < 0.02 * base[-1], (name, losses[-1], base[-1])
        if name != "bf16":
            metas = mpx.fp8._meta.metas_of(state.fp8_meta)
            stacked = [m for m in metas if m.stack]
            histories = [np.asarray(s.amax_history) for m in stacked for s in (m.lhs, m.grad)]
            assert stacked and all(not np.array_equal(h[0], h[1]) for h in histories)


def two_matmuls(name):
    """x.w1 -> tanh -> .w2 under the recipe ``name``: (loss_fn, optimizer, state, x)."""
    config = mpx.parse_policy(name).fp8
    dims = dims_of("mk,kn->mn")

    def loss_fn(params, meta, batch, rng):
        h, m1 = fp8_dot_general(batch["x"], params["w1"], dims, meta["l1"], rhs_is_weight=True)
        y, m2 = fp8_dot_general(jnp.tanh(h), params["w2"], dims, meta["l2"], rhs_is_weight=True)
        return jnp.mean(jnp.exp(batch["t"] * y))

    keys = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(keys[0], (64, 64)) / 8, "w2": jax.random.normal(keys[1], (64, 48)) / 8}
    meta = {"l1": Fp8Meta.init(config), "l2": Fp8Meta.init(config)}
    opt = optax.adam(1e-2)
    return loss_fn, opt, mpx.init_train_state(params, opt, fp8_meta=meta), jax.random.normal(keys[2], (32, 64))


@pytest.mark.parametrize("name", ["fp8-rowwise-gw-hp", "mxfp8", "fp8-block"])
def test_an_overflow_skips_the_step_under_every_recipe(name):
    """Two FP8 matmuls (x.w1 -> tanh -> .w2) under each recipe: after a clean step, an inf
    input entry and an overflowing loss each skip the step with params, optimizer state and
    FP8 meta untouched, as under one scale per tensor; a clean step then trains."""
    loss_fn, opt, state, x = two_matmuls(name)
    step = mpx.make_train_step(loss_fn, opt, donate=False)
    state, m = step(state, {"x": x, "t": jnp.float32(1.0)})
    assert not bool(m.skipped)
    before = state
    for poisoned in ({"x": x.at[3, 5].set(jnp.inf), "t": jnp.float32(1.0)}, {"x": x, "t": jnp.float32(1e4)}):
        state, m = step(state, poisoned)
        assert bool(m.skipped), name
    for a, b in zip(jax.tree.leaves((state.params, state.opt_state, state.fp8_meta)),
                    jax.tree.leaves((before.params, before.opt_state, before.fp8_meta))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    state, m = step(state, {"x": x, "t": jnp.float32(1.0)})
    assert not bool(m.skipped) and not np.array_equal(np.asarray(state.params["w1"]), np.asarray(before.params["w1"]))


@pytest.mark.parametrize("name", ["fp8-rowwise", "mxfp8"])
def test_a_step_that_does_not_count_under_a_recipe_changes_nothing_but_the_fractions(name):
    """``fp8_statistics=False`` under a recipe (the unlogged steps' program): params, optimizer
    state, scales, histories and amaxes are the counting step's bit for bit; the saturated /
    flushed fractions are the ones the state came in with; an overflow is still skipped."""
    loss_fn, opt, state, x = two_matmuls(name)
    lean, quiet = (jax.jit(functools.partial(mpx.train_step, loss_fn=loss_fn, optimizer=opt, fp8_bootstrap=False,
                                             fp8_statistics=count)) for count in (True, False))
    batch = {"x": x, "t": jnp.float32(1.0)}
    # fractions to keep: every other column a millionth of the rest flushes in its row or tile
    state, _ = lean(state, {"x": x.at[:, ::2].multiply(1e-6), "t": jnp.float32(1.0)})
    counted, _ = lean(state, batch)
    kept, _ = quiet(state, batch)
    fractions = lambda s: [(float(t.saturated), float(t.flushed)) for m in s.fp8_meta.values()  # noqa: E731
                           for t in (m.lhs, m.rhs, m.grad)]
    strip = lambda s: s.replace(rng=None, fp8_meta=jax.tree.map(  # noqa: E731
        lambda t: t.replace(saturated=None, flushed=None), s.fp8_meta, is_leaf=lambda t: isinstance(t, Fp8Scale)))
    for a, b in zip(jax.tree.leaves(strip(counted)), jax.tree.leaves(strip(kept))):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert fractions(kept) == fractions(state) and fractions(counted) != fractions(state)
    poisoned, m = quiet(state, {"x": x.at[3, 5].set(jnp.inf), "t": jnp.float32(1.0)})
    assert bool(m.skipped) and all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                                   zip(jax.tree.leaves(poisoned.params), jax.tree.leaves(state.params)))


def test_a_captured_model_runs_every_recipe():
    """A plain NNX model with matmuls written as jnp.einsum (captured, no layer hook): each
    recipe gives its three GEMMs per captured op (forward FP8, both gradients FP8 but the
    weight gradient of gw-hp), and its output is within 6% of f32 (measured 3-4%)."""

    class Plain(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (64, 32)) / 8)

        def __call__(self, x):
            return jnp.einsum("bk,kn->bn", x, self.w[...])

    x = jax.random.normal(jax.random.key(3), (16, 64))
    exact = Plain(nnx.Rngs(0))(x)
    for name, per_op in (("fp8-rowwise", 3), ("fp8-rowwise-gw-hp", 2), ("mxfp8", 3), ("fp8-block", 3)):
        model = Plain(nnx.Rngs(0))
        mpx.apply_policy(model, mpx.parse_policy(f"{name}; @einsum->fp8"), x)
        out = model(x)
        assert float(jnp.linalg.norm(out - exact) / jnp.linalg.norm(exact)) < 0.06, name
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, rest, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

        n_fp8 = sum(all("float8" in d for d in dtypes) for _, dtypes in mpx.inspect.dot_generals(jax.grad(loss), params, rest))
        assert n_fp8 == per_op, (name, n_fp8)


def test_describe_names_each_recipe_and_warns_of_blocks_spelled_out_on_an_h100():
    """The precision column names the recipe; for an H100 (whose FP8 GEMMs take one scale per
    operand) a block or MX recipe is a `SpelledOutBlocks` warning and a note; row scales are not;
    for a B200 MX is not (its GEMMs take MX tiles), DeepSeek's blocks are."""
    import warnings

    from helpers import lm_step

    from mpx.inspect import SpelledOutBlocks, describe

    model, policy, _, _ = lm_step("mxfp8", layers=1)
    with pytest.warns(SpelledOutBlocks, match=r"4 fp8 ops scale in blocks \(mx\): h100's FP8 GEMMs take one scale"):
        table = describe(model, policy, device="h100")
    assert {r.precision for r in table.rows if r.precision.startswith("fp8")} == {"fp8 (mx)"}
    assert any("scale in blocks" in n for n in table.notes)
    with warnings.catch_warnings():  # a B200's GEMMs take MX tiles themselves
        warnings.simplefilter("error", SpelledOutBlocks)
        assert not any("scale in blocks" in n for n in describe(model, policy, device="b200").notes)
    model, policy, _, _ = lm_step("fp8-block", layers=1)
    with pytest.warns(SpelledOutBlocks, match=r"\(block\): b200's FP8 GEMMs take block scales of mx only"):
        describe(model, policy, device="b200")
    model, policy, _, _ = lm_step("fp8-rowwise-gw-hp", layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpelledOutBlocks)
        table = describe(model, policy, device="h100")
    assert {r.precision for r in table.rows if r.precision.startswith("fp8")} == {"fp8 (row; weight_grad compute)"}
