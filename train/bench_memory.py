"""The bench's memory mode: what the config's train step holds on each device and what it moves
between devices, compiled (never run) on 1 device and on an 8-way FSDP mesh.

    python -m train bench CONFIG --mode memory --target h100 [--variant NAME [KEY=VALUE ...]] [--out FILE]

The step is the app's (`mpx.train_step` with `train.build.make_optimizer`, the config's
gradient accumulation, the language-modelling loss, the state laid out by
`train.mesh.state_shardings`, donated), the lean program of every unlogged step after the
first (no FP8 saturation / flush counts).
The model is the config's ``TransformerLM`` as configured (layers, scan, remat): a config
override such as ``model.num_layers=4`` makes a smaller one. Built abstractly (shapes only), a
1.3B model costs no host memory.

Programs: on this host's CPU (1 device, and 8 where the process has them:
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; otherwise the row says so) and for
``--target`` without it (`mpx.program`, 1 and 8 compile-only devices). The 8-device mesh is
``data=1, fsdp=8``: every param and optimizer moment split 8 ways.

Variants: named lists of config overrides (`VARIANTS`), each compiled as its own config. By
default the config's own precision (``config``, where it is none of the presets), ``bf16`` and
``fp8``. A new variant is one entry: ``--variant NAME KEY=VALUE ...`` on the command line (e.g.
``--variant fp8_moments precision=fp8 optim.moments=fp8`` once the config has that key).

Columns, per device (GB = 1e9 bytes): ``params``, ``optimizer`` (optimizer state) and
``fp8_meta`` from the abstract state's shapes and shardings (the arguments XLA also counts
besides them: the step counter, loss scale, key and the batch); ``arguments``, ``temp``,
``peak`` and ``total`` from XLA's memory analysis (`mpx.program.ProgramReport`): ``peak`` is
XLA's own, the most live at once in the schedule its buffer assignment simulated (the CPU
backend's leaves the temporaries out: read ``total`` there), ``total`` arguments + outputs -
donated outputs + temporaries, every buffer live at once; per step, the bytes each kind of
collective moves (`mpx.program.Collective`: an all-gather its result, the others their
operand) and the all-gathered bytes by element type.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import mpx
import mpx.nn as mn
from train import mesh as mesh_lib
from train.build import make_optimizer
from train.config import apply_overrides, config_from_dict
from train.schema import ConfigError, RunConfig
from train.tasks import LanguageModelling

VARIANTS: dict[str, tuple[str, ...]] = {
    "bf16": ("precision=bf16",),
    "fp8": ("precision=fp8",),
    "fp8_moments_bf16": ("precision=fp8", "optim.moments=bf16"),
    "fp8_moments_fp8": ("precision=fp8", "optim.moments=fp8"),
    "fp8_moments_fp8_master_bf16": ("precision=fp8", "optim.moments=fp8", "optim.master=bf16"),
    "fp8_moments_fp8_remat_fp8": ("precision=fp8", "optim.moments=fp8", "model.remat=true", "model.remat_policy=fp8"),
}
"""Named variants: the config overrides each applies to the bench's config."""

DEVICES = (1, 8)
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Variant:
    """A row group: ``overrides`` (``key=value`` config overrides) applied to the config."""

    name: str
    overrides: tuple[str, ...] = ()

    @classmethod
    def parse(cls, words: Sequence[str]) -> Variant:
        """``["fp8"]`` (a `VARIANTS` name) or ``["NAME", "key=value", ...]`` (a new one)."""
        name, *overrides = words
        if overrides:
            return cls(name, tuple(overrides))
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}, or a new one "
                             f"as NAME KEY=VALUE ... (e.g. --variant {name} precision=fp8)")
        return cls(name, VARIANTS[name])


def default_variants(config: RunConfig) -> tuple[Variant, ...]:
    """The config's own precision, unless it is one of the presets, then ``bf16`` and ``fp8``."""
    preset = isinstance(config.precision, str) and config.precision in VARIANTS
    own = () if preset else (Variant("config"),)
    return (*own, *(Variant(name, overrides) for name, overrides in VARIANTS.items()))


def variant_config(config: RunConfig, variant: Variant) -> RunConfig:
    try:
        return config_from_dict(apply_overrides(config.to_dict(), variant.overrides))
    except ConfigError as e:
        raise ConfigError(f"variant {variant.name!r}: {e}") from None


# ----------------------------------------------------------------------------- the program


