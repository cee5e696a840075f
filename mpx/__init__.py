"""mpx: mixed-precision (FP8 / INT8 / BF16 / FP16 / FP32) training on JAX.

The names here are what a training script calls; each subpackage exports its own
(`mpx.fp8`, `mpx.int8`, `mpx.optim`, `mpx.nn`, `mpx.linen`, `mpx.inspect`, `mpx.program`, ...).
"""

from mpx import fp8, inspect, int8, loss_scale, ops, optim, policy, program, ptq
from mpx.fp8 import Fp8Config, Fp8Meta, fp8_dot_general
from mpx.int8 import Int8Config, int8_dot_general
from mpx.loss_scale import LossScaleConfig
from mpx.policy import Policy, Rule, parse as parse_policy
from mpx._step import BootstrappedStep, StepMetrics, TrainState, init_train_state, make_train_step, train_step
from mpx import nn  # noqa: E402 - layers build on everything above
from mpx import linen  # noqa: E402
from mpx._models import apply_policy, matmuls, split  # noqa: E402 - any model under a policy: NNX, linen, hub objects

__all__ = [
    "BootstrappedStep",
    "Fp8Config",
    "Fp8Meta",
    "Int8Config",
    "LossScaleConfig",
    "Policy",
    "Rule",
    "StepMetrics",
    "TrainState",
    "apply_policy",
    "fp8",
    "fp8_dot_general",
    "init_train_state",
    "inspect",
    "int8",
    "int8_dot_general",
    "linen",
    "loss_scale",
    "make_train_step",
    "matmuls",
    "nn",
    "ops",
    "optim",
    "parse_policy",
    "policy",
    "program",
    "ptq",
    "split",
    "train_step",
]
