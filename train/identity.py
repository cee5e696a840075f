"""A run's identity: when a resume, an evaluation or a change of data is the same run.

The files are `train.rundir`'s; this module holds the rules that compare them.
``<run_dir>/config.yaml`` is written when a run starts from scratch. Resuming compares the
current config with it: keys that only say how long to run, how often to log or save
and on which devices (`HARMLESS`) may change (each change is reported); any other
difference changes what the saved state is or means (a model shape, the precision, the
data, the optimizer) and is an error that lists the keys, before anything is restored,
so a run is never silently restarted in its own directory. The precision is compared as
the policy it parses to, however it is spelled.

The one deliberate change: ``--change-optim`` lets a resume change how updates are made
from the saved optimizer state (`ADJUSTABLE`: the learning rate and its schedule, clipping,
Adam's constants), e.g. to go on from the last good checkpoint of a diverged run with a
lower learning rate. The run's ``config.yaml`` then becomes the new config and
``history.jsonl`` records the change and the step it took effect at.

``<run_dir>/data.json`` is the run's data by content (`data_fingerprint`): a checkpoint's
data position means something only for the data it was saved on, so a resume whose files
changed under the same paths is an error too (`DataChanged`), unless the run is told to
go on with the new data from its start (``--new-data``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from train import rundir
from train.data.corpora import file_sha256
from train.schema import ConfigError, OptimConfig, RunConfig

HARMLESS = (
    "name", "run_dir", "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.max_consecutive_skips", "train.max_loss_ratio",
    "checkpoint.every", "checkpoint.keep", "checkpoint.async_save", "logging.tensorboard", "logging.progress",
    "mesh.data", "mesh.fsdp", "mesh.distributed",
)
"""Dotted config keys a resumed run may change."""

ADJUSTABLE = ("optim.lr", "optim.warmup_steps", "optim.decay_steps", "optim.min_lr_ratio", "optim.grad_clip",
              "optim.weight_decay", "optim.b1", "optim.b2", "optim.eps")
"""Optimizer keys a resume may change with ``--change-optim``: they change how the next
updates are computed, not what the saved optimizer state holds. ``optim.moments``,
``optim.moment_block`` and ``optim.master`` are not among them: they change the saved
state's layout (the moments' and the params' dtypes, the moments' block scales), which a
checkpoint cannot be restored into."""

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


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """`flatten` undone: ``{"model.d_model": 64}`` -> ``{"model": {"d_model": 64}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def with_defaults(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config, flattened, with the keys it lacks at their defaults: a key added to
    the schema after the run was created (``model.layout``) defaults to what runs did
    before it existed, so a run saved without it is the same run."""
    return {**flatten(RunConfig().to_dict()), **flatten(saved)}


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (saved, current)`` for every dotted key whose value differs (the precision:
    whose parsed policies differ); keys ``saved`` lacks count at their defaults."""
    a, b = with_defaults(saved), flatten(current)
    missing = object()
    out = {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)}
    if "precision" in out and _same_policy(*out["precision"]):
        del out["precision"]
    return out


def _same_policy(a, b) -> bool:
    import mpx

    try:
        return mpx.parse_policy(a) == mpx.parse_policy(b)
    except ValueError:  # a spec this version cannot read is not this run's policy
        return False


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], *, run_dir: str,
                 say: Callable[[str], None], change_optim: bool = False) -> dict[str, tuple[Any, Any]]:
    """Raise `ConfigMismatch` when ``current`` differs from ``saved`` beyond `HARMLESS`
    keys (and `ADJUSTABLE` ones with ``change_optim``); report the allowed changes through
    ``say``. Returns the `ADJUSTABLE` changes (for `amend`)."""
    diff = differences(saved, current)
    allowed = HARMLESS + (ADJUSTABLE if change_optim else ())
    harmful = {k: v for k, v in diff.items() if k not in allowed}
    if harmful:
        lines = "\n".join(f"  {k}: {a!r} (the run) -> {b!r} (now)" for k, (a, b) in harmful.items())
        optim_only = all(k in ADJUSTABLE for k in harmful)
        raise ConfigMismatch(
            f"run {run_dir} was created with a different config; these keys change what its checkpoints hold "
            f"or mean:\n{lines}\nto keep training this run, use its config ({pathlib.Path(run_dir) / rundir.CONFIG_FILE})"
            + ("; to resume it with these optimizer settings (e.g. a lower lr after a divergence), add "
               "--change-optim" if optim_only else "")
            + f"; for a new run give it a new name (name=...) or run_dir; only {', '.join(HARMLESS[2:])} may "
            f"change on resume, and with --change-optim {', '.join(ADJUSTABLE)}")
    clip = diff.get("optim.grad_clip")
    if change_optim and clip is not None and (clip[0] is None) != (clip[1] is None):
        raise ConfigMismatch(
            f"optim.grad_clip: {clip[0]!r} (the run) -> {clip[1]!r} (now) adds or removes the clipping stage, whose "
            "state is part of the saved optimizer state; --change-optim can change the clip value, not whether "
            "there is one; for a new run give it a new name (name=...)")
    for key, (a, b) in diff.items():
        say(f"resuming with {key} = {b!r} (the run had {a!r})")
    return {k: v for k, v in diff.items() if k in ADJUSTABLE}


