"""The Llama layout of mpx.nn: rotary positions, RMSNorm, SwiGLU and grouped-query attention
against float64 numpy written here, training under every preset, its precision table, scan
over layers, and its config errors.

The references share no code with mpx: RoPE is written as complex multiplication (feature i
and i + K/2 are the real and imaginary parts), attention as a loop over query heads, each
reading key/value head ``h // (H / G)``. Errors are absolute or norm-wise relative, stated
per test.
"""

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mpx
import mpx.nn as mn
from mpx.fp8 import fp8_max
from mpx.nn._rotary import apply_rotary, rotary_angles
from mpx.nn._transformer import SwiGLU, _norm
from train import metrics

from helpers import ref_scale

CFG = mn.TransformerConfig(vocab_size=256, d_model=32, num_heads=4, num_layers=2, d_ff=64, max_len=16,
                           layout="llama", num_kv_heads=2)
B, T = 2, 8
CORPUS = (pathlib.Path(__file__).parent / "data" / "tiny_corpus.txt").read_bytes()


def llama(**changes) -> mn.TransformerConfig:
    return dataclasses.replace(CFG, **changes)


def f64(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def rel_err(a, b) -> float:
    a, b = f64(a), f64(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def normal(key: int, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32).astype(dtype)


# Each computation compiled whole: op by op, every small op would compile on its own.
call = nnx.jit(lambda module, *args: module(*args))
rope = jax.jit(lambda x, positions, base: apply_rotary(x, *rotary_angles(positions, x.shape[-1], base)))


# ----------------------------------------------------------------------------- numpy references


def np_rope(x, positions, base):
    """x (B, T, N, K) turned by position: pair (i, i + K/2) as one complex number."""
    half = x.shape[-1] // 2
    theta = base ** (-2.0 * np.arange(half) / x.shape[-1])
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * positions[None, :, None, None] * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def np_core(q, k, v):
    """Causal softmax(q k^T / sqrt(K)) v, q (B, T, H, K), k and v (B, T, G, K) -> (B, T, H, K)."""
    h, g, t = q.shape[2], k.shape[2], q.shape[1]
    out = np.empty(q.shape)
    for head in range(h):
        kv = head // (h // g)
        s = np.einsum("btk,bsk->bts", q[:, :, head], k[:, :, kv]) / np.sqrt(q.shape[-1])
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        out[:, :, head] = (p / p.sum(-1, keepdims=True)) @ v[:, :, kv]
    return out


def np_attention(x, w_qkv, w_out, h, g, base):
    """The llama attention layer: x (B, T, D) -> (B, T, D), no biases."""
    b, t, d = x.shape
    kd = d // h
    qkv = x @ w_qkv
    q = qkv[..., : h * kd].reshape(b, t, h, kd)
    k = qkv[..., h * kd : (h + g) * kd].reshape(b, t, g, kd)
    v = qkv[..., (h + g) * kd :].reshape(b, t, g, kd)
    pos = np.arange(t, dtype=np.float64)
    return np_core(np_rope(q, pos, base), np_rope(k, pos, base), v).reshape(b, t, d) @ w_out


def np_rms_norm(x, scale, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def np_swiglu(x, w_gate, w_up, w_down):
    gate = x @ w_gate
    return (gate / (1.0 + np.exp(-gate)) * (x @ w_up)) @ w_down


# ----------------------------------------------------------------------------- the parts


def test_rope_matches_complex_rotation_and_keeps_the_dtype():
    """Errors relative to each pair's magnitude (what a rotation keeps). float32: a float32
    angle p * theta is off by about p * 2**-24 radians, so the bound grows with the
    position: 1e-6 + p * 2**-22 (measured 6.5e-5 at p = 4095 where the bound is 1e-3, 1.3e-5
    at p = 1000). bfloat16 in and out, the angles still in float32: the reference rounded
    once to bf16, within 2**-8 more (measured 3.2e-3 against 3.9e-3 + the f32 term); a bf16
    angle at p = 4095 would be off by radians. Both bases, two conventions' worth of pairs
    (interleaved pairs would be off by O(1))."""
    positions = jnp.array([0, 1, 7, 1000, 4095])
    bound = 1e-6 + f64(positions)[None, :, None, None] * 2.0**-22
    x = normal(0, (2, 5, 3, 16))
    for base, dtype, rounding in [(10000.0, jnp.float32, 0.0), (500000.0, jnp.float32, 0.0),
                                  (10000.0, jnp.bfloat16, 2.0**-8), (500000.0, jnp.bfloat16, 2.0**-8)]:
        xd = x.astype(dtype)
        z = np.abs(f64(xd)[..., :8] + 1j * f64(xd)[..., 8:])
        magnitude = np.concatenate([z, z], axis=-1)
        got = rope(xd, positions, base)
        assert got.dtype == dtype
        err = np.abs(f64(got) - np_rope(f64(xd), f64(positions), base)) / magnitude
        assert np.all(err <= bound + rounding), (base, dtype, err.max(axis=(0, 2, 3)))
    # Relative positions only: shifting queries and keys alike leaves their products alone.
    q, k = normal(1, (1, 4, 1, 16)), normal(2, (1, 4, 1, 16))
    dots = [jnp.einsum("btnk,bsnk->ts", rope(q, p, 10000.0), rope(k, p, 10000.0))
            for p in (jnp.arange(4), jnp.arange(4) + 300)]
    np.testing.assert_allclose(dots[0], dots[1], rtol=0, atol=1e-4)


def test_rms_norm_and_swiglu_match_numpy():
    """The layout's norm (RMSNorm with the config's eps, its statistics in float32 even for
    a bf16 input) and SwiGLU MLP, against float64. Measured: 5e-8 and 2e-7 norm-wise
    relative; bound 1e-5. eps = 0.1 changes the output by 5%, so a norm ignoring it fails."""
    config, bf16, fp32 = llama(norm_eps=0.1), mpx.parse_policy("bf16"), mpx.parse_policy("fp32")
    norm = mn.apply_policy(_norm(config, bf16, nnx.Rngs(0)), bf16)
    norm.scale.set_value(normal(1, (32,)))
    x = normal(2, (B, T, 32), jnp.bfloat16)
    got = call(norm, x)
    assert got.dtype == jnp.float32  # norms run in fp32 under the presets
    assert rel_err(got, np_rms_norm(f64(x), f64(norm.scale[...]), 0.1)) < 1e-5
    assert rel_err(got, np_rms_norm(f64(x), f64(norm.scale[...]), 1e-5)) > 0.01

    mlp = mn.apply_policy(SwiGLU(config, fp32, rngs=nnx.Rngs(0)), fp32)
    x = normal(3, (B, T, 32))
    ref = np_swiglu(f64(x), *(f64(layer.kernel[...]) for layer in (mlp.gate, mlp.up, mlp.down)))
    assert rel_err(call(mlp, x), ref) < 1e-5


def attention(config, name="fp32", seed=0) -> mn.Attention:
    policy = mpx.parse_policy(name)
    attn = mn.Attention(config, policy, rngs=nnx.Rngs(seed))
    mn.apply_policy(attn, policy)
    return attn


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["gqa", "mqa"])
def test_attention_matches_numpy_on_both_paths(kv_heads, monkeypatch):
    """Llama attention with G of 4 heads sharing keys and values, fp32, against float64
    (G = 4, plain multi-head attention, is the next test's).

    The whole layer (projections, rotary positions, causal softmax, grouping) goes the fused
    path (jax.nn.dot_product_attention, handed K and V with G heads, not repeated); both
    attention cores on the same q, k, v are compared too. Measured: at most 2e-7
    norm-wise relative; bound 1e-5."""
    config = llama(num_kv_heads=kv_heads)
    attn = attention(config)
    assert attn.uses_fused()
    seen = []
    original = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda q, k, v, **kw: seen.append(k.shape) or original(q, k, v, **kw))
    x = normal(1, (B, T, 32))
    ref = np_attention(f64(x), f64(attn.qkv.kernel[...]), f64(attn.out.kernel[...]), 4, kv_heads, 10000.0)
    assert rel_err(call(attn, x), ref) < 1e-5
    assert seen == [(B, T, kv_heads, 8)]

    q, k, v = normal(2, (B, T, 4, 8)), normal(3, (B, T, kv_heads, 8)), normal(4, (B, T, kv_heads, 8))
    ref = np_core(f64(q), f64(k), f64(v))
    fused, explicit = cores(attn, q, k, v)
    assert rel_err(fused, ref) < 1e-5
    assert rel_err(explicit, ref) < 1e-5


@nnx.jit
def cores(attn, q, k, v):
    return attn._fused(q, k, v, None), attn._explicit(q, k, v, None, deterministic=True, rngs=None)


def test_grouped_attention_equals_multi_head_attention_with_shared_key_value_weights():
    """G = 2 of 4 heads computes what full multi-head attention does when each of its key
    and value heads is the group's (the kernel's columns repeated per head); num_kv_heads
    = num_heads is plain multi-head attention, the same as leaving it unset. Measured: equal
    to the last bit; bound 1e-6 (XLA may group the heads' sums differently)."""
    gqa, mha = attention(llama(num_kv_heads=2)), attention(llama(num_kv_heads=None))
    assert mha.num_kv_heads == 4 and llama(num_kv_heads=4).kv_heads == 4
    w = np.asarray(gqa.qkv.kernel[...])  # (D, (H + 2G) K): q | k | v
    q, k, v = w[:, :32], w[:, 32:48].reshape(32, 2, 8), w[:, 48:].reshape(32, 2, 8)
    repeat = lambda a: np.repeat(a, 2, axis=1).reshape(32, 32)  # noqa: E731  head h reads group h // 2
    mha.qkv.kernel.set_value(jnp.asarray(np.concatenate([q, repeat(k), repeat(v)], axis=1)))
    mha.out.kernel.set_value(gqa.out.kernel[...])
    x = normal(1, (B, T, 32))
    np.testing.assert_allclose(call(gqa, x), call(mha, x), rtol=0, atol=1e-6)
    plain = call(attention(llama(num_kv_heads=None)), x)
    np.testing.assert_array_equal(call(attention(llama(num_kv_heads=4)), x), plain)


# ----------------------------------------------------------------------------- the model


def test_llama_params_have_no_biases_and_no_position_table():
    """Parameters: embedding, per layer RMSNorm scales and five bias-free kernels, final
    norm (and a head kernel when untied). The 1B config's count is its comment's."""
    model = nnx.eval_shape(lambda: mn.TransformerLM(llama(num_layers=1), policy=mpx.parse_policy("fp32"),
                                                    rngs=nnx.Rngs(0)))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    shapes = {"/".join(map(str, p)): v.shape for p, v in nnx.to_flat_state(params)}
    qkv = (4 + 2 * 2) * 8
    assert shapes == {
        "embed/embedding": (256, 32), "blocks/0/ln1/scale": (32,), "blocks/0/attn/qkv/kernel": (32, qkv),
        "blocks/0/attn/out/kernel": (32, 32), "blocks/0/ln2/scale": (32,), "blocks/0/mlp/gate/kernel": (32, 64),
        "blocks/0/mlp/up/kernel": (32, 64), "blocks/0/mlp/down/kernel": (64, 32), "ln_f/scale": (32,)}

    big = mn.TransformerConfig(vocab_size=32768, d_model=2048, num_heads=32, num_kv_heads=8, num_layers=16,
                               d_ff=8192, max_len=2048, layout="llama", rope_base=500000.0)
    model = nnx.eval_shape(lambda: mn.TransformerLM(big, policy=mpx.parse_policy("fp8"), rngs=nnx.Rngs(0)))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == 1_040_254_976
    assert metrics.embedding_params(big) == 0  # MFU: no position table; the tied embedding is the head
    assert metrics.embedding_params(dataclasses.replace(big, tie_embeddings=False)) == 32768 * 2048

    # The gpt2 layout (the default) keeps its table and biases, and may group its heads too.
    assert mn.GPT2_SMALL.layout == "gpt2" and mn.GPT2_SMALL.kv_heads == mn.GPT2_SMALL.num_heads
    gpt2 = llama(layout="gpt2", num_layers=1)
    model = nnx.eval_shape(lambda: mn.TransformerLM(gpt2, policy=mpx.parse_policy("fp32"), rngs=nnx.Rngs(0)))
    assert (model.pos_embed.embedding.shape, model.blocks[0].attn.qkv.bias.shape) == ((16, 32), (qkv,))
    assert model.blocks[0].mlp.fc.bias.shape == (64,) and isinstance(model.ln_f, nnx.LayerNorm)


def test_precision_table_lists_every_llama_op():
    """The fp8 preset on a one-layer LM with an untied head: projections and the MLP's
    three matmuls in fp8, embedding and head bf16, norms, softmax and loss fp32."""
    policy = mpx.parse_policy("fp8")
    model = mn.TransformerLM(llama(num_layers=1, tie_embeddings=False), policy=policy, rngs=nnx.Rngs(0))
    rows = {r.path: (r.kind, r.precision) for r in mpx.inspect.describe(model, policy).rows}
    assert rows == {
        "embed": ("embed", "bf16"),
        "blocks/0/ln1": ("norm", "fp32"),
        "blocks/0/attn/qkv": ("dense", "fp8"),
        "blocks/0/attn/logits": ("attention_logits", "bf16"),
        "blocks/0/attn/softmax": ("softmax", "fp32"),
        "blocks/0/attn/values": ("attention_values", "bf16"),
        "blocks/0/attn/out": ("dense", "fp8"),
        "blocks/0/ln2": ("norm", "fp32"),
        "blocks/0/mlp/gate": ("dense", "fp8"),
        "blocks/0/mlp/up": ("dense", "fp8"),
        "blocks/0/mlp/down": ("dense", "fp8"),
        "ln_f": ("norm", "fp32"),
        "head": ("head", "bf16"),
        "loss": ("loss", "fp32"),
    }


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"layout": "lama"}, r"^layout must be one of 'gpt2', 'llama', got 'lama' \(did you mean 'llama'\?\)$"),
        ({"num_kv_heads": 3}, r"^num_kv_heads \(3\) must divide num_heads \(4\); "
                              r"e.g. num_kv_heads=2 \(one of 1, 2, 4\)$"),
        ({"num_kv_heads": 0}, r"^num_kv_heads must be a positive integer or null \(num_heads\), got 0$"),
        ({"num_kv_heads": 2.0}, r"^num_kv_heads must be a positive integer"),
        ({"rope_base": 1.0}, r"^rope_base must be a number > 1 \(Llama uses 10000 or 500000\), got 1.0$"),
        ({"rope_base": 5e5, "layout": "gpt2"}, r"^rope_base \(500000.0\) sets rotary positions, which layout='gpt2'"),
        ({"norm_eps": 0.0}, r"^norm_eps must be a positive number, got 0.0$"),
        ({"norm_eps": float("nan")}, r"^norm_eps must be a positive number, got nan$"),
        ({"d_model": 20}, r"^d_model // num_heads \(5\) must be even with layout='llama' .* e.g. d_model=24$"),
    ],
)
def test_config_errors_name_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        llama(**changes)


