"""mpx.optim: AdamW with moments stored in f32, bf16 or 8 bits.

The 8-bit quantizer against a numpy/ml_dtypes one written here; f32 storage against
optax.adamw bit for bit; bf16 and fp8 storage against f32 within measured bounds; the state
through jit, orbax and an 8-device FSDP mesh unchanged; the errors."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import mpx
from mpx.optim import _adam, _blocks

ROOT = pathlib.Path(__file__).resolve().parents[1]
E4M3_MAX = 448.0


def reference_quantize(x: np.ndarray, block: int):
    """Block absmax E4M3, written out with numpy and ml_dtypes: (codes, scales)."""
    x = np.atleast_1d(np.asarray(x, np.float32))
    n = x.shape[-1]
    starts = range(0, n, block)
    amax = np.stack([np.abs(x[..., s:s + block]).max(axis=-1) for s in starts], axis=-1)
    scale = np.where(amax > 0, amax * np.float32(1 / E4M3_MAX), np.float32(1)).astype(np.float32)
    per_element = np.concatenate([np.repeat(scale[..., i:i + 1], min(block, n - s), axis=-1)
                                  for i, s in enumerate(starts)], axis=-1)
    scaled = np.clip(x / per_element, -E4M3_MAX, E4M3_MAX).astype(np.float32)
    return scaled.astype(ml_dtypes.float8_e4m3fn), scale


def structured(shape, seed=0):
    """Values over ~12 decades with whole zero blocks and zero elements: what moments look like."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * np.exp(rng.normal(0, 3, shape))).astype(np.float32)
    if x.ndim == 2:
        x[0, :40] = 0.0  # a zero block at block 32 (and part of one at 128)
    x.flat[::7] = 0.0
    return x


@pytest.mark.parametrize("shape, block", [((3, 300), 128), ((4, 64), 32), ((5,), 2), ((2, 3, 7), 4), ((), 128)])
def test_quantize_matches_numpy_codes_and_scales_bit_for_bit(shape, block):
    """Ragged last blocks (300 = 2 x 128 + 44, 7 = 4 + 3), all-zero blocks, a scalar."""
    x = structured(shape)
    q = _blocks.quantize(jnp.asarray(x), block)
    codes, scale = reference_quantize(x, block)
    assert q.codes.shape == x.shape and q.scale.shape == shape[:-1] + (-(-(shape or (1,))[-1] // block),)
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1).view(np.uint8), codes.reshape(-1).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(q.scale).view(np.uint32), scale.view(np.uint32))


def test_quantize_round_trip_error_is_half_an_e4m3_step():
    """E4M3 has 3 mantissa bits: to nearest, an element in the normal range is off by at most
    2**-4 of itself; below 2**-6 (subnormals, spacing 2**-9) by at most 2**-10 of the block's
    scale. 1e-6 of itself more for the f32 multiply by the scale. Zeros stay exactly zero."""
    x = structured((6, 300))
    q = _blocks.quantize(jnp.asarray(x), 128)
    back = np.asarray(_blocks.dequantize(q))
    scale = np.repeat(np.asarray(q.scale), 128, axis=-1)[:, :300]
    bound = 2.0**-4 * np.abs(x) * (1 + 1e-6) + 2.0**-10 * scale
    assert np.all(np.abs(back - x) <= bound)
    assert np.all(back[x == 0] == 0) and np.all(back[0, :32] == 0)