def amend(run_dir: str | pathlib.Path, saved: Mapping[str, Any], changes: Mapping[str, tuple[Any, Any]], *,
          step: int) -> None:
    """Write the run's config ``saved`` with the ``changes`` (`check_resume`'s) made, and
    append them to ``history.jsonl`` with the step they take effect after. Only those keys
    change: the others (`HARMLESS` ones included) keep the run's values."""
    config = unflatten({**flatten(saved), **{key: value for key, (_, value) in changes.items()}})
    rundir.record_config(run_dir, config)
    rundir.append_history(run_dir, {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                    "changed": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}})


def keep_decay_end(saved: Mapping[str, Any], optim: OptimConfig, steps: int, *,
                   say: Callable[[str], None]) -> OptimConfig:
    """``optim`` with the learning rate decaying where the run's own schedule ends.

    The cosine ends at ``optim.decay_steps``, or at ``train.steps`` (``steps``) when that is
    unset. A resume that changes ``train.steps`` would move that end, and the learning rate
    of the very next step with it (up, for a longer run); instead the schedule keeps the
    run's end (from there on the rate stays at its floor), and this is said."""
    run = flatten(saved)
    run_steps = run.get("train.steps")
    if optim.decay_steps is not None or run_steps in (None, steps) or run.get("optim.decay_steps") is not None:
        return optim
    say(f"the learning rate keeps the run's schedule: it decays to {optim.lr * optim.min_lr_ratio:g} at step "
        f"{run_steps} (the run's train.steps) and stays there; to decay over the new {steps} steps instead, "
        f"resume with optim.decay_steps={steps} --change-optim (the rate of the next step changes)")
    return dataclasses.replace(optim, decay_steps=max(run_steps, optim.warmup_steps + 1))


class DataChanged(ConfigError):
    """A run resumed on data whose content differs from the data it was trained on."""


def _file_identity(path: pathlib.Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def data_fingerprint(prepared, tokenizer) -> dict[str, Any]:
    """What a run's data is: the prepared dataset (``<builder>/<source>_<digest>``, the
    digest hashing the source files' bytes and the split), each source file's size and
    sha256 (to name the one that changed), and the tokenizer the run encodes with."""
    model = getattr(tokenizer, "definition", b"")
    return {
        "dataset": f"{prepared.directory.parent.parent.name}/{prepared.directory.parent.name}",
        "files": {str(f): _file_identity(pathlib.Path(f)) for f in prepared.files},
        "tokenizer": {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
                      "sha256": hashlib.sha256(model).hexdigest()},
    }


def data_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """What differs between two `data_fingerprint`s, one phrase each; empty: the same data."""
    changes = []
    old, new = saved.get("files", {}), current.get("files", {})
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path), new.get(path)
        if a is None:
            changes.append(f"{path} is new")
        elif b is None:
            changes.append(f"{path} is no longer read")
        elif a != b:
            changes.append(f"{path} changed (size {a['size']} -> {b['size']} bytes, sha256 {a['sha256'][:12]} -> "
                           f"{b['sha256'][:12]})")
    if saved.get("tokenizer") != current.get("tokenizer"):
        a, b = saved.get("tokenizer") or {}, current["tokenizer"]
        changes.append(f"the tokenizer changed ({a.get('kind')} {a.get('vocab_size')} -> "
                       f"{b['kind']} {b['vocab_size']})")
    if not changes and saved.get("dataset") != current.get("dataset"):
        changes.append(f"the prepared dataset changed ({saved.get('dataset')} -> {current['dataset']})")
    return changes


EVALUATION_KEYS = ("name", "run_dir", "data.files", "data.data_dir", "data.path", "data.text_column",
                   "data.label_column", "data.validation_fraction", "data.batch_size", "train.eval_batches",
                   "mesh.data", "mesh.fsdp", "mesh.distributed", "logging.tensorboard", "logging.progress")
"""Keys an evaluation takes from its own command: which data, how much of it, which devices."""


def for_evaluation(run_config: Mapping[str, Any], command, *, say: Callable[[str], None]):
    """The config to evaluate a run with: the run's own, with `EVALUATION_KEYS` from the
    command's config ``command``; every other key where the two differ (beyond `HARMLESS`
    ones) is reported."""
    from train.schema import config_from_dict

    theirs, mine = with_defaults(run_config), flatten(command.to_dict())
    merged = {**theirs, **{k: v for k, v in mine.items() if k in EVALUATION_KEYS}}
    ignored = sorted(k for k in set(theirs) | set(mine)
                     if k not in EVALUATION_KEYS and k not in HARMLESS and theirs.get(k) != mine.get(k))
    if ignored:
        say(f"using the run's own {', '.join(ignored)} (from {pathlib.Path(command.run_dir) / rundir.CONFIG_FILE})")
    return config_from_dict(unflatten(merged))