# ----------------------------------------------------------------------------- training


def batch(length=T + 1, size=8):
    data = np.frombuffer(CORPUS, np.uint8).astype(np.int32)
    starts = np.random.default_rng(0).integers(0, len(data) - length, size)
    return jnp.asarray(np.stack([data[s : s + length] for s in starts]))


def lm_loss(graphdef):
    def loss_fn(params, meta, tokens, rng):
        model = nnx.merge(graphdef, params, meta)
        return model.loss(model(tokens[:, :-1]), tokens[:, 1:])

    return loss_fn


def train(config, policy, steps, *, like=None, lr=1e-2):
    """``steps`` AdamW steps on one batch, one compiled program: (start params, losses,
    skipped flags, final state). ``like``: pure params to start from."""
    model = mn.TransformerLM(config, policy=policy, rngs=nnx.Rngs(0))
    graphdef, params, meta = nnx.split(model, nnx.Param, mn.Fp8MetaVariable)
    if like is not None:
        nnx.replace_by_pure_dict(params, like)
    start = nnx.to_pure_dict(params)
    opt = optax.adamw(lr)
    step = jax.jit(functools.partial(mpx.train_step, loss_fn=lm_loss(graphdef), optimizer=opt))
    state = mpx.init_train_state(params, opt, policy=policy, fp8_meta=meta)
    losses, skipped, tokens = [], [], batch()
    for _ in range(steps):
        state, m = step(state, tokens)
        losses.append(float(m.loss))
        skipped.append(bool(m.skipped))
    return start, np.array(losses), np.array(skipped), state


