"""A model's root call, as capture takes it: what the NNX and linen glue each provide.

Capturing a model's matmuls needs the same four things whatever the model is written in: its
call as a pure function of its state (so that it can be traced), that state and the call's
arguments, a way to mark each module method call in the trace (`mpx._naming.Naming`: a
matmul is named by the call it ran in), and the policy ops of the layers that run their
own (reported with them). `Root` holds them; `mpx.capture.Captured` does the rest (trace,
FP8 state, evaluation) the same way for `mpx.nn._root` (NNX) and `mpx.linen._root` (linen
modules and the model objects that apply them). Where the FP8 metas are kept between calls,
and how changed state goes back, stay with each framework (an NNX variable; a linen
collection or the caller's dict).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ContextManager

import jax
import numpy as np

from mpx._naming import Naming
from mpx.policy import OpPrecision

_MISSING_HINT = ("initialize the model under the same policy (its FP8 state is created from a trace of the "
                 "model on example inputs)")


@dataclasses.dataclass(frozen=True)
class Root:
    """One call of a model's root module, for `mpx.capture.Captured`.

    ``call(state, args, kwargs)`` runs the model's own call on ``state`` (a tuple, the
    parameters first: a matmul with one of their leaves, or with anything computed from them
    alone, is a projection) and returns what the call returns; it must rebuild the model from
    ``state``, not close over it. ``args`` / ``kwargs`` are the call's arguments: their
    arrays are the trace's inputs, every other leaf (flags, sizes) stays as given.
    ``marking(naming)`` is entered around the trace and marks every module method call for
    ``naming``. ``layer_op(path)``: the policy op of the layer op at ``path`` (None when
    unknown). ``missing_hint`` ends the error for an apply without the FP8 metas it needs.
    """

    call: Callable[[tuple, tuple, dict], Any]
    state: tuple
    args: tuple
    kwargs: Mapping[str, Any]
    marking: Callable[[Naming], ContextManager[Any]]
    layer_op: Callable[[str], OpPrecision | None] = lambda path: None
    missing_hint: str = _MISSING_HINT

    def flat(self) -> tuple[Callable[..., Any], list, int]:
        """``(fn, leaves, n_params)``: the call as a function of the array leaves of the
        state and the arguments, those leaves, and how many of them (first) are parameters."""
        arrays, rebuild = split_arrays(self.args, dict(self.kwargs))
        leaves, tree = jax.tree.flatten((self.state, arrays))

        def fn(*new):
            state, arrays = jax.tree.unflatten(tree, new)
            return self.call(state, *rebuild(arrays))

        return fn, leaves, len(jax.tree.leaves(self.state[0]))


def split_arrays(args: tuple, kwargs: dict) -> tuple[list, Callable[[list], tuple[tuple, dict]]]:
    """The array leaves of a call's arguments (what a trace takes as inputs) and a function
    that rebuilds ``(args, kwargs)`` from new arrays, every other leaf (flags, sizes) kept."""
    leaves, tree = jax.tree.flatten((args, kwargs))
    dynamic = [isinstance(x, (jax.Array, np.ndarray)) for x in leaves]

    def rebuild(arrays):
        it = iter(arrays)
        return jax.tree.unflatten(tree, [next(it) if d else x for x, d in zip(leaves, dynamic)])

    return [x for x, d in zip(leaves, dynamic) if d], rebuild


@contextlib.contextmanager
def setting(var: contextvars.ContextVar, value) -> Iterator[None]:
    """``var`` set to ``value`` inside the block."""
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)
