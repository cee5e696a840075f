"""Data parallelism and FSDP from JAX itself: a device mesh and named shardings.

Axes ``data`` and ``fsdp``. The batch is split over both; a parameter (and its
optimizer moments) is split over ``fsdp`` along its largest dimension that divides
evenly, everything else (FP8 meta, loss scale, step, small tensors) is replicated. The
jitted step then runs SPMD: XLA inserts the gradient reductions and all-gathers, and
FP8 amaxes of sharded tensors are global maxima.

Several hosts (processes): `initialize_distributed` first, before any other JAX call;
then the mesh spans every process's devices (`make_mesh`), each process loads only its
own part of the batch (`process_shard`, `local_batch_size`) and `global_batch` assembles
the global array from the local ones. With one process all of this reduces to the
single-host behaviour.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping

import jax
import numpy as np
from flax import linen
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mpx.optim import BlockExpanded, BlockQuantized
from train.schema import ConfigError, MeshConfig

AXES = ("data", "fsdp")
_BLOCKS = (BlockQuantized, BlockExpanded)

# ----------------------------------------------------------------------------- processes

#: Explicit launch: the same command on every host with these set (process 0 runs the
#: coordinator service at JAX_COORDINATOR_ADDRESS, ``host:port``, reachable from all).
COORDINATOR, NUM_PROCESSES, PROCESS_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise _config_error(f"environment variable {name}={raw!r} is not an integer") from None


def _config_error(message: str) -> ConfigError:
    return ConfigError(f"mesh.distributed: {message}")


def _count(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ.get(name, "").split("(")[0])  # SLURM may write "2(x3)"
    except ValueError:
        return 0


def _cluster(environ: Mapping[str, str]) -> str | None:
    """The multi-process launcher JAX's own auto-detection reads (SLURM step, Open MPI,
    Cloud TPU pod), if this process was started by one with more than one process; else None."""
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in environ for v in slurm) and _count(environ, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS"
                                                  in environ else "SLURM_NTASKS") > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in environ and _count(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "Cloud TPU"
    return None


def distributed_args(distributed: bool | None, environ: Mapping[str, str] = os.environ) -> dict | None:
    """The keyword arguments for `jax.distributed.initialize`, or None when this process
    should run alone. Pure: reads ``environ`` only, starts nothing.

    ``distributed`` is the config's ``mesh.distributed``: False never initializes; True
    always does (JAX fills in what the environment does not give, or fails); None (auto)
    initializes when the environment describes more than one process: ``JAX_NUM_PROCESSES``
    > 1 (with ``JAX_COORDINATOR_ADDRESS`` and ``JAX_PROCESS_ID``), or a SLURM step, Open
    MPI job or Cloud TPU pod with several processes (JAX detects those itself).
    """
    if distributed is False:
        return None
    coordinator = environ.get(COORDINATOR) or None
    num, pid = _env_int(environ, NUM_PROCESSES), _env_int(environ, PROCESS_ID)
    if num is not None and num < 1:
        raise _config_error(f"{NUM_PROCESSES} must be >= 1, got {num}")
    if pid is not None and (pid < 0 or (num is not None and pid >= num)):
        raise _config_error(f"{PROCESS_ID} must be in [0, {NUM_PROCESSES}) = [0, {num}), got {pid}"
                            if num is not None else f"{PROCESS_ID} must be >= 0, got {pid}")
    args = {k: v for k, v in (("coordinator_address", coordinator), ("num_processes", num), ("process_id", pid))
            if v is not None}
    if distributed is True:
        return args
    cluster = _cluster(environ)
    if num == 1 or (cluster is None and not args):
        return None  # one process: the normal single-host run
    if cluster is None:
        missing = [n for n, v in ((COORDINATOR, coordinator), (NUM_PROCESSES, num), (PROCESS_ID, pid)) if v is None]
        if missing:
            given = ", ".join(n for n in (COORDINATOR, NUM_PROCESSES, PROCESS_ID) if n not in missing)
            raise _config_error(
                f"{given} {'is' if ', ' not in given else 'are'} set but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not; a multi-process run needs all three on every host "
                f"(or run under SLURM, Open MPI or a Cloud TPU pod); mesh.distributed=false runs alone")
    return args


def initialize_distributed(distributed: bool | None = None, environ: Mapping[str, str] = os.environ) -> bool:
    """Start the JAX distributed system if the run spans several processes (see
    `distributed_args`); call it before any other JAX call. Returns whether the
    distributed system is running (started now, or already by an earlier call); False,
    and nothing touched, for a normal single-process run."""
    if jax.distributed.is_initialized():
        return True
    args = distributed_args(distributed, environ)
    if args is None:
        return False
    try:
        jax.distributed.initialize(**args)
    except (ValueError, TypeError) as e:  # JAX found no coordinator / process count / id
        raise _config_error(
            f"cannot start the JAX distributed system ({e}); on every host set {COORDINATOR}=host:port "
            f"(process 0's address), {NUM_PROCESSES} and {PROCESS_ID}, or launch with SLURM, Open MPI or on a "
            "Cloud TPU pod; mesh.distributed=false runs a single process") from e
    return True


def process_shard() -> tuple[int, int]:
    """``(jax.process_index(), jax.process_count())``: this process's shard of the data,
    for the loaders' ``shard_index`` / ``shard_count``."""
    return jax.process_index(), jax.process_count()


