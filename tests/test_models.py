"""mpx.apply_policy: one verb for NNX modules, linen modules and model objects, each giving
what its old entry point gave on the same model; mpx.split and mpx.matmuls after it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mpx
import mpx.linen as ml
from mpx.inspect import describe
from mpx._naming import equations

POLICY = mpx.parse_policy("fp8")
X = jax.random.normal(jax.random.key(0), (4, 16))
KINDS = {"out": "head"}


class NnxModel(nnx.Module):
    """A hand-written matmul (captured) and two Linears, the last one the output layer."""

    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (16, 32)) * 0.2)
        self.mid = nnx.Linear(32, 32, rngs=rngs)
        self.out = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.mid(jax.nn.relu(x @ self.w))))


class LinenModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.2), (16, 32))
        h = nn.relu(nn.Dense(32, name="mid")(nn.relu(x @ w)))
        return nn.Dense(4, name="out")(h)


class HubModel:
    """A model hub's class: holds a linen module and its params, calls apply itself."""

    def __init__(self):
        self.module = LinenModel()
        self.params = self.module.init(jax.random.key(1), X)["params"]

    def __call__(self, x, params=None):
        return self.module.apply({"params": self.params if params is None else params}, x)


def decisions(matmuls) -> list[tuple[str, str, str]]:
    return [(m.path, m.kind, m.precision) for m in matmuls]


def rows(table) -> list[tuple[str, str, str, str]]:
    return [(r.path, r.kind, r.precision, r.note) for r in table.rows]


def test_an_nnx_model_is_changed_in_place_as_by_mpx_nn_apply_policy():
    old, new = NnxModel(nnx.Rngs(0)), NnxModel(nnx.Rngs(0))
    mpx.nn.apply_policy(old, POLICY, X, kinds=KINDS)
    assert mpx.apply_policy(new, POLICY, X, kinds=KINDS) is new
    expected = [("dot_general_0", "dense", "fp8"), ("mid", "dense", "fp8"), ("out", "head", "bf16")]
    assert decisions(mpx.matmuls(new, POLICY, X)) == decisions(mpx.nn._root.matmuls(old, POLICY, KINDS, (X,), {}))
    assert decisions(mpx.matmuls(new, POLICY, X)) == expected
    assert rows(describe(new, POLICY, X)) == rows(describe(old, POLICY, X, kinds=KINDS))
    # The same state, taken apart the same way, computes the same numbers.
    for a, b in zip(mpx.split(new), mpx.nn.split(old)):
        assert jax.tree.structure(a) == jax.tree.structure(b)
    np.testing.assert_array_equal(new(X), old(X))


def test_describe_and_matmuls_default_to_the_kinds_the_model_runs_with():
    """A captured matmul named a head by apply_policy's kinds is a bf16 head in the table
    too, without passing kinds again (it runs as one)."""
    model = mpx.apply_policy(NnxModel(nnx.Rngs(0)), POLICY, X, kinds={"dot_general_0": "head", **KINDS})
    assert {r.path: (r.kind, r.precision) for r in describe(model, POLICY, X).rows}["dot_general_0"] == ("head", "bf16")
    jaxpr = jax.make_jaxpr(lambda x: model(x))(X).jaxpr
    dtypes = [(str(e.invars[0].aval.dtype), str(e.invars[1].aval.dtype)) for e, _ in equations(jaxpr)
              if e.primitive.name == "dot_general" and e.invars[1].aval.shape == (16, 32)]
    assert dtypes == [("bfloat16", "bfloat16")]


