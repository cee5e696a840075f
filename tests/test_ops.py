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
