"""The bench's static mode: the programs of the other modes compiled for a target device that
this machine does not have (`mpx.program`), compared by what they run instead of how fast.

    python -m train bench CONFIG --mode static --target h100 [--layers 4] [--out static.json]

Rows, each a full AdamW train step compiled for the target:

* the plain-Flax decoder of the layer mode (``--layers`` pre-norm layers of the config's shape
  between an embedding and an untied head): ``flax_bf16`` (no mpx at all), ``flax_fp8_direct``
  (Flax's ``Fp8DirectDotGeneralOp`` dot in the four dense layers of every block), and the same
  model under an mpx policy (``mpx_bf16``, ``mpx_fp8``, by `mpx.apply_policy`);
* mpx's ``TransformerLM`` of the config's shape under the bf16, fp8 and int8 presets: with
  ``--layers`` layers unrolled, and as configured (its layers, scan and remat), if that differs.

Columns: GEMMs (FP8 / int8 / other; ``widened_8bit``: 8-bit GEMMs the target's matrix units
widen), non-GEMM kernels launched per step, bytes accessed and those outside GEMMs, temp
memory, the attention kernel, GEMM TFLOP, a roofline (every kernel at the target's bandwidth
or peak, a widened GEMM at the rate it runs at) and the compile time.

For a TPU target (``v5e``, ``v5p``, ``v6e``, ``v7x``; libtpu, `make tpu-compiler`): mpx's
``TransformerLM`` with ``--layers`` layers unrolled under bf16, fp8, int8 and int8 with int8
gradients (`TPU_PRESETS`); libtpu takes minutes for each step of this size on a CPU. Models are built abstractly (shapes
only), so a 1.3B model costs no host memory. No autotuning happens without the device: GEMMs
are compiled with Triton off (`mpx.program.CUBLAS_ONLY`), what XLA's GEMM rewriter makes of them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import mpx
import mpx.nn as mn
from train.bench import FlaxFp8Dot, PlainStack

PLAIN_VARIANTS = ("flax_bf16", "flax_fp8_direct", "mpx_bf16", "mpx_fp8")
LM_PRESETS = ("bf16", "fp8", "int8")
TPU_PRESETS = {"bf16": "bf16", "fp8": "fp8", "int8": "int8", "int8_bwd_int8": "int8; int8.backward=int8"}
"""A TPU's rows: its 8-bit path is int8 with int8 gradients (v5e, v5p, v6e) or fp8 (v7x)."""


