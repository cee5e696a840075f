"""Sampling text from a trained LM with a key/value cache.

A prefill runs the model over the prompts once and fills the cache (`mpx.nn.KVCache`);
then one compiled step per token feeds the last token, reads and extends the cache, and
samples the next. Both steps are compiled once per model (graph, policy included), batch
size and cache length, and reused by later calls; the sampling settings are arguments of
the compiled steps, not constants in them.

Sampling, in this order (as Hugging Face's ``generate`` does): the repetition penalty on
every token the row has seen (prompt included), the temperature, top-k, then top-p on
what top-k left; temperature 0 is greedy (the likeliest token after the penalty).

Past the cache's length the window shifts: the cache is filled again from each row's
last ``length // 2`` tokens (positions start over from 0 there), and decoding goes on.
``int8_cache``: the cache holds int8 codes with a scale per token and head (half a bf16
cache's memory; its cost is measured in the README).

`reference_generate` is the sampler without a cache (the whole window recomputed for
every token): the reference the cached path is tested and timed against.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature`` 0: greedy. ``top_k`` 0: all tokens.
    ``top_p`` 1: no nucleus cut. ``repetition_penalty`` 1: none (> 1 discourages seen
    tokens: a positive logit is divided by it, a negative one multiplied)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_sampling(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                       repetition_penalty=self.repetition_penalty)

    def arrays(self) -> tuple[jax.Array, ...]:
        """(temperature, top_k, top_p, repetition_penalty) as the compiled steps take them."""
        return (np.float32(self.temperature), np.int32(self.top_k), np.float32(self.top_p),
                np.float32(self.repetition_penalty))


def check_sampling(*, new_tokens: int = 1, temperature: float = 1.0, top_k: int | None = 0, top_p: float = 1.0,
                   repetition_penalty: float = 1.0, stop: Sequence[str] = (), vocab_size: int | None = None) -> None:
    """Clear errors for sampling settings that cannot work (named as the CLI flags)."""
    if new_tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {new_tokens}")
    if not temperature >= 0 or math.isinf(temperature):  # also NaN
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"--top-k must be >= 0 (0: all tokens), got {top_k}")
    if top_k and vocab_size is not None and top_k > vocab_size:
        raise ValueError(f"--top-k {top_k} is larger than the vocabulary ({vocab_size} tokens); "
                         f"use at most {vocab_size}, or 0 for all")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1] (1: no nucleus cut), got {top_p}")
    if not 0 < repetition_penalty < math.inf:
        raise ValueError(f"--repetition-penalty must be a number > 0 (1: none, 1.1-1.3 discourages repeats), "
                         f"got {repetition_penalty}")
    if any(not s for s in stop):
        raise ValueError("--stop must be a non-empty string (an empty one would stop at once)")


# ----------------------------------------------------------------------------- sampling math (pure)


def penalize(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """``logits`` (B, V) with every ``seen`` (B, V) token's logit divided by ``penalty`` if it
    is positive, else multiplied by it (Keskar et al. 2019, CTRL): a penalty > 1 makes a
    seen token less likely whatever its sign."""
    return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def filter_logits(logits: jax.Array, *, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """``logits`` (B, V) f32 with -inf outside the tokens sampling may pick: the ``top_k``
    likeliest (0: all; ties with the k-th are kept), then the smallest set of those whose
    probabilities (renormalized over them) add up to ``top_p`` or more (at least one token;
    ties with the last one kept). ``top_k`` and ``top_p`` may be traced."""
    v = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)  # (B, V), descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take(ordered, k - 1, axis=-1)[..., None]  # (B, 1)
    ordered = jnp.where(ordered >= kth, ordered, -jnp.inf)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the likelier tokens
    kept = (before < top_p) & (ordered > -jnp.inf)
    kept = kept.at[..., 0].set(True)
    last = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)  # smallest kept logit
    return jnp.where(logits >= jnp.maximum(kth, last), logits, -jnp.inf)


def next_token(logits: jax.Array, seen: jax.Array, key: jax.Array, temperature, top_k, top_p,
               penalty) -> jax.Array:
    """One token id per row (B,) from ``logits`` (B, V), under the settings of `Sampling`."""
    logits = penalize(logits.astype(jnp.float32), seen, penalty)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)
    sampled = jax.random.categorical(key, filter_logits(scaled, top_k=top_k, top_p=top_p), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


def mark_seen(seen: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """``seen`` (B, V) with the valid (``mask``) ``tokens`` (B, T) marked."""
    rows = jnp.arange(seen.shape[0])[:, None]
    return seen.at[rows, tokens].max(mask.astype(bool))


# ----------------------------------------------------------------------------- the compiled steps


@functools.lru_cache(maxsize=8)
def compiled_steps(graphdef) -> tuple[Callable, Callable]:
    """``(prefill, step)`` for a model graph, compiled by jax per shape on first use:

    * ``prefill(params, meta, cache, tokens (B, T), mask (B, T), seen, key, i, settings)``
      appends the prompts and samples from each row's last valid token;
    * ``step(params, meta, cache, tokens (B,), seen, key, i, settings)`` appends one token
      per row and samples the next.

    Both return ``(next tokens (B,), cache, seen)``; the cache and ``seen`` passed in are
    donated (updated in place). ``i`` numbers the token for the key
    (``fold_in(key, i)``). The FP8 meta is only read: nothing of the model is written back.
    """

    def advance(params, meta, cache, tokens, mask, seen, key, i, settings):
        model = nnx.merge(graphdef, params, meta)  # state as arguments: merged Variables belong to this trace
        logits, cache = model.decode(tokens, cache, mask)  # (B, T, V)
        seen = mark_seen(seen, tokens, mask)
        last = jnp.argmax(jnp.where(mask, jnp.arange(tokens.shape[1]), -1), axis=1)  # (B,)
        logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
        return next_token(logits, seen, jax.random.fold_in(key, i), *settings), cache, seen

    prefill = jax.jit(advance, donate_argnums=(2, 5))

    @functools.partial(jax.jit, donate_argnums=(2, 4))
    def step(params, meta, cache, tokens, seen, key, i, settings):
        tokens = tokens[:, None]
        return advance(params, meta, cache, tokens, jnp.ones(tokens.shape, bool), seen, key, i, settings)

    return prefill, step


def _bucket(n: int, limit: int) -> int:
    """The prefill's padded length for n tokens: a power of two (>= 8), at most ``limit``;
    a few compiled prefills serve every prompt length."""
    return min(limit, max(8, 1 << (n - 1).bit_length()))


def _refill(max_len: int) -> int:
    """How many of each row's last tokens a full cache is filled again with."""
    return max(1, max_len // 2)


def decode_tokens(graphdef, params, meta, prompts: Sequence[Sequence[int]], *, max_len: int, new_tokens: int,
                  sampling: Sampling = Sampling(), int8_cache: bool = False) -> Iterator[np.ndarray]:
    """The next token of every row (B,), step by step, ``new_tokens`` times; stop early by
    leaving the loop. ``max_len``: the cache length (at most the model's ``max_len``); a
    prompt longer than it keeps its last ``max_len`` tokens. ``int8_cache``: keys and
    values as int8 codes with a scale per token and head (`mpx.nn.KVCache`).

    While the host reads one step's tokens the next step already runs (its input stays on
    the device), so a caller that stops after step n has paid for step n + 1 too.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("a prompt is empty; give at least one token (e.g. a newline)")
    check_sampling(new_tokens=new_tokens)
    prefill, step = compiled_steps(graphdef)
    model = nnx.merge(graphdef, params, meta)
    batch = len(prompts)
    settings = sampling.arrays()
    key = jax.random.key(sampling.seed)
    vocab = model.config.vocab_size
    histories = [list(p) for p in prompts]

    # When the window will shift, the first prefill pads to the width of the later ones:
    # one compiled prefill, not two.
    shifts = max(len(p) for p in prompts) + new_tokens - 1 > max_len
    least = _bucket(_refill(max_len), max_len) if shifts else 1

    def fill(seen, keep: int, i: int):
        """A fresh cache holding each row's last ``keep`` tokens (right-padded), and the
        ``i``-th new token sampled from it; the rows' next slots."""
        contexts = [h[-keep:] for h in histories]
        width = max(least, _bucket(max(map(len, contexts)), max_len))
        tokens, mask = np.zeros((batch, width), np.int32), np.zeros((batch, width), bool)
        for row, context in enumerate(contexts):
            tokens[row, : len(context)], mask[row, : len(context)] = context, True
        cache = model.init_cache(batch, max_len, int8=int8_cache)
        return prefill(params, meta, cache, tokens, mask, seen, key, np.int32(i), settings), [len(c) for c in contexts]

    (tokens, cache, seen), index = fill(np.zeros((batch, vocab), bool), max_len, 0)
    for i in range(1, new_tokens + 1):
        ahead = None
        if i < new_tokens and max(index) < max_len:  # dispatched before this step's tokens are read
            ahead = step(params, meta, cache, tokens, seen, key, np.int32(i), settings)
            index = [n + 1 for n in index]
        out = np.asarray(tokens)
        for history, token in zip(histories, out):
            history.append(int(token))
        yield out
        if i == new_tokens:
            return
        if ahead is None:  # the cache is full: fill it again from the last half of each row
            # seen through the host, like the first call's: an array the steps left on the
            # params' devices (a run's mesh) would compile the prefill again.
            ahead, index = fill(np.asarray(seen), _refill(max_len), i)
        tokens, cache, seen = ahead


def generate(graphdef, params, meta, prompts: Sequence[Sequence[int]], *, max_len: int, new_tokens: int,
             sampling: Sampling = Sampling(), int8_cache: bool = False) -> list[list[int]]:
    """``new_tokens`` token ids continuing each prompt (see `decode_tokens`)."""
    steps = list(decode_tokens(graphdef, params, meta, prompts, max_len=max_len, new_tokens=new_tokens,
                               sampling=sampling, int8_cache=int8_cache))
    return np.stack(steps, axis=1).tolist()


# ----------------------------------------------------------------------------- text, stop strings, streaming


@dataclasses.dataclass
class Generation:
    """What `generate_text` produced: each row's ``texts`` (ending before its first stop
    string, which is neither returned nor streamed), the ``tokens`` sampled for it (up to
    the one that completed the stop string), and ``times``: seconds from the call until
    each step's tokens were read."""

    texts: list[str]
    tokens: list[list[int]]
    times: list[float]

    def tokens_per_second(self) -> float | None:
        """The decoding speed, all rows together: the steps after the first two (on a cold
        start those compile the prefill and the step, and read the prompt); None with
        fewer than 4 steps."""
        if len(self.times) < 4:
            return None
        return len(self.tokens) * (len(self.times) - 2) / (self.times[-1] - self.times[1])


def generate_text(graphdef, params, meta, tokenizer, prompts: Sequence[str], *, max_len: int, new_tokens: int,
                  sampling: Sampling = Sampling(), stop: Sequence[str] = (),
                  on_text: Callable[[int, str], None] | None = None, int8_cache: bool = False) -> Generation:
    """Continue each of ``prompts`` by up to ``new_tokens`` tokens of ``tokenizer``'s text.

    A row stops at the first of the ``stop`` strings its text contains; generation ends
    when every row has stopped. ``on_text(row, piece)`` streams each row's text as it is
    decoded: a piece is held back while it might be the start of a stop string or an
    incomplete character (a byte-level model samples UTF-8 one byte at a time), and the
    pieces of a row add up to its text.
    """
    check_sampling(new_tokens=new_tokens, stop=stop)
    ids = [tokenizer.encode(p) for p in prompts]
    rows = len(ids)
    out: list[list[int]] = [[] for _ in range(rows)]
    texts, shown, done = [""] * rows, [0] * rows, [False] * rows
    times: list[float] = []
    start = time.perf_counter()
    for step_tokens in decode_tokens(graphdef, params, meta, ids, max_len=max_len, new_tokens=new_tokens,
                                     sampling=sampling, int8_cache=int8_cache):
        times.append(time.perf_counter() - start)
        for row, token in enumerate(step_tokens):
            if done[row]:
                continue
            out[row].append(int(token))
            text = tokenizer.decode(out[row])
            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=None)
            if cut is not None:
                text, done[row] = text[:cut], True
            texts[row] = text
            end = len(text) if done[row] else _settled(text, stop)
            if on_text is not None and end > shown[row]:
                on_text(row, text[shown[row]:end])
                shown[row] = end
        if all(done):
            break
    for row, text in enumerate(texts):
        if on_text is not None and len(text) > shown[row]:
            on_text(row, text[shown[row]:])
    return Generation(texts, out, times)