def test_expanded_second_moment_never_reads_back_zero_and_keeps_relative_error():
    """The second moment's form: a block's smallest nonzero is raised to E4M3's smallest
    normal, so nothing nonzero reads back as 0, however far below the block's largest
    (here 40 decades). Every element is then in E4M3's normal range (relative error
    2**-4), and reading back takes its k-th root: (1 + 2**-4) ** (1 / k) - 1 (compressed,
    k < 1, only where a block spans more than E4M3's 448 / 2**-6); 3e-5 more for the f32
    round-off of exp(z) at |z| up to ~200 (|z| 2**-24 ~ 1.2e-5)."""
    x = np.abs(structured((6, 300)))
    x[1, 5], x[1, 6] = 1e-30, 1e10  # one block over 40 decades
    x[2] = np.linspace(1.0, 100.0, 300)  # blocks narrower than E4M3's range: expanded, k > 1
    x[3] = 1.0 + np.linspace(0.0, 1e-3, 300)  # nearly equal: k at its cap
    q = _blocks.quantize_expanded(jnp.asarray(x), 128)
    back = np.asarray(_blocks.dequantize_expanded(q))
    assert np.all((back == 0) == (x == 0))
    k = np.repeat(np.asarray(q.exponent), 128, axis=-1)[:, :300]
    nonzero = x > 0
    rel = np.abs(back - x)[nonzero] / x[nonzero]
    assert np.all(rel <= (1 + 2.0**-4) ** (1 / k[nonzero]) - 1 + 3e-5)
    assert np.any(k < 1) and np.any(k > 1) and np.any(k == _blocks.MAX_EXPONENT)  # every kind of block
    assert np.all(np.asarray(q.exponent) <= _blocks.MAX_EXPONENT)


def params_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.standard_normal((8, 300)), jnp.float32),  # a ragged block at 128
            "b": jnp.asarray(rng.standard_normal((300,)), jnp.float32), "s": jnp.float32(0.5)}


def gradients(params, step):
    rng = np.random.default_rng(100 + step)
    return jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(jnp.shape(p)) * 0.1, jnp.float32), params)


