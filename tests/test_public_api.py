"""The public faces, pinned name by name, and the README's and the doctests' code using
nothing else.

Every name in a face is a promise to users: adding or removing one is a decision made
here, not a side effect of an import. What a face leaves out stays importable from its
module (``from mpx.fp8._meta import advance``) for mpx's own use and for tests.
"""

import doctest
import importlib
import re
import types

import pytest

from test_doctests import MODULES as DOCTEST_MODULES
from test_readme import python_blocks

FACES = {
    "mpx": [
        "BootstrappedStep", "Fp8Config", "Fp8Meta", "Int8Config", "LossScaleConfig", "Policy", "Rule", "StepMetrics",
        "TrainState", "apply_policy", "fp8", "fp8_dot_general", "init_train_state", "inspect", "int8",
        "int8_dot_general", "linen", "loss_scale", "make_train_step", "matmuls", "nn", "ops", "optim", "parse_policy",
        "policy", "program", "ptq", "split", "train_step",
    ],
    "mpx.fp8": [
        "E4M3", "E5M2", "Fp8Config", "Fp8FanoutWarning", "Fp8Meta", "Fp8Scale", "amax", "dequantize", "fp8_dot_general",
        "fp8_max", "keeping_weights_whole", "quantization_stats", "quantize", "remat_saving_fp8", "saved_in_fp8",
    ],
    "mpx.int8": [
        "INT8_MAX", "Int8Config", "absmax_scale", "dequantize", "fake_quantize", "int8_dot_general", "quantize",
        "quantize_with_scale",
    ],
    "mpx.optim": ["MOMENTS", "BlockExpanded", "BlockQuantized", "ScaleByAdamState", "adamw", "apply_updates", "scale_by_adam",
                  "stochastic_round"],
    "mpx.nn": [
        "GPT2_MEDIUM", "GPT2_SMALL", "Attention", "CrossEntropy", "DotGeneral", "Einsum", "FoundOp", "Fp8MetaVariable",
        "KVCache", "Linear", "SequenceClassifier", "Softmax", "TransformerConfig", "TransformerLM", "apply_policy", "find_ops",
        "split",
    ],
    "mpx.linen": [
        "CAPTURED", "FP8_COLLECTION", "PolicyDotGeneral", "PolicyModule", "Wrapped", "linen_matmuls", "linen_ops",
        "policy_context", "split_variables",
    ],
    "mpx.inspect": [
        "NOT_UNDER_POLICY", "FormatError", "Fp8GemmReport", "GemmRow", "OpRow", "OpSensitivity", "PrecisionTable",
        "SensitivityReport", "SpeedModel", "SpelledOutBlocks", "TensorStats", "Widened8Bit", "describe", "dot_generals",
        "format_fp8_stats", "fp8_gemms", "fp8_stats", "sensitivity",
    ],
    "mpx.policy": [
        "DTYPES", "FASTEST_8BIT", "KINDS", "MATMUL_KINDS", "OpPrecision", "PRECISIONS", "PRESETS", "Policy", "Rule",
        "StaticInputs", "TOP_KEYS", "WEIGHT_RHS_KINDS", "as_dict", "key_name", "kind_overrides", "parse", "resolve",
    ],
    "mpx.loss_scale": [
        "DynamicLossScale", "LossScale", "LossScaleConfig", "NoOpLossScale", "StaticLossScale", "all_finite",
        "dynamic_loss_scale", "select_tree",
    ],
    "mpx.ptq": [
        "FORMATS", "ActivationStats", "QuantizedWeight", "calibrate", "dequantize_params", "nbytes", "quantize_params",
        "quantize_weight", "quantized_paths",
    ],
    "mpx.program": [
        "B200", "CUBLAS_ONLY", "Collective", "H100", "Kernel", "ProgramReport", "TARGETS", "Target", "block_scaled",
        "block_scaled_gemms", "compile_for", "ensure_compiler", "get_target", "kernels", "make_mesh", "native_8bit",
        "platform_of", "read", "report", "shape_bytes", "target_of", "topology", "use_plugin",
    ],
}


@pytest.mark.parametrize("name", FACES)
def test_each_face_exports_exactly_its_pinned_names(name):
    face = importlib.import_module(name).__all__
    assert len(face) == len(set(face)), f"{name}.__all__ lists a name twice"
    assert sorted(face) == sorted(FACES[name])


@pytest.mark.parametrize("name", FACES)
def test_every_exported_name_resolves_and_none_is_private(name):
    module = importlib.import_module(name)
    for export in module.__all__:
        assert not export.startswith("_"), f"{name} exports the private name {export}"
        assert hasattr(module, export), f"{name}.__all__ lists {export}, which {name} does not define"


