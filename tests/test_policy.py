"""Precision policies: presets, rule order, path patterns, parsing, hashing, errors, casts."""

import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from mpx.fp8 import Fp8Config
from mpx.loss_scale import LossScaleConfig
from mpx.policy import KINDS, PRESETS, Policy, Rule, parse

F32, BF16, FP16 = jnp.float32, jnp.bfloat16, jnp.float16
FP8 = Fp8Config()
STABLE = ("softmax", "norm", "loss")


def resolved(policy, path="blocks/0/mlp/fc1"):
    """kind -> (precision, dtype, fp8 config, deciding rule index) for every kind."""
    out = {}
    for kind in KINDS:
        op = policy.for_op(path, kind)
        out[kind] = (op.precision, op.dtype, op.fp8, op.rule)
    return out


# fp8 preset rules: 0 = softmax|norm|loss->fp32, 1 = embed|head->bf16, 2 = dense|einsum->fp8.
PRESET_TABLES = {
    "fp32": {k: ("fp32", F32, None, None) for k in KINDS},
    "bf16": {k: ("fp32", F32, None, 0) if k in STABLE else ("bf16", BF16, None, None) for k in KINDS},
    "fp16": {k: ("fp32", F32, None, 0) if k in STABLE else ("fp16", FP16, None, None) for k in KINDS},
    "fp8": {
        "dense": ("fp8", BF16, FP8, 2), "einsum": ("fp8", BF16, FP8, 2),
        "attention_logits": ("bf16", BF16, None, None), "attention_values": ("bf16", BF16, None, None),
        "embed": ("bf16", BF16, None, 1), "head": ("bf16", BF16, None, 1),
        "softmax": ("fp32", F32, None, 0), "norm": ("fp32", F32, None, 0), "loss": ("fp32", F32, None, 0),
    },
    # int8 preset: the fp8 preset's rules with dense|einsum->int8 (rule 2).
    "int8": {
        "dense": ("int8", BF16, None, 2), "einsum": ("int8", BF16, None, 2),
        "attention_logits": ("bf16", BF16, None, None), "attention_values": ("bf16", BF16, None, None),
        "embed": ("bf16", BF16, None, 1), "head": ("bf16", BF16, None, 1),
        "softmax": ("fp32", F32, None, 0), "norm": ("fp32", F32, None, 0), "loss": ("fp32", F32, None, 0),
    },
}
PRESET_DTYPES = {"fp32": ("fp32", "fp32", "fp32"), "bf16": ("fp32", "bf16", "fp32"),
                 "fp16": ("fp32", "fp16", "fp32"), "fp8": ("fp32", "bf16", "fp32"), "int8": ("fp32", "bf16", "fp32")}


@pytest.mark.parametrize("name", PRESET_DTYPES)
def test_preset_dtypes_loss_scale_and_per_kind_precision(name):
    """Each preset's (params, compute, output), loss-scale kind and the full kind table."""
    policy = parse(name)
    assert (policy.params, policy.compute, policy.output) == PRESET_DTYPES[name]
    assert policy.param_dtype == F32 and policy.output_dtype == F32
    assert policy.loss_scale == LossScaleConfig(kind="dynamic" if name == "fp16" else "none")
    assert policy.fp8 == FP8
    assert resolved(policy) == PRESET_TABLES[name]
    assert policy.for_op("blocks/0/mlp/fc1", "dense").is_fp8 is (name == "fp8")
    assert policy.for_op("blocks/0/mlp/fc1", "dense").is_int8 is (name == "int8")


RECIPE_CONFIGS = {
    "fp8-rowwise": Fp8Config(granularity="row"),
    "fp8-rowwise-gw-hp": Fp8Config(granularity="row", weight_grad="compute"),
    "fp8-block": Fp8Config(granularity="block", format="e4m3", block_size=128),
    "mxfp8": Fp8Config(granularity="mx", format="e4m3"),
}


def test_the_presets_are_the_five_precisions_and_the_fp8_recipes():
    assert PRESETS == (*PRESET_DTYPES, *RECIPE_CONFIGS)


