"""Runs to and from the weight files other tools write (``import``, ``export --format safetensors``).

    import_run(config, "gpt2/model.safetensors", tokenizer=["gpt2/vocab.json", "gpt2/merges.txt"])
    export_safetensors(load_model(config), "model.safetensors")

`import_run` creates the run ``config`` describes from a ``.safetensors`` file in the
naming of the config's ``model.layout`` (`train.weights`): the params from the file, a
fresh optimizer state and FP8 meta at step 0 (one checkpoint), the config, the data record
and the tokenizer the weights were trained with (``tokenizer``: its files; none: the one
the data config describes). ``train`` then continues it as its own run, ``eval`` and
``generate`` read it, and a fine-tuning run starts from it (``finetune.init_from``).
`export_safetensors` writes the inverse: a language-model run's params in that naming.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence

import jax
from flax import nnx

import mpx
from train import checkpoint as ckpt
from train import identity
from train import rundir
from train import weights as hub_weights
from train.build import build
from train.data.tokenizers import import_tokenizer
from train.evaluation import Trained, new_directory
from train.schema import ConfigError, RunConfig

Path = str | pathlib.Path


def import_run(config: RunConfig, weights: Path, *, tokenizer: Sequence[Path] = (),
               say: Callable[[str], None] = print) -> pathlib.Path:
    """Create ``config.run_dir`` (it must not exist) from the weights file ``weights``;
    returns the run directory. Every mismatch between the file and the config is one
    error before anything is written: a shape key of the config the weights contradict
    (`check_shape`), then every missing, misshaped or unexpected tensor (`train.weights`)."""
    config = config.resolved()
    if config.data.task != "lm":
        raise ConfigError(f"import creates a language-model run (data.task=lm), this config is data.task="
                          f"{config.data.task}; import the weights as an LM run, then fine-tune from it "
                          "(finetune.init_from)")
    if config.finetune.init_from:
        raise ConfigError(f"import takes the params from --weights, and this config also loads them from "
                          f"finetune.init_from ({config.finetune.init_from}); set finetune.init_from=null")
    final = pathlib.Path(config.run_dir).absolute()
    if final.exists():
        raise ValueError(f"run directory {final} exists; import creates a new run: give it a new name (name=...) "
                         "or run_dir")
    tensors, _ = hub_weights.read_safetensors(weights)
    own_tokenizer = import_tokenizer(tokenizer) if tokenizer else None
    if own_tokenizer is not None:  # before the data is prepared: a mismatch is said at once
        check_shape(tensors, config, own_tokenizer.vocab_size, weights)
    built = build(config, say=say, tokenizer=own_tokenizer)
    if own_tokenizer is None:
        check_shape(tensors, config, built.task.vocab_size, weights)
    shape = config.model.to_transformer(built.task.vocab_size)
    loaded = hub_weights.from_hub(tensors, shape, dtype=built.policy.param_dtype, say=say)
    params = jax.device_get(built.state.params)
    nnx.replace_by_pure_dict(params, loaded)
    state = mpx.init_train_state(params, built.optimizer, policy=built.policy, fp8_meta=built.state.fp8_meta,
                                 rng=built.state.rng)
    state = jax.device_put(state, built.shardings)
    with new_directory(final, "run") as (partial, _):
        rundir.keep_tokenizer(partial, built.task.tokenizer)
        rundir.record_config(partial, config.to_dict())
        rundir.record_data(partial, identity.data_fingerprint(built.task.prepared, built.task.tokenizer))
        rundir.append_history(partial, {"step": 0, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                        "imported": _provenance(weights, tokenizer)})
        checkpointer = ckpt.Checkpointer.of(config.checkpoint, partial, training=True)
        try:
            checkpointer.save(0, state, data_state=built.task.train_iter().get_state(), config=config.to_dict(),
                              force=True)
        finally:
            checkpointer.close()
    n = sum(a.size for a in jax.tree.leaves(loaded))
    say(f"imported {n:,} params ({config.model.layout} naming) from {weights} into {final} at step 0, tokenizer "
        f"{built.task.tokenizer.kind} ({built.task.tokenizer.vocab_size} ids)")
    return final


def _provenance(weights: Path, tokenizer: Sequence[Path]) -> dict:
    """What ``history.jsonl`` says of an import: the files, the weights' by content too."""
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"weights": str(pathlib.Path(weights).absolute()), "sha256": digest.hexdigest(),
            "tokenizer": [str(pathlib.Path(p).absolute()) for p in tokenizer]}


def _yaml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def check_shape(tensors: Mapping, config: RunConfig, vocab_size: int, weights: Path = "the weights") -> None:
    """A `ConfigError` listing each ``model.*`` key whose value the weights contradict
    (``model.d_model: the weights have 768, the config says 512``). ``vocab_size``: the
    tokenizer's, which ``model.vocab_size: null`` stands for; a tokenizer with more ids
    than the weights have rows is not the one they were trained with."""
    model = config.model
    shape = model.to_transformer(max(vocab_size, model.vocab_size or 0))
    lines = []
    for key, (theirs, _) in hub_weights.read_shape(tensors, shape).items():
        said = getattr(model, key)
        if key == "vocab_size" and theirs < vocab_size:
            lines.append(f"model.vocab_size: the weights have {theirs} token rows and the tokenizer {vocab_size} ids; "
                         "give the tokenizer they were trained with (--tokenizer)")
        elif key == "vocab_size" and said is None:
            lines.append(f"model.vocab_size: the weights have {theirs}, the config says null (the tokenizer's "
                         f"{vocab_size}); set model.vocab_size={theirs}")
        elif key == "num_kv_heads" and said is None:
            lines.append(f"model.num_kv_heads: the weights have {theirs}, the config says null (num_heads, "
                         f"{model.num_heads})")
        else:
            lines.append(f"model.{key}: the weights have {_yaml_value(theirs)}, the config says {_yaml_value(said)}")
    if lines:
        raise ConfigError(f"{weights} does not fit the config's model (num_heads, rope_base and norm_eps are not in "
                          "the weights: the config must give the ones it was trained with):\n  " + "\n  ".join(lines))


def export_safetensors(trained: Trained, out: Path | None = None) -> pathlib.Path:
    """Write a language-model run's params (``trained``, `train.evaluation.load_model`'s)
    to a new ``.safetensors`` file in its layout's naming (`train.weights`), each in its
    param dtype; returns the path. ``out`` None: ``<run_dir>/model_step<N>.safetensors``.
    The FP8 meta stays behind (a loader of this naming has no place for it; an imported
    run starts its own)."""
    if trained.config.data.task != "lm":
        raise ValueError(f"export --format safetensors writes a language model in GPT-2's or Llama's naming; this run "
                         f"is data.task={trained.config.data.task}: export it with --format orbax")
    shape = trained.config.model.to_transformer(trained.task.vocab_size)
    tensors = hub_weights.to_hub(trained.state.params, shape)
    if out is None:
        out = pathlib.Path(trained.config.run_dir) / f"model_step{trained.step}.safetensors"
    metadata = {"mpx.step": str(trained.step), "mpx.model": json.dumps(trained.config.to_dict()["model"])}
    return hub_weights.write_safetensors(out, tensors, metadata)
