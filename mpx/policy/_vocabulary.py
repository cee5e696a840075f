"""The words a policy is written in: precisions, dtypes and op kinds."""

from __future__ import annotations

from collections.abc import Iterable

import jax.numpy as jnp

from mpx._checks import did_you_mean

PRECISIONS = ("fp8", "bf16", "fp16", "fp32", "int8")
QUANTIZED = ("fp8", "int8")  # precisions that apply to matmuls only
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16, "fp32": jnp.float32}
KINDS = (
    "dense",  # a projection: activations x weight
    "einsum",  # a general contraction with a weight
    "attention_logits",  # q @ k^T
    "attention_values",  # softmax(q k^T) @ v
    "head",  # the output projection to the vocabulary / classes
    "embed",  # embedding lookup (the dtype it is gathered into)
    "softmax",
    "norm",
    "loss",
)
MATMUL_KINDS = ("dense", "einsum", "attention_logits", "attention_values", "head")
WEIGHT_RHS_KINDS = ("dense", "einsum", "head")  # matmuls whose rhs is a weight (the rest: two activations)
INPUT_FORMATS = ("int8", "fp8")

# numpy's names for the precisions, which users type out of habit
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float8": "fp8"}


def suggest(value, choices: Iterable[str]) -> str:
    """`mpx._checks.did_you_mean`, knowing numpy's names for the precisions."""
    return did_you_mean(value, choices, aliases=_ALIASES)
