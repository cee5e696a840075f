"""mpx: mixed-precision (FP8 / INT8 / BF16 / FP16 / FP32) training on JAX."""

from mpx import fp8, inspect, int8, loss_scale, ops, policy, program, ptq
from mpx.fp8 import Fp8Config, Fp8Meta, Fp8Scale, fp8_dot_general
from mpx.int8 import Int8Config, int8_dot_general
from mpx.loss_scale import (
    DynamicLossScale,
    LossScaleConfig,
    NoOpLossScale,
    StaticLossScale,
    all_finite,
    dynamic_loss_scale,
    select_tree,
)
from mpx.policy import OpPrecision, Policy, Rule, parse as parse_policy
from mpx.step import BootstrappedStep, StepMetrics, TrainState, init_train_state, make_train_step, train_step
from mpx import nn  # noqa: E402 - layers build on everything above
from mpx import linen  # noqa: E402
from mpx.models import apply_policy, matmuls, split  # noqa: E402 - any model under a policy: NNX, linen, hub objects

__all__ = [
    "BootstrappedStep",
    "DynamicLossScale",
    "Fp8Config",
    "Fp8Meta",
    "Fp8Scale",
    "Int8Config",
    "LossScaleConfig",
    "NoOpLossScale",
    "OpPrecision",
    "Policy",
    "Rule",
    "StaticLossScale",
    "StepMetrics",
    "TrainState",
    "all_finite",
    "apply_policy",
    "dynamic_loss_scale",
    "fp8",
    "fp8_dot_general",
    "inspect",
    "init_train_state",
    "int8",
    "int8_dot_general",
    "linen",
    "loss_scale",
    "make_train_step",
    "matmuls",
    "nn",
    "ops",
    "parse_policy",
    "policy",
    "program",
    "ptq",
    "select_tree",
    "split",
    "train_step",
]