class PlainLM(nnx.Module):
    """The layer mode's decoder stack between a bf16 embedding and an untied bf16 head."""

    def __init__(self, shape: mn.TransformerConfig, layers: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(shape.vocab_size, shape.d_model, dtype=jnp.bfloat16, rngs=rngs)
        self.stack = PlainStack(layers, shape.d_model, shape.num_heads, shape.d_ff, rngs=rngs)
        self.norm = nnx.LayerNorm(shape.d_model, dtype=jnp.float32, rngs=rngs)
        self.head = nnx.Linear(shape.d_model, shape.vocab_size, use_bias=False, dtype=jnp.bfloat16, rngs=rngs)

    def __call__(self, tokens):  # (B, T) -> (B, T, V)
        x = self.stack(self.embed(tokens))
        return self.head(self.norm(x).astype(jnp.bfloat16))


def _lm_loss(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def plain_step(shape: mn.TransformerConfig, variant: str, *, layers: int):
    """(step fn, abstract state) of the plain decoder under ``variant``."""

    def build():
        model = PlainLM(shape, layers, rngs=nnx.Rngs(0))
        if variant == "flax_fp8_direct":
            for block in model.stack.blocks:
                for layer in (block.qkv, block.out, block.fc, block.proj):
                    layer.dot_general = nnx.data(FlaxFp8Dot())
        elif variant.startswith("mpx_"):
            mpx.apply_policy(model, mpx.parse_policy(variant[4:]), kinds={"head": "head"})  # the preset keeps heads bf16
        return model

    model = nnx.eval_shape(build)
    opt = optax.adamw(1e-4)
    if variant.startswith("mpx_"):
        graphdef, params, meta = nnx.split(model, nnx.Param, mn.Fp8MetaVariable)

        def loss_fn(params, meta, batch, rng):
            return _lm_loss(nnx.merge(graphdef, params, meta)(batch[:, :-1]), batch[:, 1:])

        state = jax.eval_shape(lambda p, m: mpx.init_train_state(p, opt, fp8_meta=m), params, meta)
        return functools.partial(mpx.train_step, loss_fn=loss_fn, optimizer=opt, fp8_bootstrap=False,
                                 fp8_statistics=False), state

    # Plain Flax: gradients wrt params and Flax's FP8 state; the FP8 state's "gradient" is its
    # new value (Flax's convention), the params go through AdamW.
    graphdef, params, fp8 = nnx.split(model, nnx.Param, ...)

    def step(state, batch):
        params, fp8, opt_state = state

        def loss(params, fp8):
            return _lm_loss(nnx.merge(graphdef, params, fp8)(batch[:, :-1]), batch[:, 1:])

        value, (grads, new_fp8) = jax.value_and_grad(loss, argnums=(0, 1))(params, fp8)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_fp8, opt_state), value

    state = jax.eval_shape(lambda p, f: (p, f, opt.init(p)), params, fp8)
    return step, state


def lm_step(shape: mn.TransformerConfig, preset: str):
    """(step fn, abstract state) of the config's TransformerLM under ``preset``."""
    policy = mpx.parse_policy(preset)
    model = nnx.eval_shape(lambda: mn.TransformerLM(shape, policy=policy, rngs=nnx.Rngs(0)))
    graphdef, params, meta = nnx.split(model, nnx.Param, mn.Fp8MetaVariable)

    def loss_fn(params, meta, batch, rng):
        m = nnx.merge(graphdef, params, meta)
        return m.loss(m(batch[:, :-1]), batch[:, 1:])

    opt = optax.adamw(1e-4)
    state = jax.eval_shape(lambda p, m: mpx.init_train_state(p, opt, policy=policy, fp8_meta=m), params, meta)
    return functools.partial(mpx.train_step, loss_fn=loss_fn, optimizer=opt, fp8_bootstrap=False,
                             fp8_statistics=False), state


def row(model: str, variant: str, report: mpx.program.ProgramReport) -> dict[str, Any]:
    s = report.summary()
    return {
        "mode": "static", "model": model, "variant": variant, "target": report.target,
        "fp8_gemms": report.gemms("fp8"), "int8_gemms": report.gemms("int8"),
        "other_gemms": report.gemms() - report.gemms("fp8") - report.gemms("int8"),
        "widened_8bit": len(report.widened),
        "non_gemm_kernels": s["non_gemm_kernels"], "bytes_gb": s["bytes_accessed"] / 1e9,
        "outside_gemms_gb": s["bytes_outside_gemms"] / 1e9, "temp_gb": s["temp_bytes"] / 1e9,
        "attention": s["attention"], "gemm_tflop": s["gemm_flops"] / 1e12, "roofline_ms": s["roofline_ms"],
        "compile_s": s["compile_s"],
    }


def _report_or_error(model: str, variant: str, fn, state, tokens, target: str) -> dict[str, Any]:
    """The row of one program, or a row that says why it does not compile for the target (a
    step whose temporaries exceed the chip's memory: XLA's RESOURCE_EXHAUSTED message)."""
    try:
        return row(model, variant, mpx.program.report(fn, state, tokens, target=target))
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {"mode": "static", "model": model, "variant": variant, "target": target,
                "error": str(e).splitlines()[0]}


def static(shape: mn.TransformerConfig, *, batch: int, seq: int, layers: int, target: str,
           presets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """One row per program (see the module docstring), in one process; ``presets``: the
    ``TransformerLM`` rows' policies instead of `LM_PRESETS` (`TPU_PRESETS` on a TPU)."""
    tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    rows = []
    if mpx.program.get_target(target).platform == "tpu":  # libtpu compiles big steps slowly: mpx's LM only
        lm_shape = dataclasses.replace(shape, num_layers=layers, scan_layers=False, remat=False)
        for variant, spec in ({p: p for p in presets} or TPU_PRESETS).items():
            fn, state = lm_step(lm_shape, spec)
            rows.append(_report_or_error(f"TransformerLM x{layers}", f"mpx_{variant}", fn, state, tokens, target))
        return rows
    for variant in PLAIN_VARIANTS:
        fn, state = plain_step(shape, variant, layers=layers)
        rows.append(row(f"plain x{layers}", variant, mpx.program.report(fn, state, tokens, target=target)))
    unrolled = dataclasses.replace(shape, num_layers=layers, scan_layers=False, remat=False)
    for lm_shape in dict.fromkeys([unrolled, shape]):  # the config's own shape too, if it differs
        lm = f"TransformerLM x{lm_shape.num_layers}" + (" scan" if lm_shape.scan_layers else "") + (
            " remat" if lm_shape.remat else "")
        for preset in presets or LM_PRESETS:
            fn, state = lm_step(lm_shape, preset)
            rows.append(row(lm, f"mpx_{preset}", mpx.program.report(fn, state, tokens, target=target)))
    return rows
