"""Precision policies: presets, rule order, path patterns, parsing, errors."""

import jax
import jax.numpy as jnp
import pytest
from jax.tree_util import DictKey, SequenceKey

import mpx
from mpx.policy import KINDS, MATMUL_KINDS, PRESETS, Policy, Rule, parse


def precisions(policy, path="blocks/0/mlp/fc"):
    return {kind: policy.for_op(path, kind).precision for kind in KINDS}


def test_presets():
    assert precisions(parse("fp32")) == {k: "fp32" for k in KINDS}
    assert precisions(parse("bf16")) == {k: ("fp32" if k in ("softmax", "norm", "loss") else "bf16") for k in KINDS}
    assert precisions(parse("fp16")) == {k: ("fp32" if k in ("softmax", "norm", "loss") else "fp16") for k in KINDS}
    assert precisions(parse("fp8")) == {
        "dense": "fp8", "einsum": "fp8", "attention_logits": "bf16", "attention_values": "bf16",
        "head": "bf16", "embed": "bf16", "softmax": "fp32", "norm": "fp32", "loss": "fp32",
    }
    assert [parse(p).loss_scale.kind for p in PRESETS] == ["none", "none", "dynamic", "none"]
    fp8 = parse("fp8")
    assert (fp8.params, fp8.compute, fp8.output) == ("fp32", "bf16", "fp32")
    dense = fp8.for_op("x", "dense")
    assert dense.is_fp8 and dense.dtype == jnp.bfloat16 and dense.fp8 == mpx.Fp8Config()
    logits = fp8.for_op("x", "attention_logits")
    assert logits.rule is None and logits.fp8 is None  # no rule: the compute dtype


def test_first_matching_rule_wins():
    a = Policy(compute="bf16", rules=(Rule("fp32", match="blocks/**"), Rule("fp8", kind="dense")))
    b = Policy(compute="bf16", rules=(Rule("fp8", kind="dense"), Rule("fp32", match="blocks/**")))
    assert (a.for_op("blocks/1/fc", "dense").precision, a.for_op("blocks/1/fc", "dense").rule) == ("fp32", 0)
    assert (b.for_op("blocks/1/fc", "dense").precision, b.for_op("blocks/1/fc", "dense").rule) == ("fp8", 0)
    assert b.for_op("blocks/1/ln", "norm").rule == 1


@pytest.mark.parametrize(
    "pattern, path, hit",
    [
        ("blocks/*/mlp/fc1", "blocks/3/mlp/fc1", True),
        ("blocks/*/mlp/fc1", "blocks/3/x/mlp/fc1", False),
        ("**/head", "head", True),
        ("**/head", "a/b/head", True),
        ("blocks/*/attn/(qkv|out)", "blocks/0/attn/out", True),
        ("blocks/*/attn/(qkv|out)", "blocks/0/attn/logits", False),
        ("blocks/*", "blocks/0/mlp", False),  # whole-path match, not prefix
        ("blocks/**", "blocks/0/mlp", True),
    ],
)
def test_path_patterns(pattern, path, hit):
    policy = Policy(rules=(Rule("bf16", match=pattern),))
    assert (policy.for_op(path, "dense").precision == "bf16") is hit


def test_paths_given_as_key_sequences():
    policy = parse("fp32; blocks/*/mlp->bf16")
    assert policy.for_op((DictKey("blocks"), SequenceKey(2), DictKey("mlp")), "dense").precision == "bf16"
    assert policy.for_op(["blocks", 2, "mlp"], "dense").precision == "bf16"


def test_fp8_rules_pass_over_non_matmul_ops():
    policy = parse("bf16; blocks/**->fp8")
    assert policy.for_op("blocks/0/ln1", "norm").precision == "fp32"  # next rule: the preset's
    assert policy.for_op("blocks/0/fc", "dense").precision == "fp8"
    assert set(MATMUL_KINDS) == {"dense", "einsum", "attention_logits", "attention_values", "head"}


