"""Models written without mpx, the way other people write them, under an fp8 policy.

Each model uses one pattern that no layer hook reaches: a Conv1D-style projection calling
``lax.dot_general`` with an (in, out) kernel, attention through ``jnp.einsum``, ``@`` in an
MLP, a tied head through ``Embed.attend``, a module called twice, a nested ``apply`` (a
model hub's wrapper class), an NNX model with Dropout and BatchNorm, scanned stacks. For
each: the lowered train step holds 3 FP8 dot_generals per fp8 matmul call (forward and
both gradients), it trains on a small deterministic task within a stated margin of bf16,
and describe() lists every matmul with its precision.
"""

import dataclasses
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
from mpx.inspect import NOT_UNDER_POLICY, describe

from helpers import settled

V, D, T, B = 32, 32, 8, 16  # vocab, width, sequence, batch: small enough to compile fast


def task_batch() -> jnp.ndarray:
    """A deterministic next-token task: each sequence counts up by a per-row stride mod V,
    so every next token is a function of the current one and its predecessor."""
    start = jnp.arange(B)[:, None] * 5
    stride = 1 + jnp.arange(B)[:, None] % 3
    return (start + stride * jnp.arange(T + 1)[None]) % V


def lm_loss(logits, tokens):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], axis=-1))


def fp8_dots(lowered_text: str) -> int:
    """dot_general ops of the lowered StableHLO whose operands are FP8."""
    return sum(1 for line in lowered_text.splitlines()
               if "stablehlo.dot_general" in line and re.search(r"\(tensor<[^>]*f8E", line))


# ----------------------------------------------------------------------------- linen models


class Conv1D(nn.Module):
    """GPT-2's projection: kernel stored (in, out), applied with lax.dot_general."""

    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.normal(0.05), (x.shape[-1], self.features))
        b = self.param("bias", nn.initializers.zeros, (self.features,))
        return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ()))) + b


class EinsumAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q, k, v = jnp.split(Conv1D(3 * D, name="c_attn")(x), 3, axis=-1)
        scores = jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(D)
        scores = jnp.where(jnp.tril(jnp.ones((x.shape[1],) * 2, bool)), scores, -1e9)
        probs = jax.nn.softmax(scores, axis=-1)
        return Conv1D(D, name="c_proj")(jnp.einsum("bts,bsd->btd", probs, v))


class GPTBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + EinsumAttention(name="attn")(nn.LayerNorm(name="ln_1")(x))
        h = nn.LayerNorm(name="ln_2")(x)
        return x + Conv1D(D, name="c_proj")(jax.nn.gelu(Conv1D(2 * D, name="c_fc")(h)))


class GPT(nn.Module):
    """Two Conv1D blocks with einsum attention and a head tied through wte.attend: 13
    matmuls, 8 of them projections (fp8 under the preset)."""

    @nn.compact
    def __call__(self, tokens):
        wte = nn.Embed(V, D, name="wte")
        x = wte(tokens) + self.param("wpe", nn.initializers.normal(0.02), (T, D))[: tokens.shape[1]]
        for i in range(2):
            x = GPTBlock(name=f"h_{i}")(x)
        return wte.attend(nn.LayerNorm(name="ln_f")(x))


