"""mpx.nn.Attention: the fused path (jax.nn.dot_product_attention) against an explicit
softmax(QK^T)V reference, which path each policy takes, and padding.

The reference shares the module's own ``qkv`` and ``out`` layers (so both sides round the
projections identically) and replaces only the attention core by a float32 softmax(QK^T)V
in plain jnp at ``precision="highest"``. Errors are norm-wise relative
(||a - b|| / ||b||), over the query rows that have at least one key to attend to.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mpx
import mpx.nn as mn
import mpx.nn._transformer as transformer

CFG = mn.TransformerConfig(vocab_size=64, d_model=64, num_heads=4, num_layers=2, d_ff=64, max_len=32)
B, T = 3, 24
POS = jnp.arange(T)[None]
# Row 0 all valid, row 1 right-padded (the data pipeline's layout), row 2 left-padded with
# a hole: its queries 0..5 have no valid key at or before them (fully masked rows).
MASK = jnp.concatenate([POS < T, POS < 17, (POS >= 6) & (POS != 11)])
HAS_KEY = jnp.cumsum(MASK, axis=1) > 0  # (B, T): query rows with something to attend to
FP8_ATTENTION = "fp8; @attention_logits|attention_values->fp8; fp8.amax_history=4"


def attention(name: str, config=CFG) -> mn.Attention:
    policy = mpx.parse_policy(name)
    attn = mn.Attention(config, policy, rngs=nnx.Rngs(0))
    mn.apply_policy(attn, policy)
    return attn


def inputs(dtype):
    x = jax.random.normal(jax.random.key(1), (B, T, CFG.d_model), jnp.float32).astype(dtype)
    w = jax.random.normal(jax.random.key(2), (B, T, CFG.d_model), jnp.float32)
    return x, w


def reference_core(q, k, v, mask):
    """softmax(q k^T / sqrt(K)) v, causal and key-masked, in float32. (B, T, D) each -> (B, T, D);
    a row with no allowed key gives 0 (it is never compared)."""
    b, t, d = q.shape
    h = CFG.num_heads
    q, k, v = (a.astype(jnp.float32).reshape(b, t, h, d // h) for a in (q, k, v))  # (B, T, H, K)
    logits = jnp.einsum("bthk,bshk->bhts", q, k, precision="highest") / np.sqrt(d // h)  # (B, H, T, S)
    allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    probs = jnp.where(allowed, jax.nn.softmax(jnp.where(allowed, logits, -jnp.inf), axis=-1), 0.0)
    return jnp.einsum("bhts,bshk->bthk", probs, v, precision="highest").reshape(b, t, d)


def forward_and_grads(attn, x, w, mask):
    """Output and gradients (wrt params and x) of sum(w * out), for the module and for the
    reference, in one compiled function. w is zero on rows with no key, whose output differs
    by design between the paths (see Attention)."""
    graphdef, params, rest = nnx.split(attn, nnx.Param, ...)
    if mask is not None:
        w = w * HAS_KEY[..., None]

    def f(params, x, reference):
        m = nnx.merge(graphdef, params, rest)
        if reference:
            q, k, v = jnp.split(m.qkv(x), 3, axis=-1)
            out = m.out(reference_core(q, k, v, mask).astype(m.values.dtype))
        else:
            out = m(x, mask)
        return jnp.sum(out.astype(jnp.float32) * w), out

    grad = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)

    @jax.jit
    def both(params, x):
        (_, out), grads = grad(params, x, False)
        (_, ref), ref_grads = grad(params, x, True)
        return (out, grads), (ref, ref_grads)

    return both(params, x)


@nnx.jit
def call(model, x):
    return model(x, MASK)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fused_vs_reference(name: str, masked: bool) -> dict[str, float]:
    """Norm-wise relative errors of the module (under policy ``name``) vs the reference."""
    attn = attention(name)
    x, w = inputs(attn.logits.dtype)
    mask = MASK if masked else None
    rows = np.asarray(HAS_KEY) if masked else np.ones((B, T), bool)
    (out, (g, gx)), (ref, (rg, rgx)) = forward_and_grads(attn, x, w, mask)
    errs = {"out": rel_err(np.asarray(out, np.float32)[rows], np.asarray(ref, np.float32)[rows]), "d_x": rel_err(gx, rgx)}
    for (path, a), (_, b) in zip(nnx.to_flat_state(g), nnx.to_flat_state(rg)):
        errs["d_" + "/".join(map(str, path))] = rel_err(a.get_value(), b.get_value())
    return errs


# ----------------------------------------------------------------------------- fused vs reference


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "causal+padding"])
def test_fused_fp32_equals_the_reference(masked):
    """fp32: the fused path is the reference up to float32 rounding.

    Both sides sum the same products in a different order (and the fused path scales the
    logits after the product, the reference divides them): each output is a sum of T=24
    softmax-weighted terms, so about one ulp of 2**-23 ~ 1.2e-7. Measured: forward 1.1e-7,
    gradients (x, qkv and out kernels and biases) <= 1.2e-7. Bound 1e-6 (~8 ulp): any real
    difference in the softmax (a lost mask, a wrong scale) is orders of magnitude larger.
    Matmuls run at full float32 (default_matmul_precision), as a GPU would use TF32 otherwise.
    """
    with jax.default_matmul_precision("float32"):
        assert attention("fp32").uses_fused()
        errs = fused_vs_reference("fp32", masked)
    assert max(errs.values()) < 1e-6, errs


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "causal+padding"])
def test_fused_bf16_is_within_bf16_rounding_of_the_reference(masked):
    """bf16: the fused path differs from the float32 reference by bf16 rounding only.

    Under the bf16 preset the fused kernel gets bf16 q, k, v, forms the logits and softmax
    in f32, rounds the probabilities to bf16 and returns a bf16 result; the reference
    rounds only its result. Both then go through the same bf16 ``out`` layer, which rounds
    its (now slightly different) output once more. About four bf16 roundings, each of rms
    2**-9/sqrt(3) ~ 1.1e-3 relative: ~2.3e-3 expected. Measured: forward 3.0e-3 (3.2e-3
    with padding), gradients 3.1e-3..4.3e-3 (the backward rounds dO and dP to bf16 too).
    Bound 2**-7 ~ 7.8e-3 (two bf16 ulps), 1.8x the largest measured value and far below
    what a wrong mask or scale gives (order 1). For contrast, the explicit path under the
    same policy (logits rounded to bf16) measures 3.5e-3..5.6e-3 against this reference.
    """
    assert attention("bf16").uses_fused()
    errs = fused_vs_reference("bf16", masked)
    assert max(errs.values()) < 2**-7, errs


# ----------------------------------------------------------------------------- which path runs


@pytest.fixture
def path_counter(monkeypatch):
    """Counts the calls (traces) of each path: jax.nn.dot_product_attention and Attention._explicit."""
    calls = {"fused": 0, "explicit": 0}
    fused, explicit = jax.nn.dot_product_attention, mn.Attention._explicit

    def counting_fused(*args, **kwargs):
        calls["fused"] += 1
        return fused(*args, **kwargs)

    def counting_explicit(self, *args, **kwargs):
        calls["explicit"] += 1
        return explicit(self, *args, **kwargs)

    monkeypatch.setattr(jax.nn, "dot_product_attention", counting_fused)
    monkeypatch.setattr(mn.Attention, "_explicit", counting_explicit)
    return calls


def lm_paths(name, calls, **config):
    """{fused, explicit} call counts of one traced TransformerLM forward under ``name``."""
    calls.update(fused=0, explicit=0)
    model = mn.TransformerLM(mn.TransformerConfig(**{**CFG.__dict__, **config}), policy=mpx.parse_policy(name),
                             rngs=nnx.Rngs(0))
    tokens = jnp.zeros((B, T), jnp.int32)
    nnx.eval_shape(lambda m: m(tokens, MASK), model)
    return dict(calls), model


@pytest.mark.parametrize("name, path", [("fp32", "fused"), ("bf16", "fused"), ("fp8", "fused"),
                                        ("fp32; @dense->fp8", "fused"), ("fp16", "explicit")])
def test_presets_take_one_path_in_both_layouts(name, path, path_counter):
    """The fp32, bf16 and fp8 presets give the attention matmuls one bf16/fp32 dtype and the
    softmax fp32, so each block runs fused: unrolled once per layer, and scanned (one traced
    block) only fused too, so the two layouts compute the same thing (tests/test_scan.py).
    fp16 runs explicit (jax's XLA attention needs an F16_F16_F32 dot, which CPU rejects)."""
    other = {"fused": "explicit", "explicit": "fused"}[path]
    calls, _ = lm_paths(name, path_counter)
    assert calls == {path: CFG.num_layers, other: 0}
    calls, _ = lm_paths(name, path_counter, scan_layers=True)
    assert calls[path] >= 1 and calls[other] == 0


def test_fp8_attention_takes_the_explicit_path_and_still_works(path_counter):
    """fp8 attention matmuls are not what the fused kernel computes: the explicit path runs,
    the ops keep their names and fp8 precision in describe, and the LM gives finite logits
    under a mask with fully masked (left-padding) query rows."""
    calls, model = lm_paths(FP8_ATTENTION, path_counter)
    assert calls == {"fused": 0, "explicit": CFG.num_layers}
    policy = mpx.parse_policy(FP8_ATTENTION)
    rows = {r.path: r for r in mpx.inspect.describe(model, policy).rows}
    assert {p: (rows[p].kind, rows[p].precision) for p in ("blocks/1/attn/logits", "blocks/1/attn/values")} == {
        "blocks/1/attn/logits": ("attention_logits", "fp8"), "blocks/1/attn/values": ("attention_values", "fp8")}
    assert (rows["blocks/1/attn/softmax"].kind, rows["blocks/1/attn/softmax"].precision) == ("softmax", "fp32")
    assert model.blocks[0].attn.logits.fp8_meta is not None
    logits = call(model, jax.random.randint(jax.random.key(0), (B, T), 0, CFG.vocab_size))
    assert logits.shape == (B, T, CFG.vocab_size) and bool(jnp.all(jnp.isfinite(logits)))


@pytest.mark.parametrize(
    "name, fused",
    [
        ("bf16", True),
        ("fp16", False),  # see transformer._FUSED_DTYPES
        ("fp32; @attention_logits|attention_values->bf16", True),
        ("fp8", True),
        ("bf16; @softmax->bf16", False),  # the kernel's softmax is f32, not what is asked
        ("bf16; @attention_values->fp32", False),  # two dtypes
        ("fp8; @attention_logits->fp8", False),
        (None, False),  # no policy applied yet
    ],
)
def test_fused_decision_follows_the_three_op_precisions(name, fused):
    policy = mpx.parse_policy(name or "bf16")
    attn = mn.Attention(CFG, policy, rngs=nnx.Rngs(0))
    if name is not None:
        mn.apply_policy(attn, policy)
    assert attn.uses_fused() is fused
    assert transformer.fused_attention_allowed(attn.logits.precision, attn.softmax.precision,
                                               attn.values.precision) is fused


def test_attention_dropout_falls_back_to_the_explicit_path(path_counter):
    """The fused kernel cannot drop attention probabilities: with dropout in training the
    explicit path runs (and drops), in evaluation the fused one."""
    attn = attention("bf16", mn.TransformerConfig(**{**CFG.__dict__, "dropout": 0.5}))
    x, _ = inputs(jnp.bfloat16)
    assert attn.uses_fused(deterministic=True) and not attn.uses_fused(deterministic=False)
    train = nnx.jit(lambda m, x, rngs: m(x, MASK, deterministic=False, rngs=rngs))
    a, b = train(attn, x, nnx.Rngs(dropout=0)), train(attn, x, nnx.Rngs(dropout=1))
    assert path_counter == {"fused": 0, "explicit": 1}  # one trace
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # dropout applied
    call(attn, x)
    assert path_counter == {"fused": 1, "explicit": 1}


# ----------------------------------------------------------------------------- padding


@pytest.mark.parametrize("name", ["fp32", "bf16", "bf16; @softmax->bf16"])
def test_padding_rows_are_finite_and_do_not_reach_valid_ones(name):
    """Left padding leaves queries 0..5 of row 2 with no valid key. The fused (fp32, bf16)
    and explicit (bf16 softmax) paths give finite outputs there, and gradients of a loss
    over every row, padded ones included, stay finite. (fp8 attention, also explicit:
    test_fp8_attention_takes_the_explicit_path_and_still_works.)

    Changing the input at padded positions leaves every valid position's output bit-for-bit
    unchanged: a padded key's probability is exactly 0 (exp underflows), on both paths.
    """
    attn = attention(name)
    x, w = inputs(jnp.float32)
    changed = jnp.where(MASK[..., None], x, 100.0 * jax.random.normal(jax.random.key(3), x.shape, x.dtype))
    graphdef, params, rest = nnx.split(attn, nnx.Param, ...)

    @jax.jit
    def f(params, x):
        def loss(params):
            out = nnx.merge(graphdef, params, rest)(x, MASK)
            return jnp.sum(out.astype(jnp.float32) * w), out

        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, a), grads = f(params, x)
    (_, b), _ = f(params, changed)
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert all(np.all(np.isfinite(t)) for t in jax.tree.leaves((a, b, grads)))
    valid = np.asarray(MASK)
    assert np.array_equal(a[valid], b[valid])
    assert not np.array_equal(a[~valid], b[~valid])  # the padded rows did see the change


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_padded_tokens_do_not_reach_valid_positions_of_an_lm(name):
    """Through two fused layers: padded positions' own outputs change and feed the next
    layer, yet valid positions' logits stay bit-for-bit the same."""
    model = mn.TransformerLM(CFG, policy=mpx.parse_policy(name), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (B, T), 0, CFG.vocab_size)
    changed = jnp.where(MASK, tokens, (tokens + 1) % CFG.vocab_size)
    a, b = np.asarray(call(model, tokens), np.float32), np.asarray(call(model, changed), np.float32)
    valid = np.asarray(MASK)
    assert np.all(np.isfinite(a)) and np.array_equal(a[valid], b[valid])