def test_fp8_exports_about_a_dozen_names_and_keeps_its_state_rules_in_meta():
    """The rules that update FP8 state are the step's business: reachable from their module,
    not from the face."""
    import mpx.fp8
    import mpx.fp8._meta

    assert len(mpx.fp8.__all__) <= 15
    for rule in ("advance", "advance_tree", "combine", "combine_metas", "combine_trees", "observation",
                 "observations_finite", "scale_for_use", "needs_bootstrap", "bootstrap"):
        assert rule not in mpx.fp8.__all__ and callable(getattr(mpx.fp8._meta, rule)), rule


def why_not_public(ref: str) -> str | None:
    """None when the dotted reference ``mpx.a.b...`` goes through public names only: each
    step through a module with an ``__all__`` is in it, no step is private. Else the reason."""
    parts = ref.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        where = ".".join(parts[:i])
        if part.startswith("_"):
            return f"{ref}: {part} is private to {where}"
        if isinstance(obj, types.ModuleType) and hasattr(obj, "__all__") and part not in obj.__all__:
            return f"{ref}: {where}.__all__ has no {part!r}"
        if not hasattr(obj, part):
            return f"{ref}: {where} has no attribute {part!r}"
        obj = getattr(obj, part)
    return None


_IMPORT_AS = re.compile(r"^[ \t]*import[ \t]+(mpx(?:\.\w+)*)(?:[ \t]+as[ \t]+(\w+))?", re.M)
_FROM_IMPORT = re.compile(r"^[ \t]*from[ \t]+(mpx(?:\.\w+)*)[ \t]+import[ \t]+(?:\(([^)]*)\)|([^\n#]*))", re.M)


def mpx_references(code: str) -> set[str]:
    """Every ``mpx.a.b`` reference of ``code``: dotted uses, imports, and uses through an
    imported alias (``import mpx.nn as mn`` ... ``mn.TransformerLM``)."""
    refs, aliases = set(), {}
    for module, alias in _IMPORT_AS.findall(code):
        refs.add(module)
        if alias:
            aliases[alias] = module
    for module, bracketed, names in _FROM_IMPORT.findall(code):
        for item in filter(None, (n.strip() for n in (bracketed or names).split(","))):
            name, _, alias = (s.strip() for s in item.partition(" as "))
            refs.add(f"{module}.{name}")
            aliases[alias or name] = f"{module}.{name}"
    refs |= set(re.findall(r"(?<![\w.])mpx(?:\.[A-Za-z_]\w*)+", code))
    for alias, target in aliases.items():
        refs |= {target + rest for rest in re.findall(rf"(?<![\w.]){re.escape(alias)}((?:\.[A-Za-z_]\w*)+)", code)}
    return refs


def _doctest_sources() -> list[tuple[str, str]]:
    out = []
    for name in DOCTEST_MODULES:
        module = importlib.import_module(name)
        for test in doctest.DocTestFinder().find(module, name):
            if test.examples:
                out.append((test.name, "".join(example.source for example in test.examples)))
    return out


@pytest.mark.parametrize("where, code", [(f"README line {line + 1}", code) for line, code, _ in python_blocks()]
                         + _doctest_sources())
def test_the_readme_and_the_doctests_use_only_public_names(where, code):
    problems = [why for why in map(why_not_public, sorted(mpx_references(code))) if why]
    assert not problems, f"{where}: " + "; ".join(problems)


def test_the_reference_check_refuses_what_is_not_public():
    """The check above can fail: internal rules, private names and missing names are refused."""
    code = ("import mpx\nimport mpx.fp8 as F\nfrom mpx.fp8._meta import advance\nfrom mpx import (ptq,\n  nn as mn)\n"
            "import numpy as np\nmpx.fp8.observe(x)\nF._scaled(x)\nmn.Linear\nmpx.nope")
    assert mpx_references(code) == {"mpx", "mpx.fp8", "mpx.fp8._meta", "mpx.fp8._meta.advance", "mpx.ptq", "mpx.nn",
                                    "mpx.fp8.observe", "mpx.fp8._scaled", "mpx.nn.Linear", "mpx.nope"}
    assert why_not_public("mpx.fp8._meta.advance") == "mpx.fp8._meta.advance: _meta is private to mpx.fp8"
    assert why_not_public("mpx.fp8.observe") == "mpx.fp8.observe: mpx.fp8.__all__ has no 'observe'"
    assert why_not_public("mpx.fp8._scaled") == "mpx.fp8._scaled: _scaled is private to mpx.fp8"
    assert why_not_public("mpx.nope") == "mpx.nope: mpx.__all__ has no 'nope'"
    assert why_not_public("mpx.nn.TransformerLM") is None and why_not_public("mpx.ops.dot_general") is None