class MatmulMLP(nn.Module):
    """``@`` with raw parameters, a module called twice, and a matmul inside a custom_vjp."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, D, name="embed")(tokens)
        w1 = self.param("w1", nn.initializers.normal(0.1), (D, 2 * D))
        w2 = self.param("w2", nn.initializers.normal(0.1), (2 * D, D))
        x = x + jax.nn.relu(x @ w1) @ w2
        shared = Conv1D(D, name="shared")
        x = x + shared(jnp.tanh(shared(x)))  # called twice: one op, its meta threaded
        x = x + _opaque_mix(x, self.param("mix", nn.initializers.normal(0.1), (D, D)))
        return nn.Dense(V, name="head")(x)


@jax.custom_vjp
def _opaque_mix(x, w):
    return x @ w


_opaque_mix.defvjp(lambda x, w: (x @ w, (x, w)), lambda res, g: (g @ res[1].T, jnp.einsum("...i,...j->ij", res[0], g)))


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + EinsumAttention(name="attn")(nn.LayerNorm()(x)), None


class ScannedGPT(nn.Module):
    """Three layers under nn.scan (one FP8 meta per layer, stacked) and an untied head."""

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(V, D, name="wte")(tokens)
        stack = nn.scan(ScanBlock, variable_axes={"params": 0, "fp8_meta": 0}, split_rngs={"params": True},
                        length=3)
        x, _ = stack(name="blocks")(x, None)
        return nn.Dense(V, name="head")(x)


class HubGPT(nn.Module):
    """A model hub's LM module: the head is a Dense applied with the embedding as kernel
    (a nested apply: no variables of its own)."""

    @nn.compact
    def __call__(self, tokens):
        wte = nn.Embed(V, D, name="wte")
        x = wte(tokens)
        x = GPTBlock(name="h_0")(x)
        shared = self.variables["params"]["wte"]["embedding"].T
        return nn.Dense(V, use_bias=False, name="lm_head").apply({"params": {"kernel": shared}}, x)


@dataclasses.dataclass
class HubOutput:
    logits: jax.Array


class HubModel:
    """The shape of a model hub's class: it holds the module and its params and calls
    ``apply`` itself."""

    def __init__(self, seed: int = 0):
        self.module = HubGPT()
        self.params = self.module.init(jax.random.key(seed), task_batch()[:, :-1])["params"]

    def __call__(self, input_ids, params=None):
        return HubOutput(self.module.apply({"params": params if params is not None else self.params}, input_ids))


# ----------------------------------------------------------------------------- the harness


@dataclasses.dataclass
class Trained:
    losses: list
    fp8_dots: int
    state: mpx.TrainState


def train_linen(model: nn.Module, policy_name: str, *, steps: int, kinds=None, lr: float = 1e-2) -> Trained:
    policy = mpx.parse_policy(policy_name)
    tokens = task_batch()
    with ml.policy_context(policy, kinds=kinds):
        params, meta = ml.split_variables(model.init(jax.random.key(0), tokens[:, :-1]))

    def loss_fn(params, meta, batch, rng):
        with ml.policy_context(policy, kinds=kinds):
            logits = model.apply({"params": params, ml.FP8_COLLECTION: meta}, batch[:, :-1])
        return lm_loss(logits, batch[:, 1:])

    return _train(loss_fn, params, meta, policy, tokens, steps, lr)


def _train(loss_fn, params, meta, policy, tokens, steps, lr, *, model_state=None, has_state=False):
    opt = optax.adam(lr)
    state = mpx.init_train_state(params, opt, policy=policy, fp8_meta=meta, model_state=model_state)
    step = mpx.make_train_step(loss_fn, opt, has_state=has_state, donate=False)
    dots = fp8_dots(step.lower(state, tokens).as_text())
    losses = []
    for _ in range(steps):
        state, m = step(state, tokens)
        assert not bool(m.skipped)
        losses.append(float(m.loss))
    return Trained(losses, dots, state)


# Bounds for "trains within a stated margin of bf16": the task is learnable to near zero
# loss from ln(32) = 3.47 in these steps; FP8 rounding (E4M3: 2**-4 relative) slows it a
# little. Each run is judged by where it settled (the median of its last 10 steps: near
# zero loss a single Adam step can spike on one CPU and not another, see helpers.settled):
# fp8 must settle below half its start, and within 0.25 nats + 30% of bf16 (measured gaps
# are < 0.1 nats on CPU; the slack covers XLA/CPU differences).
def assert_trains_like_bf16(fp8: Trained, bf16: Trained):
    fp8_end, bf16_end = settled(fp8.losses), settled(bf16.losses)
    assert fp8_end < 0.5 * fp8.losses[0], fp8.losses
    assert bf16_end < 0.5 * bf16.losses[0], bf16.losses
    assert fp8_end <= bf16_end * 1.3 + 0.25, (fp8_end, bf16_end, fp8.losses[-10:])


def precisions(table) -> dict[str, str]:
    return {r.path: r.precision for r in table.rows}


# ----------------------------------------------------------------------------- linen tests


@pytest.fixture(scope="module")
def gpt_runs():
    return {p: train_linen(GPT(), p, steps=60) for p in ("fp8", "bf16")}


def test_conv1d_einsum_attention_and_tied_head_are_all_under_the_policy(gpt_runs):
    """Conv1D projections (lax.dot_general, (in, out) kernels), einsum attention and a head
    tied through attend: the 8 projections run as FP8 GEMMs (24 FP8 dots), attention and
    head as bf16; none of it is silently left in f32."""
    fp8, bf16 = gpt_runs["fp8"], gpt_runs["bf16"]
    assert fp8.fp8_dots == 3 * 8 and bf16.fp8_dots == 0
    assert_trains_like_bf16(fp8, bf16)
    captured = fp8.state.fp8_meta["captured"]
    assert sorted(captured) == sorted(f"h_{i}/{p}" for i in range(2) for p in
                                      ("attn/c_attn", "attn/c_proj", "c_fc", "c_proj"))
    assert all(float(m.lhs.calls) == 1.0 for m in captured.values())  # each observed once per step


def test_describe_lists_every_matmul_of_a_linen_model_with_its_precision():
    policy = mpx.parse_policy("fp8")
    table = describe(GPT(), policy, task_batch()[:, :-1])
    expected = {"wte/attend": "bf16"}
    for i in range(2):
        expected.update({f"h_{i}/attn/c_attn": "fp8", f"h_{i}/attn/c_proj": "fp8", f"h_{i}/c_fc": "fp8",
                         f"h_{i}/c_proj": "fp8", f"h_{i}/attn/dot_general_0": "bf16",
                         f"h_{i}/attn/dot_general_1": "bf16"})
    assert precisions(table) == expected  # 13 matmuls, none missing
    kinds = {r.path: r.kind for r in table.rows}
    assert kinds["wte/attend"] == "head"
    assert kinds["h_0/attn/dot_general_0"] == "attention_logits" and kinds["h_0/attn/dot_general_1"] == "attention_values"
    assert table.unmatched_rules == ()  # the preset's own softmax/norm/loss rules are no typo
    assert "warning" not in str(table)


def test_matmul_operator_twice_called_module_and_opaque_matmul():
    """``@`` with raw parameters is captured; a module called twice is one op whose meta is
    threaded (calls 2, fan-out 1); a matmul inside someone's custom_vjp is listed as not
    under the policy, with the reason, and left as it is."""
    policy = mpx.parse_policy("fp8")
    table = describe(MatmulMLP(), policy, task_batch()[:, :-1])
    rows = {r.path: r for r in table.rows}
    assert {p: r.precision for p, r in rows.items()} == {
        "dot_general_0": "fp8", "dot_general_1": "fp8", "dot_general_2": NOT_UNDER_POLICY, "shared": "fp8",
        "head": "fp8"}
    assert rows["shared"].note == "captured, x2"
    assert rows["dot_general_2"].note == "inside a custom_vjp function"
    fp8, bf16 = (train_linen(MatmulMLP(), p, steps=60) for p in ("fp8", "bf16"))
    # 4 fp8 ops, 5 calls (shared twice): 15 FP8 dots
    assert fp8.fp8_dots == 3 * 5
    assert_trains_like_bf16(fp8, bf16)
    shared = fp8.state.fp8_meta["captured"]["shared"]
    assert (float(shared.lhs.calls), float(shared.lhs.fanout)) == (2.0, 1.0)


def test_scanned_linen_stack_keeps_one_meta_per_layer():
    """Captured matmuls inside nn.scan get a meta per layer (stacked, leading axis 3); the
    scan body is lowered once, so its 2 fp8 matmuls show as 6 FP8 dots, plus the head's 3."""
    fp8, bf16 = (train_linen(ScannedGPT(), p, steps=60) for p in ("fp8", "bf16"))
    assert fp8.fp8_dots == 3 * 3
    assert_trains_like_bf16(fp8, bf16)
    captured = fp8.state.fp8_meta["captured"]
    assert sorted(captured) == ["blocks/attn/c_attn", "blocks/attn/c_proj"]
    amax = np.asarray(captured["blocks/attn/c_attn"].lhs.amax)
    assert amax.shape == (3,) and len(set(amax.tolist())) == 3  # each layer its own input amax
    table = describe(ScannedGPT(), mpx.parse_policy("fp8"), task_batch()[:, :-1])
    assert {r.path: r.note for r in table.rows}["blocks/attn/c_attn"] == "captured, stack 3"