@pytest.mark.parametrize("name", RECIPE_CONFIGS)
def test_recipe_presets_are_the_fp8_preset_with_their_scaling(name):
    """Each recipe preset is the fp8 preset's table with its own Fp8Config (written out here)
    on the fp8 ops; its label in describe names the granularity."""
    policy = parse(name)
    config = RECIPE_CONFIGS[name]
    assert policy.fp8 == config and not config.per_tensor
    expected = {k: (p, d, config if c is not None else None, r) for k, (p, d, c, r) in PRESET_TABLES["fp8"].items()}
    assert resolved(policy) == expected
    label = policy.for_op("blocks/0/mlp/fc1", "dense").label
    assert label == {"fp8-rowwise": "fp8 (row)", "fp8-rowwise-gw-hp": "fp8 (row; weight_grad compute)",
                     "fp8-block": "fp8 (block)", "mxfp8": "fp8 (mx)"}[name]
    # A preset's recipe takes further keys like any other preset.
    assert parse(f"{name}; fp8.weight_grad=tensor").fp8 == dataclasses.replace(config, weight_grad="tensor")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fp8; fp8.granularity=rows", r"fp8 granularity 'rows' is not supported; expected one of tensor, row, block, "
                                      r"mx \(did you mean 'row'\?\)"),
        ("fp8; fp8.weight_grad=bf16", r"fp8 weight_grad 'bf16' is not supported; expected one of tensor, row, block, "
                                      r"mx, compute \(did you mean 'compute'\?"),
        ("fp8; fp8.block_size=0", r"fp8 block_size must be an integer >= 1, got 0"),
        ("fp8; fp8.forward=compute; fp8.input_grad=compute; fp8.weight_grad=compute",
         r"all 'compute': no GEMM of the op is FP8"),
    ],
)
def test_bad_recipe_keys_name_the_key_and_the_choices(spec, message):
    with pytest.raises(ValueError, match=message):
        parse(spec)


def test_first_matching_rule_wins_and_reports_its_index():
    """Swapping two overlapping rules flips the decision; OpPrecision.rule is the winner's index."""
    a = Policy(compute="bf16", rules=(Rule("fp32", match="blocks/**"), Rule("fp8", kind="dense")))
    b = Policy(compute="bf16", rules=(Rule("fp8", kind="dense"), Rule("fp32", match="blocks/**")))
    op_a, op_b = a.for_op("blocks/1/fc", "dense"), b.for_op("blocks/1/fc", "dense")
    assert (op_a.precision, op_a.dtype, op_a.fp8, op_a.rule) == ("fp32", F32, None, 0)
    assert (op_b.precision, op_b.dtype, op_b.fp8, op_b.rule) == ("fp8", BF16, FP8, 0)
    assert (b.for_op("blocks/1/ln", "norm").precision, b.for_op("blocks/1/ln", "norm").rule) == ("fp32", 1)
    assert (a.for_op("head", "dense").precision, a.for_op("head", "dense").rule) == ("fp8", 1)
    assert (a.for_op("head", "norm").precision, a.for_op("head", "norm").rule) == ("bf16", None)


@pytest.mark.parametrize(
    "pattern, path, hit",
    [
        ("blocks/*/mlp/fc1", "blocks/3/mlp/fc1", True),
        ("blocks/*/mlp/fc1", "blocks/3/x/mlp/fc1", False),  # * is exactly one segment
        ("blocks/*/mlp/fc1", "blocks//mlp/fc1", False),  # ... and never an empty one
        ("**/head", "head", True),
        ("**/head", "a/b/head", True),
        ("**/head", "a/bhead", False),
        ("blocks/**/fc", "blocks/fc", True),
        ("blocks/**/fc", "blocks/0/mlp/fc", True),
        ("blocks/*/attn/(qkv|out)", "blocks/0/attn/qkv", True),
        ("blocks/*/attn/(qkv|out)", "blocks/0/attn/out", True),
        ("blocks/*/attn/(qkv|out)", "blocks/0/attn/logits", False),
        ("blocks/*", "blocks/0/mlp", False),  # full match, not prefix
        ("blocks/*", "blocks/0", True),
        ("mlp", "blocks/0/mlp", False),  # not a search either
        ("blocks/**", "blocks/0/mlp", True),
    ],
)
def test_path_patterns_match_the_whole_path(pattern, path, hit):
    """`*` one segment, `**` any number, regex alternation, fullmatch semantics."""
    op = Policy(rules=(Rule("bf16", match=pattern),)).for_op(path, "dense")
    assert (op.precision, op.rule) == (("bf16", 0) if hit else ("fp32", None))


