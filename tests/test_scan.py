"""Scan over layers: one FP8 meta per layer of a scanned stack, equal to the unrolled model's.

Regression tests for structures that used to crash: linen ``nn.scan`` (ScopeCollectionNotFound,
then a broadcasting error in the step) and NNX layers built with ``nnx.vmap`` and run with
``nnx.scan`` (IndexError). Each scanned model is trained next to an unrolled twin holding
the same parameters, and the scanned stack's meta, sliced per layer, must equal the meta
of the twin's layer.

Why the comparisons run under ``fp32; @dense->fp8`` (FP8 dense matmuls, everything else in
f32) rather than the ``fp8`` preset: under the preset the embeddings, head and surrounding
ops compute in bf16, and XLA on CPU (which has no bf16 arithmetic) upcasts them to f32 and
drops intermediate roundings differently depending on how it fuses a program. The scanned
and unrolled programs fuse differently, and so do the eager and jitted runs of the *same*
unrolled model (measured: first-step loss 4.5189 eager vs 4.5027 jitted); FP8 rounding
(3 mantissa bits) then turns those 2**-9 differences into flipped codes. Measured with the
preset, scanned vs unrolled LM: first-step losses 4.5117 vs 4.5027, per-layer meta fields
up to 12% apart after three steps. A bound that loose would not notice two layers' metas
being swapped (the kernel amaxes of the layers differ by under 1%). With f32 around the
FP8 matmuls the two programs agree to float32 rounding (below), which pins the layer-by-layer
correspondence. The FP8 ops, the meta and its threading through the scan are the same
under both policies; the preset's scanned, rematerialised LM is trained end to end in
test_train_e2e (fp8-scanned-remat: every layer keeps its own, moving meta).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mpx
import mpx.linen as ml
import mpx.nn as mn
from mpx.fp8 import Fp8Meta, fp8_max

from helpers import ref_scale

L = 3  # layers in every stack below
EXACT = mpx.parse_policy("fp32; @dense->fp8; fp8.amax_history=4")
FIELDS = ("scale", "amax_history", "amax", "calls", "fanout")
TENSORS = ("lhs", "rhs", "grad")
LR = 1e-2


def trainer(loss_fn):
    opt = optax.adam(LR)
    return opt, jax.jit(functools.partial(mpx.train_step, loss_fn=loss_fn, optimizer=opt))


def train(loss_fn, params, meta, batches):
    """Run the jitted step over ``batches``: (losses, final state). Every step must apply."""
    opt, step = trainer(loss_fn)
    state = mpx.init_train_state(params, opt, fp8_meta=meta)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        assert not bool(metrics.skipped)
        assert float(metrics.fp8_fanout) == 1.0  # every meta threaded, none shared
        losses.append(float(metrics.loss))
    return np.array(losses), state


def metas_at(tree) -> dict[str, Fp8Meta]:
    """path -> Fp8Meta of a pytree of metas, the path without container plumbing."""
    found = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, Fp8Meta))[0]
    out = {}
    for key_path, meta in found:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in key_path]
        keys = [k for k in keys if k not in ("value", "raw_value", "dot_general", "fp8_meta", "meta")]
        out["/".join(k for k in keys if not k.startswith("PolicyDotGeneral_"))] = meta
    return out


def layer(meta: Fp8Meta, i: int) -> Fp8Meta:
    return jax.tree.map(lambda a: a[i], meta)


def meta_gap(a: Fp8Meta, b: Fp8Meta) -> float:
    """Largest relative difference over the compared fields of the three tensors."""
    gap = 0.0
    for t in TENSORS:
        for f in FIELDS:
            x = np.asarray(getattr(getattr(a, t), f), np.float64)
            y = np.asarray(getattr(getattr(b, t), f), np.float64)
            gap = max(gap, float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-30))))
    return gap


def assert_layers_match(stacked: dict[str, Fp8Meta], unrolled: dict[str, Fp8Meta], name, rtol):
    """Every op's stacked meta, sliced at layer i, equals the unrolled model's layer-i meta
    (``name(op, i)`` gives its path there), within ``rtol``; and the comparison can fail:
    each layer differs from every other layer by far more than ``rtol``."""
    for op, meta in stacked.items():
        assert meta.stack == (L,), op
        for i in range(L):
            mine = layer(meta, i)
            assert meta_gap(mine, unrolled[name(op, i)]) <= rtol, (op, i, meta_gap(mine, unrolled[name(op, i)]))
            for t in TENSORS:
                s = getattr(mine, t)
                assert float(s.calls) == 1.0 and float(s.fanout) == 1.0, (op, i, t)  # its own meta
                assert float(s.scale) != 1.0, (op, i, t)  # calibrated, not the initial scale
            for j in range(L):
                if j != i:
                    assert meta_gap(mine, unrolled[name(op, j)]) > 100 * rtol, (op, i, j)


# ----------------------------------------------------------------------------- TransformerLM


CFG = mn.TransformerConfig(vocab_size=64, d_model=32, num_heads=4, num_layers=L, d_ff=64, max_len=16, dropout=0.0)
LM_OPS = ("attn/qkv", "attn/out", "mlp/fc", "mlp/proj")


def lm_batches():
    return [jax.random.randint(jax.random.key(10 + i), (2, 17), 0, CFG.vocab_size) for i in range(3)]


def lm_loss(graphdef):
    def loss_fn(params, meta, tokens, rng):
        model = nnx.merge(graphdef, params, meta)
        return model.loss(model(tokens[:, :-1]), tokens[:, 1:])

    return loss_fn


def stack_layers(layers):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *layers)


def train_lm(policy, *, scan, remat=False, like=None):
    """Train a TransformerLM 3 steps; ``like``: pure params of an unrolled LM to start from."""
    model = mn.TransformerLM(dataclasses.replace(CFG, scan_layers=scan, remat=remat), policy=policy, rngs=nnx.Rngs(0))
    graphdef, params, meta = nnx.split(model, nnx.Param, mn.Fp8MetaVariable)
    if like is not None:
        pure = {**like, "blocks": stack_layers([like["blocks"][i] for i in range(L)])}
        nnx.replace_by_pure_dict(params, pure)
    initial = nnx.to_pure_dict(params)
    losses, state = train(lm_loss(graphdef), params, meta, lm_batches())
    return initial, losses, state


@pytest.fixture(scope="module")
def lm_runs():
    initial, losses, state = train_lm(EXACT, scan=False)
    runs = {"unrolled": (initial, losses, state)}
    runs["scan"] = train_lm(EXACT, scan=True, like=initial)
    runs["scan+remat"] = train_lm(EXACT, scan=True, remat=True, like=initial)
    return runs


@pytest.mark.parametrize("variant", ["scan", "scan+remat"])
def test_scanned_lm_trains_like_the_unrolled_lm(lm_runs, variant):
    """scan_layers (and scan_layers + remat) vs the unrolled LM from the same parameters,
    three Adam steps on the same batches.

    Measured: the losses of every step are bit-identical; every meta field of every layer
    agrees to 1.2e-7 relative (an f32 ulp: the backward pass adds some terms in another
    order), the final parameters to 3e-8 absolute (1.2e-7 for norm scales, values ~1).
    Bounds: 1e-6 relative for losses and metas, 1e-6 absolute for parameters. Layers differ
    from one another by more than 0.3 (relative, in some field), so a swapped or shared layer
    cannot pass. The one exception is the key third of the qkv bias: a softmax over keys
    ignores what is added to all of a query's logits, so q.b_k has exactly zero gradient,
    and its float32-noise gradient (~1e-9) goes through Adam's g / sqrt(v) as about +-lr per
    step in either model; it differs by up to 1.6e-3 (bound: three steps of +-lr each, 0.06).
    """
    initial, losses, state = lm_runs["unrolled"]
    s_initial, s_losses, s_state = lm_runs[variant]
    # Same start: the unrolled blocks' parameters, stacked along a new axis 0.
    unrolled_start = stack_layers([initial["blocks"][i] for i in range(L)])
    jax.tree.map(np.testing.assert_array_equal, s_initial["blocks"], unrolled_start)
    np.testing.assert_allclose(s_losses, losses, rtol=1e-6)
    assert losses[0] > 4.0  # ln(64) = 4.16 at init: a real forward, not a constant

    # Parameters: everything outside the blocks directly, each block against its slice.
    final, s_final = nnx.to_pure_dict(state.params), nnx.to_pure_dict(s_state.params)
    d = CFG.d_model
    for i in range(L):
        mine = jax.tree.map(lambda a: np.asarray(a)[i], s_final["blocks"])
        theirs = final["blocks"][i]
        key_bias = (np.asarray(mine["attn"]["qkv"]["bias"]), np.asarray(theirs["attn"]["qkv"]["bias"]))
        for a in (mine, theirs):
            a["attn"]["qkv"]["bias"] = np.delete(np.asarray(a["attn"]["qkv"]["bias"]), np.s_[d : 2 * d])
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-6), mine, theirs)
        np.testing.assert_allclose(key_bias[0][d : 2 * d], key_bias[1][d : 2 * d], rtol=0, atol=2 * 3 * LR)
    outside = lambda p: {k: v for k, v in p.items() if k != "blocks"}  # noqa: E731
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=0, atol=1e-6), outside(s_final), outside(final))
    # The parameters moved (3 Adam steps of up to lr each; measured median 0.02), so agreeing
    # is not agreeing on the initial values.
    moved = np.asarray(final["blocks"][1]["mlp"]["fc"]["kernel"]) - initial["blocks"][1]["mlp"]["fc"]["kernel"]
    assert np.median(np.abs(moved)) > LR

    stacked, unrolled = metas_at(s_state.fp8_meta), metas_at(state.fp8_meta)
    assert sorted(stacked) == sorted(f"blocks/{op}" for op in LM_OPS)
    assert len(unrolled) == L * len(LM_OPS)
    assert_layers_match(stacked, unrolled, lambda op, i: op.replace("blocks/", f"blocks/{i}/"), rtol=1e-6)
    for meta in stacked.values():  # delayed scaling: scale = fp8_max / max(history), per layer
        for name, s, dtype in meta.tensors():
            expected = [ref_scale(a, fp8_max(dtype)) for a in np.max(s.amax_history, axis=-1)]
            np.testing.assert_array_equal(s.scale, expected)
            history = np.asarray(s.amax_history)  # three steps rolled in, the oldest slot still empty
            assert np.all(history[:, :3] > 0) and np.all(history[:, 3] == 0), name


# ----------------------------------------------------------------------------- NNX, written as users do


D = 8


class UserBlock(nnx.Module):
    """A residual MLP block written with plain Flax NNX, knowing nothing of mpx."""

    def __init__(self, d, rngs):
        self.fc = nnx.Linear(d, 2 * d, rngs=rngs)
        self.proj = nnx.Linear(2 * d, d, rngs=rngs)
        self.norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, x):
        return x + self.proj(jax.nn.gelu(self.fc(self.norm(x))))


class UserStack(nnx.Module):
    """The Flax-documented scan-over-layers pattern: blocks built by nnx.vmap over split
    rngs, run by nnx.scan with nnx.remat inside."""

    def __init__(self, d, n, rngs):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return UserBlock(d, rngs)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        @nnx.remat
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


class UserLoop(nnx.Module):
    """The same blocks, built one by one and run by a Python loop."""

    def __init__(self, d, n, rngs):
        self.blocks = nnx.List([UserBlock(d, rngs) for _ in range(n)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def user_batches():
    x = jax.random.normal(jax.random.key(1), (16, D))
    y = jnp.sin(x)
    return [(x, y)] * 3


def nnx_loss(graphdef):
    def loss_fn(params, meta, batch, rng):
        out = nnx.merge(graphdef, params, meta)(batch[0])
        return jnp.mean((out.astype(jnp.float32) - batch[1]) ** 2)

    return loss_fn


@pytest.fixture(scope="module")
def nnx_runs():
    stack = mn.apply_policy(UserStack(D, L, nnx.Rngs(0)), EXACT)
    found = [(f.path, f.kind, f.stack) for f in mn.find_ops(stack)]
    graphdef, params, meta = nnx.split(stack, nnx.Param, mn.Fp8MetaVariable)
    fresh = metas_at(meta)
    pure = nnx.to_pure_dict(params)
    stacked = train(nnx_loss(graphdef), params, meta, user_batches())

    loop = mn.apply_policy(UserLoop(D, L, nnx.Rngs(5)), EXACT)
    graphdef, params, meta = nnx.split(loop, nnx.Param, mn.Fp8MetaVariable)
    nnx.replace_by_pure_dict(params, {"blocks": {i: jax.tree.map(lambda a: a[i], pure["blocks"]) for i in range(L)}})
    unrolled = train(nnx_loss(graphdef), params, meta, user_batches())
    return found, fresh, stacked, unrolled


def test_nnx_vmapped_blocks_run_by_scan_train_like_the_same_blocks_in_a_loop(nnx_runs):
    """apply_policy finds each vmapped layer once, stacked (L,), gives it an (L,)-stacked
    fresh meta; the scanned, rematerialised stack trains (loss falls every step, no skip,
    fan-out 1) and each layer's meta equals that of the same block run unrolled.

    Measured vs the Python-loop twin (f32 around the FP8 matmuls, see the module
    docstring): losses bit-identical, metas within 1.4e-7 relative (layer 0 only), while the
    layers differ from one another by 0.11 or more. Bounds as for the LM: 1e-6 on both.
    """
    found, fresh, (losses, state), (loop_losses, loop_state) = nnx_runs
    assert found == [("blocks/fc", "dense", (L,)), ("blocks/norm", "norm", (L,)), ("blocks/proj", "dense", (L,))]
    assert sorted(fresh) == ["blocks/fc", "blocks/proj"]
    for meta in fresh.values():
        assert meta.stack == (L,) and meta.lhs.amax_history.shape == (L, 4)
        np.testing.assert_array_equal(meta.rhs.scale, np.ones(L))

    assert np.all(np.diff(losses) < 0), losses  # 3 Adam steps on one batch (measured 1.25, 0.88, 0.63)
    np.testing.assert_allclose(losses, loop_losses, rtol=1e-6)
    unrolled = metas_at(loop_state.fp8_meta)
    assert sorted(unrolled) == [f"blocks/{i}/{op}" for i in range(L) for op in ("fc", "proj")]
    assert_layers_match(metas_at(state.fp8_meta), unrolled, lambda op, i: op.replace("blocks/", f"blocks/{i}/"), 1e-6)


# ----------------------------------------------------------------------------- linen nn.scan


class LinenBlock(nn.Module):
    """A residual MLP block in plain linen, shaped for nn.scan: (carry, x) -> (carry, None)."""

    @nn.compact
    def __call__(self, x, _):
        h = nn.Dense(2 * D)(nn.LayerNorm()(x))
        return x + nn.Dense(D)(jax.nn.gelu(h)), None


class LinenScan(nn.Module):
    variable_axes: tuple = (("params", 0), ("fp8_meta", 0))
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(LinenBlock) if self.remat else LinenBlock
        layers = nn.scan(block, variable_axes=dict(self.variable_axes), split_rngs={"params": True}, length=L)
        return layers(name="layers")(x, None)[0]


class LinenLoop(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(L):
            x, _ = LinenBlock(name=f"layers_{i}")(x, None)
        return x


def linen_init(model, x):
    def f(x):
        with ml.policy_context(EXACT):
            return model.init(jax.random.key(0), x)

    return ml.split_variables(jax.jit(f)(x))


def linen_loss(model):
    def loss_fn(params, meta, batch, rng):
        with ml.policy_context(EXACT):
            out, _ = model.apply({"params": params, ml.FP8_COLLECTION: meta}, batch[0], mutable=[ml.FP8_COLLECTION])
        return jnp.mean((out.astype(jnp.float32) - batch[1]) ** 2)

    return loss_fn


def test_linen_scan_without_the_meta_collection_says_how_to_fix_it():
    model = LinenScan(variable_axes=(("params", 0),))
    with pytest.raises(ValueError, match=r"add 'fp8_meta': 0 to its variable_axes"):
        linen_init(model, jnp.ones((2, D)))


@pytest.fixture(scope="module")
def linen_runs():
    x = user_batches()[0][0]
    loop = LinenLoop()
    loop_params, loop_meta = linen_init(loop, x)
    runs = {}
    for remat in (False, True):
        model = LinenScan(remat=remat)
        params, meta = linen_init(model, x)
        fresh = metas_at(meta)
        runs[remat] = (fresh, params, train(linen_loss(model), params, meta, user_batches()))
    # The loop twin starts from the scanned stack's parameters, one slice per named block.
    stacked_params = runs[False][1]["layers"]
    assert jax.tree.structure(stacked_params) == jax.tree.structure(loop_params["layers_0"])
    sliced = {f"layers_{i}": jax.tree.map(lambda a: a[i], stacked_params) for i in range(L)}
    return runs, train(linen_loss(loop), sliced, loop_meta, user_batches())


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan+remat"])
def test_linen_scan_keeps_one_meta_per_layer_equal_to_the_loop(linen_runs, remat):
    """With 'fp8_meta': 0 in variable_axes each Dense of the scanned block gets an (L,)
    stacked meta; the stack (with nn.remat inside or not) trains (loss falls every step,
    no skip, fan-out 1) and each layer's meta equals that of the same block applied L times
    in a Python loop with that layer's parameter slice.

    Measured: losses and metas bit-identical (losses 2.27, 1.42, 0.94), layers 0.31 or more
    apart. Bounds as for the LM: 1e-6 on both.
    """
    runs, (loop_losses, loop_state) = linen_runs
    fresh, _, (losses, state) = runs[remat]
    assert sorted(fresh) == ["layers/Dense_0", "layers/Dense_1"]
    for meta in fresh.values():
        assert meta.stack == (L,) and meta.lhs.amax_history.shape == (L, 4)
    assert np.all(np.diff(losses) < 0), losses  # 3 Adam steps on one batch
    np.testing.assert_allclose(losses, loop_losses, rtol=1e-6)
    unrolled = metas_at(loop_state.fp8_meta)
    assert sorted(unrolled) == [f"layers_{i}/Dense_{k}" for i in range(L) for k in (0, 1)]
    assert_layers_match(metas_at(state.fp8_meta), unrolled, lambda op, i: op.replace("layers/", f"layers_{i}/"), 1e-6)


# ----------------------------------------------------------------------------- inspect


def test_fp8_stats_lists_each_layer_of_a_stacked_meta(nnx_runs, linen_runs):
    """A stacked meta gives one row per layer and tensor, path suffixed [i], carrying the
    values of that layer's slice exactly; for the NNX state and the linen collection alike."""
    trees = {"blocks": nnx_runs[2][1].fp8_meta, "layers": linen_runs[0][False][2][1].fp8_meta}
    for prefix, tree in trees.items():
        metas = metas_at(tree)
        rows = mpx.inspect.fp8_stats(tree)
        assert len(rows) == len(metas) * L * 3
        by_key = {(r.path, r.tensor): r for r in rows}
        assert len(by_key) == len(rows)
        for op, meta in metas.items():
            for i in range(L):
                for name in TENSORS:
                    row = by_key[(f"{op}[{i}]", name)]
                    s = getattr(meta, name)
                    for field in ("amax", "scale", "saturated", "flushed", "calls", "fanout"):
                        assert getattr(row, field) == float(np.asarray(getattr(s, field))[i]), (op, i, name, field)
        assert all(r.path.startswith(prefix + "/") for r in rows)
        # Rows of different layers differ: the suffix indexes the layer, not a copy of layer 0.
        assert len({by_key[(f"{op}[{i}]", "lhs")].amax for op in metas for i in range(L)}) == len(metas) * L


