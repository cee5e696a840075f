"""mpx.linen: unmodified linen models and explicit dot_general_cls under a policy."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mpx
import mpx.linen as ml
from mpx.fp8 import apply_meta_updates

POLICY = mpx.parse_policy("fp8; fp8.amax_history=4")
KINDS = {"Dense_2": "head"}


class PlainMLP(nn.Module):
    """A user's linen model: only nn.Dense, no mpx anywhere."""

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(nn.Dense(32)(x))
        x = nn.gelu(nn.Dense(32)(x))
        return nn.Dense(1)(x)


def data():
    x = jax.random.normal(jax.random.key(0), (128, 8))
    return x, jnp.sin(x @ jnp.linspace(-1.0, 1.0, 8))[:, None]


def init(model, x, policy=POLICY, kinds=KINDS):
    with ml.policy_context(policy, kinds=kinds):
        return model.init(jax.random.key(1), x)


def run(model, params, meta, x, policy=POLICY, kinds=KINDS):
    with ml.policy_context(policy, kinds=kinds):
        return ml.apply_with_meta(model, params, meta, x)


def test_plain_model_under_the_context_keeps_its_params_and_gains_fp8_meta():
    x, _ = data()
    model = PlainMLP()
    variables = init(model, x)
    plain = model.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, variables["params"]) == jax.tree.map(jnp.shape, plain["params"])
    assert sorted(variables[ml.FP8_COLLECTION]) == ["Dense_0", "Dense_1"]  # the head is bf16 under fp8
    assert ml.linen_ops(model, POLICY, x, kinds=KINDS) == [("Dense_0", "dense"), ("Dense_1", "dense"), ("Dense_2", "head")]


def test_forward_is_close_to_the_plain_fp32_model():
    """After one calibration step, three layers (two FP8 with E4M3 operands ~0.05 rms
    each, a bf16 head) stay within 0.1 norm-wise of the fp32 model; measured 0.05."""
    x, _ = data()
    model = PlainMLP()
    params, meta = ml.split_variables(init(model, x))
    updates = jax.grad(lambda m: jnp.sum(run(model, params, m, x).astype(jnp.float32)))(meta)
    meta = apply_meta_updates(meta, updates)
    out = np.asarray(run(model, params, meta, x), np.float64)
    ref = np.asarray(model.apply({"params": params}, x), np.float64)
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 0.0 < rel < 0.1, rel


def test_trains_with_the_mpx_step_and_meta_follows_the_tensors():
    x, y = data()
    model = PlainMLP()
    params, meta = ml.split_variables(init(model, x))

    def loss_fn(params, meta, batch, rng):
        return jnp.mean((run(model, params, meta, batch[0]).astype(jnp.float32) - batch[1]) ** 2)

    opt = optax.adam(1e-2)
    state = mpx.init_train_state(params, opt, fp8_meta=meta)
    step = jax.jit(functools.partial(mpx.train_step, loss_fn=loss_fn, optimizer=opt))
    losses = []
    for _ in range(100):
        kernel_before = state.params["Dense_1"]["kernel"]
        state, m = step(state, (x, y))
        losses.append(float(m.loss))
    # Target variance ~0.4; 100 Adam steps bring the MSE below a fifth of the start.
    assert np.mean(losses[-5:]) < 0.2 * losses[0], (losses[0], losses[-5:])
    d1 = state.fp8_meta["Dense_1"]["PolicyDotGeneral_0"]["meta"]
    # Slot 0 holds the amax of the kernel the last step used (cast to bf16 by the layer).
    assert float(d1.rhs.amax_history[0]) == float(jnp.max(jnp.abs(kernel_before.astype(jnp.bfloat16))))
    for s, limit in ((d1.lhs, 448.0), (d1.rhs, 448.0), (d1.grad, 57344.0)):
        assert float(s.scale) != 1.0
        np.testing.assert_allclose(float(s.scale), limit / float(jnp.max(s.amax_history)), rtol=1e-6)


def test_explicit_dot_general_cls():
    class Explicit(nn.Module):
        @nn.compact
        def __call__(self, x):
            dot = functools.partial(ml.PolicyDotGeneral, policy=POLICY)
            return nn.Dense(4, dot_general_cls=dot, dtype=jnp.bfloat16, name="proj")(x)

    x = jnp.ones((2, 8))
    variables = Explicit().init(jax.random.key(0), x)  # no context needed
    meta = variables[ml.FP8_COLLECTION]["proj"]["PolicyDotGeneral_0"]["meta"]
    assert isinstance(meta, mpx.Fp8Meta)
    out = Explicit().apply(variables, x)
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 4)


def test_a_layer_called_twice_combines_amaxes_by_max():
    class Twice(nn.Module):
        @nn.compact
        def __call__(self, a, b):
            dense = nn.Dense(4, use_bias=False)
            return jnp.sum(dense(a).astype(jnp.float32)) + 3.0 * jnp.sum(dense(b).astype(jnp.float32))

    a, b = jnp.full((2, 4), 2.0), jnp.full((2, 4), -5.0)
    model = Twice()
    with ml.policy_context(POLICY):
        params, meta = ml.split_variables(model.init(jax.random.key(0), a, b))
    new = jax.grad(lambda m: _twice(model, params, m, a, b))(meta)
    s = new["Dense_0"]["PolicyDotGeneral_0"]["meta"]
    assert float(s.lhs.amax_history[0]) == 5.0  # max(2, 5), the sum would be 7
    assert float(s.grad.amax_history[0]) == 3.0


def _twice(model, params, meta, a, b):
    with ml.policy_context(POLICY):
        return ml.apply_with_meta(model, params, meta, a, b)


def test_bf16_policy_creates_no_meta_and_computes_in_bf16():
    x, _ = data()
    model = PlainMLP()
    policy = mpx.parse_policy("bf16")
    variables = init(model, x, policy=policy)
    assert ml.FP8_COLLECTION not in variables
    with ml.policy_context(policy):
        out = model.apply(variables, x)
    assert out.dtype == jnp.bfloat16
