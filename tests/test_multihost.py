"""Multi-host readiness: loaders shard the records by process, `initialize_distributed`
starts JAX's distributed system only when the run spans several processes, and
`global_batch` builds global arrays from per-process batches (checked for real with two
CPU processes on this machine)."""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest

from train import data
from train import mesh as mesh_lib
from train.config import load_config
from train.schema import ConfigError
from helpers import assert_same_batches, paragraph, take, texts

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> data.Prepared:
    """An odd number of training documents, each starting with a unique marker ``¶NNN``."""
    corpus = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    corpus.write_text("\n".join(paragraph(i) for i in range(63)), encoding="utf-8")
    p = data.prepare_lm(tmp_path_factory.mktemp("lm"), [corpus], validation_fraction=0.2, seed=0)
    assert len(p.train) % 2 == 1  # so that the dropped remainder is exercised
    return p


@pytest.fixture(scope="module")
def cls(tmp_path_factory) -> data.Prepared:
    path = tmp_path_factory.mktemp("cls") / "reviews.jsonl"
    rows = [{"review": f"review {i} " + "good " * (i % 7), "stars": ["low", "mid", "high"][i % 3]} for i in range(91)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data.prepare_classification(tmp_path_factory.mktemp("cls_data"), path, text_column="review",
                                       label_column="stars")


def markers(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"¶(\d{3})", text)]


def lm_tokens(source, tokenizer, shard, **kw) -> np.ndarray:
    """Every token a process reads in one epoch (rows of 2 tokens: at most 1 dropped)."""
    it = data.lm_loader(source, tokenizer, seq_len=1, batch_size=1, seed=3, num_epochs=1,
                        shard_index=shard[0], shard_count=shard[1], **kw)
    return np.concatenate([b["tokens"].reshape(-1) for b in it])


def lm_text(source, tokenizer, shard, **kw) -> str:
    return tokenizer.decode(lm_tokens(source, tokenizer, shard, **kw).tolist())


# ----------------------------------------------------------------------------- loaders


def test_lm_shards_read_disjoint_documents_that_cover_the_source(lm):
    tok, n = lm.tokenizer, len(lm.train)
    docs = texts(lm.train)
    ids = [markers(d)[0] for d in docs]
    # in order: shard k's stream is exactly documents k, k + 2, ... of the first n - n % 2
    for k in (0, 1):
        got = lm_tokens(lm.train, tok, (k, 2), shuffle=False)
        want = np.concatenate([tok.encode(d) for d in docs[k: n - n % 2: 2]])
        assert len(want) - 1 <= len(got) <= len(want)
        np.testing.assert_array_equal(got, want[: len(got)])
    # shuffled: each shard reads its own half once, the halves are disjoint and cover the source
    a, b = (markers(lm_text(lm.train, tok, (k, 2), shuffle=True)) for k in (0, 1))
    assert len(a) == len(set(a)) == len(b) == len(set(b)) == n // 2
    assert not set(a) & set(b)
    assert set(a) | set(b) == set(ids[: n - n % 2])
    assert sorted(a) != a  # shuffled, not in source order
    one = markers(lm_text(lm.train, tok, (0, 1), shuffle=True))
    assert sorted(one) == sorted(ids)  # one process reads everything


def test_classification_shards_read_disjoint_examples_that_cover_the_source(cls):
    n = len(cls.train)
    tok = cls.tokenizer
    by_tokens = {}
    for i in range(n):
        ids = tuple(tok.encode(cls.train[i]["text"].decode())[:32])
        by_tokens[ids + (0,) * (32 - len(ids))] = (i, int(cls.train[i]["label"]))

    def read(shard, shuffle):
        it = data.classification_loader(cls.train, tok, seq_len=32, batch_size=5, seed=1, shuffle=shuffle, num_epochs=1,
                                        shard_index=shard[0], shard_count=shard[1])
        rows = []
        for b in it:
            for tokens, label in zip(b["tokens"], b["label"]):
                index, want = by_tokens[tuple(tokens.tolist())]
                assert int(label) == want  # the label travels with its text
                rows.append(index)
        return rows

    assert len(by_tokens) == n  # every example is identifiable by its tokens
    for shuffle in (False, True):
        a, b = read((0, 3), shuffle), read((1, 3), shuffle)
        c = read((2, 3), shuffle)
        per = n // 3 // 5 * 5  # whole batches of each process's n // 3 examples
        assert len(a) == len(b) == len(c) == per
        assert not (set(a) & set(b) or set(a) & set(c) or set(b) & set(c))
        assert set(a) <= set(range(0, n, 3)) and set(b) <= set(range(1, n, 3)) and set(c) <= set(range(2, n, 3))
        if not shuffle:
            assert a == list(range(0, 3 * per, 3)) and b == list(range(1, 3 * per + 1, 3))
    whole = read((0, 1), True)
    assert len(whole) == n // 5 * 5 and len(set(whole)) == len(whole)