def all_process_states(state: dict) -> dict:
    """Every process's data position, for a checkpoint: ``{"processes": [state_0, ...]}``
    on every process (process k's ``state`` at index k). The loaders of several processes
    read different shards, so each needs its own position back on resume. Collective: all
    processes call it at the same step."""
    if jax.process_count() == 1:
        return {"processes": [state]}
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.int32(encoded.size))
    padded = np.zeros(int(np.max(lengths)), np.uint8)
    padded[: encoded.size] = encoded
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return {"processes": [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, np.asarray(lengths))]}


def all_processes_have(flag: bool) -> bool:
    """Whether ``flag`` holds on every process (``flag`` itself with one process).
    Collective: every process calls it, e.g. to stop a loop over shards of unequal length
    together."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def this_process_state(saved: dict) -> dict:
    """This process's data position from what `all_process_states` saved; a checkpoint
    written by a different number of processes is an error (their shards differ)."""
    states = saved["processes"]
    if len(states) != jax.process_count():
        raise ConfigError(
            f"the checkpoint's data position was written by {len(states)} process(es) and this run has "
            f"{jax.process_count()}: each process reads its own shard, so the positions do not carry over; "
            "resume with the same number of processes, or start a new run (a new name) from its params "
            "with finetune.init_from")
    return states[jax.process_index()]


def local_batch_size(batch_size: int, process_count: int) -> int:
    """The rows each process loads: ``data.batch_size`` is the global batch (the same
    config means the same training on one host or several), split evenly over processes."""
    if batch_size % process_count:
        raise ConfigError(f"data.batch_size ({batch_size}) must be divisible by the {process_count} processes "
                          f"of the run: each loads data.batch_size / {process_count} rows")
    return batch_size // process_count


def global_batch(local_batch, sharding: NamedSharding):
    """This process's batch (a pytree of host arrays) as global `jax.Array`s laid out by
    ``sharding``: `jax.device_put` with one process; with several, each process passes its
    own rows and `jax.make_array_from_process_local_data` stitches them together (the
    global batch dimension is ``process_count`` times the local one)."""
    if jax.process_count() == 1:
        return jax.device_put(local_batch, sharding)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


# ----------------------------------------------------------------------------- mesh and shardings


def make_mesh(mesh: MeshConfig, *, batch_size: int) -> Mesh:
    """The run's mesh: ``mesh.data`` x ``mesh.fsdp`` over every device (-1 resolved,
    `MeshConfig.shape`), ``batch_size`` (``data.batch_size``) checked against it."""
    return device_mesh(*mesh.shape(jax.device_count(), batch_size=batch_size))


def device_mesh(data: int, fsdp: int) -> Mesh:
    """A ``(data, fsdp)`` mesh over the global devices (every process's), ordered by
    process (then JAX's order, which is all of it with one process): fsdp groups sit inside a
    host as far as they fit, and each process's devices hold a contiguous block of the
    batch. Several processes: the mesh must take every device (each process owns part of it)."""
    devices = sorted(jax.devices(), key=lambda d: d.process_index)  # stable: one process keeps jax.devices()
    if jax.process_count() > 1 and data * fsdp != len(devices):
        raise ConfigError(f"mesh: mesh.data ({data}) x mesh.fsdp ({fsdp}) = {data * fsdp} devices, but a "
                         f"{jax.process_count()}-process run must use all {len(devices)}; use -1 on one axis")
    return Mesh(np.asarray(devices[: data * fsdp]).reshape(data, fsdp), AXES)


def _param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    if fsdp > 1 and shape:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
                spec = [None] * len(shape)
                spec[dim] = "fsdp"
                return P(*spec)
    return P()


def _block_spec(x, codes_shape: tuple[int, ...], fsdp: int) -> P:
    """The spec of one array of a moment stored in blocks (`mpx.optim.BlockQuantized`,
    `BlockExpanded`): the codes split as the param they stand for (they have its shape),
    the per-block arrays on the same dimension, or replicated where the codes' last
    dimension is split and the block count does not divide. The update then finds every
    block's scale on the devices that hold its codes."""
    spec = _param_spec(codes_shape, fsdp)
    if tuple(x.shape) == codes_shape:
        return spec
    dims = tuple(spec) + (None,) * (len(codes_shape) - len(spec))
    if dims and dims[-1] is not None and x.shape[-1] % fsdp:
        return P()
    return spec


def split_shardings(tree, mesh: Mesh):
    """Shardings that split each array of ``tree`` (params, optimizer moments) over ``fsdp``
    along its largest dimension that divides evenly; the rest replicated. A moment stored
    in 8-bit blocks is split as its param (`_block_spec`)."""
    fsdp = mesh.shape["fsdp"]

    def one(x):
        if isinstance(x, _BLOCKS):
            shape = tuple(x.codes.shape)
            return jax.tree.map(lambda a: NamedSharding(mesh, _block_spec(a, shape, fsdp)), x)
        return NamedSharding(mesh, _param_spec(tuple(x.shape), fsdp))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, _BLOCKS))