@pytest.mark.parametrize(
    "path",
    [
        (DictKey("blocks"), SequenceKey(3), DictKey("mlp"), DictKey("fc1")),
        ["blocks", 3, "mlp", "fc1"],
        ("blocks", "3", "mlp", "fc1"),
        "blocks/3/mlp/fc1",
    ],
)
def test_path_as_key_sequence_is_joined_with_slashes(path):
    """DictKey.key / SequenceKey.idx / plain items join to 'blocks/3/mlp/fc1' before matching."""
    op = parse("fp32; blocks/*/mlp/fc1->bf16").for_op(path, "dense")
    assert (op.path, op.precision, op.rule) == ("blocks/3/mlp/fc1", "bf16", 0)


def test_path_from_tree_flatten_with_path():
    """Key paths straight from jax.tree_util of a dict/list tree resolve like the string."""
    tree = {"blocks": [{"mlp": {"fc1": 0.0}}, {"mlp": {"fc1": 0.0}}]}
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    ops = [parse("fp8; blocks/1/**->fp32").for_op(p, "dense") for p in paths]
    assert [(o.path, o.precision, o.rule) for o in ops] == [
        ("blocks/0/mlp/fc1", "fp8", 3), ("blocks/1/mlp/fc1", "fp32", 0)]


class _Block(typing.NamedTuple):
    mlp: float


def test_path_with_getattr_key():
    """NamedTuple / dataclass key paths use GetAttrKey; the segment should be 'mlp'."""
    path = (DictKey("blocks"), SequenceKey(0), GetAttrKey("mlp"))
    assert jax.tree_util.tree_flatten_with_path({"blocks": [_Block(0.0)]})[0][0][0] == path
    assert parse("fp32; blocks/*/mlp->bf16").for_op(path, "dense").path == "blocks/0/mlp"


def test_fp8_rule_is_skipped_for_non_matmul_kinds():
    """`blocks/**->fp8` takes dense/head under blocks; other kinds fall through to later rules / default."""
    policy = parse("bf16; blocks/**->fp8")
    table = resolved(policy, "blocks/0/x")
    assert table["dense"] == table["einsum"] == table["head"] == ("fp8", BF16, FP8, 0)
    assert table["attention_logits"] == ("fp8", BF16, FP8, 0)
    assert table["embed"] == ("bf16", BF16, None, None)  # no later rule: compute default
    assert table["norm"] == table["softmax"] == ("fp32", F32, None, 1)  # the preset's rule
    assert resolved(policy, "head")["dense"] == ("bf16", BF16, None, None)  # outside blocks
    bare = Policy(compute="bf16", rules=(Rule("fp8", match="blocks/**"),))
    assert resolved(bare, "blocks/0/ln")["norm"] == ("bf16", BF16, None, None)


COMPACT = ("bf16; params=fp32; output=bf16; blocks/*/mlp/*@dense->fp8; @head->fp32; blocks/0/**->fp16; "
           "@embed|norm->bf16; fp8.amax_history=16; fp8.recipe=current; fp8.margin=1; "
           "loss_scale=dynamic; loss_scale.period=10; loss_scale.initial=1024; loss_scale.min=0.5")
AS_DICT = {
    "preset": "bf16", "params": "fp32", "output": "bf16",
    "rules": [{"match": "blocks/*/mlp/*", "kind": "dense", "use": "fp8"}, {"kind": "head", "use": "fp32"},
              {"match": "blocks/0/**", "use": "fp16"}, {"kind": "embed|norm", "use": "bf16"}],
    "fp8": {"amax_history": 16, "recipe": "current", "margin": 1},
    "loss_scale": {"kind": "dynamic", "period": 10, "initial": 1024, "min": 0.5},
}


