"""Activations the backward reads in FP8 (`mpx.fp8.saved_in_fp8`, ``fp8.saved_activations=fp8``):
the forward is exact, the backward is the function's VJP at the E4M3 copy of its input (an
independent ml_dtypes quantization here), a non-finite input skips the step, and in the decoder
the MLP's activation input is what the backward keeps, one byte an element."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import mpx
import mpx.nn as mn
from mpx.fp8 import saved_in_fp8
from mpx.fp8._numerics import current_scale

from helpers import ref_scale


def e4m3_copy(x: np.ndarray) -> np.ndarray:
    """x through E4M3 with one scale putting its amax in (224, 448] (`ref_scale`), numpy and
    ml_dtypes."""
    scale = ref_scale(np.abs(x).max(), 448.0)
    codes = (x.astype(np.float32) * scale).astype(ml_dtypes.float8_e4m3fn)
    return codes.astype(np.float32) / scale


@pytest.mark.parametrize("fn", [functools.partial(jax.nn.gelu, approximate=True), jnp.tanh],
                         ids=["gelu", "tanh"])
def test_the_backward_is_the_vjp_at_the_e4m3_copy_and_the_forward_is_exact(fn):
    x = np.asarray(jax.random.normal(jax.random.key(0), (4, 64)) * 3, np.float32)
    g = np.asarray(jax.random.normal(jax.random.key(1), (4, 64)), np.float32)
    y, vjp = jax.vjp(lambda x: saved_in_fp8(fn, x), jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(fn(x)))
    # The same VJP at the same point, traced in another program: equal up to f32 evaluation
    # order (measured <= 6e-7 absolute on values up to ~1). The VJP at x itself differs from it
    # by E4M3's rounding of x (up to 2^-4 relative) times the second derivative: ~1e-2.
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=2e-6)
    reference = jax.vjp(fn, jnp.asarray(e4m3_copy(x)))[1](jnp.asarray(g))[0]
    close(np.asarray(vjp(jnp.asarray(g))[0]), np.asarray(reference))
    at_x = jax.vjp(fn, jnp.asarray(x))[1](jnp.asarray(g))[0]
    assert np.abs(np.asarray(at_x) - np.asarray(reference)).max() > 1e-3  # the copy is what is read
    # two inputs (SwiGLU's silu(gate) * up): each its own copy and scale
    u = x[::-1] / 10
    swiglu = lambda a, b: jax.nn.silu(a) * b  # noqa: E731
    got = jax.vjp(lambda a, b: saved_in_fp8(swiglu, a, b), jnp.asarray(x), jnp.asarray(u))[1](jnp.asarray(g))
    want = jax.vjp(swiglu, jnp.asarray(e4m3_copy(x)), jnp.asarray(e4m3_copy(u)))[1](jnp.asarray(g))
    for a, b in zip(got, want):
        close(np.asarray(a), np.asarray(b))


def test_a_non_finite_input_gives_a_non_finite_gradient():
    """An inf in the input is NaN in its copy: the gradient is not finite, so the step that
    computed it is skipped (never a clipped, plausible gradient)."""
    x = jnp.array([1.0, jnp.inf, -2.0])
    assert not np.isfinite(np.asarray(jax.grad(lambda x: saved_in_fp8(jnp.tanh, x).sum())(x))).all()


CONFIG = mn.TransformerConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=1, d_ff=128, max_len=16)


def lm_train_step(spec: str):
    model = mn.TransformerLM(CONFIG, policy=mpx.parse_policy(spec), rngs=nnx.Rngs(0))
    graphdef, params, meta = nnx.split(model, nnx.Param, mn.Fp8MetaVariable)

    def loss_fn(params, meta, batch, rng):
        m = nnx.merge(graphdef, params, meta)
        return m.loss(m(batch[:, :-1]), batch[:, 1:])

    opt = optax.adamw(1e-2)
    state = mpx.init_train_state(params, opt, fp8_meta=meta)
    return jax.jit(functools.partial(mpx.train_step, loss_fn=loss_fn, optimizer=opt)), state


def test_the_decoder_keeps_its_mlp_activation_in_fp8_and_trains_as_before():
    """`fp8.saved_activations=fp8`: the first step's loss is the default's bit for bit (the
    forward is exact); the program holds less memory for the backward (the MLP activation input,
    (B, T, F) bf16, becomes E4M3); and 8 steps of memorising one batch end within 2% of the
    default's loss (the gradient of GELU at a point within 2^-4 is all that changes)."""
    batch = jax.random.randint(jax.random.key(2), (8, 17), 0, CONFIG.vocab_size)
    runs = {}
    for spec in ("fp8", "fp8; fp8.saved_activations=fp8"):
        step, state = lm_train_step(spec)
        step = step.lower(state, batch).compile()  # one compile: its memory, then its steps
        temp = step.memory_analysis().temp_size_in_bytes
        losses = []
        for _ in range(8):
            state, m = step(state, batch)
            losses.append(float(m.loss))
        runs[spec] = temp, losses
    (temp, losses), (temp8, losses8) = runs.values()
    assert losses8[0] == losses[0]
    assert losses8[-1] < losses8[0] - 0.5 and abs(losses8[-1] - losses[-1]) < 0.02 * losses[-1], (losses, losses8)
    assert temp8 < temp, (temp8, temp)


