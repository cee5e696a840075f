"""Loss scales: dynamic trajectory, scale/unscale arithmetic, pytree round trips, all_finite, config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpx.loss_scale import (
    DynamicLossScale,
    LossScaleConfig,
    NoOpLossScale,
    StaticLossScale,
    all_finite,
    dynamic_loss_scale,
    select_tree,
)

T, F = True, False
F32_MAX = float(np.finfo(np.float32).max)

# dynamic_loss_scale(8.0, period=3, factor=2.0, min_loss_scale=1.0), starting at (8, 0).
# Expected (scale, counter) after each step, worked out by hand.
FLAGS = [T, T, T, T, T, F, T, T, T, F, F, F, F, F, T]
EXPECTED = [
    (8.0, 1), (8.0, 2), (16.0, 0),  # grows exactly on the 3rd consecutive finite step, run restarts
    (16.0, 1), (16.0, 2), (8.0, 0),  # non-finite: halve, run restarts (no growth from the 2 before)
    (8.0, 1), (8.0, 2), (16.0, 0),
    (8.0, 0), (4.0, 0), (2.0, 0), (1.0, 0), (1.0, 0),  # halving stops at min 1.0 and stays there
    (1.0, 1),
]


def _trajectory(adjust, ls, flags):
    out = []
    for flag in flags:
        ls = adjust(ls, jnp.array(flag))
        assert (ls.loss_scale.dtype, ls.counter.dtype) == (jnp.float32, jnp.int32)
        out.append((float(ls.loss_scale), int(ls.counter)))
    return out, ls


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_dynamic_trajectory_step_by_step(jit):
    """(scale, counter) after every adjust matches the hand-written list, eagerly and under jit."""
    adjust = (lambda ls, f: ls.adjust(f))
    adjust = jax.jit(adjust) if jit else adjust
    got, ls = _trajectory(adjust, dynamic_loss_scale(8.0, period=3, factor=2.0, min_loss_scale=1.0), FLAGS)
    assert got == EXPECTED
    assert (int(ls.period), float(ls.factor), float(ls.min_loss_scale)) == (3, 2.0, 1.0)  # untouched


def test_floor_is_clamped_to_a_non_power_of_two_min():
    """max(scale / factor, min): 8 -> 4 -> 3 -> 3 with min 3; factor 4 grows 3 -> 12 after period 1."""
    ls = dynamic_loss_scale(8.0, period=1, factor=2.0, min_loss_scale=3.0)
    assert _trajectory(lambda s, f: s.adjust(f), ls, [F, F, F, T])[0] == [(4.0, 0), (3.0, 0), (3.0, 0), (6.0, 0)]
    ls = dynamic_loss_scale(3.0, period=1, factor=4.0, min_loss_scale=1.0)
    assert _trajectory(lambda s, f: s.adjust(f), ls, [T, F])[0] == [(12.0, 0), (3.0, 0)]


@pytest.mark.parametrize("initial, factor", [(2.0**127, 2.0), (F32_MAX, 2.0), (F32_MAX / 2, 3.0)])
def test_growth_never_overflows_to_inf(initial, factor):
    """When scale * factor would be inf the scale stays put (counter still restarts)."""
    ls = dynamic_loss_scale(initial, period=1, factor=factor)
    got, _ = _trajectory(jax.jit(lambda s, f: s.adjust(f)), ls, [T, T, T])
    assert got == [(float(np.float32(initial)), 0)] * 3


def test_growth_just_below_overflow_still_happens():
    """2**126 * 2 = 2**127 is finite: it grows, then stays at 2**127."""
    got, _ = _trajectory(lambda s, f: s.adjust(f), dynamic_loss_scale(2.0**126, period=1), [T, T])
    assert got == [(2.0**127, 0), (2.0**127, 0)]


def _tree():
    return {"bf": jnp.array([1.5, -3.0], jnp.bfloat16), "h": jnp.array([0.25, -6.0], jnp.float16),
            "f": jnp.array([7.0, 0.0], jnp.float32), "n": jnp.array([3, -4], jnp.int32)}


@pytest.mark.parametrize("ls", [dynamic_loss_scale(1024), StaticLossScale(jnp.float32(1024.0)),
                                LossScaleConfig(kind="static", initial=1024).create()],
                         ids=["dynamic", "static", "static-config"])
def test_scale_unscale_exact_dtype_preserving(ls):
    """scale multiplies by 1024 exactly, unscale divides back exactly; dtypes kept; ints untouched."""
    tree = _tree()
    assert float(ls.scale(jnp.float32(2.5))) == 2560.0
    scaled = ls.scale(tree)
    assert {k: v.dtype for k, v in scaled.items()} == {k: v.dtype for k, v in tree.items()}
    expected = {"bf": [1536.0, -3072.0], "h": [256.0, -6144.0], "f": [7168.0, 0.0]}
    for k, v in expected.items():
        np.testing.assert_array_equal(np.asarray(scaled[k], np.float32), v)
    assert scaled["n"] is tree["n"]
    back = ls.unscale(scaled)
    assert {k: v.dtype for k, v in back.items()} == {k: v.dtype for k, v in tree.items()}
    for k in ("bf", "h", "f"):  # power-of-two scale: exact round trip
        np.testing.assert_array_equal(np.asarray(back[k], np.float32), np.asarray(tree[k], np.float32))
    assert back["n"] is tree["n"]


def test_scaling_an_fp16_leaf_past_65504_gives_inf_that_all_finite_catches():
    """Scaling happens in f32 and is cast back: an fp16 overflow is inf, as loss scaling expects."""
    scaled = dynamic_loss_scale(4.0).scale({"g": jnp.array([20000.0, 1.0], jnp.float16)})
    assert scaled["g"].dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(scaled["g"], np.float32), [np.inf, 4.0])
    assert not bool(all_finite(scaled))


def test_noop_and_static_behave_as_documented():
    """NoOp: identity, scale 1.0 f32; Static: fixed scale, adjust returns itself for either flag."""
    tree = _tree()
    noop = NoOpLossScale()
    assert noop.scale(tree) is tree and noop.unscale(tree) is tree
    assert noop.adjust(jnp.array(False)) is noop and noop.adjust(jnp.array(True)) is noop
    assert noop.loss_scale.dtype == jnp.float32 and float(noop.loss_scale) == 1.0
    static = StaticLossScale(jnp.float32(8.0))
    for flag in (T, F):
        assert static.adjust(jnp.array(flag)) is static
        assert float(jax.jit(lambda s, f: s.adjust(f))(static, jnp.array(flag)).loss_scale) == 8.0
    assert float(static.unscale(jnp.float32(3.0))) == 0.375


@pytest.mark.parametrize("make", [lambda: dynamic_loss_scale(8, period=3, factor=2, min_loss_scale=1),
                                  lambda: LossScaleConfig(kind="dynamic", initial=8, factor=2, min=1).create(),
                                  lambda: LossScaleConfig(kind="static", initial=8).create()],
                         ids=["dynamic-fn", "dynamic-config", "static-config"])
def test_scale_is_float32_when_built_from_python_ints(make):
    """Python-int arguments still give f32 scale/factor/min and i32 counter/period."""
    ls = make()
    assert ls.loss_scale.dtype == jnp.float32 and float(ls.loss_scale) == 8.0
    if isinstance(ls, DynamicLossScale):
        assert (ls.counter.dtype, ls.period.dtype, ls.factor.dtype, ls.min_loss_scale.dtype) == (
            jnp.int32, jnp.int32, jnp.float32, jnp.float32)


SCALES = {
    "noop": (NoOpLossScale(), 0),
    "static": (StaticLossScale(jnp.float32(8.0)), 1),
    "dynamic": (dynamic_loss_scale(64.0, period=7, factor=3.0, min_loss_scale=0.5).replace(
        counter=jnp.int32(5)), 5),
}


@pytest.mark.parametrize("name", SCALES)
def test_every_field_is_a_leaf_and_survives_jit_and_cond(name):
    """Leaf count = field count; jit identity and lax.cond give back equal leaves of the same dtype."""
    ls, n_fields = SCALES[name]
    assert len(jax.tree.leaves(ls)) == n_fields
    via_jit = jax.jit(lambda x: x)(ls)
    via_cond = jax.jit(lambda p, x: jax.lax.cond(p, lambda y: y, lambda y: y, x))(jnp.array(True), ls)
    for back in (via_jit, via_cond):
        assert type(back) is type(ls)
        leaves, want = jax.tree.leaves(back), jax.tree.leaves(ls)
        assert len(leaves) == n_fields
        for x, y in zip(leaves, want):
            assert x.dtype == y.dtype and x.shape == y.shape == ()
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dynamic_fields_preserved_by_jit_and_chosen_by_cond():
    """period/min_loss_scale/factor/counter come through jit and a traced lax.cond branch choice."""
    a = dynamic_loss_scale(64.0, period=7, factor=3.0, min_loss_scale=0.5).replace(counter=jnp.int32(5))
    b = dynamic_loss_scale(2.0, period=11, factor=4.0, min_loss_scale=0.25)
    fields = lambda s: (float(s.loss_scale), int(s.counter), int(s.period), float(s.factor), float(s.min_loss_scale))
    assert fields(jax.jit(lambda x: x)(a)) == (64.0, 5, 7, 3.0, 0.5)
    pick = jax.jit(lambda p: jax.lax.cond(p, lambda: a, lambda: b))
    assert fields(pick(jnp.array(True))) == (64.0, 5, 7, 3.0, 0.5)
    assert fields(pick(jnp.array(False))) == (2.0, 0, 11, 4.0, 0.25)


PARAMS = {"w": jnp.ones((3, 2), jnp.float32), "b": jnp.zeros((2,), jnp.float32),
          "e": jnp.full((4,), 0.5, jnp.bfloat16), "step": jnp.array(7, jnp.int32)}


@pytest.mark.parametrize("leaf", ["w", "b", "e"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_catches_one_bad_element_in_any_leaf(leaf, bad):
    """One NaN/±inf element in any float leaf (bf16 included) makes all_finite False, also under jit."""
    tree = dict(PARAMS)
    tree[leaf] = tree[leaf].at[(0,) * tree[leaf].ndim].set(bad)
    for fn in (all_finite, jax.jit(all_finite)):
        out = fn(tree)
        assert out.dtype == jnp.bool_ and out.shape == () and not bool(out)


@pytest.mark.parametrize("tree", [PARAMS, {}, {"i": jnp.array([1, 2], jnp.int32)}, [jnp.float32(1.0), 2.0]],
                         ids=["params", "empty", "ints-only", "scalars"])
def test_all_finite_true_on_finite_trees(tree):
    """Finite float leaves, int-only trees and the empty tree are all finite."""
    for fn in (all_finite, jax.jit(all_finite)):
        out = fn(tree)
        assert out.dtype == jnp.bool_ and out.shape == () and bool(out)


def test_select_tree_picks_whole_trees_by_traced_predicate():
    """Under jit with a traced scalar pred, every leaf comes from the chosen tree (dtypes kept)."""
    a = {"x": jnp.array([1.0, 2.0]), "h": jnp.array([3.0], jnp.bfloat16), "n": jnp.array([1], jnp.int32)}
    b = {"x": jnp.array([-1.0, -2.0]), "h": jnp.array([-3.0], jnp.bfloat16), "n": jnp.array([9], jnp.int32)}
    pick = jax.jit(select_tree)
    for pred, want in ((True, a), (False, b)):
        got = pick(jnp.array(pred), a, b)
        for k in a:
            assert got[k].dtype == want[k].dtype
            np.testing.assert_array_equal(np.asarray(got[k], np.float32), np.asarray(want[k], np.float32))
    s1, s2 = dynamic_loss_scale(8.0, period=3), dynamic_loss_scale(2.0, period=5)
    got = pick(jnp.array(False), s1, s2)
    assert (float(got.loss_scale), int(got.period)) == (2.0, 5)


def test_config_create_builds_the_right_scale():
    """none -> NoOp; static -> Static(initial); dynamic -> Dynamic with every configured field."""
    assert isinstance(LossScaleConfig().create(), NoOpLossScale)
    static = LossScaleConfig(kind="static", initial=128, period=3, factor=4.0).create()
    assert type(static) is StaticLossScale and float(static.loss_scale) == 128.0
    d = LossScaleConfig(kind="dynamic", initial=256, period=5, factor=4, min=2).create()
    assert type(d) is DynamicLossScale
    assert (float(d.loss_scale), int(d.counter), int(d.period), float(d.factor), float(d.min_loss_scale)) == (
        256.0, 0, 5, 4.0, 2.0)
    default = LossScaleConfig(kind="dynamic").create()
    assert (float(default.loss_scale), int(default.period), float(default.factor),
            float(default.min_loss_scale)) == (32768.0, 2000, 2.0, 1.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"kind": "auto"}, r"loss_scale kind 'auto' is not supported; expected one of none, static, dynamic"),
        ({"period": 0}, r"loss_scale period must be an integer >= 1, got 0"),
        ({"period": 2.5}, r"loss_scale period must be an integer >= 1, got 2.5"),
        ({"period": True}, r"loss_scale period must be an integer >= 1, got True"),
        ({"initial": -1}, r"loss_scale initial must be a positive number, got -1"),
        ({"initial": "big"}, r"loss_scale initial must be a positive number, got 'big'"),
        ({"factor": 0}, r"loss_scale factor must be a positive number, got 0"),
        ({"min": 0.0}, r"loss_scale min must be a positive number, got 0.0"),
        ({"kind": "dynamic", "factor": 1.0}, r"loss_scale factor must be > 1 for a dynamic scale, got 1.0"),
        ({"kind": "dynamic", "factor": 0.5}, r"loss_scale factor must be > 1 for a dynamic scale, got 0.5"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, message):
    """Each bad field raises ValueError naming the field and the offending value."""
    with pytest.raises(ValueError, match=message):
        LossScaleConfig(**kwargs)


def test_static_factor_below_one_is_allowed():
    """factor > 1 is only required for dynamic scales."""
    assert LossScaleConfig(kind="static", factor=0.5).factor == 0.5


@pytest.mark.parametrize("initial", [float("inf"), 1e39])
def test_config_rejects_initial_that_is_inf_in_float32(initial):
    """A scale that is inf in f32 can never back off (inf / 2 == inf): it should be rejected."""
    with pytest.raises(ValueError, match="initial"):
        LossScaleConfig(kind="dynamic", initial=initial)