def test_a_model_hubs_wrapper_class_with_a_nested_apply_head():
    """A class holding a module and its params, calling apply itself, whose head is a
    nested apply: `Wrapped` runs it unchanged; the head gets a path ("lm_head") that kinds
    can name, and the projections train in FP8."""
    policy = mpx.parse_policy("fp8")
    hub = HubModel()
    model = ml.Wrapped(hub, policy, kinds={"lm_head": "head"})
    tokens = task_batch()
    table = describe(model, policy, tokens[:, :-1])
    assert precisions(table)["lm_head"] == "bf16" and {r.path: r.kind for r in table.rows}["lm_head"] == "head"
    assert sorted(p for p, v in precisions(table).items() if v == "fp8") == [
        "h_0/attn/c_attn", "h_0/attn/c_proj", "h_0/c_fc", "h_0/c_proj"]

    def run(policy_name):
        wrapped = ml.Wrapped(hub, mpx.parse_policy(policy_name), kinds={"lm_head": "head"})
        meta = wrapped.init_fp8(tokens[:, :-1])

        def loss_fn(params, meta, batch, rng):
            return lm_loss(wrapped(meta, batch[:, :-1], params=params).logits, batch[:, 1:])

        return _train(loss_fn, hub.params, meta, mpx.parse_policy(policy_name), tokens, 60, 1e-2)

    fp8, bf16 = run("fp8"), run("bf16")
    assert fp8.fp8_dots == 3 * 4
    assert_trains_like_bf16(fp8, bf16)