@pytest.mark.parametrize("jit", [False, True])
def test_f32_moments_are_optax_adamw_bit_for_bit(jit):
    """Five steps under a schedule and weight decay, eager and jitted: updates, moments, count."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 10)
    ours, theirs = (mpx.optim.adamw(schedule, b2=0.95, weight_decay=0.1, moments="f32"),
                    optax.adamw(schedule, b2=0.95, weight_decay=0.1))
    update_ours, update_theirs = (jax.jit(o.update) if jit else o.update for o in (ours, theirs))
    params = params_tree()
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    for step in range(5):
        g = gradients(params, step)
        u_ours, s_ours = update_ours(g, s_ours, params)
        u_theirs, s_theirs = update_theirs(g, s_theirs, params)
        for a, b in zip(jax.tree.leaves((u_ours, s_ours[0])), jax.tree.leaves((u_theirs, s_theirs[0]))):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
        params = optax.apply_updates(params, u_theirs)


def regression_run(moments, steps=50):
    """A small MLP (32-64-8) fits a fixed random teacher: losses and the last update."""
    key = jax.random.key(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {"w1": jax.random.normal(k1, (32, 64)) / 6, "b1": jnp.zeros(64), "w2": jax.random.normal(k2, (64, 8)) / 8}
    teacher = jax.random.normal(k3, (32, 8))
    x = jax.random.normal(k4, (256, 32))
    y = jnp.tanh(x @ teacher)

    def loss_fn(p):
        return jnp.mean(jnp.square(jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] - y))

    opt = mpx.optim.adamw(3e-3, weight_decay=1e-4, moments=moments, block_size=32)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s, loss, u

    state, losses = opt.init(params), []
    for _ in range(steps):
        params, state, loss, updates = step(params, state)
        losses.append(float(loss))
    return np.array(losses), updates


@pytest.fixture(scope="module")
def f32_run():
    return regression_run("f32")


@pytest.mark.parametrize("moments, loss_bound, update_bound", [("bf16", 0.001, 0.02), ("fp8", 0.03, 0.4)])
def test_low_precision_moments_train_as_f32_does(f32_run, moments, loss_bound, update_bound):
    """50 steps: the loss at every step within ``loss_bound`` (relative) of f32 moments',
    the last update within ``update_bound`` (relative norm). Measured: bf16 0.015% / 0.7%,
    fp8 1.2% / 18%; the bounds are 2-7x that (f32-level differences would pass bf16's
    easily, an unscaled or zeroed moment fails both by far)."""
    ref_losses, ref_update = f32_run
    losses, update = regression_run(moments)
    assert np.max(np.abs(losses / ref_losses - 1)) < loss_bound
    assert optax.tree.norm(jax.tree.map(jnp.subtract, update, ref_update)) / optax.tree.norm(ref_update) < update_bound


def test_a_second_moment_far_below_its_block_max_does_not_blow_up_the_update():
    """One element's gradients 1e3 times another's in the same block: its second moment is
    1e-6 of the block's largest, below plain E4M3's reach (448 / 2**-9 ~ 2e5), while its
    first moment (1e-3 of the largest) is not. Stored plainly, that second moment reads
    back as 0 and the update is m / eps, ~1e5; the chosen form keeps it: with constant
    gradients Adam's update is 1 for every element, here within 0.15 (E4M3's 2**-4 on the
    first moment, half the second's relative error under the square root, and the drift
    of re-rounding over 10 steps)."""
    g = {"w": jnp.where(jnp.arange(64) == 0, 1.0, 1e-3).astype(jnp.float32)}
    plain = _adam.scale_by_adam_with(_adam.fp8_codec(64), _adam.Codec(lambda x: _blocks.quantize(x, 64),
                                                                       _blocks.dequantize), b1=0.9, b2=0.999, eps=1e-8)
    for opt, ok in ((mpx.optim.scale_by_adam(moments="fp8", block_size=64), True), (plain, False)):
        state = opt.init(g)
        for _ in range(10):
            updates, state = opt.update(g, state)
        worst = float(jnp.max(jnp.abs(updates["w"] - 1.0)))
        assert (worst < 0.15) == ok, worst


def test_state_shapes_and_bytes_per_parameter():
    """Codes keep each param's shape (FSDP splits them as the param); fp8 is 2 bytes a
    parameter plus 12 bytes a block of 128 (mu's scale, nu's amax and exponent)."""
    params = {"w": jnp.zeros((256, 512)), "s": jnp.zeros(())}
    nbytes = {}
    for moments in mpx.optim.MOMENTS:
        state = mpx.optim.scale_by_adam(moments=moments).init(params)
        nbytes[moments] = sum(x.nbytes for x in jax.tree.leaves((state.mu, state.nu)))
    n = 256 * 512 + 1
    assert nbytes == {"f32": 8 * n, "bf16": 4 * n, "fp8": 2 * n + 12 * (256 * 4 + 1)}
    state = mpx.optim.scale_by_adam(moments="fp8").init(params)
    assert state.mu["w"].codes.shape == state.nu["w"].codes.shape == (256, 512)
    assert state.mu["w"].scale.shape == state.nu["w"].exponent.shape == (256, 4)


def fp8_state_after_steps():
    params = params_tree()
    opt = mpx.optim.adamw(1e-2, moments="fp8", block_size=64)
    state, update = opt.init(params), jax.jit(opt.update)  # eager, each small op would dispatch alone
    for step in range(3):
        _, state = update(gradients(params, step), state, params)
    return params, opt, state


def assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_fp8_state_goes_through_jit_unchanged():
    _, _, state = fp8_state_after_steps()
    assert_bitwise_equal(jax.jit(lambda s: s)(state), state)
    assert isinstance(state[0].nu["w"], mpx.optim.BlockExpanded) and state[0].nu["w"].block_size == 64


def test_fp8_state_saves_and_restores_bit_identically(tmp_path):
    """Through the app's checkpointer (orbax): float8 arrays are stored as they are."""
    from train.checkpoint import Checkpointer

    params, opt, opt_state = fp8_state_after_steps()
    state = mpx.init_train_state(params, opt, rng=jax.random.key(0)).replace(opt_state=opt_state)
    checkpointer = Checkpointer(tmp_path / "run", every=1, keep=2, async_save=False)
    try:
        assert checkpointer.save(1, state, data_state={}, config={}, force=True)
        checkpointer.wait()
        fresh = mpx.init_train_state(params, opt, rng=jax.random.key(0))
        restored = checkpointer.restore(1, fresh).state
    finally:
        checkpointer.close()
    assert_bitwise_equal(restored.opt_state, opt_state)
    assert restored.opt_state[0].mu["w"].codes.dtype == jnp.float8_e4m3fn


def test_bad_moments_and_block_size_are_clear_errors():
    with pytest.raises(ValueError, match=r"^moments 'fp9' is not supported; expected one of f32, bf16, fp8 "
                                         r"\(did you mean 'fp8'\?\)$"):
        mpx.optim.adamw(1e-3, moments="fp9")
    for bad in (0, -1, 1.5, True, "128"):
        with pytest.raises(ValueError, match=r"^block_size must be an integer >= 1, got "):
            mpx.optim.scale_by_adam(moments="fp8", block_size=bad)