def test_compact_string_fields_and_rule_order():
    """Every compact item lands in its field; own rules precede the preset's rules."""
    p = parse(COMPACT)
    assert (p.params, p.compute, p.output) == ("fp32", "bf16", "bf16")
    assert p.rules == (Rule("fp8", match="blocks/*/mlp/*", kind="dense"), Rule("fp32", kind="head"),
                       Rule("fp16", match="blocks/0/**"), Rule("bf16", kind="embed|norm"),
                       Rule("fp32", kind="softmax|norm|loss"))
    assert p.fp8 == Fp8Config(recipe="current", amax_history=16, margin=1)
    assert p.loss_scale == LossScaleConfig(kind="dynamic", initial=1024, period=10, factor=2.0, min=0.5)
    assert (p.for_op("blocks/0/ln", "norm").precision, p.for_op("blocks/0/ln", "norm").rule) == ("fp16", 2)
    assert (p.for_op("ln_f", "norm").precision, p.for_op("ln_f", "norm").rule) == ("bf16", 3)  # beats preset
    assert (p.for_op("ln_f", "loss").precision, p.for_op("ln_f", "loss").rule) == ("fp32", 4)
    assert parse("->fp16").rules == (Rule("fp16"),)  # neither pattern nor kinds: every op


def test_dict_form_gives_the_same_policy():
    """The dict spelling of COMPACT is equal, hashes equal and resolves identically."""
    s, d = parse(COMPACT), parse(AS_DICT)
    assert s == d and hash(s) == hash(d)
    for path in ("blocks/0/mlp/fc", "blocks/2/mlp/fc", "head", "ln_f"):
        assert resolved(s, path) == resolved(d, path)
    assert parse(d) is d  # a Policy passes through


@pytest.mark.parametrize("spec", [*PRESETS, COMPACT, "fp16; loss_scale=static; loss_scale.initial=8"])
def test_to_dict_round_trips(spec):
    """parse(policy.to_dict()) == policy, for presets and custom policies."""
    policy = parse(spec)
    back = parse(policy.to_dict())
    assert back == policy and hash(back) == hash(policy)
    assert back.to_dict() == policy.to_dict()


def test_jnp_dtypes_are_normalised_to_names():
    """Policy(compute=jnp.bfloat16) equals Policy(compute='bf16')."""
    assert Policy(params=jnp.float32, compute=jnp.bfloat16, output=np.float16) == \
        Policy(params="fp32", compute="bf16", output="fp16")


def test_policy_is_a_jit_static_argument():
    """Equal policies (built separately) hit the same jit cache entry; a different one retraces."""
    traces = []

    def f(x, policy):
        traces.append(policy.compute)
        return policy.cast_to_compute(x)

    g = jax.jit(f, static_argnums=1)
    assert g(jnp.ones(2), parse("bf16")).dtype == BF16
    assert g(jnp.ones(2), parse({"preset": "bf16"})).dtype == BF16
    assert traces == ["bf16"]
    assert g(jnp.ones(2), parse("fp16")).dtype == FP16
    assert traces == ["bf16", "fp16"]


def test_casts_touch_only_floating_leaves():
    """cast_to_param/compute/output retarget float leaves; int leaves come back as-is."""
    policy = Policy(params="fp32", compute="fp16", output="bf16")
    ints = jnp.array([1, 2], jnp.int32)
    tree = {"w": jnp.array([1.5, -2.0], F32), "h": jnp.array([0.25], BF16), "n": ints, "py": 3}
    for cast, dtype in ((policy.cast_to_param, F32), (policy.cast_to_compute, FP16), (policy.cast_to_output, BF16)):
        out = cast(tree)
        assert (out["w"].dtype, out["h"].dtype) == (dtype, dtype)
        np.testing.assert_array_equal(np.asarray(out["w"], np.float32), [1.5, -2.0])  # representable: exact
        np.testing.assert_array_equal(np.asarray(out["h"], np.float32), [0.25])
        assert out["n"] is ints and out["py"] == 3 and isinstance(out["py"], int)


