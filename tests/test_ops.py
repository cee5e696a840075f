"""mpx.ops: policy dispatch of dot_general and einsum."""

import jax.numpy as jnp
import numpy as np
import pytest

import mpx
from mpx.ops import dot_general, einsum, einsum_dimension_numbers

FP32 = mpx.parse_policy("fp32").for_op("x", "einsum")
DIMS = (((1,), (0,)), ((), ()))


@pytest.mark.parametrize(
    "subscripts, a_shape, b_shape",
    [
        ("ij,jk->ik", (3, 4), (4, 5)),
        ("ij,kj->ki", (3, 4), (5, 4)),
        ("btd,dhk->bthk", (2, 3, 4), (4, 2, 5)),
        ("bthk,bshk->bhts", (2, 3, 2, 4), (2, 5, 2, 4)),
        ("bhts,bshk->bthk", (2, 2, 3, 5), (2, 5, 2, 4)),
        ("...d,df->...f", (2, 3, 4), (4, 6)),
        ("i,j->ij", (3,), (4,)),
    ],
)
def test_einsum_as_dot_general_equals_jnp_einsum(subscripts, a_shape, b_shape):
    """Integer-valued inputs make every product and sum exact in f32, so equality is exact."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.integers(-3, 4, a_shape), jnp.float32)
    b = jnp.asarray(rng.integers(-3, 4, b_shape), jnp.float32)
    out, meta = einsum(subscripts, a, b, FP32)
    assert meta is None
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jnp.einsum(subscripts, a, b)))


@pytest.mark.parametrize(
    "subscripts, message",
    [
        ("ii,ij->ij", "repeated index"),
        ("ij,jk", "explicit two-operand"),
        ("ijx,jk->ik", "summed within one operand"),
    ],
)
def test_unsupported_einsums_are_clear_errors(subscripts, message):
    with pytest.raises(ValueError, match=message):
        einsum_dimension_numbers(subscripts, 3 if "x" in subscripts else 2, 2)


def test_fp8_op_without_meta_says_how_to_make_one():
    op = mpx.parse_policy("fp8").for_op("mlp/fc", "dense")
    with pytest.raises(ValueError, match=r"Fp8Meta.init\(policy.fp8\)"):
        dot_general(jnp.ones((2, 3)), jnp.ones((3, 4)), DIMS, op)


@pytest.mark.parametrize("name, dtype", [("bf16", jnp.bfloat16), ("fp16", jnp.float16), ("fp32", jnp.float32)])
def test_non_fp8_ops_compute_in_their_dtype(name, dtype):
    op = mpx.parse_policy(name).for_op("mlp/fc", "dense")
    out, _ = dot_general(jnp.ones((2, 3)), jnp.ones((3, 4), jnp.float32), DIMS, op)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.full((2, 4), 3.0))


def test_gemm_dims_of_dense_and_batched_dot_generals():
    assert mpx.ops.gemm_dims((8, 16), (16, 64), DIMS) == (8, 16, 64)
    # attention logits (B, T, H, K) x (B, S, H, K), batch (B, H), contract K: M=T, K=K, N=S
    assert mpx.ops.gemm_dims((2, 5, 3, 4), (2, 7, 3, 4), (((3,), (3,)), ((0, 2), (0, 2)))) == (5, 4, 7)


def test_fp8_matmuls_below_min_size_run_in_the_compute_dtype():
    """fp8.min_size=32: an 8x16 @ 16x64 matmul (smallest dimension 8) is the plain bf16
    dot, bit for bit, and its meta observes nothing (it will not advance); a 64^3 one
    is an FP8 matmul (the output differs from bf16, one call observed)."""
    import jax

    policy = mpx.parse_policy("fp8; fp8.min_size=32; fp8.amax_history=4")
    op = policy.for_op("mlp/fc", "dense")
    meta = mpx.Fp8Meta.init(policy.fp8)
    rng = np.random.default_rng(0)
    for (m, k, n), fp8 in (((8, 16, 64), False), ((64, 64, 64), True)):
        a = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        out, _ = dot_general(a, b, DIMS, op, meta)
        plain = jax.lax.dot_general(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), DIMS)
        assert np.array_equal(np.asarray(out, np.float32), np.asarray(plain, np.float32)) != fp8
        seen = jax.grad(lambda mt: jnp.sum(dot_general(a, b, DIMS, op, mt)[0].astype(jnp.float32)))(meta)
        assert float(seen.lhs.calls) == (1.0 if fp8 else 0.0)