PRESETS = ("fp32", "bf16", "fp16", "fp8", "int8")


@pytest.fixture(scope="module")
def preset_runs():
    """name -> `train` of the two-layer LM under each preset, four steps."""
    return {name: train(CFG, mpx.parse_policy(name), 4) for name in PRESETS}


@pytest.mark.parametrize("name", PRESETS)
def test_llama_lm_trains_under_every_preset(preset_runs, name):
    """Four AdamW steps (lr 1e-2) on one batch of 8 x 8 bytes, one compiled step per preset.
    Measured: every preset's losses 6.05-6.07, 4.53, 3.78, 3.23-3.26 (fp8 furthest from
    fp32, by 0.033), no step skipped. Bounds: every loss finite, the first above ln(256) =
    5.5 (a real forward of an untrained model), the last at least 1.5 nats lower, each step
    within 0.1 of fp32's. fp16's dynamic loss scale (2**15 at first) may skip one step."""
    _, losses, skipped, state = preset_runs[name]
    assert np.all(np.isfinite(losses)), losses
    assert 5.5 < losses[0] < 6.5, losses
    assert losses[-1] < losses[0] - 1.5, losses
    assert skipped.sum() <= (1 if name == "fp16" else 0), skipped
    if not skipped.any():
        np.testing.assert_allclose(losses, preset_runs["fp32"][1], rtol=0, atol=0.1)
    if name == "fp8":  # every FP8 matmul of every layer calibrated its delayed scales
        metas = jax.tree.leaves(state.fp8_meta, is_leaf=lambda x: isinstance(x, mpx.Fp8Meta))
        assert len(metas) == 5 * CFG.num_layers  # qkv, out, gate, up, down
        for meta in metas:
            for s, dt in ((meta.lhs, jnp.float8_e4m3fn), (meta.rhs, jnp.float8_e4m3fn), (meta.grad, jnp.float8_e5m2)):
                assert float(s.scale) != 1.0
                assert float(s.scale) == ref_scale(jnp.max(s.amax_history), fp8_max(dt))