def test_unreadable_objects_are_errors_that_say_what_to_pass():
    policy = mpx.parse_policy("fp8")
    with pytest.raises(TypeError, match="mpx.linen.Wrapped"):
        describe(HubModel(), policy, task_batch())
    with pytest.raises(TypeError, match="example inputs"):
        describe(GPT(), policy)
    with pytest.raises(TypeError, match="policy_context"):
        ml.Wrapped(GPT(), policy)


# ----------------------------------------------------------------------------- NNX


class NnxConv1D(nnx.Module):
    def __init__(self, din: int, dout: int, rngs: nnx.Rngs):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (din, dout)) * 0.05)

    def __call__(self, x):
        return lax.dot_general(x, self.weight[...], (((x.ndim - 1,), (0,)), ((), ())))


class NnxModel(nnx.Module):
    """Conv1D projections, einsum attention, Dropout, BatchNorm and a head tied through attend."""

    def __init__(self, rngs: nnx.Rngs):
        self.wte = nnx.Embed(V, D, rngs=rngs)
        self.c_attn = NnxConv1D(D, 3 * D, rngs)
        self.c_proj = NnxConv1D(D, D, rngs)
        self.drop = nnx.Dropout(0.1)
        self.bn = nnx.BatchNorm(D, rngs=rngs)
        self.fc = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, tokens, *, train: bool = False, rngs=None):
        x = self.wte(tokens)
        q, k, v = jnp.split(self.c_attn(x), 3, axis=-1)
        probs = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / np.sqrt(D), axis=-1)
        x = x + self.drop(self.c_proj(probs @ v), deterministic=not train, rngs=rngs)
        x = self.bn(x.reshape(-1, D), use_running_average=not train).reshape(x.shape)
        return self.wte.attend(x + self.fc(x))


def train_nnx(policy_name: str, steps: int) -> tuple[Trained, nnx.Module]:
    policy = mpx.parse_policy(policy_name)
    tokens = task_batch()
    model = NnxModel(nnx.Rngs(0))
    mpx.nn.apply_policy(model, policy, tokens[:, :-1])  # example inputs: FP8 state for every matmul
    graphdef, params, meta, rest = mpx.nn.split(model)

    def loss_fn(params, meta, rest, batch, rng):
        m = nnx.merge(graphdef, params, meta, rest)
        logits = m(batch[:, :-1], train=True, rngs=nnx.Rngs(dropout=rng))
        return lm_loss(logits, batch[:, 1:]), nnx.state(m, nnx.BatchStat)

    return _train(loss_fn, params, meta, policy, tokens, steps, 1e-2, model_state=rest, has_state=True), model


def test_nnx_model_with_dropout_and_batchnorm():
    """apply_policy with example inputs puts the raw matmuls under the policy (2 captured +
    1 Linear = 3 fp8 ops, 9 FP8 dots); mpx.nn.split takes the BatchNorm statistics apart
    and the step carries them (has_state)."""
    (fp8, model), (bf16, _) = train_nnx("fp8", 60), train_nnx("bf16", 60)
    assert fp8.fp8_dots == 3 * 3 and bf16.fp8_dots == 0
    assert_trains_like_bf16(fp8, bf16)
    mean = np.asarray(fp8.state.model_state["bn"]["mean"][...])
    assert np.isfinite(mean).all() and np.abs(mean).max() > 0  # statistics were updated, not dropped
    table = describe(model, mpx.parse_policy("fp8"), task_batch()[:, :-1])
    assert precisions(table) == {"wte": "bf16", "fc": "fp8", "c_attn": "fp8", "c_proj": "fp8",
                                 "dot_general_0": "bf16", "dot_general_1": "bf16", "wte/attend": "bf16"}


