"""Benchmarks: mpx FP8 against bf16 and against Flax's FP8 op, every variant in one process.

    python -m train bench CONFIG --mode gemm|layer|step|crossover|all [--out bench.json]

Modes (each returns rows; `run` collects them into one JSON-ready record):

* ``gemm``: for (M, K, N) shapes, ``x (M, K) @ w (K, N)``: bf16; raw FP8 (operands
  quantized outside the timed program: the ceiling); `mpx.fp8_dot_general`; Flax's
  ``fp8_scaled_dot_general`` (the function behind ``Fp8DirectDotGeneralOp``); raw int8
  (s8 x s8 -> s32, codes made outside) and `mpx.int8.int8_dot_general` (per-token and
  per-channel codes made inside, straight-through backward). Forward and forward +
  backward; TFLOP/s (TOP/s for int8) and the ratio to bf16.
* ``layer``: a stack of decoder layers of the config's shape (plain Flax NNX layers),
  forward + backward: mpx fp8, mpx bf16, plain Flax bf16, Flax Fp8Direct dots.
* ``step``: the config's full train step (AdamW) under fp32 / bf16 / fp8 / fp16 / int8:
  step time, tokens/s, MFU, compiled memory.
* ``crossover``: square GEMMs of growing size, forward + backward: the smallest size
  at which mpx FP8 beats bf16, as the policy override ``fp8.min_size=N``.
* ``static`` and ``memory`` (not part of ``all``): the train step compiled, not run, for a
  target device (`train.bench_static`: its kernels and GEMMs; `train.bench_memory`: what it
  holds per device and moves between devices on 1 and 8 devices, per variant).
* ``generate`` (not part of ``all``): sampling N new tokens from a one-token prompt on a
  random model of the config's shape and policy whose window (``max_len``) is N: tokens/s
  with the key/value cache and by recomputing the window for every token
  (`train.generate.reference_generate`), and the speedup.

Timing: compile and ``warmup`` runs are excluded; each of ``repeats`` runs is timed to
``block_until_ready``; median, min and max are reported. Compare ratios inside one run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.linen import fp8_ops as flax_fp8

import mpx
import mpx.nn as mn
from mpx.fp8 import Fp8Meta
from mpx.inspect import dot_generals, format_table
from train import metrics as mt

MATMUL = (((1,), (0,)), ((), ()))


def timed(fn: Callable, *args, repeats: int, warmup: int) -> dict[str, float]:
    """Median / min / max milliseconds of ``fn(*args)`` after compiling and ``warmup`` runs."""
    jax.block_until_ready(fn(*args))
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def _require_bf16(name: str, fn: Callable, *args) -> None:
    """A "bf16" baseline that silently runs in f32 would inflate every FP8 ratio: every
    matmul of its forward ``fn`` must take bf16 operands."""
    dtypes = {d for _, operands in dot_generals(fn, *args) for d in operands}
    if dtypes != {"bfloat16"}:
        raise RuntimeError(f"benchmark baseline {name!r} is not bf16: its matmuls take {sorted(dtypes)}")


# ----------------------------------------------------------------------------- gemm


def _calibrated_meta(config: mpx.Fp8Config, x, w, g) -> Fp8Meta:
    """A meta past its first step (scales from these tensors' amaxes), as in training."""
    meta = Fp8Meta.init(config)
    loss = lambda m: jnp.sum(mpx.fp8_dot_general(x, w, MATMUL, m)[0].astype(jnp.float32) * g)  # noqa: E731
    return meta.advance(jax.jit(jax.grad(loss))(meta))


def _flax_fp8_dot(x, w, state):
    """Flax's FP8 dot (the function behind Fp8DirectDotGeneralOp), its scales and histories as inputs."""
    ls, rs, gs, lh, rh, gh = state
    return flax_fp8.fp8_scaled_dot_general(
        x, w, MATMUL, preferred_element_type=x.dtype, lhs_scale=ls, rhs_scale=rs, grad_scale=gs,
        lhs_amax_history=lh, rhs_amax_history=rh, grad_amax_history=gh, quantize_compute_type=x.dtype,
    )


def gemm_variants(m: int, k: int, n: int, *, history: int = 16, seed: int = 0) -> dict[str, tuple[Callable, Callable, tuple]]:
    """name -> (forward fn, forward+backward fn or None, args) for one (M, K, N)."""
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)
    g = jnp.ones((m, n), jnp.float32)
    w16 = w.astype(jnp.bfloat16)
    config = mpx.Fp8Config(amax_history=history)
    meta = _calibrated_meta(config, x, w, g)
    sx, sw = meta.lhs.scale, meta.rhs.scale
    qx = mpx.fp8.quantize(x, jnp.float8_e4m3fn, sx)
    qw = mpx.fp8.quantize(w, jnp.float8_e4m3fn, sw)
    flax_state = (jnp.ones((1,)), jnp.ones((1,)), jnp.ones((1,)), *(jnp.zeros((history,)) for _ in range(3)))

    def summed(f):  # forward + backward: the gradient of sum(out) wrt every input
        return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=tuple(range(3))))

    bf16 = lambda a, b, _: jnp.dot(a, b, preferred_element_type=jnp.bfloat16)  # noqa: E731
    mpx_dot = lambda a, b, mt_: mpx.fp8_dot_general(a, b, MATMUL, mt_, out_dtype=jnp.bfloat16)[0]  # noqa: E731

    def raw(a, b, scales):
        out = jax.lax.dot_general(a, b, MATMUL, preferred_element_type=jnp.bfloat16)
        return (out.astype(jnp.float32) / (scales[0] * scales[1])).astype(jnp.bfloat16)

    # int8: codes per token (x) and per output channel (w), s8 x s8 -> s32, rescaled in f32.
    ix, isx = mpx.int8.quantize(x, axes=1)
    iw, isw = mpx.int8.quantize(w, axes=0)
    int8_config = mpx.int8.Int8Config()

    def int8_raw(a, b, scales):
        out = jax.lax.dot_general(a, b, MATMUL, preferred_element_type=jnp.int32)
        return (out.astype(jnp.float32) * scales[0] * scales[1]).astype(jnp.bfloat16)

    mpx_int8 = lambda a, b, _: mpx.int8.int8_dot_general(a, b, MATMUL, int8_config, out_dtype=jnp.bfloat16)  # noqa: E731

    _require_bf16("bf16", bf16, x, w16, None)
    return {
        "bf16": (jax.jit(bf16), summed(bf16), (x, w16, jnp.zeros(()))),
        "fp8_raw": (jax.jit(raw), None, (qx, qw, (sx, sw))),
        "mpx_fp8": (jax.jit(mpx_dot), summed(mpx_dot), (x, w, meta)),
        "flax_fp8_direct": (jax.jit(_flax_fp8_dot), summed(_flax_fp8_dot), (x, w16, flax_state)),
        "int8_raw": (jax.jit(int8_raw), None, (ix, iw, (isx, isw))),
        "mpx_int8": (jax.jit(mpx_int8), summed(mpx_int8), (x, w, jnp.zeros(()))),
    }