ALL_KINDS = "dense, einsum, attention_logits, attention_values, head, embed, softmax, norm, loss"
MATMULS = "dense, einsum, attention_logits, attention_values, head"


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fp9", r"unknown policy preset 'fp9'; expected one of fp32, bf16, fp16, fp8, int8, fp8-rowwise, "
                r"fp8-rowwise-gw-hp, fp8-block, mxfp8, or 8bit \(the 8-bit format "
         r"the chip has\) \(did you mean 'fp8'\?\)"),
        ("bf16; head->float32", r"rule 0: unknown precision 'float32' for rule head->float32; "
                                r"expected one of fp8, bf16, fp16, fp32, int8 \(did you mean 'fp32'\?\)"),
        ("bf16; @softmaxx->fp32", rf"unknown op kind 'softmaxx' for rule @softmaxx->fp32; "
                                  rf"expected one of {ALL_KINDS} \(did you mean 'softmax'\?\)"),
        ("bf16; @norm|loss->fp8", rf"rule @norm\|loss->fp8 asks for fp8 on kinds norm\|loss, which are not "
                                  rf"matmuls; fp8 applies to {MATMULS}"),
        ("bf16; @softmax->int8", rf"rule @softmax->int8 asks for int8 on kinds softmax, which are not "
                                 rf"matmuls; int8 applies to {MATMULS}"),
        ("bf16; blocks/(a->fp32", r"invalid path pattern 'blocks/\(a' for rule blocks/\(a->fp32"),
        ({"presett": "fp8"}, r"unknown key 'presett' in policy; accepted keys: preset, params, compute, output, "
                             r"rules, fp8, int8, loss_scale, inputs \(did you mean 'preset'\?\)"),
        ({"rules": [{"match": "a", "usee": "fp8"}]},
         r"unknown key 'usee' in rule 0; accepted keys: match, kind, use \(did you mean 'use'\?\)"),
        ({"rules": [{"kind": "head", "use": "fp32"}, {"match": "a"}]},
         r"rule 1 \(\{'match': 'a'\}\) has no 'use'; expected one of fp8, bf16, fp16, fp32"),
        ({"rules": "a->fp8"}, r"'rules' must be a list"),
        ("compute=float32", r"unknown dtype 'float32' for compute; expected one of bf16, fp16, fp32 "
                            r"\(did you mean 'fp32'\?\)"),
        ({"params": jnp.int32}, r"unsupported dtype .*int32.* for params; expected one of bf16, fp16, fp32"),
        ("bf16; fp8.histroy=4", r"unknown key 'histroy' in fp8; accepted keys: recipe, format, amax_history, "
                                r"amax_compute, margin, min_size, granularity, forward, input_grad, weight_grad, "
                                r"input_grad_format, weight_grad_format, block_size, saved_activations "
                                r"\(did you mean 'amax_history'\?\)"),
        ("bf16; fp8.recipe=later", r"fp8 recipe 'later' is not supported; expected one of delayed, current"),
        ("fp16; loss_scale.period=0", r"loss_scale period must be an integer >= 1, got 0"),
        ("fp16; loss_scale.factor=1", r"loss_scale factor must be > 1 for a dynamic scale, got 1"),
        ("bf16; loss_scale=dynamic; loss_scale.factor=0.5", r"factor must be > 1 for a dynamic scale, got 0.5"),
        ("bf16; loss_scale=auto", r"loss_scale kind 'auto' is not supported; expected one of none, static, dynamic"),
        ("bf16; nonsense", r"cannot read policy item 'nonsense': expected 'key=value' or a rule "
                           r"'PATTERN@KINDS->PRECISION' \(a preset name may only come first\)"),
        ("bf16; speed=fast", r"unknown key 'speed' in policy item 'speed=fast'; expected params, compute, output"),
        ("", r"empty policy string"),
        (42, r"a policy spec must be a Policy, a string or a dict, got int"),
    ],
)
def test_bad_specs_raise_with_cause_and_choices(spec, message):
    """Each bad spec raises ValueError naming the offending item and the accepted values."""
    with pytest.raises(ValueError, match=message):
        parse(spec)


def test_unknown_kind_in_for_op():
    """for_op names the kind, the path and the accepted kinds."""
    with pytest.raises(ValueError, match=rf"unknown op kind 'dens' at 'fc'; expected one of {ALL_KINDS} "
                                         r"\(did you mean 'dense'\?\)"):
        parse("fp8").for_op("fc", "dens")
