"""The H100 program, without an H100: real train steps compiled for the GPU (deviceless, XLA's
whole GPU pipeline) and their GEMMs counted by kind and by policy op.

Compiled with Triton GEMMs off (`mpx.program.CUBLAS_ONLY`): every dot then shows what XLA's
GEMM rewriter makes of it. An op the policy runs in fp8 must give exactly three FP8 GEMMs
(forward, input gradient, weight gradient) and no GEMM of another kind; an int8 op an integer
GEMM (s8 x s8 -> s32 on cuBLASLt); a bf16 program no FP8 GEMM at all. The CUDA compiler plugin
comes from PyPI (`make` installs it into .venv/cuda-compiler, apart from the CPU jax, so that
no other process prints CUDA driver lines)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mpx
import mpx.linen as ml
from mpx.fp8._meta import bootstrap
from mpx.inspect import describe

from helpers import CONFIG, lm_step, require_compiler

@pytest.fixture(scope="module", autouse=True)
def h100():
    require_compiler("h100", "cuda-compiler", "H100")


def ops_of(model, policy, precision: str) -> set[str]:
    """Paths of the ops ``describe`` shows in ``precision`` (int8 ops with any recipe)."""
    return {p for label, paths in describe(model, policy).by_precision().items()
            if label.split(" ")[0] == precision for p in paths}


def assert_fp8_ops_are_fp8_gemms(report, fp8_ops: set[str], per_op=lambda op: 3):
    """Each fp8 op: ``per_op(op)`` FP8 GEMMs and no GEMM of another kind; no FP8 GEMM anywhere else."""
    by_op = report.gemms_by_op()
    assert fp8_ops, "the policy put no op in fp8"
    for op in fp8_ops:
        assert dict(by_op.get(op, {})) == {"fp8": per_op(op)}, (op, dict(by_op.get(op, {})))
    stray = {op: dict(c) for op, c in by_op.items() if op not in fp8_ops and c.get("fp8")}
    assert not stray, stray
    assert report.gemms("fp8") == sum(per_op(op) for op in fp8_ops)


# ----------------------------------------------------------------------------- TransformerLM


@pytest.mark.parametrize("scan, remat", [(False, False), (True, False), (True, True)],
                         ids=["unrolled", "scanned", "scanned-remat"])
def test_fp8_lm_train_step_runs_every_fp8_matmul_as_an_fp8_gemm(scan, remat):
    """The whole step (forward, backward, AdamW, FP8 meta update): every fp8 op of the LM gives
    its three FP8 cuBLASLt GEMMs; the ops the preset keeps in bf16 (the head) give bf16 ones.
    A scanned stack compiles its body once, so its ops count once. Remat recomputes each
    block's forward inside the backward loop: a fourth GEMM, FP8 like the first, for every op
    whose output the backward needs (all but the block's last matmul, mlp/proj). The unrolled
    step is the first step's program (fresh tensors scaled from their own amax), the scanned
    ones the lean program of every step after (`fp8_bootstrap=False`): both keep every GEMM."""
    model, policy, step, args = lm_step("fp8", scan=scan, remat=remat, fp8_bootstrap=not scan)
    report = mpx.program.report(step, *args, target="h100")
    fp8_ops = ops_of(model, policy, "fp8")
    assert len(fp8_ops) == (4 if scan else 4 * CONFIG.num_layers)  # qkv, out, fc, proj per (stacked) block
    assert_fp8_ops_are_fp8_gemms(report, fp8_ops, per_op=lambda op: 4 if remat and not op.endswith("proj") else 3)
    assert report.gemms("bf16") > 0 and report.gemms("f32") == 0  # the bf16 head, attention's two matmuls
    assert report.temp_bytes > 0 and report.bytes_accessed > report.bytes_outside_gemms > 0


def test_bf16_lm_train_step_has_no_fp8_gemm_and_cudnn_attention():
    """bf16: every dense op is three bf16 GEMMs, none FP8; attention is cuDNN's fused kernel,
    chosen because the program is compiled for a GPU (this process's backend is the CPU)."""
    model, policy, step, args = lm_step("bf16")
    report = mpx.program.report(step, *args, target="h100")
    assert report.gemms("fp8") == 0 and report.gemms("int8") == 0
    assert report.attention == "cudnn" and jax.default_backend() == "cpu"
    dense = ops_of(model, policy, "bf16")
    by_op = report.gemms_by_op()
    for op in (o for o in dense if o.endswith(("qkv", "out", "fc", "proj"))):
        assert dict(by_op[op]) == {"bf16": 3}, (op, dict(by_op[op]))


@pytest.mark.parametrize("backward, per_op", [("compute", {"int8": 1, "bf16": 2}), ("int8", {"int8": 3})])
def test_int8_lm_train_step_runs_integer_gemms(backward, per_op):
    """int8 ops run their forward as an s8 x s8 -> s32 cuBLASLt GEMM (``__cublas$lt$matmul`` on
    s8 operands: XLA has no separate int8 target), and their gradients in bf16 or, with
    ``int8.backward=int8``, as two more integer GEMMs."""
    model, policy, step, args = lm_step(f"int8; int8.backward={backward}")
    report = mpx.program.report(step, *args, target="h100")
    int8_ops = ops_of(model, policy, "int8")
    assert len(int8_ops) == 4 * CONFIG.num_layers
    by_op = report.gemms_by_op()
    for op in int8_ops:
        assert dict(by_op[op]) == per_op, (op, dict(by_op[op]))
    assert report.gemms("fp8") == 0
    int8_lines = [k.line for k in report.kernels if k.gemm == "int8"]
    assert all('custom_call_target="__cublas$lt$matmul"' in line and "s32[" in line for line in int8_lines)


def test_mx_gemms_are_blackwells_block_scaled_gemms():
    """On a B200 (compute capability 10, compiled without one) each MX GEMM is one cuDNN
    block-scaled GEMM (``jax.nn.scaled_matmul``: the GEMM applies the 1x32 tiles' E8M0 scales
    itself), three per fp8 op, and no cuBLAS FP8 GEMM is left. (DeepSeek's 128-blocks, which its
    GEMMs do not take, stay spelled out as on an H100: `describe` says so, tests/test_fp8_recipes.)"""
    model, policy, step, args = lm_step("mxfp8", layers=1, fp8_bootstrap=False)
    report = mpx.program.report(step, *args, target="b200")
    assert_fp8_ops_are_fp8_gemms(report, ops_of(model, policy, "fp8"))
    assert {k.engine for k in report.kernels if k.kind == "gemm" and k.gemm == "fp8"} == {"cudnn"}


def test_gradient_accumulation_keeps_three_fp8_gemms_per_op():
    """Four micro-batches in one step (a scan over them): still one forward and two gradient
    FP8 GEMMs per op, in the loop body."""
    model, policy, step, args = lm_step("fp8", accum_steps=4)
    report = mpx.program.report(step, *args, target="h100")
    assert_fp8_ops_are_fp8_gemms(report, ops_of(model, policy, "fp8"))
    assert any(k.launches == 4 for k in report.kernels if k.gemm == "fp8")


@pytest.mark.parametrize("remat_policy", ["full", "fp8"])
def test_fsdp_mesh_of_8_devices_keeps_fp8_gemms(remat_policy):
    """The scanned, rematerialised step sharded as the app shards it (batch over data x fsdp,
    params and optimizer state split over fsdp, activations marked by batch:
    `train.mesh.activation_sharding`) on 8 compile-only H100s: it compiles with cuDNN's fused
    attention (unmarked, XLA gave the queries, keys and values the layouts of the cuts of the
    fused qkv weight, and cuDNN's partitioner refused them), every fp8 op keeps its FP8 GEMMs,
    and the program gathers and reduces across devices. ``remat_policy=fp8`` keeps the gathered
    FP8 weights for the backward: each is gathered once a step instead of twice."""
    from train.mesh import activation_sharding, batch_sharding, state_shardings

    model, policy, step, (state, batch) = lm_step("fp8", scan=True, remat=True, remat_policy=remat_policy,
                                                  fp8_bootstrap=False)
    mesh = mpx.program.make_mesh((2, 4), ("data", "fsdp"))
    shardings = state_shardings(state, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    batch = jax.ShapeDtypeStruct((8, *batch.shape[1:]), batch.dtype, sharding=batch_sharding(mesh, accumulated=False))

    def sharded_step(state, batch):
        with activation_sharding(mesh):
            return step(state, batch)

    report = mpx.program.report(sharded_step, abstract, batch, target="h100", mesh=mesh)
    assert report.attention == "cudnn"
    fp8_ops = ops_of(model, policy, "fp8")
    assert_fp8_ops_are_fp8_gemms(report, fp8_ops, per_op=lambda op: 3 if op.endswith("proj") else 4)
    assert report.collective_bytes("reduce-scatter") > 0
    # FSDP gathers each fp8 op's weight where its GEMM needs it, and it travels as its FP8 codes
    # (quantized on each device from its shard): one byte per element, once for the forward and
    # once for the rematerialised forward and the backward (or, keeping the FP8 copies, once).
    # Nothing else a block gathers is as large as its smallest weight (64 x 64): the rest are
    # biases and norm scales.
    weights = {"/".join(map(str, path[:-1])): w.size for path, w in nnx.to_flat_state(state.params)
               if path[-1] == "kernel"}
    gathers = 2 if remat_policy == "full" else 1
    assert report.collective_bytes("all-gather", dtype="f8e4m3fn") == gathers * sum(weights[op] for op in fp8_ops)
    others = [c for c in report.collectives_of("all-gather")  # unnamed: biases and norm scales gathered again
              if (c.op is None or c.op.startswith("blocks/")) and c.dtype != "f8e4m3fn"]
    assert others and max(c.bytes for c in others) < min(weights[op] for op in fp8_ops) // CONFIG.num_layers


# ----------------------------------------------------------------------------- models written elsewhere


def test_linen_model_nnx_capture_and_hub_wrapper_under_the_policy():
    """Models written without mpx (linen under the policy context, an NNX model with raw matmuls
    through the capture, a model-hub wrapper class calling apply itself): each fp8 op is three
    FP8 GEMMs in the compiled train step."""
    import test_any_model as am

    tokens = jax.ShapeDtypeStruct(am.task_batch().shape, jnp.int32)
    policy = mpx.parse_policy("fp8")

    def compiled_train_step(loss_fn, params, meta, model_state=None, has_state=False):
        opt = optax.adam(1e-2)
        state = mpx.init_train_state(params, opt, policy=policy, fp8_meta=meta, model_state=model_state)
        step = functools.partial(mpx.train_step, loss_fn=loss_fn, optimizer=opt, has_state=has_state)
        return mpx.program.report(step, state, tokens, target="h100")

    # linen, by interception under the policy context
    model = am.GPT()
    with ml.policy_context(policy):
        params, meta = ml.split_variables(model.init(jax.random.key(0), am.task_batch()[:, :-1]))

    def linen_loss(params, meta, batch, rng):
        with ml.policy_context(policy):
            logits = model.apply({"params": params, ml.FP8_COLLECTION: meta}, batch[:, :-1])
        return am.lm_loss(logits, batch[:, 1:])

    linen = compiled_train_step(linen_loss, params, meta)
    assert_fp8_ops_are_fp8_gemms(linen, _fp8_rows(describe(model, policy, am.task_batch()[:, :-1])))

    # NNX with raw matmuls, through the capture
    nnx_model = am.NnxModel(nnx.Rngs(0))
    mpx.nn.apply_policy(nnx_model, policy, am.task_batch()[:, :-1])
    graphdef, params, meta, rest = mpx.nn.split(nnx_model)

    def nnx_loss(params, meta, rest, batch, rng):
        m = nnx.merge(graphdef, params, meta, rest)
        logits = m(batch[:, :-1], train=True, rngs=nnx.Rngs(dropout=rng))
        return am.lm_loss(logits, batch[:, 1:]), nnx.state(m, nnx.BatchStat)

    captured = compiled_train_step(nnx_loss, params, meta, model_state=rest, has_state=True)
    assert_fp8_ops_are_fp8_gemms(captured, _fp8_rows(describe(nnx_model, policy, am.task_batch()[:, :-1])))

    # a model hub's wrapper class
    hub = am.HubModel()
    wrapped = ml.Wrapped(hub, policy, kinds={"lm_head": "head"})
    meta = wrapped.init_fp8(am.task_batch()[:, :-1])

    def hub_loss(params, meta, batch, rng):
        return am.lm_loss(wrapped(meta, batch[:, :-1], params=params).logits, batch[:, 1:])

    hubbed = compiled_train_step(hub_loss, hub.params, meta)
    assert_fp8_ops_are_fp8_gemms(hubbed, _fp8_rows(describe(wrapped, policy, am.task_batch()[:, :-1])))


def _fp8_rows(table) -> set[str]:
    return set(table.by_precision().get("fp8", []))


# ----------------------------------------------------------------------------- one matmul, both GEMM engines


@pytest.mark.parametrize("options", [mpx.program.CUBLAS_ONLY, {}], ids=["cublas", "xla-defaults"])
def test_one_fp8_matmul_is_three_fp8_gemms_and_one_int8_matmul_an_integer_gemm(options):
    """value_and_grad of one fp8_dot_general: forward, input gradient and weight gradient are
    three FP8 GEMMs and the only GEMMs, whether cuBLASLt runs them or (XLA's defaults without
    autotuning) Triton: `mpx.program` counts a Triton GEMM by the operands of its dot. (With
    jax.grad alone the forward would be dead code: 2.) int8_dot_general's forward is one
    integer GEMM either way."""
    x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((512, 256), jnp.float32)
    matmul = (((1,), (0,)), ((), ()))

    def fp8(x, w, meta):
        return jnp.sum(mpx.fp8_dot_general(x, w, matmul, meta, out_dtype=jnp.bfloat16)[0].astype(jnp.float32))

    meta = mpx.Fp8Meta.init(mpx.Fp8Config(amax_history=16))
    report = mpx.program.report(jax.value_and_grad(fp8, argnums=(0, 1)), x, w, meta, options=options)
    engine = "cublas" if options else "triton"
    assert [(k.gemm, k.engine) for k in report.kernels if k.kind == "gemm"] == [("fp8", engine)] * 3

    def int8(x, w):
        return mpx.int8_dot_general(x, w, matmul, mpx.Int8Config(), out_dtype=jnp.bfloat16)

    report = mpx.program.report(int8, x, w, options=options)
    assert [(k.gemm, k.engine) for k in report.kernels if k.kind == "gemm"] == [("int8", engine)]


def test_the_rescale_and_the_bias_are_the_fp8_gemms_own_operands():
    """An fp8 matmul with a bias added after it: the cuBLASLt FP8 call takes the inverse
    scales' product as its runtime scale operand (not a constant 1.0, which left the rescale
    to a pass over the output of its own) and the bias as its epilogue: nothing runs over the
    output after the GEMM."""
    x = jax.ShapeDtypeStruct((256, 512), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((512, 256), jnp.float32)
    b = jax.ShapeDtypeStruct((256,), jnp.bfloat16)
    meta = mpx.Fp8Meta.init(mpx.Fp8Config(amax_history=16))
    meta = meta.replace(**{k: getattr(meta, k).replace(amax_history=jnp.ones(16)) for k in ("lhs", "rhs", "grad")})

    def dense(x, w, b, meta):
        with bootstrap(False):  # the steps after the first: the stored scales
            return mpx.fp8_dot_general(x, w, (((1,), (0,)), ((), ())), meta, out_dtype=jnp.bfloat16)[0] + b

    compiled = mpx.program.compile_for(dense, x, w, b, meta)
    text = compiled.as_text()
    calls = [line.strip() for line in text.splitlines() if 'custom_call_target="__cublas$lt$matmul$f8"' in line]
    assert len(calls) == 1, calls
    name = calls[0].split(" = ", 1)[0]
    operands = calls[0].split("custom-call(", 1)[1].split(")", 1)[0].split(", ")
    # (lhs, rhs, a_scale, b_scale, bias): the scale is computed from the metas, not a constant
    assert len(operands) == 5 and not operands[2].startswith("%constant"), operands
    assert operands[4].startswith("%b") and '"epilogue":"BIAS"' in calls[0]
    entry = text[text.index("ENTRY"):]
    root = next(line for line in entry.splitlines() if line.strip().startswith("ROOT"))
    assert f"get-tuple-element({name})" in root, root  # nothing runs over the output after the GEMM


def test_fp8_gemms_report_for_the_h100_finds_nothing_missing():
    """`mpx.inspect.fp8_gemms` with a target: every fp8 op of the LM's step has its three FP8
    dot_generals and three FP8 GEMMs, attributed by its name scope; nothing is missing."""
    model, policy, step, args = lm_step("fp8", layers=1)
    report = mpx.inspect.fp8_gemms(step, *args, target="h100")
    assert report.backend == "h100" and report.missing() == [], str(report)
    assert report.fp8_gemms == report.fp8_dots == 3 * len(ops_of(model, policy, "fp8"))


@pytest.mark.parametrize("spec, per_op", [("fp8-rowwise-gw-hp", {"fp8": 2, "bf16": 1}),
                                          ("fp8-block; fp8.block_size=32; fp8.input_grad=row", {"fp8": 3})])
def test_every_scaling_recipe_keeps_its_gemms_fp8(spec, per_op):
    """The unrolled LM step under the recipes: every GEMM a recipe puts in FP8 is an FP8
    cuBLASLt GEMM (row scales: one GEMM rescaled per row and column; blocks: one batched GEMM
    over the contraction's blocks, as MX's 1x32 tiles are), a weight gradient left in the compute
    dtype a bf16 GEMM. Two programs cover the three product forms (per row, per block,
    compute); extra bytes around the GEMMs are measured by the bench (README table), not here."""
    model, policy, step, args = lm_step(spec, layers=1)
    report = mpx.program.report(step, *args, target="h100")
    by_op = report.gemms_by_op()
    fp8_ops = ops_of(model, policy, "fp8")
    assert len(fp8_ops) == 4
    for op in fp8_ops:
        assert dict(by_op.get(op, {})) == per_op, (op, dict(by_op.get(op, {})))


def test_bench_static_mode_compares_the_programs_for_the_target():
    """`bench --mode static`: the plain-Flax decoder (bf16, Flax Fp8Direct, under mpx bf16 and
    fp8) and the config's TransformerLM (bf16, fp8, int8) as full train steps compiled for the
    H100, one row each with the GEMMs by kind and the cost around them."""
    from train import bench

    shape = dataclasses.replace(CONFIG, num_layers=1)
    record = bench.run(shape, batch=4, seq=32, settings=bench.BenchSettings(modes=("static",), layers=1))
    rows = {(r["model"].split(" ")[0], r["variant"]): r for r in record["rows"]}
    assert set(rows) == {("plain", v) for v in ("flax_bf16", "flax_fp8_direct", "mpx_bf16", "mpx_fp8")} | {
        ("TransformerLM", v) for v in ("mpx_bf16", "mpx_fp8", "mpx_int8")}
    assert rows["plain", "flax_bf16"]["fp8_gemms"] == rows["plain", "mpx_bf16"]["fp8_gemms"] == 0
    assert rows["plain", "flax_fp8_direct"]["fp8_gemms"] == 3 * 4  # qkv, out, fc, proj of the one layer
    assert rows["TransformerLM", "mpx_fp8"]["fp8_gemms"] == 3 * 4
    assert rows["TransformerLM", "mpx_int8"]["int8_gemms"] == 4  # the forwards; gradients in bf16
    for r in rows.values():
        assert r["target"] == "h100" and r["bytes_gb"] > r["outside_gemms_gb"] > 0 and r["roofline_ms"] > 0, r
        assert r["temp_gb"] > 0 and r["compile_s"] > 0 and r["non_gemm_kernels"] > 0, r
    assert {r["attention"] for (model, _), r in rows.items() if model == "TransformerLM"} == {"cudnn"}


# ----------------------------------------------------------------------------- the report itself


def test_report_counts_bytes_and_flops_of_a_known_program():
    """One FP8 matmul with its scale folded into the call: the GEMM's flops are 2*M*N*K, its
    bytes its two FP8 operands, its two f32 scale operands and its bf16 output (not the cuBLAS
    workspace); the scale product is the only other kernel (two f32 scalars in, one out)."""
    m, n, k = 512, 1024, 512
    f8 = jnp.float8_e4m3fn

    def matmul(a, b, sa, sb):
        y = jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)
        return y * (sa * sb).astype(jnp.bfloat16)

    args = (jax.ShapeDtypeStruct((m, k), f8), jax.ShapeDtypeStruct((n, k), f8),
            jax.ShapeDtypeStruct((), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
    report = mpx.program.report(matmul, *args, target="h100")
    (gemm,) = [x for x in report.kernels if x.kind == "gemm"]
    assert (gemm.gemm, gemm.engine, gemm.flops) == ("fp8", "cublas", 2.0 * m * n * k)
    assert gemm.bytes == m * k + n * k + 2 * 4 + 2 * m * n
    assert report.gemm_flops == 2.0 * m * n * k
    expected_ms = 1e3 * max(gemm.bytes / 3.35e12, 2.0 * m * n * k / 1979e12) + 1e3 * 12 / 3.35e12
    np.testing.assert_allclose(report.roofline_s() * 1e3, expected_ms, rtol=1e-6)


def test_an_unknown_target_is_an_error_naming_the_known_ones():
    with pytest.raises(ValueError, match="unknown target 'tpu9'; expected one of h100"):
        mpx.program.topology("tpu9")
