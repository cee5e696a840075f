"""The run directory's lock, and the check a command makes before it loads anything heavy.

Only the standard library and PyYAML here: ``python -m train train`` refuses a directory
another live run holds before jax, flax, orbax or TFDS are imported (`refuse_if_held`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import socket
import time
from collections.abc import Callable, Iterator, Sequence

LOCK_FILE = ".lock"


class RunDirectoryInUse(ValueError):
    """The run directory cannot be used: another live run holds it, or it is not writable."""


@contextlib.contextmanager
def locked(run_dir: str | pathlib.Path, *, say: Callable[[str], None]) -> Iterator[None]:
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


def refuse_if_held(run_dir: str | pathlib.Path) -> None:
    """`RunDirectoryInUse` if a live run holds ``run_dir``'s lock; takes nothing (`locked`
    takes the lock, and checks again, once the run is loaded)."""
    directory = pathlib.Path(run_dir)
    owner = _read_lock(directory / LOCK_FILE)
    if owner is not None and not _stale(owner):
        raise RunDirectoryInUse(_in_use(directory, owner))


def run_dir_of(config_path: str | pathlib.Path, overrides: Sequence[str]) -> str | None:
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
