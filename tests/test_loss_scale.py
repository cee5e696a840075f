"""Loss scales: step-by-step dynamic trajectory, scaling arithmetic, pytree round trips."""

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
# initial 8, period 3, factor 2, min 1. Expected (scale, counter) after each step, by hand:
FLAGS = [T, T, T, T, T, F, T, T, T, F, F, F, F, F, T]
EXPECTED = [
    (8, 1), (8, 2), (16, 0),  # grows on the 3rd consecutive finite step
    (16, 1), (16, 2), (8, 0),  # overflow: halve, run restarts
    (8, 1), (8, 2), (16, 0),
    (8, 0), (4, 0), (2, 0), (1, 0), (1, 0),  # floor at min 1
    (1, 1),
]


@pytest.mark.parametrize("jit", [False, True])
def test_dynamic_trajectory(jit):
    ls = dynamic_loss_scale(8.0, period=3, factor=2.0, min_loss_scale=1.0)
    adjust = jax.jit(lambda ls, f: ls.adjust(f)) if jit else (lambda ls, f: ls.adjust(f))
    got = []
    for flag in FLAGS:
        ls = adjust(ls, jnp.array(flag))
        got.append((float(ls.loss_scale), int(ls.counter)))
    assert got == [(float(s), c) for s, c in EXPECTED]
    assert ls.loss_scale.dtype == jnp.float32 and ls.counter.dtype == jnp.int32


def test_growth_never_overflows():
    ls = dynamic_loss_scale(float(np.finfo(np.float32).max) / 1.5, period=1)
    ls = ls.adjust(jnp.array(True))
    assert np.isfinite(float(ls.loss_scale)) and float(ls.loss_scale) == np.float32(np.finfo(np.float32).max / 1.5)


def test_scale_unscale_exact_and_dtype_preserving():
    ls = dynamic_loss_scale(1024)
    tree = {"a": jnp.array([1.5, -3.0], jnp.bfloat16), "b": jnp.array([0.25], jnp.float16),
            "c": jnp.array([7.0], jnp.float32), "n": jnp.array([3], jnp.int32)}
    scaled = ls.scale(tree)
    assert {k: v.dtype for k, v in scaled.items()} == {k: v.dtype for k, v in tree.items()}
    np.testing.assert_array_equal(np.asarray(scaled["c"]), [7168.0])
    np.testing.assert_array_equal(np.asarray(scaled["n"]), [3])
    back = ls.unscale(scaled)
    for k in tree:  # power-of-two scale: exact both ways
        np.testing.assert_array_equal(np.asarray(back[k], np.float32), np.asarray(tree[k], np.float32))
    assert float(StaticLossScale(jnp.float32(4.0)).scale(jnp.float32(2.5))) == 10.0
    assert NoOpLossScale().scale(tree) is tree and float(NoOpLossScale().loss_scale) == 1.0
    assert dynamic_loss_scale(2).loss_scale.dtype == jnp.float32  # from a Python int


@pytest.mark.parametrize(
    "ls, n_leaves",
    [(NoOpLossScale(), 0), (StaticLossScale(jnp.float32(8.0)), 1),
     (dynamic_loss_scale(64.0, period=7, factor=3.0, min_loss_scale=0.5), 5)],
)
def test_every_field_survives_jit_and_cond(ls, n_leaves):
    assert len(jax.tree.leaves(ls)) == n_leaves
    for back in (jax.jit(lambda x: x)(ls), jax.lax.cond(True, lambda x: x, lambda x: x, ls)):
        assert type(back) is type(ls)
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(ls)):
            assert x.dtype == y.dtype and np.array_equal(x, y)
    if isinstance(ls, DynamicLossScale):
        back = jax.jit(lambda x: x)(ls)
        assert int(back.period) == 7 and float(back.min_loss_scale) == 0.5 and float(back.factor) == 3.0


def test_all_finite_and_select_tree():
    good = {"w": jnp.ones((3,), jnp.bfloat16), "b": jnp.zeros(2), "i": jnp.array([1], jnp.int32)}
    assert bool(all_finite(good)) and bool(all_finite({}))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        assert not bool(all_finite({**good, "b": jnp.array([0.0, bad])}))
        assert not bool(all_finite({**good, "w": jnp.array([bad], jnp.bfloat16)}))
    a, b = {"x": jnp.ones(2)}, {"x": jnp.zeros(2)}
    pick = jax.jit(select_tree)
    np.testing.assert_array_equal(np.asarray(pick(jnp.array(True), a, b)["x"]), [1, 1])
    np.testing.assert_array_equal(np.asarray(pick(jnp.array(False), a, b)["x"]), [0, 0])


def test_config_creates_the_right_scale_and_rejects_bad_values():
    assert isinstance(LossScaleConfig().create(), NoOpLossScale)
    assert float(LossScaleConfig(kind="static", initial=128).create().loss_scale) == 128.0
    d = LossScaleConfig(kind="dynamic", initial=256, period=5, factor=4, min=2).create()
    assert (float(d.loss_scale), int(d.period), float(d.factor), float(d.min_loss_scale)) == (256, 5, 4, 2)
    for kwargs, field in [({"kind": "auto"}, "kind"), ({"period": 0}, "period"), ({"initial": -1}, "initial"),
                          ({"kind": "dynamic", "factor": 1.0}, "factor"), ({"min": 0}, "min")]:
        with pytest.raises(ValueError, match=field):
            LossScaleConfig(**kwargs)
