"""mpx.linen: unmodified linen models and explicit dot_general_cls under a policy."""

import functools
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpx
import mpx.linen as ml
from mpx.fp8 import Fp8Meta, fp8_dot_general

from helpers import ref_scale, settled

FP8 = mpx.parse_policy("fp8; fp8.amax_history=4")
KINDS = {"Dense_2": "head"}
BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits: round-to-nearest is within 2**-9 relative


class PlainMLP(nn.Module):
    """A user's linen model: nn.Dense only, nothing from mpx."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(1)(x)


def regression_data():
    x = jax.random.normal(jax.random.key(0), (64, 8))
    return {"x": x, "y": jnp.sin(x @ jnp.linspace(-1.0, 1.0, 8))[:, None]}


def init(model, *args, policy=FP8, kinds=KINDS):
    def f(*args):  # jitted: one compile instead of many eager FP8 ops
        with ml.policy_context(policy, kinds=kinds):
            return model.init(jax.random.key(1), *args)

    return jax.jit(f)(*args)


def apply(model, params, meta, *args, policy=FP8, kinds=KINDS):
    """The forward a loss_fn runs: the meta threaded through every call of an op."""
    with ml.policy_context(policy, kinds=kinds):
        out, _ = model.apply({"params": params, ml.FP8_COLLECTION: meta}, *args, mutable=[ml.FP8_COLLECTION])
    return out


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def meta_of(collection, path) -> Fp8Meta:
    node = collection
    for key in path.split("/"):
        node = node[key]
    return node["PolicyDotGeneral_0"]["meta"]


# ----------------------------------------------------------------------------- unmodified model


def test_plain_model_keeps_its_params_and_gains_meta_for_its_fp8_layers():
    x = regression_data()["x"]
    model = PlainMLP()
    variables = init(model, x)
    plain = model.init(jax.random.key(1), x)
    # Identical tree, shapes and values: a checkpoint of the plain model loads as is.
    jax.tree.map(np.testing.assert_array_equal, variables["params"], plain["params"])
    assert set(variables) == {"params", ml.FP8_COLLECTION}
    # The head is bf16 under the fp8 preset, so it has no meta.
    assert sorted(variables[ml.FP8_COLLECTION]) == ["Dense_0", "Dense_1"]
    for path in ("Dense_0", "Dense_1"):
        meta = meta_of(variables[ml.FP8_COLLECTION], path)
        assert meta.lhs.amax_history.shape == (4,) and float(meta.rhs.scale) == 1.0
    assert ml.linen_ops(model, FP8, x, kinds=KINDS) == [("Dense_0", "dense"), ("Dense_1", "dense"), ("Dense_2", "head")]
    table = mpx.inspect.describe(model, FP8, x, kinds=KINDS)
    assert table.by_precision() == {"fp8": ["Dense_0", "Dense_1"], "bf16": ["Dense_2"]}


def test_forward_is_close_to_the_plain_fp32_forward():
    """E4M3 keeps 4 significant bits: each operand is within 2**-4 relative (~0.036 rms
    for uniform rounding), a product ~0.05 rms, and random rounding errors add in
    quadrature through the two FP8 layers (~0.07) plus bf16 in the head (~0.002). 0.15
    leaves a 2x margin over that estimate (measured 0.031). The bf16 policy gives 0.004
    here, so an error above 0.01 shows the operands really were quantized to FP8."""
    x = jax.random.normal(jax.random.key(2), (16, 8))
    model = PlainMLP()
    params, meta = ml.split_variables(init(model, x))
    out = jax.jit(functools.partial(apply, model))(params, meta, x)
    assert out.dtype == jnp.bfloat16
    assert 0.01 < rel_err(out, model.apply({"params": params}, x)) < 0.15


def test_trains_with_the_mpx_step_and_meta_tracks_the_tensors():
    batch = regression_data()
    model = PlainMLP()
    params, meta = ml.split_variables(init(model, batch["x"]))

    def loss_fn(params, meta, batch, rng):
        out = apply(model, params, meta, batch["x"])
        return jnp.mean((out.astype(jnp.float32) - batch["y"]) ** 2)

    opt = optax.adam(1e-2)
    state = mpx.init_train_state(params, opt, fp8_meta=meta)
    step = jax.jit(functools.partial(mpx.train_step, loss_fn=loss_fn, optimizer=opt))
    losses = []
    for _ in range(100):
        used = state.params  # the params the step is about to run with
        state, metrics = step(state, batch)
        losses.append(float(metrics.loss))
    # Target variance ~0.48 on 64 points; 100 Adam steps fit it (measured: /750). Ask /20
    # of where the run settled (median of the last 10: one step's spike is luck, helpers.settled).
    assert settled(losses) < losses[0] / 20, (losses[0], losses[-10:])
    assert not any(np.isnan(losses))

    for path in ("Dense_0", "Dense_1"):
        m = meta_of(state.fp8_meta, path)
        for s, fp8_max in ((m.lhs, 448.0), (m.rhs, 448.0), (m.grad, 57344.0)):
            assert float(s.scale) != 1.0
            assert float(s.scale) == ref_scale(jnp.max(s.amax_history), fp8_max)
        # Slot 0 holds the amax of the f32 master kernel the last step ran with, exactly:
        # the FP8 matmul quantizes the master weight, not a bf16 copy of it.
        assert float(m.rhs.amax_history[0]) == float(jnp.max(jnp.abs(used[path]["kernel"])))
        # The history rolled once per step: all 4 slots (zeros at init) hold amaxes now.
        assert all(float(s) > 0 for s in m.rhs.amax_history)
    # The first layer's lhs is the batch itself.
    first = meta_of(state.fp8_meta, "Dense_0")
    assert float(first.lhs.amax_history[0]) == pytest.approx(float(jnp.max(jnp.abs(batch["x"]))), rel=BF16_EPS)


def test_a_layer_called_twice_combines_amaxes_by_max():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, a, b):
            dense = nn.Dense(4, use_bias=False)
            return jnp.sum(dense(a).astype(jnp.float32)) + 3.0 * jnp.sum(dense(b).astype(jnp.float32))

    a, b = jnp.full((2, 4), 2.0), jnp.full((2, 4), -5.0)
    model = Twice()
    params, meta = ml.split_variables(init(model, a, b))
    assert list(meta) == ["Dense_0"]  # one layer, one meta, however often it is called
    seen = meta_of(jax.jit(jax.grad(lambda m: apply(model, params, m, a, b)))(meta), "Dense_0")
    w_amax = float(jnp.max(jnp.abs(params["Dense_0"]["kernel"])))
    assert float(seen.lhs.amax) == 5.0  # max(2, 5); a sum would give 7
    assert float(seen.rhs.amax) == w_amax  # the same kernel twice; a sum would double it
    assert float(seen.grad.amax) == 3.0  # output gradients 1 and 3
    assert (float(seen.lhs.calls), float(seen.lhs.fanout)) == (2.0, 1.0)
    new = meta_of(meta, "Dense_0").advance(seen)
    assert float(new.lhs.scale) == ref_scale(5.0, 448.0)

    # Without mutable=[FP8_COLLECTION] the policy context threads the meta all the same
    # (it runs the model's apply with the FP8 collection mutable): max, not a sum, and no
    # fan-out warning. The wrong way is not possible under the context.
    def not_mutable(m):
        with ml.policy_context(FP8):
            return model.apply({"params": params, ml.FP8_COLLECTION: m}, a, b)

    with warnings.catch_warnings():
        warnings.simplefilter("error", mpx.fp8.Fp8FanoutWarning)
        plain = meta_of(jax.grad(not_mutable)(meta), "Dense_0")
    assert (float(plain.lhs.amax), float(plain.lhs.fanout), float(plain.lhs.calls)) == (5.0, 1.0, 2.0)


def test_bf16_policy_creates_no_meta_and_every_dense_computes_in_bf16():
    x = jax.random.normal(jax.random.key(2), (16, 8))
    model = PlainMLP()
    policy = mpx.parse_policy("bf16")
    variables = init(model, x, policy=policy)
    assert set(variables) == {"params"}
    assert ml.split_variables(variables)[1] == {}
    with ml.policy_context(policy):
        out, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    dense_outputs = {k: v["__call__"] for k, v in state["intermediates"].items() if k.startswith("Dense")}
    assert sorted(dense_outputs) == ["Dense_0", "Dense_1", "Dense_2"]
    assert all(len(o) == 1 and o[0].dtype == jnp.bfloat16 for o in dense_outputs.values())
    # Operands rounded to bf16 (2**-9 each, ~0.0016 rms per product) through three layers:
    # ~0.003 expected, measured 0.004.
    assert rel_err(out, model.apply(variables, x)) < 0.02
    assert ml.linen_ops(model, policy, x) == [("Dense_0", "dense"), ("Dense_1", "dense"), ("Dense_2", "dense")]


def test_dense_general_and_einsum_are_intercepted_too():
    class Mixed(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.Einsum((8, 2, 3), "bi,ijk->bjk", name="mix")(x)  # (B, 2, 3)
            return y + nn.DenseGeneral((2, 3), name="proj")(x)

    x = jax.random.normal(jax.random.key(3), (16, 8))
    model = Mixed()
    variables = init(model, x, kinds=None)
    plain = model.init(jax.random.key(1), x)
    jax.tree.map(np.testing.assert_array_equal, variables["params"], plain["params"])
    assert sorted(variables[ml.FP8_COLLECTION]) == ["mix", "proj"]
    out = jax.jit(functools.partial(apply, model, kinds=None))(*ml.split_variables(variables), x)
    assert out.dtype == jnp.bfloat16 and out.shape == (16, 2, 3)
    # One FP8 layer per output, each ~0.05 rms (see the MLP forward test).
    assert 0.01 < rel_err(out, model.apply(plain, x)) < 0.15
    assert ml.linen_ops(model, FP8, x) == [("mix", "einsum"), ("proj", "dense")]


def test_apply_without_the_meta_says_how_to_get_it():
    x = jnp.ones((2, 8))
    model = PlainMLP()
    plain = model.init(jax.random.key(1), x)  # initialised outside the policy: no fp8_meta
    with pytest.raises(ValueError, match=r"fp8_meta/Dense_0/PolicyDotGeneral_0/meta.*policy_context"):
        apply(model, plain["params"], {}, x)


def test_split_variables_refuses_collections_the_step_would_drop():
    with pytest.raises(ValueError, match=r"\['batch_stats'\]"):
        ml.split_variables({"params": {}, "batch_stats": {}})


# ----------------------------------------------------------------------------- explicit dot_general_cls


class Encoder(nn.Module):
    policy: mpx.Policy

    @nn.compact
    def __call__(self, x):
        dot = functools.partial(ml.PolicyDotGeneral, policy=self.policy)
        h = nn.Dense(16, dot_general_cls=dot, name="fc1")(x)
        return h, nn.Dense(4, dot_general_cls=dot, name="fc2")(h)


class WithEncoder(nn.Module):
    policy: mpx.Policy

    @nn.compact
    def __call__(self, x):
        return Encoder(self.policy, name="encoder")(x)


def test_explicit_dot_general_cls_names_the_op_by_its_layer():
    """The rule 'encoder/fc1->fp8' reaches the Dense at that path (the op's path is its
    layer's, not PolicyDotGeneral's own); fc2 falls through to bf16."""
    policy = mpx.parse_policy("bf16; encoder/fc1->fp8; fp8.amax_history=4")
    model = WithEncoder(policy)
    x = jax.random.normal(jax.random.key(4), (4, 8))
    variables = jax.jit(model.init)(jax.random.key(0), x)  # no context needed
    assert jax.tree.structure(variables[ml.FP8_COLLECTION]) == jax.tree.structure(
        {"encoder": {"fc1": {"PolicyDotGeneral_0": {"meta": Fp8Meta.init(policy.fp8)}}}}
    )
    assert ml.linen_ops(model, policy, x) == [("encoder/fc1", "dense"), ("encoder/fc2", "dense")]

    # Eagerly, so that every op rounds as written (under jit XLA may keep a bf16 product
    # in f32 before an f32 add, differently in different programs).
    h, out = model.apply(variables, x)
    p = variables["params"]["encoder"]
    dims = (((1,), (0,)), ((), ()))
    ref_h, _ = fp8_dot_general(x, p["fc1"]["kernel"], dims, Fp8Meta.init(policy.fp8), out_dtype=jnp.bfloat16)
    np.testing.assert_array_equal(h, ref_h + p["fc1"]["bias"])
    ref_out = jax.lax.dot_general(h.astype(jnp.bfloat16), p["fc2"]["kernel"].astype(jnp.bfloat16), dims)
    np.testing.assert_array_equal(out, ref_out + p["fc2"]["bias"])

    # Its observation comes back through the gradient like the intercepted layers'.
    def loss(meta):
        (_, y), _ = model.apply({**variables, ml.FP8_COLLECTION: meta}, x, mutable=[ml.FP8_COLLECTION])
        return jnp.sum(y)

    new = meta_of(jax.jit(jax.grad(loss))(variables[ml.FP8_COLLECTION]), "encoder/fc1")
    assert float(new.lhs.amax) == float(jnp.max(jnp.abs(x)))
    assert float(new.rhs.amax) == float(jnp.max(jnp.abs(p["fc1"]["kernel"])))