def test_scanned_llama_trains_like_the_unrolled_one(preset_runs):
    """scan_layers + remat from the unrolled fp32 run's parameters (stacked), the same four
    steps. The two programs sum in different orders: losses agree to 2.5e-7 relative
    (bound 1e-6). Parameters agree to 3e-5 absolute (bound 1e-4 = lr / 100): AdamW's
    g / sqrt(v) turns float32 noise on the few near-zero gradients into steps of a few
    thousandths of lr, while every parameter moved by ~0.03 (median) and the two layers
    started O(0.1) apart, so a swapped or shared layer fails. Under fp8 every op of the
    stack keeps one meta per layer, stacked like its kernel (the layer-by-layer FP8
    correspondence of a scanned stack is test_scan's)."""
    start, losses, _, state = preset_runs["fp32"]
    stacked = {**start, "blocks": jax.tree.map(lambda *xs: jnp.stack(xs), *[start["blocks"][i] for i in range(2)])}
    _, s_losses, _, s_state = train(llama(scan_layers=True, remat=True), mpx.parse_policy("fp32"), 4, like=stacked)
    np.testing.assert_allclose(s_losses, losses, rtol=1e-6)

    final, s_final = nnx.to_pure_dict(state.params), nnx.to_pure_dict(s_state.params)
    close = functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-4)
    for i in range(2):
        jax.tree.map(close, jax.tree.map(lambda a: np.asarray(a)[i], s_final["blocks"]), final["blocks"][i])
    jax.tree.map(close, {k: v for k, v in s_final.items() if k != "blocks"},
                 {k: v for k, v in final.items() if k != "blocks"})

    fp8 = mpx.parse_policy("fp8")
    scanned = mn.TransformerLM(llama(scan_layers=True), policy=fp8, rngs=nnx.Rngs(0))
    found = {op.path: op.stack for op in mn.find_ops(scanned) if fp8.for_op(op.path, op.kind).is_fp8}
    assert found == {f"blocks/{op}": (2,) for op in ("attn/qkv", "attn/out", "mlp/gate", "mlp/up", "mlp/down")}
    metas = jax.tree.leaves(nnx.state(scanned, mn.Fp8MetaVariable), is_leaf=lambda x: isinstance(x, mpx.Fp8Meta))
    assert len(metas) == 5 and all(meta.stack == (2,) for meta in metas)
