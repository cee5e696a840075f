"""Sampling text from a trained LM: temperature and top-k, one compiled step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int | None) -> jax.Array:
    """One token id from f32 ``logits`` (V,): greedy at temperature 0, else softmax sampling
    restricted to the ``top_k`` most likely tokens."""
    if temperature <= 0:
        return jnp.argmax(logits)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits)


def check_sampling(*, new_tokens: int, temperature: float, top_k: int | None, vocab_size: int | None) -> None:
    """Clear errors for sampling settings that cannot work (named as the CLI flags)."""
    if new_tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {new_tokens}")
    if not temperature >= 0:  # also NaN
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0: all tokens), got {top_k}")
    if top_k and vocab_size is not None and top_k > vocab_size:
        raise ValueError(f"--top-k {top_k} is larger than the vocabulary ({vocab_size} tokens); "
                         f"use at most {vocab_size}, or 0 for all")


def generate(graphdef, params, meta, prompt: list[int], *, max_len: int, new_tokens: int,
             temperature: float = 1.0, top_k: int | None = 40, seed: int = 0) -> list[int]:
    """Continue ``prompt`` by ``new_tokens`` tokens.

    The model sees a fixed window of ``max_len`` tokens, right-padded: a causal model's
    logits at position p depend only on tokens <= p, so one compiled step serves every
    position. Past ``max_len`` the window slides. The step is compiled once per model
    (graph, policy included) and sampling setting, and reused by later calls.
    """
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token (e.g. a newline)")
    check_sampling(new_tokens=new_tokens, temperature=temperature, top_k=top_k, vocab_size=None)
    step = _sampling_step(graphdef, temperature, top_k)
    tokens = list(prompt)
    key = jax.random.key(seed)
    for i in range(new_tokens):
        context = tokens[-max_len:]
        window = np.zeros((max_len,), np.int32)  # on the host: no per-length device op to compile
        window[: len(context)] = context
        tokens.append(int(step(params, meta, window, len(context) - 1, jax.random.fold_in(key, i))))
    return tokens[len(prompt):]


@functools.lru_cache(maxsize=8)
def _sampling_step(graphdef, temperature: float, top_k: int | None):
    @jax.jit
    def step(params, meta, window, pos, key):  # state as arguments: merged Variables belong to this trace
        model = nnx.merge(graphdef, params, meta)
        logits = model(window[None])[0, pos]
        return sample_logits(logits, key, temperature=temperature, top_k=top_k)

    return step


def tokens_per_second(graphdef, params, meta, *, max_len: int, new_tokens: int = 64) -> float:
    """Steady sampling speed: ``new_tokens`` timed after one untimed token (the compile)."""
    import time

    generate(graphdef, params, meta, [0], max_len=max_len, new_tokens=1)
    start = time.perf_counter()
    generate(graphdef, params, meta, [0], max_len=max_len, new_tokens=new_tokens)
    return new_tokens / (time.perf_counter() - start)
