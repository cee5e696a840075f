"""`Captured`: a model's root call with every matmul it runs under a policy."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
from jax.extend import core as jcore

from mpx.capture._analysis import Analysis, Flags, Matmul, Site
from mpx.capture._evaluate import Evaluator
from mpx.capture._root import Root
from mpx.fp8 import Fp8Meta
from mpx.fp8._dot import retraced_under_differentiation
from mpx._naming import Naming
from mpx.policy import Policy, kind_overrides


@dataclasses.dataclass
class Trace:
    """One trace of a root call: its jaxpr and inputs, the captured matmuls by position, and
    every matmul as `Captured.matmuls` reports it."""

    jaxpr: jcore.ClosedJaxpr
    flat: list
    out_tree: Any
    sites: dict[tuple, Site]
    matmuls: list[Matmul]


class Captured:
    """``root``'s call (a `Root`) with every matmul it runs under ``policy``.

    ``init()`` returns the FP8 metas of the captured fp8 matmuls (a dict by path, stacked
    for matmuls inside scans); ``apply(metas)`` runs the call with each captured matmul
    replaced by its policy op and returns what the call returns; ``matmuls()`` lists every
    matmul of the trace (see `Matmul`). ``kinds``: path pattern -> kind, first match wins.
    """

    def __init__(self, root: Root, policy: Policy, *, kinds: Mapping[str, str] | None = None):
        self.root, self.policy = root, policy
        self.kinds = kind_overrides(kinds)

    def trace(self) -> Trace:
        """Trace the call and find its matmuls (what `apply` evaluates; ``trace=`` reuses it)."""
        naming = Naming()
        fn, flat, n_params = self.root.flat()
        differentiated = any(hasattr(x, "primal") for x in flat)  # JVP tracers: inside jax.grad
        with self.root.marking(naming), retraced_under_differentiation(differentiated):
            closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*flat)
        analysis = Analysis(naming, self.policy, self.kinds, self.root.layer_op)
        analysis.run(closed.jaxpr, [Flags(i >= n_params, False) for i in range(len(flat))], (), "", ())
        sites, matmuls = analysis.finish()
        return Trace(closed, flat, jax.tree.structure(out_shape), sites, matmuls)

    def matmuls(self) -> list[Matmul]:
        """Every matmul the call runs, in trace order (see `Matmul`)."""
        return self.trace().matmuls

    def init(self, *, trace: Trace | None = None) -> dict[str, Fp8Meta]:
        """A fresh `Fp8Meta` for each captured matmul the policy puts in fp8, by path."""
        return create_metas(self.meta_specs(trace if trace is not None else self.trace()))

    def meta_specs(self, trace: Trace) -> dict[str, tuple[Any, tuple[int, ...]]]:
        """``{path: (Fp8Config, stack)}`` of the metas `init` creates (to create them
        outside a trace)."""
        specs: dict[str, tuple[Any, tuple[int, ...]]] = {}
        for site in trace.sites.values():
            op = self.policy.for_op(site.path, site.kind)
            if op.is_fp8:
                specs.setdefault(site.path, (op.fp8, site.stack))
        return specs

    def apply(self, metas: Mapping[str, Fp8Meta], *, trace: Trace | None = None):
        """The call, every captured matmul under the policy, FP8 state ``metas``."""
        trace = trace if trace is not None else self.trace()
        missing = sorted(set(self.meta_specs(trace)) - set(metas))
        if missing:
            raise ValueError(f"no FP8 meta for the fp8 matmul(s) {', '.join(missing)}; {self.root.missing_hint}")
        outs = Evaluator(self.policy, trace.sites).run(trace.jaxpr.jaxpr, trace.jaxpr.consts, trace.flat, (),
                                                       dict(metas))
        return jax.tree.unflatten(trace.out_tree, outs)


def create_metas(specs: Mapping[str, tuple[Any, tuple[int, ...]]]) -> dict[str, Fp8Meta]:
    """Fresh metas from `Captured.meta_specs` (``{path: (Fp8Config, stack)}``)."""
    return {path: Fp8Meta.init(config, stack=stack) for path, (config, stack) in specs.items()}