def _settled(text: str, stop: Sequence[str]) -> int:
    """How much of ``text`` can be shown now: all but a tail that may still change (an
    incomplete character, decoded as U+FFFD) or become a stop string."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    head = text[:end]
    hold = max((k for s in stop for k in range(1, len(s)) if head.endswith(s[:k])), default=0)
    return end - hold


# ----------------------------------------------------------------------------- without a cache: the reference


def reference_generate(graphdef, params, meta, prompt: Sequence[int], *, max_len: int, new_tokens: int,
                       sampling: Sampling = Sampling()) -> list[int]:
    """``new_tokens`` ids continuing one ``prompt``, each from a full pass over the window of
    the last ``max_len`` tokens (right-padded to ``max_len``: a causal model's logits at
    position p depend only on tokens <= p, so one compiled program serves every position).

    The sampler before the cache, kept as the reference the cached path is tested against
    (greedy, token for token) and timed against (``python -m train bench --mode
    generate``). Its repetition penalty sees the window only.
    """
    if not prompt:
        raise ValueError("the prompt is empty; give at least one token (e.g. a newline)")
    check_sampling(new_tokens=new_tokens)
    step = _reference_step(graphdef)
    tokens = list(prompt)
    key, settings = jax.random.key(sampling.seed), sampling.arrays()
    for i in range(new_tokens):
        context = tokens[-max_len:]
        window = np.zeros((1, max_len), np.int32)  # on the host: no per-length device op to compile
        window[0, : len(context)] = context
        tokens.append(int(step(params, meta, window, np.int32(len(context) - 1), key, np.int32(i), settings)[0]))
    return tokens[len(prompt):]


@functools.lru_cache(maxsize=8)
def _reference_step(graphdef):
    @jax.jit
    def step(params, meta, window, pos, key, i, settings):
        model = nnx.merge(graphdef, params, meta)
        logits = jnp.take(model(window), pos, axis=1)  # (1, V)
        seen = mark_seen(jnp.zeros(logits.shape, bool), window, jnp.arange(window.shape[1])[None] <= pos)
        return next_token(logits, seen, jax.random.fold_in(key, i), *settings)

    return step


def tokens_per_second(graphdef, params, meta, *, max_len: int, new_tokens: int = 64, reference: bool = False
                      ) -> float:
    """Sampling speed from a one-token prompt: ``new_tokens`` tokens timed after an untimed
    run that compiles what they use. ``reference``: without the cache (`reference_generate`,
    whose one program compiles on its first token)."""
    def run(n):
        if reference:
            return reference_generate(graphdef, params, meta, [0], max_len=max_len, new_tokens=n)
        return generate(graphdef, params, meta, [[0]], max_len=max_len, new_tokens=n)

    run(1 if reference else new_tokens)
    start = time.perf_counter()
    run(new_tokens)
    return new_tokens / (time.perf_counter() - start)
