"""mpx.nn: the decoder under every policy, FP8 vs BF16 layers, apply_policy on plain NNX models."""

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
from mpx.fp8._meta import advance_tree
from mpx.nn._op_modules import EinsumOp
from mpx.nn._transformer import Block

from helpers import ref_scale, settled

CORPUS = (pathlib.Path(__file__).parent / "data" / "tiny_corpus.txt").read_bytes()
TINY = mn.TransformerConfig(vocab_size=256, d_model=64, num_heads=4, num_layers=2, d_ff=128, max_len=32)


def policy(name: str) -> mpx.Policy:
    return mpx.parse_policy(name + ("; fp8.amax_history=16" if name.startswith("fp8") else ""))


def param_count(make) -> int:
    model = nnx.eval_shape(make)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------------------- config and shapes


@pytest.mark.parametrize(
    "config, published",
    [(mn.GPT2_SMALL, 124_439_808), (mn.GPT2_MEDIUM, 354_823_168)],
    ids=["gpt2-small", "gpt2-medium"],
)
def test_gpt2_parameter_counts_match_the_published_ones(config, published):
    """Tied embeddings, biases on every projection, LayerNorm scale+bias: GPT-2's layout."""
    assert param_count(lambda: mn.TransformerLM(config, policy=policy("fp8"), rngs=nnx.Rngs(0))) == published


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"d_model": 30, "num_heads": 4}, r"d_model \(30\) must be divisible by num_heads \(4\)"),
        ({"num_layers": 0}, "num_layers must be a positive integer"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    base = dict(vocab_size=8, d_model=32, num_heads=4, num_layers=1, d_ff=8, max_len=8)
    with pytest.raises(ValueError, match=message):
        mn.TransformerConfig(**{**base, **kwargs})


def test_untied_head_is_a_linear_of_kind_head():
    cfg = mn.TransformerConfig(**{**TINY.__dict__, "tie_embeddings": False})
    model = mn.TransformerLM(cfg, policy=policy("fp8"), rngs=nnx.Rngs(0))
    assert model.head.kernel.shape == (64, 256)
    assert param_count(lambda: mn.TransformerLM(cfg, policy=policy("fp32"), rngs=nnx.Rngs(0))) == param_count(
        lambda: mn.TransformerLM(TINY, policy=policy("fp32"), rngs=nnx.Rngs(0))
    ) + 64 * 256
    assert jax.eval_shape(model, jnp.zeros((2, 8), jnp.int32)).shape == (2, 8, 256)


def test_too_long_sequence_is_a_clear_error():
    model = mn.TransformerLM(TINY, policy=policy("fp32"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sequence length 33 exceeds max_len 32"):
        model(jnp.zeros((1, 33), jnp.int32))


# ----------------------------------------------------------------------------- FP8 block vs BF16 block


def block_and_meta(name):
    """A Block under the named policy (same init for every policy) with calibrated FP8 scales."""
    pol = policy(name)
    block = Block(TINY, pol, rngs=nnx.Rngs(3))
    mn.apply_policy(block, pol)
    return block


def block_grads(block, x, w):
    graphdef, params, meta = nnx.split(block, nnx.Param, mn.Fp8MetaVariable)

    def f(params, meta, x):
        out = nnx.merge(graphdef, params, meta)(x)
        return jnp.sum(out.astype(jnp.float32) * w), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(params, meta, x)
    return out, grads, (graphdef, params, meta)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_fp8_block_is_close_to_bf16_block_forward_and_backward():
    """Forward and gradients of an FP8 Block stay within a stated distance of the BF16 Block.

    Norm-wise relative errors vs the bf16 block. Each FP8 product quantizes both operands
    to E4M3 (relative rounding error <= 2**-4, rms ~2**-4/sqrt(3) ~ 0.036 each, ~0.05
    per product); the attention and MLP branches chain two such products each. Measured:
    branch increments 0.062, block output (exact residual added) 0.041, input gradient
    0.075, weight and norm-scale gradients 0.08-0.11 (the output gradient adds E5M2,
    rms ~0.07). Bounds are about twice those: 0.08, 0.15, 0.2. For contrast, bf16 vs fp32
    differs by ~0.005, so an error above 0.01 also shows the FP8 path really ran.
    """
    x = jax.random.normal(jax.random.key(0), (4, 16, TINY.d_model), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (4, 16, TINY.d_model), jnp.float32)
    ref_out, (ref_g, _, ref_gx), _ = block_grads(block_and_meta("bf16"), x, w)

    fp8 = block_and_meta("fp8")
    _, (_, observed, _), (graphdef, params, meta) = block_grads(fp8, x, w)
    calibrated = nnx.merge(graphdef, params, advance_tree(meta, observed))  # delayed scaling, step 2
    out, (g, _, gx), _ = block_grads(calibrated, x, w)

    assert out.dtype == ref_out.dtype == jnp.bfloat16
    assert 0.01 < rel_err(out, ref_out) < 0.08
    assert rel_err(gx, ref_gx) < 0.15
    for path in ("attn/qkv/kernel", "attn/out/kernel", "mlp/fc/kernel", "mlp/proj/kernel", "ln1/scale"):
        get = lambda tree: functools.reduce(lambda t, k: t[k], path.split("/"), tree)[...]  # noqa: E731
        assert rel_err(get(g), get(ref_g)) < 0.2, path


# ----------------------------------------------------------------------------- training the LM


def lm_batches(step, batch=16, length=32):
    data = np.frombuffer(CORPUS, np.uint8).astype(np.int32)
    starts = np.random.default_rng(step).integers(0, len(data) - length - 1, batch)
    return {"tokens": jnp.asarray(np.stack([data[s : s + length + 1] for s in starts]))}


def unigram_entropy() -> float:
    p = np.bincount(np.frombuffer(CORPUS, np.uint8), minlength=256) / len(CORPUS)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def lm_trainer(name, lr=3e-3):
    pol = policy(name)
    model = mn.TransformerLM(TINY, policy=pol, rngs=nnx.Rngs(0))
    graphdef, params, meta = nnx.split(model, nnx.Param, mn.Fp8MetaVariable)

    def loss_fn(params, meta, batch, rng):
        m = nnx.merge(graphdef, params, meta)
        tokens = batch["tokens"]
        return m.loss(m(tokens[:, :-1]), tokens[:, 1:])

    opt = optax.adamw(lr)
    state = mpx.init_train_state(params, opt, fp8_meta=meta, loss_scale=pol.loss_scale.create())
    return state, jax.jit(functools.partial(mpx.train_step, loss_fn=loss_fn, optimizer=opt))


@pytest.fixture(scope="module")
def lm_runs():
    runs = {}
    # fp32 training is pinned in test_step and test_llama (every preset); int8's own LM test is
    # in test_int8.py (within 0.05 nats of bf16).
    for name in ("bf16", "fp16", "fp8"):
        state, step = lm_trainer(name)
        losses = []
        for i in range(300):
            state, m = step(state, lm_batches(i))
            losses.append(float(m.loss))
        runs[name] = (np.array(losses), state)
    return runs


def test_tiny_lm_learns_the_text_under_every_policy(lm_runs):
    """Byte-level LM on a 1 KB text, 300 AdamW steps.

    The unigram entropy of the text is 3.2 nats (a model that learned only byte
    frequencies); the initial loss is ln(256) = 5.5. Measured final losses (median of the
    last 20 steps): bf16 0.54, fp16 0.54, fp8 0.57 (fp32 0.54). Bound: below half the
    unigram entropy for every policy, so each must have learned context, not counts.
    """
    h = unigram_entropy()
    for name, (losses, _) in lm_runs.items():
        assert losses[0] > 5.0, name
        assert settled(losses, 20) < 0.5 * h, (name, losses[-20:], h)


def test_fp8_lm_ends_within_margin_of_bf16(lm_runs):
    """FP8's final loss is within 0.15 nats of BF16's (measured gap 0.03: E4M3/E5M2
    rounding adds a little noise per step; 0.15 is five times that and still a small
    fraction of the 2.7-nat distance between the unigram entropy and the final loss)."""
    fp8, bf16 = settled(lm_runs["fp8"][0], 20), settled(lm_runs["bf16"][0], 20)
    assert abs(fp8 - bf16) < 0.15, (fp8, bf16)


def test_fp8_lm_meta_tracks_every_fp8_matmul(lm_runs):
    """After training, every fp8 matmul's scales are fp8_max / max(history) (`ref_scale`) and moved
    away from the initial 1.0; the fp16 run kept its dynamic loss scale in f32."""
    _, state = lm_runs["fp8"]
    metas = [m for m in jax.tree.leaves(state.fp8_meta, is_leaf=lambda x: isinstance(x, mpx.Fp8Meta))]
    assert len(metas) == 4 * TINY.num_layers  # qkv, out, fc, proj per block
    for meta in metas:
        for s, dt in ((meta.lhs, jnp.float8_e4m3fn), (meta.rhs, jnp.float8_e4m3fn), (meta.grad, jnp.float8_e5m2)):
            assert float(s.scale) != 1.0
            assert float(s.scale) == ref_scale(jnp.max(s.amax_history), fp8_max(dt))
    assert lm_runs["fp16"][1].loss_scale.loss_scale.dtype == jnp.float32


# ----------------------------------------------------------------------------- sequence classifier


def classifier(name):
    return mn.SequenceClassifier(TINY, 3, policy=policy(name), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", ["fp32", "fp8"])
def test_classifier_ignores_padded_tokens(name):
    """Changing tokens where mask is False leaves the logits bit-for-bit unchanged:
    masked keys get probability exactly 0 and pooling weight exactly 0. Past the first
    step, delayed FP8 scales come from the meta, not from the current tensor, so they
    cannot leak either (on a fresh meta the first step scales from the tensor itself,
    padding included, like the current recipe)."""
    model = classifier(name)
    tokens = jax.random.randint(jax.random.key(0), (3, 12), 0, 256)
    mask = jnp.arange(12)[None, :] < jnp.array([[12], [7], [3]])
    graphdef, params, meta = nnx.split(model, nnx.Param, mn.Fp8MetaVariable)
    observed = jax.jit(jax.grad(
        lambda m: jnp.sum(nnx.merge(graphdef, params, m)(tokens, mask).astype(jnp.float32))))(meta)
    meta = advance_tree(meta, observed)  # one step of delayed scaling
    logits = jax.jit(lambda tokens, mask: nnx.merge(graphdef, params, meta)(tokens, mask))
    noise = jax.random.randint(jax.random.key(1), (3, 12), 0, 256)
    changed = jnp.where(mask, tokens, noise)
    a, b = logits(tokens, mask), logits(changed, mask)
    assert a.shape == (3, 3)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    # The mask matters: the same change without it moves the logits of padded rows.
    assert not np.array_equal(np.asarray(logits(tokens, None)), np.asarray(logits(changed, None)))


def test_classifier_backward_shapes_and_body_paths_match_the_lm():
    model = classifier("bf16")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jnp.ones((2, 8), jnp.int32)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(tokens)
        return -jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[:, 0])

    grads = jax.jit(jax.grad(loss))(params)
    assert jax.tree.map(jnp.shape, grads) == jax.tree.map(jnp.shape, params)
    assert grads["classifier"]["kernel"].shape == (64, 3)
    assert float(jnp.abs(grads["blocks"][0]["mlp"]["fc"]["kernel"][...]).sum()) > 0
    lm_params = nnx.split(mn.TransformerLM(TINY, policy=policy("bf16"), rngs=nnx.Rngs(0)), nnx.Param, ...)[1]
    body = lambda p: {k: v for k, v in nnx.to_pure_dict(p).items() if k not in ("head", "classifier")}  # noqa: E731
    assert jax.tree.map(jnp.shape, body(params)) == jax.tree.map(jnp.shape, body(lm_params))


# ----------------------------------------------------------------------------- apply_policy on plain NNX


class PlainMLP(nnx.Module):
    """A user's model written with plain Flax NNX, knowing nothing of mpx."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 32, rngs=rngs)
        self.out = nnx.Linear(32, 1, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.gelu(self.fc1(x))
        h = self.norm(jax.nn.gelu(self.fc2(h)))
        return self.out(h)


def test_apply_policy_on_a_plain_nnx_mlp_trains_with_fp8_meta():
    """The user's Linears get FP8 meta where the policy says fp8 (its output layer is
    tagged as the head, which the fp8 preset keeps in bf16); the jitted step trains it
    and the meta's scales follow the tensors."""
    pol = policy("fp8")
    model = mn.apply_policy(PlainMLP(nnx.Rngs(0)), pol, kinds={"out": "head"})
    graphdef, params, meta = nnx.split(model, nnx.Param, mn.Fp8MetaVariable)
    assert sorted(nnx.to_pure_dict(meta)) == ["fc1", "fc2"]
    assert model.norm.dtype == jnp.float32 and model.out.dtype == jnp.bfloat16

    key = jax.random.key(0)
    x = jax.random.normal(key, (128, 8))
    y = jnp.sin(x.sum(-1, keepdims=True))

    def loss_fn(params, meta, batch, rng):
        pred = nnx.merge(graphdef, params, meta)(batch[0])
        return jnp.mean((pred.astype(jnp.float32) - batch[1]) ** 2)

    opt = optax.adam(1e-2)
    state = mpx.init_train_state(params, opt, fp8_meta=meta)
    step = jax.jit(functools.partial(mpx.train_step, loss_fn=loss_fn, optimizer=opt))
    losses = []
    for _ in range(150):
        state, m = step(state, (x, y))
        losses.append(float(m.loss))
    # Initial MSE ~0.5 (target variance); 150 Adam steps fit it to well under a tenth.
    assert settled(losses) < 0.1 * losses[0], (losses[0], losses[-10:])
    fc1 = state.fp8_meta["fc1"]["dot_general"]["fp8_meta"].get_value()
    # nnx.Linear casts its input to the compute dtype (bf16) before the FP8 matmul sees it.
    assert float(fc1.lhs.amax_history[0]) == float(jnp.max(jnp.abs(x.astype(jnp.bfloat16))))
    assert float(fc1.lhs.scale) == ref_scale(jnp.max(fc1.lhs.amax_history), 448.0)
    assert sorted(s.path for s in mpx.inspect.fp8_stats(state.fp8_meta))[:3] == ["fc1"] * 3
    assert float(fc1.grad.scale) != 1.0


def test_a_layer_called_twice_combines_amaxes_by_max():
    """One NNX Linear applied to two inputs in one step: its meta records max(amax), not the sum."""

    class Twice(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(4, 4, rngs=rngs)

        def __call__(self, a, b):
            return jnp.sum(self.fc(a).astype(jnp.float32)) + 3.0 * jnp.sum(self.fc(b).astype(jnp.float32))

    model = mn.apply_policy(Twice(nnx.Rngs(0)), policy("fp8"))
    graphdef, params, meta = nnx.split(model, nnx.Param, mn.Fp8MetaVariable)
    a, b = jnp.full((2, 4), 2.0), jnp.full((2, 4), -5.0)
    observed = jax.grad(lambda meta: nnx.merge(graphdef, params, meta)(a, b))(meta)
    seen = nnx.to_pure_dict(observed)["fc"]["dot_general"]["fp8_meta"]
    assert float(seen.lhs.amax) == 5.0  # max(2, 5); the sum would be 7
    assert float(seen.grad.amax) == 3.0  # output gradients 1 and 3
    assert (float(seen.lhs.calls), float(seen.lhs.fanout)) == (2.0, 1.0)  # threaded by the Variable
    new = nnx.to_pure_dict(advance_tree(meta, observed))["fc"]["dot_general"]["fp8_meta"]
    assert float(new.lhs.scale) == ref_scale(5.0, 448.0)


def test_apply_policy_on_nnx_einsum_matches_the_plain_einsum():
    """nnx.Einsum gets an FP8 EinsumOp; on FP8-representable inputs (small integers and
    halves, delayed scales of 1) the result equals the plain einsum exactly."""
    layer = nnx.Einsum("btd,dhk->bthk", (4, 2, 3), (2, 3), rngs=nnx.Rngs(0))
    layer.kernel.set_value(jnp.round(layer.kernel[...] * 4) / 2)
    x = jnp.asarray(np.random.default_rng(0).integers(-3, 4, (2, 5, 4)), jnp.float32)
    plain = layer(x)
    mn.apply_policy(layer, mpx.parse_policy("fp32; @einsum->fp8; fp8.amax_history=4"))
    assert isinstance(layer.einsum_op, EinsumOp) and layer.einsum_op.fp8_meta is not None
    fresh = layer.einsum_op.fp8_meta.get_value()
    seen_once = fresh.lhs.replace(amax_history=fresh.lhs.amax_history.at[0].set(1.0))  # scale 1 in use
    layer.einsum_op.fp8_meta.set_value(fresh.replace(lhs=seen_once, rhs=seen_once, grad=seen_once))
    np.testing.assert_array_equal(np.asarray(layer(x)), np.asarray(plain))


def test_activation_marks_are_constraints_only_under_logical_rules():
    """The decoder's logical marks (`mpx.nn._sharding`): without flax's logical axis rules the
    program is the unmarked one; with ``batch`` mapped under an auto mesh, every block input and
    the queries, keys and values carry a constraint splitting their batch dimension only; under
    a mesh of explicit axes (sharding in the types) they stay out of the way."""
    from flax import linen
    from jax.sharding import AxisType

    config = mn.TransformerConfig(vocab_size=64, d_model=32, num_heads=2, num_layers=2, d_ff=64, max_len=8)
    model = mn.TransformerLM(config, policy=mpx.parse_policy("bf16"), rngs=nnx.Rngs(0))
    tokens = jnp.zeros((2, 8), jnp.int32)

    def lowered(axis_type=None):
        mesh = jax.make_mesh((1, 1), ("data", "fsdp"), axis_types=(axis_type,) * 2) if axis_type else None

        def f(tokens):
            if mesh is None:
                return model(tokens)
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
                    linen.logical_axis_rules([("batch", ("data", "fsdp"))]):
                return model(tokens)

        return jax.jit(f).lower(tokens).as_text()

    plain = lowered()
    assert "sharding_constraint" not in plain
    marked = lowered(AxisType.Auto)
    constraints = [line for line in marked.splitlines() if "sdy.sharding_constraint" in line]
    # per block: the residual input and q, k, v
    assert len(constraints) == 2 * 4, constraints
    assert all('[{"data", "fsdp"}, {}, {}' in line for line in constraints), constraints
    explicit = [line for line in lowered(AxisType.Explicit).splitlines() if "sdy.sharding_constraint" in line]
    assert not [line for line in explicit if '"data"' in line], explicit  # (jax's own replicated ones only)