def test_a_linen_module_gets_init_and_apply_under_the_policy_as_in_policy_context():
    module = LinenModel()
    model = mpx.apply_policy(module, POLICY, kinds=KINDS)
    assert isinstance(model, ml.PolicyModule) and model.module is module

    def old_init(x):
        with ml.policy_context(POLICY, kinds=KINDS):
            return module.init(jax.random.key(2), x)

    old_vars, new_vars = jax.jit(old_init)(X), jax.jit(model.init)(jax.random.key(2), X)
    jax.tree.map(np.testing.assert_array_equal, new_vars, old_vars)
    params, fp8_meta = mpx.split(new_vars)
    assert sorted(fp8_meta) == ["captured", "mid"]  # the `@` and the fp8 Dense; the head is bf16
    jax.tree.map(np.testing.assert_array_equal, (params, fp8_meta), ml.split_variables(old_vars))

    def old_apply(v, x):
        with ml.policy_context(POLICY, kinds=KINDS):
            return module.apply(v, x)

    np.testing.assert_array_equal(jax.jit(model.apply)(new_vars, X), jax.jit(old_apply)(old_vars, X))
    expected = [("dot_general_0", "dense", "fp8"), ("mid", "dense", "fp8"), ("out", "head", "bf16")]
    assert decisions(mpx.matmuls(model, POLICY, X)) == expected
    assert decisions(mpx.matmuls(module, POLICY, X, kinds=KINDS)) == expected
    assert decisions(ml.linen_matmuls(module, POLICY, X, kinds=KINDS)) == expected
    assert rows(describe(model, POLICY, X)) == rows(describe(module, POLICY, X, kinds=KINDS))


def test_a_model_object_becomes_wrapped_as_by_mpx_linen_wrapped():
    hub = HubModel()
    model = mpx.apply_policy(hub, POLICY, kinds=KINDS)
    old = ml.Wrapped(hub, POLICY, kinds=KINDS)
    assert isinstance(model, ml.Wrapped) and model.obj is hub
    meta, old_meta = model.init_fp8(X), old.init_fp8(X)
    assert sorted(meta) == sorted(old_meta) == ["dot_general_0", "mid"]
    expected = [("dot_general_0", "dense", "fp8"), ("mid", "dense", "fp8"), ("out", "head", "bf16")]
    assert decisions(mpx.matmuls(model, POLICY, X)) == decisions(old.matmuls(X)) == expected
    assert rows(describe(model, POLICY, X)) == rows(describe(old, POLICY, X))
    run = jax.jit(lambda m, p, x, w: w(m, x, params=p), static_argnums=3)
    np.testing.assert_array_equal(run(meta, hub.params, X, model), run(old_meta, hub.params, X, old))


def test_applying_again_replaces_the_policy_around_the_same_model():
    bf16 = mpx.parse_policy("bf16")
    linen_model = mpx.apply_policy(mpx.apply_policy(LinenModel(), POLICY), bf16)
    assert linen_model.policy is bf16 and isinstance(linen_model.module, LinenModel)
    assert {m.precision for m in mpx.matmuls(linen_model, bf16, X)} == {"bf16"}
    hub = HubModel()
    wrapped = mpx.apply_policy(mpx.apply_policy(hub, POLICY), bf16)
    assert wrapped.obj is hub and wrapped.policy is bf16


def test_what_the_verb_cannot_take_is_a_type_error_naming_what_it_takes():
    accepted = r"takes an nnx.Module, a flax.linen Module, or an object whose __call__ runs a linen module's apply"
    for value in (3, "model", jnp.ones(3)):
        with pytest.raises(TypeError, match=accepted):
            mpx.apply_policy(value, POLICY)
    with pytest.raises(TypeError, match=r"not its class.*LinenModel\(\.\.\.\)"):
        mpx.apply_policy(LinenModel, POLICY)
    with pytest.raises(TypeError, match=r"no example inputs for a linen module.*model.init\(key, x\)"):
        mpx.apply_policy(LinenModel(), POLICY, X)
    with pytest.raises(TypeError, match=r"no example inputs for a wrapped model object.*init_fp8"):
        mpx.apply_policy(HubModel(), POLICY, X)
    with pytest.raises(TypeError, match=r"split takes an nnx.Module or linen variables.*got int"):
        mpx.split(3)
    with pytest.raises(TypeError, match=r"matmuls takes an NNX module.*wrapped = mpx.apply_policy\(obj, policy\)"):
        mpx.matmuls(HubModel(), POLICY, X)
    with pytest.raises(TypeError, match="matmuls needs example inputs"):
        mpx.matmuls(LinenModel(), POLICY)