def test_the_config_builds_the_chosen_moments_and_a_resume_cannot_change_them():
    from train import identity
    from train.build import make_optimizer
    from train.config import load_config

    config = load_config(ROOT / "configs" / "quickstart.yaml", ["optim.moments=fp8", "optim.moment_block=64"])
    assert config.optim.moments in mpx.optim.MOMENTS and set(mpx.optim.MOMENTS) == {"f32", "bf16", "fp8"}
    state = make_optimizer(config.optim, 10).init({"w": jnp.zeros((4, 100))})
    assert jax.tree.leaves(state)[1].shape == (4, 100)  # clipping's empty state, then the codes
    moments = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, mpx.optim.BlockQuantized))
               if isinstance(x, mpx.optim.BlockQuantized)]
    assert moments and moments[0].scale.shape == (4, 2)
    saved = load_config(ROOT / "configs" / "quickstart.yaml").to_dict()
    for change_optim in (False, True):
        with pytest.raises(identity.ConfigMismatch, match=r"optim.moments: 'f32' \(the run\) -> 'fp8' \(now\)"):
            identity.check_resume(saved, config.to_dict(), run_dir="runs/q", say=print, change_optim=change_optim)
    del saved["optim"]["moments"], saved["optim"]["moment_block"]  # a run from before the keys: f32
    assert identity.check_resume(saved, load_config(ROOT / "configs" / "quickstart.yaml").to_dict(),
                                 run_dir="runs/q", say=print) == {}


FSDP_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp
    import mpx
    from train import mesh as mesh_lib

    mesh = mesh_lib.device_mesh(1, 8)
    # split on a leading dim; on the last dim with whole blocks per device; ragged and split on
    # the last dim (8 x 40: blocks of 32 straddle devices, so the scales are replicated)
    params = {"a": jnp.ones((64, 48)), "b": jnp.ones((4, 512)), "c": jnp.ones((3, 320)), "s": jnp.ones(())}
    opt = mpx.optim.adamw(1e-3, moments="fp8", block_size=32)
    state = opt.init(params)
    p_sh, s_sh = mesh_lib.split_shardings(params, mesh), mesh_lib.split_shardings(state, mesh)
    specs = {k: [str(s_sh[0].mu[k].codes.spec), str(s_sh[0].mu[k].scale.spec), str(s_sh[0].nu[k].amax.spec),
                 str(s_sh[0].nu[k].exponent.spec), str(p_sh[k].spec)] for k in params}
    aligned = {k: params[k] for k in ("a", "b")}
    opt_a = mpx.optim.adamw(1e-3, moments="fp8", block_size=32)
    st = opt_a.init(aligned)
    p_a, s_a = mesh_lib.split_shardings(aligned, mesh), mesh_lib.split_shardings(st, mesh)
    update = jax.jit(opt_a.update, in_shardings=(p_a, s_a, p_a), out_shardings=(p_a, s_a))
    hlo = update.lower(aligned, st, aligned).compile().as_text()
    print(json.dumps({"specs": specs, "collectives": [c for c in ("all-gather", "all-to-all", "collective-permute",
                                                                     "all-reduce") if c in hlo]}))
""")


def test_fp8_moments_split_over_fsdp_as_their_params():
    """8 simulated devices, mesh (data 1, fsdp 8): codes get their param's spec, scales the
    same dimension (replicated where the split last dim's block count does not divide);
    with blocks inside each device's part, the compiled update has no collective at all."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, "-c", FSDP_SCRIPT], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    split0, split1 = "P('fsdp', None)", "P(None, 'fsdp')"
    assert result["specs"] == {
        "a": [split0] * 5,  # (64, 48): dim 0; the scales (64, 2) split there too
        "b": [split1] * 5,  # (4, 512): 16 blocks of 32, two a device
        "c": [split1, "P()", "P()", "P()", split1],  # 10 blocks over 8
        "s": ["P()"] * 5,
    }
    assert result["collectives"] == []