def test_unsharded_loaders_are_unchanged(lm, cls):
    """The defaults, an explicit (0, 1) and the pre-sharding pipeline give the same batches."""
    tok = cls.tokenizer
    kw = dict(seq_len=16, batch_size=4, seed=7)
    for loader, source in ((data.lm_loader, lm.train), (data.classification_loader, cls.train)):
        default = take(loader(source, tok, **kw), 25)  # crosses an epoch boundary
        assert_same_batches(take(loader(source, tok, shard_index=0, shard_count=1, **kw), 25), default)
    # the classification pipeline as it was built before sharding existed, straight from grain
    def encode(ex):
        ids = tok.encode(ex["text"].decode())[:16]
        tokens = np.zeros(16, np.int32)
        tokens[: len(ids)] = ids
        return {"tokens": tokens, "mask": np.arange(16) < len(ids), "label": np.int32(ex["label"])}

    before = grain.MapDataset.source(cls.train).shuffle(seed=7).repeat(None).map(encode)
    before = iter(before.batch(4, drop_remainder=True).to_iter_dataset())
    assert_same_batches(take(data.classification_loader(cls.train, tok, **kw), 30), take(before, 30))
    # the LM stream: the documents in grain's seed-7 order, packed
    order = list(grain.MapDataset.range(len(lm.train)).shuffle(seed=7))
    stream = np.concatenate([lm.tokenizer.encode(lm.train[i]["text"].decode()) for i in order])
    got = np.concatenate([b["tokens"].reshape(-1) for b in take(data.lm_loader(lm.train, lm.tokenizer, **kw), 5)])
    np.testing.assert_array_equal(got, stream[: len(got)])


@pytest.mark.parametrize("steps", [0, 3, 11])  # 11 crosses the shard's first epoch boundary
def test_sharded_iterator_state_restores_exactly(lm, cls, steps):
    for make in (
        lambda: data.lm_loader(lm.train, lm.tokenizer, seq_len=23, batch_size=4, seed=5, shard_index=1, shard_count=2),
        lambda: data.classification_loader(cls.train, cls.tokenizer, seq_len=16, batch_size=4, seed=5,
                                           shard_index=1, shard_count=2),
    ):
        it = make()
        take(it, steps)
        state = json.loads(json.dumps(it.get_state()))
        expected = take(it, 6)
        resumed = make()
        take(resumed, 2)
        resumed.set_state(state)
        assert_same_batches(take(resumed, 6), expected)


