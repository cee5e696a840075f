"""Small helpers shared by several test modules."""

import dataclasses
import functools
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mpx
import mpx.nn as mn


def fp8_gpu() -> bool:
    """The first device is a GPU of compute capability >= 8.9 (Ada/Hopper: FP8 tensor cores)."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return False
    major, minor = (int(p) for p in str(getattr(dev, "compute_capability", "0.0")).split(".")[:2])
    return (major, minor) >= (8, 9)


def ref_scale(amax, limit: float, margin: int = 0) -> np.float32:
    """mpx's scale for an amax, in float64: the largest power of two ``s`` with ``amax *
    2**margin * s <= limit`` (exact: frexp of the float64 quotient, checked by the product)."""
    top = float(np.float32(amax)) * 2.0**margin
    mantissa, exponent = np.frexp(limit / top)  # quotient = mantissa * 2**exponent, 0.5 <= mantissa < 1
    s = 2.0 ** (int(exponent) - 1)
    return np.float32(s / 2 if top * s > limit else s)


def paragraph(i: int) -> str:
    """Document ``i`` of a tiny corpus: a unique marker ``¶NNN``, a few lines, some unicode."""
    words = ["thou", "art", "more", "lovely", "and", "more", "temperate", "été", "naïve", "🙂"]
    lines = [" ".join(words[(i + k + j) % len(words)] for j in range(3 + (i + k) % 5)) for k in range(1 + i % 4)]
    return f"¶{i:03d} " + "\n".join(lines) + "\n"


def texts(source) -> list[str]:
    return [source[i]["text"].decode() for i in range(len(source))]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def settled(losses, last: int = 10) -> float:
    """Where a training run ended: the median of its last ``last`` losses.

    A run judged by its final step passes or fails by luck: XLA's CPU code differs between
    processors (vector width, fused multiply-adds), so near zero loss one machine's last Adam
    step spikes (0.28 after 0.02) where another's does not. The median of the last few steps
    ignores such a spike (up to half of them) while a run that really stopped learning, or
    diverged, still shows in it."""
    tail = np.asarray(losses[-last:], dtype=np.float64)
    assert len(tail) == last, f"a run of {len(losses)} steps has no last {last}"
    assert np.isfinite(tail).all(), f"non-finite loss among the last {last}: {tail}"
    return float(np.median(tail))


CONFIG = mn.TransformerConfig(vocab_size=256, d_model=64, num_heads=4, num_layers=2, d_ff=128, max_len=32)
BATCH = jax.ShapeDtypeStruct((4, 33), jnp.int32)


def lm_step(spec: str, *, scan=False, remat=False, remat_policy="full", accum_steps=1, layers=CONFIG.num_layers,
            fp8_bootstrap=True):
    """A full TransformerLM train step (AdamW) under ``spec``: (model, policy, step, abstract args).
    Matmul dims are multiples of 16 (cuBLASLt FP8 takes those). ``fp8_bootstrap``: the first
    step's program (True) or the lean one of the steps after."""
    policy = mpx.parse_policy(spec)
    config = dataclasses.replace(CONFIG, scan_layers=scan, remat=remat, remat_policy=remat_policy, num_layers=layers)
    model = mn.TransformerLM(config, policy=policy, rngs=nnx.Rngs(0))
    graphdef, params, meta = nnx.split(model, nnx.Param, mn.Fp8MetaVariable)

    def loss_fn(params, meta, batch, rng):
        m = nnx.merge(graphdef, params, meta)
        return m.loss(m(batch[:, :-1]), batch[:, 1:])

    opt = optax.adamw(1e-3)
    state = mpx.init_train_state(params, opt, policy=policy, fp8_meta=meta)
    step = functools.partial(mpx.train_step, loss_fn=loss_fn, optimizer=opt, accum_steps=accum_steps,
                             fp8_bootstrap=fp8_bootstrap)
    batch = BATCH if accum_steps == 1 else jax.ShapeDtypeStruct((accum_steps, *BATCH.shape), BATCH.dtype)
    return model, policy, step, (state, batch)


def tiny_lm_run(name: str, data_dir, *, precision: str = "fp8", lr: str = "3.0e-3",
                train: str = "steps: 4, log_every: 2, eval_every: 0",
                checkpoint: str = "every: 2, keep: 3, async_save: false") -> str:
    """The YAML of a training run small enough to start in seconds on a CPU: a one-layer
    byte-level LM (d_model 32, sequences of 32), the Shakespeare corpus in ``data_dir``,
    no TensorBoard or progress bar; ``train`` and ``checkpoint`` are those sections' keys."""
    return f"""
name: {name}
precision: {precision}
model: {{d_model: 32, num_heads: 2, num_layers: 1, d_ff: 64, max_len: 32}}
optim: {{lr: {lr}, warmup_steps: 2}}
data: {{task: lm, seq_len: 32, batch_size: 8, data_dir: {data_dir}}}
train: {{{train}}}
checkpoint: {{{checkpoint}}}
logging: {{tensorboard: false, progress: false}}
"""


def require_compiler(target: str, overlay: str, tier: str) -> None:
    """Load the compiler for ``target`` from ``sys.prefix/overlay`` (where the Makefile installs
    it) for a compile tier: a failure in CI (the tier must run there), a skip elsewhere."""
    try:
        mpx.program.ensure_compiler(target, pathlib.Path(sys.prefix) / overlay)
    except RuntimeError as missing:
        if os.environ.get("CI"):
            pytest.fail(f"the {tier} compile tier must run in CI: {missing}")
        pytest.skip(f"no {tier} compiler: {missing}")