def test_a_bad_setting_names_the_choices():
    with pytest.raises(ValueError, match="fp8 saved_activations 'bf16' .*compute, fp8"):
        mpx.parse_policy("fp8; fp8.saved_activations=bf16")


# ----------------------------------------------------------------------------- remat_policy=fp8

STACK = mn.TransformerConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=2, d_ff=64, max_len=16,
                             scan_layers=True, remat=True)


def saved_arrays(config, spec, capsys) -> list[str]:
    """The (dtype[shape]) of every array the backward of the scanned blocks keeps (what
    ``jax.ad_checkpoint.print_saved_residuals`` lists as an output of the scan)."""
    model = mn.TransformerLM(config, policy=mpx.parse_policy(spec), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, config.vocab_size)

    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        return m.loss(m(tokens[:, :-1]), tokens[:, 1:])

    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(loss, params)
    return sorted(line.split()[0] for line in capsys.readouterr().out.splitlines() if "output of scan" in line)


def test_remat_fp8_keeps_each_fp8_matmuls_operand_codes(capsys):
    """``remat_policy=fp8``: the backward of the scanned, rematerialised blocks keeps, per layer,
    the E4M3 codes of both operands of each fp8 matmul (qkv, out, fc, proj under the preset; kept
    as their bytes, u8) besides each block's input, and f32 scalars (scales and observations);
    full remat keeps the block input alone."""
    full = saved_arrays(STACK, "fp8", capsys)
    kept = saved_arrays(dataclasses.replace(STACK, remat_policy="fp8"), "fp8", capsys)
    assert full == ["bf16[2,2,8,32]"]  # (layers, B, T, D): each block's input
    L, B, T, D, F = 2, 2, 8, 32, 64
    codes = sorted(f"u8[{','.join(map(str, s))}]" for s in [
        (L, B, T, D), (L, D, 3 * D),   # qkv: its input, its weight
        (L, B, T, D), (L, D, D),       # out
        (L, B, T, D), (L, D, F),       # fc
        (L, B, T, F), (L, F, D),       # proj
    ])
    assert sorted(a for a in kept if a.startswith("u8")) == codes
    assert set(kept) - set(codes) == {"bf16[2,2,8,32]", "f32[2]"}
    # with the MLP activation saved in FP8 as well, its copy is kept too (the GELU's input)
    also = saved_arrays(dataclasses.replace(STACK, remat_policy="fp8"), "fp8; fp8.saved_activations=fp8", capsys)
    assert sorted(a for a in also if a.startswith("u8")) == sorted([*codes, f"u8[{L},{B},{T},{F}]"])