def abstract_step(config: RunConfig, mesh: Mesh):
    """(step fn, abstract sharded state, abstract sharded batch, jit options) of the app's train
    step for ``config`` on ``mesh``: shapes only, nothing allocated."""
    policy = config.policy()
    shape = config.model.to_transformer(config.model.vocab_size or 256)
    graphdef, params, meta, _ = mn.split(nnx.eval_shape(lambda: mn.TransformerLM(shape, policy=policy,
                                                                                    rngs=nnx.Rngs(0))))
    optimizer = make_optimizer(config.optim, config.train.steps)
    state = jax.eval_shape(lambda p, m: mpx.init_train_state(p, optimizer, policy=policy, fp8_meta=m,
                                                             rng=jax.random.key(0)), params, meta)
    shardings = mesh_lib.state_shardings(state, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    accum = config.optim.grad_accum
    rows = (config.data.batch_size, config.data.seq_len + 1)
    batch = {"tokens": jax.ShapeDtypeStruct((accum, *rows) if accum > 1 else rows, np.int32,
                                            sharding=mesh_lib.batch_sharding(mesh, accumulated=accum > 1))}
    dropout = config.model.dropout > 0

    def loss_fn(params, meta, batch, rng):
        with mesh_lib.activation_sharding(mesh):  # as the app traces its step
            return LanguageModelling.loss(graphdef, params, meta, batch, rng, dropout=dropout)

    step = functools.partial(mpx.train_step, loss_fn=loss_fn, optimizer=optimizer, has_aux=True,
                             accum_steps=accum, fp8_bootstrap=False, fp8_statistics=False)
    # as the app jits it: the state keeps its layout and its buffers are reused
    options = {"out_shardings": (shardings, mesh_lib.replicated(mesh)), "donate_argnums": 0}
    return step, state, batch, options


def per_device_bytes(tree) -> int:
    """Bytes of one device's shard of every array of an abstract sharded ``tree`` (a replicated
    array counts whole on each device)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _mesh(platform: str, target: str, devices: int) -> Mesh | str:
    """The ``data=1, fsdp=devices`` mesh, or why this process cannot build it."""
    if platform != "cpu":
        return mpx.program.make_mesh((1, devices), mesh_lib.AXES, target=target)
    cpus = jax.devices("cpu")
    if len(cpus) < devices:
        return (f"this process has {len(cpus)} CPU device(s); "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} gives it {devices}")
    return Mesh(np.asarray(cpus[:devices]).reshape(1, devices), mesh_lib.AXES)


def _compile(step, state, batch, options, *, platform: str, target: str, mesh: Mesh) -> mpx.program.ProgramReport:
    start = time.perf_counter()
    if platform == "cpu":
        compiled = jax.jit(step, **options).trace(state, batch).lower().compile()
        return mpx.program.read(compiled, None, compile_s=time.perf_counter() - start)
    return mpx.program.report(step, state, batch, target=target, mesh=mesh, **options)


def _cause(message: str) -> str:
    """The line of an XLA error that says what failed: a Python error raised inside the
    compiler (a custom partitioner's), else the first line."""
    lines = message.splitlines()
    return next((line.strip() for line in lines if re.match(r"^\s*\w+Error: ", line)), lines[0] if lines else "")


def row(variant: Variant, config: RunConfig, platform: str, devices: int, *, target: str) -> dict[str, Any]:
    """One variant's step on ``devices`` devices of ``platform`` (``cpu``: this host; else the
    compile-only ``target``)."""
    head = {"mode": "memory", "variant": variant.name, "platform": platform, "devices": devices}
    mesh = _mesh(platform, target, devices)
    if isinstance(mesh, str):
        return {**head, "skipped": mesh}
    if config.data.batch_size % devices:
        return {**head, "skipped": f"data.batch_size ({config.data.batch_size}) does not split over {devices} devices"}
    step, state, batch, options = abstract_step(config, mesh)
    try:
        report = _compile(step, state, batch, options, platform=platform, target=target, mesh=mesh)
    except jax.errors.JaxRuntimeError as e:  # a step larger than the device, a partitioning XLA refuses
        return {**head, "error": _cause(str(e))}
    gathered = {dtype: report.collective_bytes("all-gather", dtype=dtype) / GB
                for dtype in dict.fromkeys(c.dtype for c in report.collectives_of("all-gather"))}
    return {
        **head, "precision": str(config.precision),
        "params_gb": per_device_bytes(state.params) / GB, "optimizer_gb": per_device_bytes(state.opt_state) / GB,
        "fp8_meta_gb": per_device_bytes(state.fp8_meta) / GB, "arguments_gb": report.argument_bytes / GB,
        "temp_gb": report.temp_bytes / GB, "peak_gb": report.peak_bytes / GB, "total_gb": report.total_bytes / GB,
        **{f"{kind.replace('-', '_')}_gb": report.collective_bytes(kind) / GB for kind in COLLECTIVES},
        "all_gather_by_dtype_gb": gathered, "compile_s": report.compile_s,
    }


def memory(config: RunConfig, *, target: str, variants: Sequence[Variant] = ()) -> list[dict[str, Any]]:
    """Rows of every variant (default `default_variants`) on this host's CPU and on ``target``,
    for 1 and 8 devices each."""
    rows = []
    for variant in variants or default_variants(config):
        varied = variant_config(config, variant)
        for platform in ("cpu", target):
            for devices in DEVICES:
                rows.append(row(variant, varied, platform, devices, target=target))
    return rows
