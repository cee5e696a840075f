"""The jaxpr of a traced function evaluated again, its captured matmuls as policy ops.

`Evaluator` runs the equations as they were traced, except at the positions `Analysis`
chose: each such ``dot_general`` becomes `mpx.ops.dot_general` under the policy, its FP8
meta threaded from one call of the same op to the next (amaxes combine by max). Calls,
checkpoints and scans holding a captured matmul are gone into; a scan's metas are sliced
per iteration (one meta per layer of a scanned stack). The evaluated program keeps the
traced one's name scopes, so profiles and `mpx.inspect.fp8_gemms` read the model's names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import jax
from jax import lax
from jax.extend import core as jcore

from mpx import ops
from mpx.capture._analysis import CALLS, REMAT, Site, called_jaxpr
from mpx._naming import is_call_marker
from mpx.policy import Policy


def _scope(eqn):
    """The equation's name scopes (module and op names), re-entered so that the evaluated
    program is named as the traced one; the capture's own markers left out."""
    names = [n for n in str(eqn.source_info.name_stack).split("/") if n and not is_call_marker(n)]
    return jax.named_scope("/".join(names)) if names else contextlib.nullcontext()


def _bind(eqn, ins) -> list:
    """Run one equation as it was traced (``jax.core.eval_jaxpr``'s step)."""
    with eqn.ctx.manager:
        outs = eqn.primitive.bind(*ins, **eqn.primitive.get_bind_params(eqn.params))
    return outs if eqn.primitive.multiple_results else [outs]


class Evaluator:
    """Evaluates a jaxpr with the matmuls at ``sites`` (position -> `Site`) as policy ops."""

    def __init__(self, policy: Policy, sites: Mapping[tuple, Site]):
        self.policy, self.sites = policy, sites
        # Positions of the equations (calls, scans) that hold a captured matmul.
        self._holders = {pos[:k] for pos in sites for k in range(1, len(pos))}

    def run(self, jaxpr, consts, args, pos: tuple, metas: dict) -> list:
        """The outputs of ``jaxpr`` at position ``pos`` on ``args``; ``metas`` (by path) is
        updated with the metas the fp8 matmuls return."""
        env: dict = {}

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for var, value in zip(jaxpr.constvars, consts):
            env[var] = value
        for var, value in zip(jaxpr.invars, args):
            env[var] = value
        for i, eqn in enumerate(jaxpr.eqns):
            with _scope(eqn):
                outs = self._eqn(eqn, (*pos, i), [read(v) for v in eqn.invars], metas)
            for var, value in zip(eqn.outvars, outs):
                if not isinstance(var, jcore.DropVar):
                    env[var] = value
        return [read(v) for v in jaxpr.outvars]

    def _eqn(self, eqn, here: tuple, ins: list, metas: dict) -> list:
        name = eqn.primitive.name
        if name == "dot_general" and here in self.sites:
            return [self._dot(eqn, ins, self.sites[here], metas)]
        if here not in self._holders:
            return _bind(eqn, ins)  # nothing captured in it: as traced
        if name in CALLS:
            sub, sub_consts = called_jaxpr(eqn)
            return self.run(sub, sub_consts, ins, here, metas)
        if name in REMAT:
            sub, sub_consts = called_jaxpr(eqn)
            fun = jax.checkpoint(lambda *a: self.run(sub, sub_consts, a, here, metas),
                                 prevent_cse=eqn.params["prevent_cse"], policy=eqn.params["policy"])
            return fun(*ins)
        if name == "scan":
            return self._scan(eqn, ins, here, metas)
        return _bind(eqn, ins)

    def _dot(self, eqn, ins, site: Site, metas: dict):
        op = self.policy.for_op(site.path, site.kind)
        out, meta = ops.dot_general(ins[0], ins[1], eqn.params["dimension_numbers"], op, metas.get(site.path))
        if meta is not None:
            metas[site.path] = meta  # threaded to the next call of the same op
        return out.astype(eqn.outvars[0].aval.dtype)

    def _scan(self, eqn, ins, here, metas):
        p = eqn.params
        body, body_consts = called_jaxpr(eqn)
        nc, nk = p["num_consts"], p["num_carry"]
        inner = {s.path for pos, s in self.sites.items() if pos[: len(here)] == here}
        stacked = {k: v for k, v in metas.items() if k in inner}

        def step(carry, x):
            xs, per_layer = x
            outs = self.run(body, body_consts, [*ins[:nc], *carry, *xs], here, dict(per_layer))
            return outs[:nk], outs[nk:]

        carry, ys = lax.scan(step, ins[nc: nc + nk], (ins[nc + nk:], stacked), length=p["length"],
                             reverse=p["reverse"], unroll=p["unroll"])
        return [*carry, *ys]