def test_nnx_batch_statistics_follow_the_plain_model():
    """Under the fp32 policy one step's BatchNorm statistics equal those of the plain model
    called in train mode on the same batch (the capture writes back what the call changed,
    and only that)."""
    tokens = task_batch()
    plain = NnxModel(nnx.Rngs(0))
    plain(tokens[:, :-1], train=True, rngs=nnx.Rngs(dropout=jax.random.fold_in(jax.random.key(0), 0)))
    trained, _ = train_nnx("fp32", 1)
    for name in ("mean", "var"):
        np.testing.assert_allclose(np.asarray(trained.state.model_state["bn"][name][...]),
                                   np.asarray(getattr(plain.bn, name)[...]), rtol=1e-5, atol=1e-6)


def test_nnx_model_without_example_inputs_is_a_clear_error():
    model = NnxModel(nnx.Rngs(0))
    mpx.nn.apply_policy(model, mpx.parse_policy("fp8"))
    with pytest.raises(ValueError, match=r"c_attn, c_proj.*pass example inputs to apply_policy"):
        model(task_batch()[:, :-1])
    # bf16 needs no FP8 state: no inputs needed, and the raw matmuls still run in bf16
    model = NnxModel(nnx.Rngs(0))
    mpx.nn.apply_policy(model, mpx.parse_policy("bf16"))
    jaxpr = jax.make_jaxpr(lambda t: model(t))(task_batch()[:, :-1])
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


class NnxScanned(nnx.Module):
    """Three Conv1D layers built with nnx.vmap and run with nnx.scan, and a Linear head."""

    def __init__(self, rngs: nnx.Rngs):
        self.wte = nnx.Embed(V, D, rngs=rngs)

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return NnxConv1D(D, D, rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, tokens):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(block, x):
            return x + jnp.tanh(block(x)).astype(x.dtype)  # a scan carry keeps its dtype

        return self.head(run(self.blocks, self.wte(tokens)))


def test_nnx_scanned_stack_of_raw_matmuls():
    """The matmul inside nnx.scan gets one meta per layer (stacked, 3); the scan body is
    lowered once: its fp8 matmul and the head's give 6 FP8 dots; fp8 trains like bf16."""
    tokens = task_batch()

    def run(policy_name):
        policy = mpx.parse_policy(policy_name)
        model = NnxScanned(nnx.Rngs(0))
        mpx.nn.apply_policy(model, policy, tokens[:, :-1])
        graphdef, params, meta, rest = mpx.nn.split(model)

        def loss_fn(params, meta, batch, rng):
            return lm_loss(nnx.merge(graphdef, params, meta, rest)(batch[:, :-1]), batch[:, 1:])

        return _train(loss_fn, params, meta, policy, tokens, 60, 1e-2)

    fp8, bf16 = run("fp8"), run("bf16")
    assert fp8.fp8_dots == 3 * 2
    assert_trains_like_bf16(fp8, bf16)
    (path, captured), = fp8.state.fp8_meta["mpx_fp8"].get_value().items()
    amax = np.asarray(captured.lhs.amax)
    assert path == "dot_general_0" and amax.shape == (3,) and len(set(amax.tolist())) == 3


# ----------------------------------------------------------------------------- the capture's root


def test_a_matmul_inside_a_closed_call_is_captured_and_runs_in_fp8():
    """A call primitive that keeps its jaxpr as ``call_jaxpr`` (closed_call) is gone into as
    ``jit`` is: its matmul is named, put in fp8 and evaluated through the policy op."""
    import contextlib

    from jax.extend.core import primitives

    from mpx import capture

    x, w = jnp.ones((4, 16)), jnp.full((16, 16), 0.5)
    inner = jax.make_jaxpr(lambda x, w: x @ w)(x, w)
    closed_call = primitives.closed_call_p

    def call(state, args, kwargs):
        (w,), (x,) = state, args
        return closed_call.bind(x, w, **closed_call.get_bind_params({"call_jaxpr": inner}))[0]

    root = capture.Root(call, (w,), (x,), {}, marking=lambda naming: contextlib.nullcontext())
    captured = capture.Captured(root, mpx.parse_policy("fp8"))
    trace = captured.trace()
    assert [(m.path, m.kind, m.precision) for m in trace.matmuls] == [("dot_general_0", "dense", "fp8")]
    metas = captured.init(trace=trace)
    assert list(metas) == ["dot_general_0"]
    np.testing.assert_array_equal(captured.apply(metas, trace=trace), x @ w)  # 1 and 0.5 are exact in fp8
    assert "f8_e4m3" in str(jax.make_jaxpr(lambda m: captured.apply(m, trace=trace))(metas))
