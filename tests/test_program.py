"""mpx.program's reading of an optimized program, checked against XLA's own cost analysis on
this machine's backend (the one backend where ``cost_analysis()`` answers): the bytes it
derives from the HLO's shapes, and the GEMM flops, must be XLA's."""

import math

import jax
import jax.numpy as jnp
import pytest

import mpx


def compiled(fn, *args):
    return jax.jit(fn).lower(*args).compile()


PROGRAMS = {
    # a GEMM and an elementwise epilogue
    "matmul_tanh_mul": (lambda a, b, c: jnp.tanh(a @ b) * c,
                        (jnp.ones((128, 256)), jnp.ones((256, 64)), jnp.ones((128, 64)))),
    # a reduction, a transpose and a broadcast: no GEMM
    "softmax_t": (lambda x: jax.nn.softmax(x.T, axis=-1), (jnp.ones((96, 48)),)),
    # a batched bf16 GEMM into f32 and a convert
    "batched_bf16": (lambda a, b: jnp.einsum("bij,bjk->bik", a, b, preferred_element_type=jnp.float32
                                             ).astype(jnp.bfloat16),
                     (jnp.ones((4, 32, 64), jnp.bfloat16), jnp.ones((4, 64, 16), jnp.bfloat16))),
}


@pytest.mark.parametrize("name", PROGRAMS)
def test_bytes_and_gemm_flops_are_xlas_on_this_backend(name):
    """Bytes: every kernel's operands and results, exactly XLA's "bytes accessed". Flops: the
    GEMMs' 2*M*N*K; XLA's count adds the elementwise and reduction flops, which the roofline
    leaves to the bytes: a few per output element here (softmax: max, subtract, exp, sum,
    divide), so XLA's count lies between ours and ours + 4 per output element."""
    fn, args = PROGRAMS[name]
    program = compiled(fn, *args)
    cost = program.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    kernels = mpx.program.kernels(program.as_text())
    assert sum(k.bytes * k.launches for k in kernels) == cost["bytes accessed"]
    gemm_flops = sum(k.flops for k in kernels if k.kind == "gemm")
    elementwise = 4 * math.prod(jax.eval_shape(fn, *args).shape)
    assert gemm_flops <= cost["flops"] <= gemm_flops + elementwise, (gemm_flops, cost["flops"])
    if name == "matmul_tanh_mul":
        assert gemm_flops == 2 * 128 * 256 * 64
    if name == "batched_bf16":
        assert [k.gemm for k in kernels if k.kind == "gemm"] == ["bf16"] and gemm_flops == 2 * 4 * 32 * 64 * 16


def test_a_scan_launches_its_body_per_iteration_and_reads_one_slice_per_launch():
    """Kernels inside a while loop with a known trip count launch once per iteration; a body
    reading layer i of a stacked weight reads that layer (its slice), not the stack."""
    layers, d = 6, 64

    def stack(x, ws):
        return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

    x, ws = jnp.ones((8, d)), jnp.ones((layers, d, d))
    kernels = mpx.program.kernels(compiled(stack, x, ws).as_text())
    (gemm,) = [k for k in kernels if k.kind == "gemm"]
    assert gemm.launches == layers and gemm.flops == 2 * 8 * d * d
    assert sum(k.flops * k.launches for k in kernels if k.kind == "gemm") == layers * 2 * 8 * d * d
    per_launch = sum(k.bytes for k in kernels if k.launches == layers)
    assert per_launch < ws.nbytes, (per_launch, ws.nbytes)  # never the whole stack per layer


def test_shape_bytes_reads_arrays_and_tuples():
    assert mpx.program.shape_bytes("bf16[8,128]{1,0}") == 8 * 128 * 2
    assert mpx.program.shape_bytes("(f8e4m3fn[16,16]{1,0}, f32[], s32[4])") == 256 + 4 + 16
    assert mpx.program.shape_bytes("pred[3]") == 3