def replicated_shardings(tree, mesh: Mesh):
    """``tree``'s arrays replicated on every device (FP8 meta, loss scale)."""
    return jax.tree.map(lambda _: replicated(mesh), tree)


def state_shardings(state, mesh: Mesh):
    """Shardings for a `mpx.TrainState`: params and optimizer state split over ``fsdp``."""
    return state.replace(
        step=replicated(mesh),
        params=split_shardings(state.params, mesh),
        opt_state=split_shardings(state.opt_state, mesh),
        fp8_meta=replicated_shardings(state.fp8_meta, mesh),
        loss_scale=replicated_shardings(state.loss_scale, mesh),
        rng=replicated(mesh),
    )


@contextlib.contextmanager
def activation_sharding(mesh: Mesh) -> Iterator[None]:
    """While a step is traced: the model's activations split by batch over ``data`` x ``fsdp``
    (the logical ``batch`` axis of `mpx.nn`'s marks; every other logical axis unsharded), so
    each weight is gathered for its matmul and no activation takes a weight's layout. Usable
    inside `jax.jit` (an abstract mesh, not a device context)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), linen.logical_axis_rules([("batch", AXES)]):
        yield


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, *, accumulated: bool) -> NamedSharding:
    """The batch axis (axis 1 under gradient accumulation) split over every device."""
    return NamedSharding(mesh, P(None, AXES) if accumulated else P(AXES))
