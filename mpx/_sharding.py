"""Sharding constraints that are nothing unless a mesh and flax logical axis rules are active.

`mark` constrains an array to the mesh axes the active `flax.linen.logical_axis_rules` give
its dimensions' logical names (a name the rules leave out, or None: unsplit). With no rules it
returns the array itself, so library code can mark what it knows about a layout and cost
nothing to a program that does not shard (see `mpx.nn._sharding` for the decoder's names).
"""

from __future__ import annotations

import jax
from flax import linen


def mark(x, names: tuple[str, ...]):
    """``x`` constrained to the mesh axes the active logical rules give ``names`` (one per
    dimension); ``x`` itself when no rules are active, and under a mesh of explicit axes (there
    an array's sharding is part of its type, and jax refuses a constraint that would change it)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
        return x
    return linen.with_logical_constraint(x, names)
