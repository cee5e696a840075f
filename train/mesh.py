"""Data parallelism and FSDP from JAX itself: a device mesh and named shardings.

Axes ``data`` and ``fsdp``. The batch is split over both; a parameter (and its
optimizer moments) is split over ``fsdp`` along its largest dimension that divides
evenly, everything else (FP8 meta, loss scale, step, small tensors) is replicated. The
jitted step then runs SPMD: XLA inserts the gradient reductions and all-gathers, and
FP8 amaxes of sharded tensors are global maxima.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")


def make_mesh(data: int, fsdp: int) -> Mesh:
    devices = np.asarray(jax.devices()[: data * fsdp]).reshape(data, fsdp)
    return Mesh(devices, AXES)


def _param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    if fsdp > 1 and shape:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
                spec = [None] * len(shape)
                spec[dim] = "fsdp"
                return P(*spec)
    return P()


def state_shardings(state, mesh: Mesh):
    """Shardings for a `mpx.TrainState`: params and optimizer state split over ``fsdp``."""
    fsdp = mesh.shape["fsdp"]
    replicated = NamedSharding(mesh, P())

    def for_tree(tree, split: bool):
        return jax.tree.map(
            lambda x: NamedSharding(mesh, _param_spec(tuple(x.shape), fsdp)) if split else replicated, tree
        )

    return state.replace(
        step=replicated,
        params=for_tree(state.params, True),
        opt_state=for_tree(state.opt_state, True),
        fp8_meta=for_tree(state.fp8_meta, False),
        loss_scale=for_tree(state.loss_scale, False),
        rng=replicated,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, *, accumulated: bool) -> NamedSharding:
    """The batch axis (axis 1 under gradient accumulation) split over every device."""
    return NamedSharding(mesh, P(None, AXES) if accumulated else P(AXES))