# ----------------------------------------------------------------------------- which ops are inside a stack


class StackBesideAMatmul(nnx.Module):
    """A vmapped stack next to an unstacked matmul of the same module (an mpx DotGeneral
    on a plain weight), both under one parent: only the stack's ops are stacked."""

    def __init__(self, rngs):
        self.stack = UserStack(D, L, rngs)
        self.mix = mn.DotGeneral("dense")
        self.w = nnx.Param(jax.random.normal(jax.random.key(2), (D, D)) / 3)

    def __call__(self, x):
        return self.mix(self.stack(x), self.w[...], (((1,), (0,)), ((), ())))


class Wrapped(nnx.Module):
    def __init__(self, config, policy, rngs):
        self.lm = mn.TransformerLM(config, policy=policy, rngs=rngs)

    def __call__(self, tokens):
        return self.lm(tokens)


def test_only_ops_inside_a_stack_get_a_stacked_meta():
    """Ops without parameters of their own (attention matmuls, a tied head, a bare
    DotGeneral) take the stack of the layers around them only when everything in their
    enclosing module is stacked: a scanned LM's attention logits get (L,), while its tied
    head (wrapped in a user's module, beside the stack) and a matmul beside a vmapped
    stack get (). Each model then runs forward and backward, every meta observed once."""
    policy = mpx.parse_policy("fp8; @head|attention_logits->fp8; fp8.amax_history=4")
    config = mn.TransformerConfig(vocab_size=64, d_model=32, num_heads=4, num_layers=L, d_ff=64, max_len=16,
                                  scan_layers=True)
    wrapped = Wrapped(config, policy, nnx.Rngs(0))
    beside = mn.apply_policy(StackBesideAMatmul(nnx.Rngs(0)), policy)
    stacks = {f.path: f.stack for m in (wrapped, beside) for f in mn.find_ops(m)}
    assert stacks["lm/blocks/attn/logits"] == stacks["lm/blocks/attn/qkv"] == (L,)
    assert stacks["lm/head"] == stacks["lm/embed"] == ()
    assert stacks["stack/blocks/fc"] == (L,) and stacks["mix"] == ()
    inputs = {wrapped: jnp.zeros((2, 8), jnp.int32), beside: jnp.ones((4, D))}
    for model, x in inputs.items():
        graphdef, params, meta = nnx.split(model, nnx.Param, mn.Fp8MetaVariable)
        run = lambda p, m: jnp.sum(nnx.merge(graphdef, p, m)(x).astype(jnp.float32))  # noqa: E731
        _, observed = jax.jit(jax.grad(run, argnums=(0, 1)))(params, meta)  # as train_step differentiates
        for found in metas_at(observed).values():
            assert np.all(np.asarray(found.lhs.calls) == 1.0)
