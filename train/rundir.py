"""The run directory: what lives in it, and the small reads and writes of each file.

    <run_dir>/
      .lock            the live run that holds the directory (pid, host, start time)
      config.yaml      the config the run was created with (or last --change-optim'ed to)
      history.jsonl    each --change-optim: the keys changed and the step they took effect at;
                       an imported run's first line: the weights file (and sha256) it came from
      data.json        the data the run trains on, by content (`train.identity.data_fingerprint`)
      tokenizer/       the tokenizer the run encodes with, kept once the run has started
      metrics.jsonl    one row per log and eval step (`train.logger` writes and reads it)
      tensorboard/     the same rows for TensorBoard
      checkpoints/     orbax checkpoints, one per saved step (`train.checkpoint`)
      diverged/ damaged/  checkpoints set aside by a divergence or a failed restore
      model_step<N>.safetensors  ``export --format safetensors`` without ``--out``

Every name of that layout, and every read or write of the files the run keeps about itself,
is here, so a change to the layout is a change to one module. Writes are atomic (a temporary
file renamed over the old one): a crash leaves the old file or none, never half of one.
What the files *mean* (which config changes a resume allows, when the data has changed) is
`train.identity`'s. Only the standard library and PyYAML: the CLI refuses a held directory
(`refuse_if_held`) before jax, flax, orbax or TFDS are imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.jsonl"
DATA_FILE = "data.json"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"

Path = str | pathlib.Path


# ----------------------------------------------------------------------------- paths


def metrics_file(run_dir: Path) -> pathlib.Path:
    return pathlib.Path(run_dir) / METRICS_FILE


def tensorboard_dir(run_dir: Path) -> pathlib.Path:
    return pathlib.Path(run_dir) / TENSORBOARD_DIR


def checkpoint_dir(run_dir: Path) -> pathlib.Path:
    """Absolute: orbax and TensorStore take absolute paths only."""
    return pathlib.Path(run_dir).absolute() / CHECKPOINTS_DIR


def has_checkpoints(run_dir: Path) -> bool:
    """Whether the run has saved any step (readable or not)."""
    directory = checkpoint_dir(run_dir)
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


# ----------------------------------------------------------------------------- the run's records


def _write_atomically(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def saved_config(run_dir: Path) -> dict | None:
    """The config a run was created with, or None for a run directory without one."""
    import yaml

    path = pathlib.Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def record_config(run_dir: Path, config: Mapping[str, Any]) -> None:
    """Write the run's config (plain data, `RunConfig.to_dict`)."""
    import yaml

    _write_atomically(pathlib.Path(run_dir) / CONFIG_FILE, yaml.safe_dump(dict(config), sort_keys=False))


def append_history(run_dir: Path, entry: Mapping[str, Any]) -> None:
    """One line of ``history.jsonl`` (a change of the run's config, and when; an import)."""
    with open(pathlib.Path(run_dir) / HISTORY_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(dict(entry)) + "\n")


def saved_data(run_dir: Path) -> dict | None:
    """The run's recorded data (`record_data`), or None for a run from before data.json."""
    path = pathlib.Path(run_dir) / DATA_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def record_data(run_dir: Path, fingerprint: Mapping[str, Any], *, since_step: int = 0) -> None:
    """Write the run's data fingerprint. ``since_step``: the step the run started on this
    data; checkpoints up to it hold a position in other data."""
    _write_atomically(pathlib.Path(run_dir) / DATA_FILE,
                      json.dumps({"since_step": since_step, **fingerprint}, indent=2) + "\n")


def run_tokenizer(run_dir: Path):
    """The tokenizer a run was created with, or None before it has one."""
    from train.data.tokenizers import load_tokenizer

    directory = pathlib.Path(run_dir) / TOKENIZER_DIR
    return load_tokenizer(directory) if directory.is_dir() else None