def test_shards_are_shuffled_independently():
    source = [{"text": f"{i:03d}\n".encode()} for i in range(40)]  # seq_len 3: a row is a document
    tok = data.ByteTokenizer()

    def order(k):
        it = data.lm_loader(source, tok, seq_len=3, batch_size=4, seed=0, shard_index=k, shard_count=2)
        return [int(tok.decode(r)) // 2 for b in take(it, 5) for r in b["tokens"]]

    assert sorted(order(0)) == sorted(order(1)) == list(range(20))
    assert order(0) != order(1)  # record 2k and 2k + 1 do not travel together


def test_bad_shards_are_clear_errors():
    source = [{"text": b"only one", "label": 0}]
    tok = data.ByteTokenizer()
    with pytest.raises(ValueError, match=r"shard_index must be in \[0, shard_count - 1\]"):
        data.lm_loader(source * 4, tok, seq_len=4, batch_size=1, seed=0, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="Number of shards must be a positive integer"):
        data.classification_loader(source, tok, seq_len=4, batch_size=1, seed=0, shard_count=0)
    with pytest.raises(data.DataError, match="has 1 records, fewer than the 2 processes"):
        data.classification_loader(source, tok, seq_len=4, batch_size=1, seed=0, shard_index=1, shard_count=2)


def test_local_batch_size_splits_the_global_batch():
    assert mesh_lib.local_batch_size(16, 1) == 16 and mesh_lib.local_batch_size(16, 4) == 4
    with pytest.raises(ConfigError, match=r"^data.batch_size \(15\) must be divisible by the 2 processes"):
        mesh_lib.local_batch_size(15, 2)
    assert mesh_lib.process_shard() == (0, 1)


# ----------------------------------------------------------------------------- distributed


def test_initialize_distributed_is_a_no_op_for_a_single_process(monkeypatch):
    def refuse(**kwargs):
        raise AssertionError(f"jax.distributed.initialize called with {kwargs}")

    monkeypatch.setattr(jax.distributed, "initialize", refuse)
    plain = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_", "TPU_"))}
    assert mesh_lib.initialize_distributed(None, plain) is False
    assert mesh_lib.initialize_distributed(None, {}) is False
    assert mesh_lib.initialize_distributed(None, {"JAX_NUM_PROCESSES": "1"}) is False
    everything = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert mesh_lib.initialize_distributed(False, everything) is False  # mesh.distributed=false: never
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


def test_distributed_args_follow_the_environment():
    args = mesh_lib.distributed_args
    explicit = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert args(None, explicit) == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert args(True, explicit) == args(None, explicit)
    assert args(True, {}) == {}  # forced: JAX detects the rest (or fails, see below)
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}
    assert args(None, slurm) == {}  # JAX's own SLURM detection fills everything in
    assert args(None, {**slurm, "SLURM_NTASKS": "1"}) is None  # a single-task step runs alone
    assert args(None, {**slurm, "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert args(None, {k: v for k, v in slurm.items() if k != "SLURM_STEP_NODELIST"}) is None  # sbatch script
    assert args(None, {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}) == {}
    assert args(None, {"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "1"}) is None
    assert args(None, {"TPU_WORKER_HOSTNAMES": "h0,h1"}) == {} and args(None, {"TPU_WORKER_HOSTNAMES": "h0"}) is None
    with pytest.raises(ConfigError, match=r"^mesh.distributed: JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES "
                                          r"and JAX_PROCESS_ID are not"):
        args(None, {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    with pytest.raises(ConfigError, match=r"JAX_NUM_PROCESSES, JAX_PROCESS_ID are set but JAX_COORDINATOR_ADDRESS "
                                          r"is not"):
        args(None, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
    with pytest.raises(ConfigError, match=r"JAX_NUM_PROCESSES='two' is not an integer"):
        args(None, {**explicit, "JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ConfigError, match=r"JAX_PROCESS_ID must be in \[0, JAX_NUM_PROCESSES\) = \[0, 2\), got 2"):
        args(None, {**explicit, "JAX_PROCESS_ID": "2"})


def test_forced_distributed_without_a_coordinator_is_a_clear_error(monkeypatch):
    def jax_fails(**kwargs):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", jax_fails)
    with pytest.raises(ConfigError, match=r"^mesh.distributed: cannot start the JAX distributed system "
                                          r"\(coordinator_address should be defined.\); on every host set "
                                          r"JAX_COORDINATOR_ADDRESS=host:port"):
        mesh_lib.initialize_distributed(True, {})


def test_mesh_distributed_config_key():
    assert load_config(QUICKSTART).mesh.distributed is None
    for value, parsed in (("true", True), ("false", False), ("null", None)):
        config = load_config(QUICKSTART, [f"mesh.distributed={value}"])
        assert config.mesh.distributed is parsed and config.to_dict()["mesh"]["distributed"] is parsed
    with pytest.raises(ConfigError, match=r"^mesh.distributed: expected true or false or null, got 'maybe'$"):
        load_config(QUICKSTART, ["mesh.distributed=maybe"])


def test_global_batch_with_one_process_is_device_put():
    mesh = mesh_lib.device_mesh(jax.device_count(), 1)
    assert mesh.devices.tolist() == [[d] for d in jax.devices()]  # one process: jax.devices() order, as before
    for accumulated, shape in ((False, (8, 5)), (True, (2, 8, 5))):
        sharding = mesh_lib.batch_sharding(mesh, accumulated=accumulated)
        batch = {"tokens": np.arange(np.prod(shape), dtype=np.int32).reshape(shape), "label": np.ones(shape[:-1])}
        got, want = mesh_lib.global_batch(batch, sharding), jax.device_put(batch, sharding)
        for k in batch:
            assert got[k].sharding == want[k].sharding and got[k].shape == want[k].shape
            np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))


# ----------------------------------------------------------------------------- two real processes

WORKER = r"""
import json, sys
import numpy as np
from train import data, mesh as mesh_lib
from train.schema import ConfigError

started = mesh_lib.initialize_distributed(None)  # before any other JAX call
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils

index, count = mesh_lib.process_shard()
out = {"started": started, "shard": [index, count], "devices": jax.device_count(),
       "layout": [[d.process_index for d in row] for row in mesh_lib.device_mesh(2, 2).devices]}
try:
    mesh_lib.device_mesh(1, 2)
except ConfigError as e:
    out["partial_mesh"] = str(e)
mesh = mesh_lib.device_mesh(4, 1)
source = [{"text": f"{i:03d}\n".encode(), "label": i % 3} for i in range(41)]
it = data.classification_loader(source, data.ByteTokenizer(), seq_len=4, batch_size=mesh_lib.local_batch_size(8, count),
                                seed=0, shard_index=index, shard_count=count)
local = [next(it) for _ in range(2)]
batch = mesh_lib.global_batch(local[0], mesh_lib.batch_sharding(mesh, accumulated=False))
stacked = {k: np.stack([b[k] for b in local]) for k in local[0]}
accum = mesh_lib.global_batch(stacked, mesh_lib.batch_sharding(mesh, accumulated=True))
out["local"] = [b["tokens"].tolist() for b in local]
out["shapes"] = [list(batch["tokens"].shape), list(accum["tokens"].shape), list(accum["label"].shape)]
out["global"] = np.asarray(multihost_utils.process_allgather(batch["tokens"], tiled=True)).tolist()
out["global_accum"] = np.asarray(multihost_utils.process_allgather(accum["tokens"], tiled=True)).tolist()
# Each process's data position after its 2 batches, gathered for a checkpoint (through
# JSON, as orbax stores it) and handed back to the process it came from.
# Packed LM windows over documents of different lengths: the positions differ by process.
docs = [{"text": ("x" * (i % 5 + 1) + "\n").encode()} for i in range(41)]
lm = lambda: data.lm_loader(docs, data.ByteTokenizer(), seq_len=3, batch_size=2, seed=0, shard_index=index,
                            shard_count=count)
it = lm()
next(it), next(it)
saved = json.loads(json.dumps(mesh_lib.all_process_states(it.get_state())))
out["own_state"] = mesh_lib.this_process_state(saved) == it.get_state()
out["states_differ"] = saved["processes"][0] != saved["processes"][1]
resumed = lm()
resumed.set_state(mesh_lib.this_process_state(saved))
out["resumed_next"] = next(resumed)["tokens"].tolist() == next(it)["tokens"].tolist()
out["all_have"] = [mesh_lib.all_processes_have(True), mesh_lib.all_processes_have(index == 0)]
weights = jnp.arange(1, 9)[:, None]
out["weighted_sum"] = int(jax.jit(lambda t: jnp.sum(t * weights))(batch["tokens"]))
print("RESULT " + json.dumps(out))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_shard_the_data_and_build_one_global_batch(tmp_path):
    """Two CPU processes with 2 devices each, started like two hosts: the coordinator env
    vars and mesh.distributed auto. Each loads its own 4 rows; the global batch is 8; a
    checkpoint's data position holds both processes' and gives each its own back."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_", "TPU_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(ROOT),
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER], cwd=tmp_path, env={**env, "JAX_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=120)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    a, b = outs
    assert a["started"] and b["started"] and a["shard"] == [0, 2] and b["shard"] == [1, 2]
    assert a["devices"] == 4 and a["layout"] == [[0, 0], [1, 1]]  # data axis across hosts, fsdp inside one
    assert "a 2-process run must use all 4" in a["partial_mesh"]
    assert a["shapes"] == [[8, 4], [2, 8, 4], [2, 8]]
    rows = lambda o, step: [bytes(r).decode() for r in o["local"][step]]
    # disjoint shares: process 0 reads even records, process 1 odd ones
    assert all(int(r) % 2 == 0 for s in (0, 1) for r in rows(a, s)) and all(int(r) % 2 for s in (0, 1) for r in rows(b, s))
    # the global batch is process 0's rows then process 1's, on both processes
    for o in (a, b):
        assert o["global"] == a["local"][0] + b["local"][0]
        assert o["global_accum"] == [a["local"][s] + b["local"][s] for s in (0, 1)]
    # a checkpoint holds both data positions; each process resumes with its own next batch
    assert [(o["own_state"], o["states_differ"], o["resumed_next"]) for o in (a, b)] == [(True, True, True)] * 2
    assert a["all_have"] == b["all_have"] == [True, False]  # eval stops together when one shard runs out
    expected = int(np.sum(np.asarray(a["local"][0] + b["local"][0]) * np.arange(1, 9)[:, None]))
    assert a["weighted_sum"] == b["weighted_sum"] == expected


def test_a_data_position_from_another_process_count_is_a_clear_error():
    """One process resuming a checkpoint written by two: the shards differ, so no position fits."""
    saved = mesh_lib.all_process_states({"next_index": 5})
    assert saved == {"processes": [{"next_index": 5}]} and mesh_lib.this_process_state(saved) == {"next_index": 5}
    with pytest.raises(ConfigError, match=r"written by 2 process\(es\) and this run has 1.*same number of processes"):
        mesh_lib.this_process_state({"processes": [{"next_index": 5}, {"next_index": 6}]})