def gemm(shapes: Sequence[tuple[int, int, int]], *, repeats: int, warmup: int,
         variants: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows of every (shape, variant, pass); bf16 first, as the reference of the ratios."""
    rows = []
    for m, k, n in shapes:
        flops = 2.0 * m * k * n
        base: dict[str, float] = {}
        for name, (fwd, fwd_bwd, args) in gemm_variants(m, k, n).items():
            if variants is not None and name not in variants:
                continue
            for mode, fn, mult in (("fwd", fwd, 1), ("fwd+bwd", fwd_bwd, 3)):
                if fn is None:
                    continue
                t = timed(fn, *args, repeats=repeats, warmup=warmup)
                if name == "bf16":
                    base[mode] = t["median_ms"]
                rows.append({"mode": "gemm", "shape": [m, k, n], "variant": name, "pass": mode, **t,
                             "tflops": mult * flops / (t["median_ms"] * 1e-3) / 1e12,
                             "speedup_vs_bf16": base[mode] / t["median_ms"]})
    return rows


def crossover(sizes: Sequence[int], *, repeats: int, warmup: int) -> dict[str, Any]:
    """The smallest square size n at which mpx FP8 forward+backward beats bf16 (None: never)."""
    rows = [r for r in gemm([(s, s, s) for s in sizes], repeats=repeats, warmup=warmup, variants=("bf16", "mpx_fp8"))
            if r["pass"] == "fwd+bwd"]
    wins = [r["shape"][0] for r in rows if r["variant"] == "mpx_fp8" and r["speedup_vs_bf16"] > 1.0]
    size = min(wins) if wins else None
    return {"rows": rows, "min_size": size, "policy_override": f"fp8.min_size={size}" if size else None}


# ----------------------------------------------------------------------------- layer


class PlainBlock(nnx.Module):
    """A pre-norm decoder layer written with plain Flax NNX (cuDNN/XLA attention), for baselines."""

    def __init__(self, d: int, heads: int, d_ff: int, *, dtype, rngs: nnx.Rngs):
        self.heads = heads
        self.ln1 = nnx.LayerNorm(d, dtype=jnp.float32, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(d, d, dtype=dtype, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, dtype=jnp.float32, rngs=rngs)
        self.fc = nnx.Linear(d, d_ff, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(d_ff, d, dtype=dtype, rngs=rngs)

    def __call__(self, x):  # (B, T, D) bf16
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(self.ln1(x).astype(x.dtype)), 3, axis=-1)
        q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in (q, k, v))  # (B, T, H, K)
        # cuDNN flash attention where the program runs on a GPU, as mpx's TransformerLM does
        cudnn = mpx.program.platform_of(q) == "gpu"
        a = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn" if cudnn else None)
        a = a.reshape(b, t, d)
        x = x + self.out(a).astype(x.dtype)
        return x + self.proj(jax.nn.gelu(self.fc(self.ln2(x).astype(x.dtype)), approximate=True)).astype(x.dtype)


class FlaxFp8Dot(nnx.Module):
    """Flax's Fp8Direct dot as an injectable ``dot_general`` with its six state variables."""

    def __init__(self, history: int = 16):
        self.state = nnx.Variable(tuple([jnp.ones((1,))] * 3 + [jnp.zeros((history,))] * 3))

    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
        del precision, preferred_element_type
        ls, rs, gs, lh, rh, gh = self.state.get_value()
        return flax_fp8.fp8_scaled_dot_general(
            lhs, rhs.astype(lhs.dtype), dimension_numbers, preferred_element_type=lhs.dtype, lhs_scale=ls,
            rhs_scale=rs, grad_scale=gs, lhs_amax_history=lh, rhs_amax_history=rh, grad_amax_history=gh,
            quantize_compute_type=lhs.dtype,
        )


class PlainStack(nnx.Module):
    def __init__(self, n: int, d: int, heads: int, d_ff: int, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([PlainBlock(d, heads, d_ff, dtype=jnp.bfloat16, rngs=rngs) for _ in range(n)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def layer_variants(shape: mn.TransformerConfig, *, layers: int, batch: int, seq: int) -> dict[str, tuple]:
    """name -> (jitted forward+backward, args) for ``layers`` decoder layers of ``shape``."""

    def build(variant: str):
        stack = PlainStack(layers, shape.d_model, shape.num_heads, shape.d_ff, rngs=nnx.Rngs(0))
        if variant in ("mpx_fp8", "mpx_bf16"):
            mpx.apply_policy(stack, mpx.parse_policy("fp8; fp8.amax_history=16" if variant == "mpx_fp8" else "bf16"))
        elif variant == "flax_fp8_direct":
            for block in stack.blocks:
                for layer in (block.qkv, block.out, block.fc, block.proj):
                    layer.dot_general = nnx.data(FlaxFp8Dot())
        return nnx.split(stack, nnx.Param, ...)

    x = jax.random.normal(jax.random.key(1), (batch, seq, shape.d_model), jnp.float32).astype(jnp.bfloat16)
    out = {}
    for variant in ("mpx_bf16", "flax_bf16", "mpx_fp8", "flax_fp8_direct"):
        graphdef, params, rest = build(variant)

        def loss(params, rest, x, graphdef=graphdef):
            return jnp.sum(nnx.merge(graphdef, params, rest)(x).astype(jnp.float32))

        if variant.endswith("bf16"):
            _require_bf16(variant, loss, params, rest, x)
        out[variant] = (jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (params, rest, x))
    return out


def layer(shape: mn.TransformerConfig, *, layers: int, batch: int, seq: int, repeats: int, warmup: int):
    rows, base = [], None
    for name, (fn, args) in layer_variants(shape, layers=layers, batch=batch, seq=seq).items():
        t = timed(fn, *args, repeats=repeats, warmup=warmup)
        base = base or t["median_ms"]  # mpx_bf16 first
        rows.append({"mode": "layer", "variant": name, "layers": layers, "batch": batch, "seq": seq, **t,
                     "speedup_vs_mpx_bf16": base / t["median_ms"]})
    return rows


# ----------------------------------------------------------------------------- step


PRECISIONS = ("fp32", "bf16", "fp8", "fp16", "int8")


def step(shape: mn.TransformerConfig, *, batch: int, seq: int, repeats: int, warmup: int) -> list[dict[str, Any]]:
    """The full train step (AdamW) of a TransformerLM under each preset."""
    tokens = jax.random.randint(jax.random.key(2), (batch, seq + 1), 0, shape.vocab_size)
    peak = mt.peak_flops()
    rows, base = [], None
    for precision in PRECISIONS:
        policy = mpx.parse_policy(precision)
        model = mn.TransformerLM(shape, policy=policy, rngs=nnx.Rngs(0))
        graphdef, params, meta = nnx.split(model, nnx.Param, mn.Fp8MetaVariable)

        def loss_fn(params, meta, batch, rng, graphdef=graphdef):
            m = nnx.merge(graphdef, params, meta)
            return m.loss(m(batch[:, :-1]), batch[:, 1:])

        opt = optax.adamw(1e-4)
        state = mpx.init_train_state(params, opt, fp8_meta=meta, loss_scale=policy.loss_scale.create())
        # The program of every unlogged step after the first (each timed run starts from this state).
        fn = jax.jit(functools.partial(mpx.train_step, loss_fn=loss_fn, optimizer=opt, fp8_bootstrap=False,
                                       fp8_statistics=False))
        compiled = fn.lower(state, tokens).compile()
        memory = compiled.memory_analysis()
        t = timed(compiled, state, tokens, repeats=repeats, warmup=warmup)  # not donated: each run is step 0 again
        base = base or t["median_ms"]  # fp32 first
        tps = batch * seq / (t["median_ms"] * 1e-3)
        flops = mt.flops_per_token(params, num_layers=shape.num_layers, seq_len=seq, d_model=shape.d_model,
                                   embedding_params=mt.embedding_params(shape))
        rows.append({
            "mode": "step", "variant": precision, "batch": batch, "seq": seq, **t, "tokens_per_s": tps,
            "mfu": mt.mfu(tps, flops, devices=1, peak=peak), "speedup_vs_fp32": base / t["median_ms"],
            "memory_bytes": None if memory is None else int(
                memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes),
        })
    return rows


# ----------------------------------------------------------------------------- generate


def generation(shape: mn.TransformerConfig, *, new_tokens: Sequence[int], policy: mpx.Policy) -> list[dict[str, Any]]:
    """For each N: a random model of ``shape`` with ``max_len`` N under ``policy`` samples N
    tokens (temperature 1, all tokens) from a one-token prompt, with the cache and by
    recomputing the window; tokens/s of each after compiling (`train.generate.tokens_per_second`)."""
    from train.generate import tokens_per_second

    rows = []
    for n in new_tokens:
        lm = mn.TransformerLM(dataclasses.replace(shape, max_len=n), policy=policy, rngs=nnx.Rngs(0))
        graphdef, params, meta, _ = mn.split(lm)
        cached = tokens_per_second(graphdef, params, meta, max_len=n, new_tokens=n)
        recompute = tokens_per_second(graphdef, params, meta, max_len=n, new_tokens=n, reference=True)
        rows.append({"mode": "generate", "new_tokens": n, "max_len": n, "recompute_tokens_per_s": recompute,
                     "cached_tokens_per_s": cached, "speedup": cached / recompute})
    return rows


def cpu_model() -> str:
    """The host CPU's model name (/proc/cpuinfo), or the platform's word for it."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- the record


TIMED_MODES = ("gemm", "layer", "step", "crossover")
# "all" is the timed modes; static compiles for a target (train/bench_static.py); generate
# times sampling, minutes on a CPU at 1024 tokens (its recomputing reference is quadratic).
MODES = (*TIMED_MODES, "static", "memory", "generate")


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """What to run. ``shapes``: (M, K, N) of the gemm mode; ``sizes``: the crossover ladder;
    ``target``: the device the static mode compiles for; ``new_tokens``: the generate
    mode's lengths; ``presets``: the policies of the static mode's ``TransformerLM`` rows
    (empty: bf16, fp8 and int8 on a GPU, the TPU's 8-bit paths on a TPU); ``variants``: the
    memory mode's, each the words of one ``--variant`` (a name of `train.bench_memory.VARIANTS`,
    or a new name and its config overrides; empty: the config's precision, bf16 and fp8)."""

    modes: tuple[str, ...] = TIMED_MODES
    shapes: tuple[tuple[int, int, int], ...] = ((8192, 8192, 8192), (16384, 2048, 8192), (16384, 8192, 2048))
    sizes: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192)
    layers: int = 4
    repeats: int = 20
    warmup: int = 3
    target: str = "h100"
    new_tokens: tuple[int, ...] = (256, 1024)
    presets: tuple[str, ...] = ()
    variants: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self):
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown bench mode {bad[0]!r}; expected one of {', '.join(MODES)} or all")
        if self.repeats < 1 or self.warmup < 0 or self.layers < 1:
            raise ValueError("bench needs repeats >= 1, warmup >= 0 and layers >= 1")
        if not self.new_tokens or min(self.new_tokens) < 1:
            raise ValueError(f"--new-tokens must be positive integers, got {','.join(map(str, self.new_tokens))}")
        for spec in self.presets:
            try:
                mpx.parse_policy(spec)
            except ValueError as e:
                raise ValueError(f"--presets: {e}") from None
        if self.variants:
            from train.bench_memory import Variant

            for words in self.variants:
                Variant.parse(words)


def run(shape: mn.TransformerConfig, *, batch: int, seq: int, settings: BenchSettings,
        policy: mpx.Policy | None = None, config=None) -> dict[str, Any]:
    """Every requested mode in this process; a JSON-ready record with device and versions.
    ``policy``: the generate mode's (default fp32); ``config``: the memory mode's run config
    (`train.schema.RunConfig`: it compiles the app's step, optimizer and all)."""
    import flax
    import optax as optax_mod

    device = jax.devices()[0]
    record: dict[str, Any] = {
        "device": getattr(device, "device_kind", device.platform), "backend": jax.default_backend(),
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax_mod.__version__,
                     "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"), "settings": dataclasses.asdict(settings),
        "model": dataclasses.asdict(shape), "batch": batch, "seq": seq, "rows": [],
    }
    kw = {"repeats": settings.repeats, "warmup": settings.warmup}
    if "gemm" in settings.modes:
        record["rows"] += gemm(settings.shapes, **kw)
    if "layer" in settings.modes:
        record["rows"] += layer(shape, layers=settings.layers, batch=batch, seq=seq, **kw)
    if "step" in settings.modes:
        record["rows"] += step(shape, batch=batch, seq=seq, **kw)
    if "crossover" in settings.modes:
        result = crossover(settings.sizes, **kw)
        record["rows"] += [{**r, "mode": "crossover"} for r in result["rows"]]
        record["crossover"] = {"min_size": result["min_size"], "policy_override": result["policy_override"]}
    if "static" in settings.modes:
        from train.bench_static import static

        record["rows"] += static(shape, batch=batch, seq=seq, layers=settings.layers, target=settings.target,
                                 presets=settings.presets)
    if "memory" in settings.modes:
        from train.bench_memory import Variant, memory

        if config is None:
            raise ValueError("bench --mode memory compiles the app's train step: pass the run config")
        record["rows"] += memory(config, target=settings.target,
                                 variants=[Variant.parse(words) for words in settings.variants])
    if "generate" in settings.modes:
        policy = policy or mpx.parse_policy("fp32")
        record["cpu"], record["policy"] = cpu_model(), dataclasses.asdict(policy)
        record["rows"] += generation(shape, new_tokens=settings.new_tokens, policy=policy)
    return record


def format_record(record: dict[str, Any]) -> str:
    """The rows as aligned text tables, one per mode."""
    lines = [f"{record['device']} ({record['backend']}), jax {record['versions']['jax']}, {record['date']}"]
    for mode in MODES:
        rows = [r for r in record["rows"] if r["mode"] == mode]
        if not rows:
            continue
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "mode"))  # a row may say why it has no figures
        lines += ["", f"[{mode}]"] + format_table(keys, [[_cell(r.get(k)) for k in keys] for r in rows])
    if "crossover" in record:
        lines.append(f"crossover: {record['crossover']}")
    return "\n".join(lines)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "x".join(map(str, v))
    if isinstance(v, dict):
        return " ".join(f"{k}:{_cell(x)}" for k, x in v.items()) or "-"
    return str(v)


def write(record: dict[str, Any], path: str | pathlib.Path) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
