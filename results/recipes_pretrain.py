"""Which FP8 scaling recipe trains best on `configs/pretrain_fp8.yaml` (1000 steps), against bf16.

    python results/recipes_pretrain.py > results/recipes_pretrain_fp8.json

Each precision runs the config as it is (`python -m train train configs/pretrain_fp8.yaml
precision=<preset> run_dir=runs/pre_recipe_<preset>`), one after another on this machine,
from the same data, seed and schedule; reported per run: the validation loss at each eval
step (250, 500, 750, 1000) and bits per byte at the end, the largest saturated / flushed FP8
fractions of the last logged step, skipped steps, wall seconds, and the final validation loss
relative to bf16's.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import subprocess
import sys
import time

import flax
import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/pretrain_fp8.yaml"
PRECISIONS = ("bf16", "fp8", "fp8-rowwise", "fp8-rowwise-gw-hp", "fp8-block", "mxfp8")


def run(precision: str) -> dict:
    run_dir = ROOT / "runs" / f"pre_recipe_{precision}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "train", "train", CONFIG, f"precision={precision}", f"run_dir={run_dir}"],
                   cwd=ROOT, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    last = [r for r in rows if r["split"] == "train"][-1]
    return {
        "precision": precision,
        "val_loss": evals[-1]["loss"],
        "bits_per_byte": evals[-1]["bits_per_byte"],
        "val_loss_by_step": {str(r["step"]): r["loss"] for r in evals},
        "train_loss_last": last["loss"],
        "skipped": last["skipped"],
        "fp8_max_saturated_last": last.get("fp8_max_saturated"),
        "fp8_max_flushed_last": last.get("fp8_max_flushed"),
        "seconds": round(seconds, 2),
    }


def main() -> None:
    runs = [run(p) for p in PRECISIONS]
    bf16 = runs[0]["val_loss"]
    for r in runs:
        r["vs_bf16_percent"] = 100 * (r["val_loss"] - bf16) / bf16
    json.dump({"config": CONFIG, "command": f"python -m train train {CONFIG} precision=<preset>", "steps": 1000,
               "device": "cpu (2 cores)", "versions": {"jax": jax.__version__, "flax": flax.__version__},
               "date": datetime.date.today().isoformat(), "runs": runs}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
