"""One verb puts any model under a policy; one family of functions follows it.

`apply_policy` takes a Flax NNX module, a Flax linen module, or an object that calls a
linen module's ``apply`` itself (a model hub's class), and puts every matmul it runs under
the policy, whatever code wrote it. `split` takes the state apart for `mpx.train_step`,
`matmuls` lists every matmul with the policy's decision, and `mpx.inspect.describe`
tabulates them; all three take what `apply_policy` takes or returns.

    model = mpx.apply_policy(model, policy, x)              # NNX: in place, x traces it
    graphdef, params, fp8_meta, rest = mpx.split(model)
    print(mpx.inspect.describe(model, policy, x))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import linen, nnx

from mpx import capture
from mpx.linen._context import matmuls_linen
from mpx.linen._module import PolicyModule, split_linen
from mpx.linen._wrapped import Wrapped
from mpx.nn import _root as nnx_root
from mpx.nn._apply import apply_nnx, split_nnx
from mpx.policy import Policy

_ACCEPTS = ("an nnx.Module, a flax.linen Module, or an object whose __call__ runs a linen module's apply "
            "(a model hub's model class)")


def apply_policy(model, policy: Policy, *example_args, kinds: Mapping[str, str] | None = None,
                 **example_kwargs):
    """Put ``model`` under ``policy``: every matmul it runs, layers and hand-written ones.

    - an ``nnx.Module``: changed in place and returned. Given example inputs
      (``example_args``, ``example_kwargs``: what the model is called with), the model is
      traced once and its hand-written matmuls (``@``, ``jnp.einsum``, ``lax.dot_general``,
      an embedding's ``attend``) get their FP8 state; without them only its layers do.
    - a linen ``nn.Module``: a `mpx.linen.PolicyModule`, whose ``init`` and ``apply`` are
      the module's under the policy (FP8 state in the ``fp8_meta`` collection). Linen
      creates state in ``init``, so example inputs go there, not here.
    - any other callable (a model hub's class that holds a linen module and its params and
      calls ``apply``): a `mpx.linen.Wrapped`; ``init_fp8(inputs)`` makes its FP8 state,
      ``wrapped(fp8_meta, inputs)`` runs it.

    ``kinds`` maps path patterns (policy syntax) to op kinds, e.g. ``{"lm_head": "head"}``
    for an output projection that is a plain Linear. Applying again replaces the earlier
    policy (a `PolicyModule` or `Wrapped` given here is re-made around its model).
    """
    if isinstance(model, nnx.Module):
        return apply_nnx(model, policy, *example_args, kinds=kinds, **example_kwargs)
    if isinstance(model, PolicyModule):
        model = model.module
    elif isinstance(model, Wrapped):
        model = model.obj
    if isinstance(model, type):
        raise TypeError(f"apply_policy takes a model, not its class: got the class {model.__name__}; pass an "
                        f"instance, e.g. mpx.apply_policy({model.__name__}(...), policy)")
    kind = "a linen module" if isinstance(model, linen.Module) else "a wrapped model object"
    if isinstance(model, linen.Module) or callable(model):
        if example_args or example_kwargs:
            raise TypeError(
                f"apply_policy takes no example inputs for {kind} ({type(model).__name__}): its FP8 state is "
                f"created from the inputs given to "
                f"{'model.init(key, x)' if kind == 'a linen module' else 'model.init_fp8(x)'}; call "
                f"mpx.apply_policy(model, policy) and pass the inputs there")
        if isinstance(model, linen.Module):
            return PolicyModule(model, policy, kinds=kinds)
        return Wrapped(model, policy, kinds=kinds)
    raise TypeError(f"apply_policy takes {_ACCEPTS}; got {type(model).__name__}")


def split(state) -> tuple[Any, ...]:
    """The state of a model under a policy, taken apart for `mpx.train_step`.

    - an ``nnx.Module``: ``(graphdef, params, fp8_meta, rest)``, as ``nnx.split`` gives
      them: the parameters (what the optimizer trains), the FP8 state (what the step
      advances) and everything else (batch statistics, RNG state: ``model_state`` of
      ``train_step(..., has_state=True)``). ``nnx.merge(graphdef, params, fp8_meta, rest)``
      rebuilds the model.
    - linen variables (what ``init`` of a `mpx.linen.PolicyModule` returns):
      ``(params, fp8_meta)``; ``fp8_meta`` is ``{}`` when no op runs in fp8. Collections
      besides these two are refused (the step would drop them).

    A `mpx.linen.Wrapped` model holds no state to split: its params are the object's own
    and ``init_fp8`` returns its FP8 state.
    """
    if isinstance(state, nnx.Module):
        return split_nnx(state)
    if isinstance(state, Mapping):
        return split_linen(state)
    raise TypeError(f"split takes an nnx.Module or linen variables (a dict of collections, what init returns); "
                    f"got {type(state).__name__}")


def matmuls(model, policy: Policy, *example_args, kinds: Mapping[str, str] | None = None,
            **example_kwargs) -> list[capture.Matmul]:
    """Every matmul ``model`` runs on the example inputs under ``policy``, in trace order
    (see `mpx.capture.Matmul`): layer ops, captured matmuls and those left outside the
    policy with the reason. Nothing is computed: the model is traced.

    ``model``: an ``nnx.Module``, a linen ``nn.Module``, or what `apply_policy` returned
    for one or for a model object. ``kinds`` defaults to those the model was put under
    the policy with.
    """
    if not example_args and not example_kwargs:
        raise TypeError("matmuls needs example inputs (it traces the model): matmuls(model, policy, x)")
    kinds = kinds_of(model) if kinds is None else kinds
    if isinstance(model, nnx.Module):
        return nnx_root.matmuls(model, policy, kinds, example_args, example_kwargs)
    if isinstance(model, PolicyModule):
        model = model.module
    if isinstance(model, linen.Module):
        return matmuls_linen(model, policy, *example_args, kinds=kinds, **example_kwargs)
    if isinstance(model, Wrapped):
        return Wrapped(model.obj, policy, kinds=kinds).matmuls(*example_args, **example_kwargs)
    raise TypeError(unreadable("matmuls", model))


def kinds_of(model) -> dict[str, str]:
    """The ``kinds`` ``model`` was put under a policy with (``{}`` when none)."""
    if isinstance(model, (PolicyModule, Wrapped)):
        return dict(model.kinds)
    if isinstance(model, nnx.Module):
        return dict(nnx_root.policy_of(model)[1])
    return {}


def unreadable(verb: str, model) -> str:
    """The error for a model ``verb`` cannot read, with what to pass instead."""
    return (f"{verb} takes an NNX module, a linen module, or what mpx.apply_policy returned (for an object that "
            f"calls a linen module's apply itself: an mpx.linen.Wrapped); got {type(model).__name__}. For an "
            f"object that holds a linen module and its params (a model hub's model class), put it under the "
            f"policy first: wrapped = mpx.apply_policy(obj, policy), then {verb}(wrapped, policy, inputs...)")