def keep_tokenizer(run_dir: Path, tokenizer) -> None:
    """Save ``tokenizer`` as the run's own, once (a run's tokenizer never changes)."""
    directory = pathlib.Path(run_dir) / TOKENIZER_DIR
    if directory.is_dir():
        return
    tmp = pathlib.Path(run_dir) / (TOKENIZER_DIR + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer.save(tmp)
    tmp.replace(directory)


def copy_record(run_dir: Path, out: pathlib.Path) -> None:
    """The run's ``config.yaml`` and ``tokenizer/`` into ``out`` (an export carries them)."""
    run = pathlib.Path(run_dir)
    if (run / CONFIG_FILE).is_file():
        shutil.copy2(run / CONFIG_FILE, out / CONFIG_FILE)
    if (run / TOKENIZER_DIR).is_dir():
        shutil.copytree(run / TOKENIZER_DIR, out / TOKENIZER_DIR)


# ----------------------------------------------------------------------------- the lock


class RunDirectoryInUse(ValueError):
    """The run directory cannot be used: another live run holds it, or it is not writable."""


@contextlib.contextmanager
def locked(run_dir: Path, *, say: Callable[[str], None]) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` (pid, host, start time) while a run trains in the directory.

    A lock left by a process that no longer exists on this host is stale: it is taken over,
    and said so. A live owner (or one on another host, whose liveness cannot be checked
    from here) is an error naming it and the file to delete if it is gone. A directory this
    lock created and the run left empty (it failed before writing anything) is removed.
    """
    directory = pathlib.Path(run_dir)
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise RunDirectoryInUse(
            f"cannot write to run directory {directory} ({e.strerror or e}): a run keeps its checkpoints, config "
            "and metrics there; make it writable or choose another run_dir") from None
    path = directory / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _read_lock(path)
            if owner is not None and not _stale(owner):
                raise RunDirectoryInUse(_in_use(directory, owner)) from None
            say(f"taking over the stale lock of {directory} (pid {owner and owner.get('pid')} is gone)")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        if _read_lock(path) == me:
            path.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only if empty: a run that never wrote a file leaves no directory


def refuse_if_held(run_dir: Path) -> None:
    """`RunDirectoryInUse` if a live run holds ``run_dir``'s lock; takes nothing (`locked`
    takes the lock, and checks again, once the run is loaded)."""
    directory = pathlib.Path(run_dir)
    owner = _read_lock(directory / LOCK_FILE)
    if owner is not None and not _stale(owner):
        raise RunDirectoryInUse(_in_use(directory, owner))


def run_dir_of(config_path: Path, overrides: Sequence[str]) -> str | None:
    """The run directory a config file and its overrides name, read without validating
    anything (``name`` and ``run_dir`` are never inherited from a base, so the file itself
    holds them); None where that cannot be read: the full load will say why."""
    import yaml

    try:
        d = yaml.safe_load(pathlib.Path(config_path).read_text(encoding="utf-8"))
        values = {"name": pathlib.Path(config_path).stem, **{k: d[k] for k in ("name", "run_dir") if k in d}}
        for item in overrides:
            key, _, raw = item.partition("=")
            if key.strip() in ("name", "run_dir"):
                values[key.strip()] = yaml.safe_load(raw)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, TypeError, AttributeError):
        return None
    run_dir = values.get("run_dir") or f"runs/{values['name']}"
    return run_dir if isinstance(run_dir, str) else None


def _in_use(directory: pathlib.Path, owner: dict) -> str:
    return (f"run directory {directory} is in use by pid {owner.get('pid')} on {owner.get('host')} "
            f"(since {owner.get('started')}): two runs in one directory would mix their checkpoints "
            f"and metrics; wait for it, use another name, or delete {directory / LOCK_FILE} if that run is gone")


def _read_lock(path: pathlib.Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # gone, or half written by a crash: stale


def _stale(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except (ProcessLookupError, KeyError, ValueError, TypeError):
        return True
    except PermissionError:
        return False  # alive, another user's
    return False
