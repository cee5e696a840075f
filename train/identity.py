"""A run's identity and its directory: the config it was created with, and a lock.

``<run_dir>/config.yaml`` is written when a run starts from scratch. Resuming compares the
current config with it: keys that only say how long to run, how often to log or save
and on which devices (`HARMLESS`) may change (each change is reported); any other
difference changes what the saved state is or means (a model shape, the precision, the
data, the optimizer) and is an error that lists the keys, before anything is restored,
so a run is never silently restarted in its own directory.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import yaml

from train.lock import LOCK_FILE, RunDirectoryInUse, locked  # noqa: F401 - the run directory's lock
from train.schema import ConfigError

CONFIG_FILE = "config.yaml"

HARMLESS = (
    "name", "run_dir", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.max_consecutive_skips", "train.max_loss_ratio",
    "checkpoint.every", "checkpoint.keep", "checkpoint.async_save", "logging.tensorboard", "logging.progress",
    "mesh.data", "mesh.fsdp", "mesh.distributed",
)
"""Dotted config keys a resumed run may change."""


class ConfigMismatch(ConfigError):
    """A run resumed with a config whose state-changing keys differ from its own."""


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"d_model": 64}}`` -> ``{"model.d_model": 64}`` (a policy mapping stays whole)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and dotted != "precision":
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved, current)`` for every dotted key whose value differs."""
    a, b = flatten(saved), flatten(current)
    missing = object()
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)}


def saved_config(run_dir: str | pathlib.Path) -> dict | None:
    """The config a run was created with, or None for a run directory without one."""
    path = pathlib.Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def record(run_dir: str | pathlib.Path, config: Mapping[str, Any]) -> None:
    """Write the run's config (atomically: a crash leaves the old file or none)."""
    directory = pathlib.Path(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(yaml.safe_dump(dict(config), sort_keys=False), encoding="utf-8")
    tmp.replace(directory / CONFIG_FILE)


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], *, run_dir: str,
                 say: Callable[[str], None]) -> None:
    """Raise `ConfigMismatch` when ``current`` differs from ``saved`` beyond `HARMLESS`
    keys; report the harmless changes through ``say``."""
    diff = differences(saved, current)
    harmful = {k: v for k, v in diff.items() if k not in HARMLESS}
    if harmful:
        lines = "\n".join(f"  {k}: {a!r} (the run) -> {b!r} (now)" for k, (a, b) in harmful.items())
        raise ConfigMismatch(
            f"run {run_dir} was created with a different config; these keys change what its checkpoints hold "
            f"or mean:\n{lines}\nto keep training this run, use its config ({pathlib.Path(run_dir) / CONFIG_FILE}); "
            f"for a new run give it a new name (name=...) or run_dir; only "
            f"{', '.join(HARMLESS[2:])} may change on resume")
    for key, (a, b) in diff.items():
        say(f"resuming with {key} = {b!r} (the run had {a!r})")


TOKENIZER_DIR = "tokenizer"

EVALUATION_KEYS = ("name", "run_dir", "data.files", "data.data_dir", "data.path", "data.text_column",
                   "data.label_column", "data.validation_fraction", "data.batch_size", "train.eval_batches",
                   "mesh.data", "mesh.fsdp", "mesh.distributed", "logging.tensorboard", "logging.progress")
"""Keys an evaluation takes from its own command: which data, how much of it, which devices."""


def run_tokenizer(run_dir: str | pathlib.Path):
    """The tokenizer a run was created with, or None before it has one."""
    from train.data.tokenizers import load_tokenizer

    directory = pathlib.Path(run_dir) / TOKENIZER_DIR
    return load_tokenizer(directory) if directory.is_dir() else None


def keep_tokenizer(run_dir: str | pathlib.Path, tokenizer) -> None:
    """Save ``tokenizer`` as the run's own, once (a run's tokenizer never changes)."""
    directory = pathlib.Path(run_dir) / TOKENIZER_DIR
    if directory.is_dir():
        return
    tmp = pathlib.Path(run_dir) / (TOKENIZER_DIR + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer.save(tmp)
    tmp.replace(directory)


def for_evaluation(run_config: Mapping[str, Any], command, *, say: Callable[[str], None]):
    """The config to evaluate a run with: the run's own, with `EVALUATION_KEYS` from the
    command's config ``command``; every other key where the two differ (beyond `HARMLESS`
    ones) is reported."""
    from train.schema import config_from_dict

    theirs, mine = flatten(run_config), flatten(command.to_dict())
    merged = {**theirs, **{k: v for k, v in mine.items() if k in EVALUATION_KEYS}}
    ignored = sorted(k for k in set(theirs) | set(mine)
                     if k not in EVALUATION_KEYS and k not in HARMLESS and theirs.get(k) != mine.get(k))
    if ignored:
        say(f"using the run's own {', '.join(ignored)} (from {pathlib.Path(command.run_dir) / CONFIG_FILE})")
    nested: dict[str, Any] = {}
    for key, value in merged.items():
        *parents, last = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config_from_dict(nested)


def copy_identity(run_dir: str | pathlib.Path, out: pathlib.Path) -> None:
    """The run's ``config.yaml`` and ``tokenizer/`` into ``out`` (an export carries them)."""
    import shutil

    run = pathlib.Path(run_dir)
    if (run / CONFIG_FILE).is_file():
        shutil.copy2(run / CONFIG_FILE, out / CONFIG_FILE)
    if (run / TOKENIZER_DIR).is_dir():
        shutil.copytree(run / TOKENIZER_DIR, out / TOKENIZER_DIR)