def test_compact_string_and_dict_forms_agree():
    s = parse("bf16; params=fp32; output=bf16; blocks/*/mlp/*@dense->fp8; @head->fp32; fp8.amax_history=16; "
              "fp8.recipe=current; fp8.margin=1; loss_scale=dynamic; loss_scale.period=10")
    d = parse({"preset": "bf16", "params": "fp32", "output": "bf16",
               "rules": [{"match": "blocks/*/mlp/*", "kind": "dense", "use": "fp8"}, {"kind": "head", "use": "fp32"}],
               "fp8": {"amax_history": 16, "recipe": "current", "margin": 1},
               "loss_scale": {"kind": "dynamic", "period": 10}})
    assert s == d
    assert s.rules[:2] == (Rule("fp8", match="blocks/*/mlp/*", kind="dense"), Rule("fp32", kind="head"))
    assert s.rules[2:] == parse("bf16").rules  # the preset's own rules come after
    assert (s.fp8.amax_history, s.fp8.recipe, s.loss_scale.period) == (16, "current", 10)
    assert s.output == "bf16"


@pytest.mark.parametrize("spec", [*PRESETS, "fp8; blocks/0/**->fp32; fp8.amax_history=8; loss_scale=static"])
def test_to_dict_round_trips(spec):
    policy = parse(spec)
    assert parse(policy.to_dict()) == policy
    assert hash(parse(policy.to_dict())) == hash(policy)


def test_policy_is_a_valid_jit_static_argument():
    f = jax.jit(lambda x, policy: x.astype(policy.compute_dtype), static_argnums=1)
    assert f(jnp.ones(2), parse("bf16")).dtype == jnp.bfloat16
    assert f(jnp.ones(2), parse("fp16")).dtype == jnp.float16


def test_casts_touch_only_floating_leaves():
    policy = parse("bf16")
    tree = {"w": jnp.ones(2), "n": jnp.array([1], jnp.int32)}
    out = policy.cast_to_compute(tree)
    assert out["w"].dtype == jnp.bfloat16 and out["n"].dtype == jnp.int32
    assert policy.cast_to_param({"w": jnp.ones(2, jnp.bfloat16)})["w"].dtype == jnp.float32
    assert policy.cast_to_output(tree)["w"].dtype == jnp.float32


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fp9", r"unknown policy preset 'fp9'.*fp32, bf16, fp16, fp8.*did you mean 'fp8'"),
        ("bf16; head->float32", r"rule 0.*unknown precision 'float32'.*head->float32.*fp8, bf16, fp16, fp32.*'fp32'"),
        ("bf16; @softmaxx->fp32", r"unknown op kind 'softmaxx'.*did you mean 'softmax'"),
        ("bf16; @norm->fp8", r"fp8 on kinds norm, which are not matmuls"),
        ("bf16; blocks/(a->fp32", r"invalid path pattern 'blocks/\(a'"),
        ("compute=float32", r"unknown dtype 'float32' for compute.*did you mean 'fp32'"),
        ("bf16; fp8.histroy=4", r"unknown key 'histroy' in fp8.*amax_history"),
        ("bf16; fp8.recipe=later", r"fp8 recipe 'later'.*delayed, current"),
        ("fp16; loss_scale.period=0", r"loss_scale period must be an integer >= 1"),
        ("bf16; loss_scale=dynamic; loss_scale.factor=1", r"factor must be > 1"),
        ("bf16; nonsense", r"cannot read policy item 'nonsense'"),
        ("bf16; speed=fast", r"unknown key 'speed'"),
        ({"presett": "fp8"}, r"unknown key 'presett' in policy.*did you mean 'preset'"),
        ({"rules": [{"match": "a", "usee": "fp8"}]}, r"unknown key 'usee' in rule 0.*match, kind, use"),
        ({"rules": [{"match": "a"}]}, r"rule 0 .* has no 'use'"),
        ({"rules": "a->fp8"}, r"'rules' must be a list"),
        ("", r"empty policy string"),
    ],
)
def test_bad_specs_name_the_cause(spec, message):
    with pytest.raises(ValueError, match=message):
        parse(spec)


def test_unknown_kind_at_resolution():
    with pytest.raises(ValueError, match=r"unknown op kind 'dens' at 'fc'.*did you mean 'dense'"):
        parse("fp8").for_op("fc", "dens")