def test_an_fp8_matmul_under_the_policy_is_the_matmul_without_remat():
    """`remat_saving_fp8` on one fp8 matmul: both gradients equal those without remat bit for
    bit, and the value up to summation order. The kept codes include E4M3's top binade (256..448:
    asserted for w's), which jax's rounding of kept residuals (IEEE ``reduce_precision``) would
    turn into NaN: they are kept as their bytes."""
    meta = mpx.fp8.Fp8Meta.init(mpx.fp8.Fp8Config())
    x = jax.random.normal(jax.random.key(0), (4, 32))
    w = jax.random.normal(jax.random.key(1), (32, 16))

    def f(x, w):
        y, _ = mpx.fp8.fp8_dot_general(jnp.sin(x), w, (((1,), (0,)), ((), ())), meta)
        return jnp.tanh(y).sum()

    codes = mpx.fp8.quantize(w, jnp.float8_e4m3fn, current_scale(w, jnp.float8_e4m3fn)).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(codes))) >= 256  # the first step scales from the amax itself
    plain = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, w)
    kept = jax.jit(jax.value_and_grad(jax.checkpoint(f, policy=mpx.fp8.remat_saving_fp8()), argnums=(0, 1)))(x, w)
    # the loss: the same 64 terms summed in another fusion's order (measured 1.9e-6 of 10.2)
    np.testing.assert_allclose(float(kept[0]), float(plain[0]), rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, kept[1], plain[1])


def test_remat_fp8_backward_reads_the_forwards_own_codes():
    """One rematerialised block: with ``remat_policy=fp8`` the backward reads the codes the
    forward quantized, so loss and gradients are those of the block without remat, up to f32 /
    bf16 evaluation order: within 1% of the gradient's norm (measured 0.1%). (Full remat
    requantizes a recomputed forward, which XLA may evaluate with excess precision: an amax a
    bf16 ulp away moves every code; measured 11% from no remat on this block, bf16 alone 1%.)
    What the kept copies cost in memory is measured where it means something: `bench --mode
    memory` on gpt_1_3b (README)."""
    batch = jax.random.randint(jax.random.key(2), (4, 17), 0, STACK.vocab_size)
    runs = {}
    for name, remat in (("none", {"remat": False}), ("fp8", {"remat": True, "remat_policy": "fp8"})):
        config = dataclasses.replace(STACK, num_layers=1, scan_layers=False, **remat)
        model = mn.TransformerLM(config, policy=mpx.parse_policy("fp8"), rngs=nnx.Rngs(0))
        graphdef, params, meta = nnx.split(model, nnx.Param, mn.Fp8MetaVariable)

        def loss_fn(params, graphdef=graphdef, meta=meta):
            m = nnx.merge(graphdef, params, meta)
            return m.loss(m(batch[:, :-1]), batch[:, 1:])

        loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
        runs[name] = float(loss), jax.tree.leaves(grads)
    norm = lambda gs: float(jnp.sqrt(sum(jnp.sum(g.astype(jnp.float32) ** 2) for g in gs)))  # noqa: E731
    (loss, grads), (loss8, grads8) = runs["none"], runs["fp8"]
    assert loss8 == loss
    assert norm([a - b for a, b in zip(grads8, grads)]) < 0.01 * norm(grads)


def test_remat_policy_is_checked():
    with pytest.raises(ValueError, match="remat_policy must be one of 'full', 'fp8', got 'fp9'"):
        mn.TransformerConfig(**{**dataclasses.asdict(STACK), "remat_policy": "fp9"})
    with pytest.raises(ValueError, match="remat_policy='fp8' says what recomputation keeps, but remat is off"):
        dataclasses.replace(STACK, remat=False, remat_policy="fp8")
    # no per-tensor fp8 matmul to keep: loud, not a silent full recompute
    for spec in ("bf16", "fp8-rowwise"):
        model = mn.TransformerLM(dataclasses.replace(STACK, remat_policy="fp8"), policy=mpx.parse_policy(spec),
                                 rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="no matmul of the blocks is one under this policy"):
            model(jnp.zeros((1, 4), jnp.int32))
