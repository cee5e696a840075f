"""Put any Flax NNX model under a precision policy, in place (what `mpx.apply_policy` does
for an ``nnx.Module``)."""

from __future__ import annotations

from collections.abc import Mapping

from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from mpx.nn._root import capture_matmuls
from mpx.nn._discover import find_ops
from mpx.nn._op_modules import DotGeneral, EinsumOp, Fp8MetaVariable, Op
from mpx.policy import Policy


def promote_keep_kernel(args, /, *, dtype=None, inexact=True):
    """Flax NNX's ``promote_dtype``, except that the kernel (the second array) keeps its
    storage dtype: an FP8 or int8 matmul quantizes the f32 master weight itself, so the
    weight is rounded once (to FP8 / int8), not first to the compute dtype."""
    inputs, kernel, *rest = args
    inputs, *rest = nnx_dtypes.promote_dtype((inputs, *rest), dtype=dtype, inexact=inexact)
    return (inputs, kernel, *rest)


def apply_nnx(model: nnx.Module, policy: Policy, *example_args, kinds: Mapping[str, str] | None = None,
              **example_kwargs) -> nnx.Module:
    """Make every op of the NNX ``model`` obey ``policy``, in place; returns ``model``.

    Linear / LinearGeneral get a policy `DotGeneral` (with an `Fp8MetaVariable` where the
    policy says fp8) and compute in the op's dtype; Einsum gets an `EinsumOp`; Embed and
    norms compute in their op's dtype; mpx op modules take their precision. Parameters
    are cast to the policy's storage dtype; an fp8 layer quantizes its kernel from that
    dtype directly. Layers built under ``nnx.vmap`` get one FP8 meta per layer, stacked
    like their parameters, so ``nnx.scan`` slices both alike. Applying again replaces
    earlier decisions (and resets FP8 meta).
    """
    for param_path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var.set_value(policy.cast_to_param(var.get_value()))
    for found in find_ops(model, kinds):
        op = policy.for_op(found.path, found.kind)
        module = found.module
        if isinstance(module, Op):
            module.set_precision(op, stack=found.stack)
            continue
        if isinstance(module, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)):
            dot = (EinsumOp if isinstance(module, nnx.Einsum) else DotGeneral)(found.kind, path=found.path)
            dot.set_precision(op, stack=found.stack)
            if isinstance(module, nnx.Einsum):
                module.einsum_op = nnx.data(dot)
            else:
                module.dot_general = nnx.data(dot)
            module.promote_dtype = promote_keep_kernel if op.is_quantized else nnx_dtypes.promote_dtype
        module.dtype = op.dtype
    capture_matmuls(model, policy, kinds, example_args, example_kwargs)
    return model


def split_nnx(model: nnx.Module):
    """``(graphdef, params, fp8_meta, rest)`` of any NNX model: the parameters (what the
    optimizer trains), the FP8 state (what `mpx.train_step` advances) and everything else
    (batch statistics, RNG state: ``model_state`` of ``train_step(..., has_state=True)``).
    ``nnx.merge(graphdef, params, fp8_meta, rest)`` rebuilds the model."""
    return nnx.split(model, nnx.Param, Fp8MetaVariable, ...)


def apply_policy(model: nnx.Module, policy: Policy, *example_args, kinds: Mapping[str, str] | None = None,
                 **example_kwargs) -> nnx.Module:
    """Alias of `mpx.apply_policy` for an NNX model, kept for one release."""
    return apply_nnx(model, policy, *example_args, kinds=kinds, **example_kwargs)


def split(model: nnx.Module):
    """Alias of `mpx.split` for an NNX model, kept for one release."""
    return split_nnx(model)
