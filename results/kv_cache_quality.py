"""What the int8 key/value cache costs against the compute-dtype cache, on a trained LM run;
and, as the yardstick, how the compute-dtype cache agrees with the recomputing sampler.

    python -m train train configs/quickstart.yaml run_dir=/tmp/kvq/run data.data_dir=/tmp/kvq/data
    python results/kv_cache_quality.py run_dir=/tmp/kvq/run data.data_dir=/tmp/kvq/data > results/kv_cache_cpu.json

16 validation sequences of 128 tokens: teacher-forced (one prefill over each, both caches:
loss, logit error, top-1 agreement); then greedy decoding of 96 tokens from their first 32,
with each cache and with `train.generate.reference_generate`.
"""

import json
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from train.bench import cpu_model
from train.config import load_config
from train.evaluation import load_model
from train.generate import Sampling, generate, reference_generate

GREEDY = Sampling(temperature=0.0)


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    same = a == b
    first = [int(np.argmin(row)) if not row.all() else row.size for row in same]
    return {"position_agreement": float(same.mean()), "rows_identical": int(sum(row.all() for row in same)),
            "tokens_before_first_difference": first}


def main(overrides):
    config = load_config("configs/quickstart.yaml", overrides)
    trained = load_model(config, say=lambda _: None)
    graphdef, params, meta = trained.graphdef, trained.state.params, trained.state.fp8_meta
    tokens = np.asarray(next(trained.task.eval_iter())["tokens"])[:16, :128]

    @jax.jit
    def prefill_both(params, meta, tokens):
        lm = nnx.merge(graphdef, params, meta)
        exact, _ = lm.decode(tokens, lm.init_cache(tokens.shape[0]))
        coded, _ = lm.decode(tokens, lm.init_cache(tokens.shape[0], int8=True))
        return exact.astype(jnp.float32), coded.astype(jnp.float32)

    def loss(logits):
        logp = jax.nn.log_softmax(logits[:, :-1])
        return float(-jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:, None]), -1)))

    exact, coded = prefill_both(params, meta, jnp.asarray(tokens, jnp.int32))
    prompts = [list(map(int, row[:32])) for row in tokens]
    run = lambda **kw: np.array(generate(graphdef, params, meta, prompts, max_len=128, new_tokens=96,  # noqa: E731
                                         sampling=GREEDY, **kw))
    cached, coded_greedy = run(), run(int8_cache=True)
    recomputed = np.array([reference_generate(graphdef, params, meta, p, max_len=128, new_tokens=96, sampling=GREEDY)
                           for p in prompts])
    return {
        "what": "int8 key/value cache vs the compute-dtype (bf16) cache on the fp8 quickstart LM (400 steps)",
        "cpu": cpu_model(), "versions": {"jax": jax.__version__, "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d"), "run_step": trained.step, "policy": config.precision,
        "teacher_forced": {
            "sequences": len(tokens), "tokens": tokens.shape[1], "loss_bf16_cache": loss(exact),
            "loss_int8_cache": loss(coded), "logits_rel_l2": float(jnp.linalg.norm(exact - coded) / jnp.linalg.norm(exact)),
            "logits_max_abs": float(jnp.max(jnp.abs(exact - coded))),
            "top1_agreement": float(jnp.mean(jnp.argmax(exact, -1) == jnp.argmax(coded, -1))),
        },
        "greedy": {"prompts": len(prompts), "prompt_tokens": 32, "new_tokens": 96,
                   "int8_cache_vs_bf16_cache": agreement(coded_greedy, cached),
                   "bf16_cache_vs_recompute": agreement(cached, recomputed)},
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=1))
