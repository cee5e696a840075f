"""Sampling with the key/value cache (`train.generate` over `mpx.nn.TransformerLM.decode`):
greedy decoding gives, token for token, what recomputing the whole window gives, in both
layouts, scanned and unrolled, under fp32 and fp8, for a batch of prompts of different
lengths padded on either side; the decode step compiles once; the sampling rules (top-k,
top-p, repetition penalty) keep to their definitions; stop strings cut the text.

The models are tiny random ones with an untied head (a tied head at random init mostly
predicts the token it is fed, so greedy rows would be one token repeated). Under fp8 the
reference runs under the same policy, and every FP8 tensor is past one step (delayed
scaling then quantizes with its stored scale, whatever else is in the batch; a fresh
meta scales each tensor from its own amax, so a batch row would depend on the others).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mpx
import mpx.nn as mn
from mpx.fp8 import Fp8Meta
from mpx.fp8._meta import is_fp8_meta, observation
from train.data.tokenizers import ByteTokenizer
from train.generate import (Sampling, compiled_steps, filter_logits, generate, generate_text, next_token, penalize,
                            reference_generate, _settled)

VOCAB, MAX_LEN, NEW = 64, 112, 64
# Three lengths, batched; the longest fills the prefill's 64 columns, as the last 56 tokens of
# a row do when a full cache is filled again: one compiled prefill serves every test.
PROMPTS = [[5, 17, 33], [(7 * i + 3) % VOCAB for i in range(40)], [42]]
WIDTH = 64
GREEDY = Sampling(temperature=0.0)

# Each layout scanned and unrolled, each under fp32 and fp8 (pairwise: four models, not eight).
MODELS = {
    "gpt2-fp32": dict(layout="gpt2", scan_layers=False, precision="fp32"),
    "gpt2-scan-fp8": dict(layout="gpt2", scan_layers=True, precision="fp8"),
    "llama-gqa-scan-fp32": dict(layout="llama", scan_layers=True, precision="fp32"),
    "llama-gqa-fp8": dict(layout="llama", scan_layers=False, precision="fp8"),
}


def settled(meta):
    """Every FP8 tensor's state after one step that saw an amax of 4 (scale about 448 / 4)."""
    def one(m: Fp8Meta) -> Fp8Meta:
        seen = [observation(s, jnp.float32(4.0), (0.0, 0.0)) for s in (m.lhs, m.rhs, m.grad)]
        return m.advance(Fp8Meta(*seen, config=m.config))

    return jax.tree.map(one, meta, is_leaf=is_fp8_meta)


@functools.cache
def model(name: str):
    spec = dict(MODELS[name])
    precision = spec.pop("precision")
    kv = dict(num_heads=4, num_kv_heads=2) if spec["layout"] == "llama" else dict(num_heads=2)
    config = mn.TransformerConfig(vocab_size=VOCAB, d_model=32, num_layers=2, d_ff=64, max_len=MAX_LEN,
                                  tie_embeddings=False, **kv, **spec)
    lm = mn.TransformerLM(config, policy=mpx.parse_policy(precision), rngs=nnx.Rngs(0))
    graphdef, params, meta, rest = mn.split(lm)
    assert not rest
    return graphdef, params, jax.jit(settled)(meta)


@pytest.mark.parametrize("name", MODELS)
def test_cached_greedy_equals_recomputing_the_window(name):
    """64 new tokens for three prompts of 3, 40 and 1 tokens, batched (right-padded) with the
    cache, against the recomputing sampler on each prompt alone: the same tokens. The decode
    step compiled once for the 63 steps."""
    graphdef, params, meta = model(name)
    out = generate(graphdef, params, meta, PROMPTS, max_len=MAX_LEN, new_tokens=NEW, sampling=GREEDY)
    for prompt, row in zip(PROMPTS, out):
        assert row == reference_generate(graphdef, params, meta, prompt, max_len=MAX_LEN, new_tokens=NEW,
                                         sampling=GREEDY)
    assert len({t for row in out for t in row}) >= 10, out  # varied rows: the comparison is not trivial
    prefill, step = compiled_steps(graphdef)
    assert step._cache_size() == 1 and prefill._cache_size() == 1


@pytest.mark.parametrize("name", ["gpt2-fp32", "llama-gqa-scan-fp32"])
def test_left_padding_gives_the_right_padded_tokens(name):
    """The same prompts padded on the left: each row's tokens keep their positions (the
    gpt2 table is absolute, so a slot used as a position would show), padding is never
    attended, and the tokens equal the right-padded batch's. Left padding takes slots: 48
    tokens fill the 112 slots after 64 of prompt. The cache ends with every row's next slot
    at 64 + 47 and its next position at its own length + 47."""
    graphdef, params, meta = model(name)
    prefill, step = compiled_steps(graphdef)
    tokens, mask = np.zeros((3, WIDTH), np.int32), np.zeros((3, WIDTH), bool)
    for row, prompt in enumerate(PROMPTS):
        tokens[row, WIDTH - len(prompt):], mask[row, WIDTH - len(prompt):] = prompt, True
    cache = nnx.merge(graphdef, params, meta).init_cache(3, MAX_LEN)
    key, settings = jax.random.key(0), GREEDY.arrays()
    token, cache, seen = prefill(params, meta, cache, tokens, mask, jnp.zeros((3, VOCAB), bool), key, np.int32(0),
                                 settings)
    steps = [token]
    new = MAX_LEN - WIDTH
    for i in range(1, new):
        token, cache, seen = step(params, meta, cache, token, seen, key, np.int32(i), settings)
        steps.append(token)
    right = generate(graphdef, params, meta, PROMPTS, max_len=MAX_LEN, new_tokens=new, sampling=GREEDY)
    assert np.stack(steps, axis=1).tolist() == right
    assert cache.index.tolist() == [WIDTH + new - 1] * 3
    assert cache.positions.tolist() == [len(p) + new - 1 for p in PROMPTS]
    assert cache.valid.sum(axis=1).tolist() == [len(p) + new - 1 for p in PROMPTS]  # padding slots stay invalid


def test_compiled_once_per_batch_size_and_length():
    """Two more calls with the same batch size and cache length, other prompts, lengths and
    sampling settings: no new trace of the decode step (nor of the prefill: its prompts pad
    to the same power of two, 64)."""
    graphdef, params, meta = model("gpt2-fp32")
    generate(graphdef, params, meta, PROMPTS, max_len=MAX_LEN, new_tokens=3)
    prefill, step = compiled_steps(graphdef)
    before = step._cache_size(), prefill._cache_size()
    generate(graphdef, params, meta, [[1], PROMPTS[1][:35], [4, 5, 6]], max_len=MAX_LEN, new_tokens=9,
             sampling=Sampling(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3, seed=4))
    generate(graphdef, params, meta, PROMPTS, max_len=MAX_LEN, new_tokens=5, sampling=GREEDY)
    assert (step._cache_size(), prefill._cache_size()) == before
    assert step._cache_size() == 1  # one trace of the step for every call of this module's tests


def test_cache_dtype_follows_the_compute_dtype():
    for name, dtype in (("gpt2-fp32", jnp.float32), ("llama-gqa-fp8", jnp.bfloat16)):
        graphdef, params, meta = model(name)
        cache = nnx.merge(graphdef, params, meta).init_cache(2, 16)
        head_dim = 8 if "llama" in name else 16  # 4 query heads sharing 2 key/value heads; 2 heads
        assert cache.keys.dtype == cache.values.dtype == dtype
        assert cache.keys.shape == (2, 2, 16, 2, head_dim)  # (L, B, S, G, K)
    with pytest.raises(ValueError, match=r"cache length must be an integer in \[1, max_len=112\]"):
        nnx.merge(graphdef, params, meta).init_cache(1, MAX_LEN + 1)


def test_the_cache_passes_through_jit_unchanged():
    cache = mn.KVCache.init(layers=2, batch=3, length=5, kv_heads=2, head_dim=4, dtype=jnp.bfloat16)
    cache = cache.replace(index=jnp.array([1, 2, 3], jnp.int32), valid=cache.valid.at[:, 0].set(True))
    back = jax.jit(lambda c: c)(cache)
    assert type(back) is mn.KVCache and back.length == 5 and back.batch == 3
    for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(back)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_past_the_cache_the_window_shifts_and_decoding_goes_on():
    """100 tokens in a cache of 112: when the longest row (40 tokens of prompt) is full, after
    73 tokens, the cache is filled again from each row's last 56 tokens; the tokens after
    that are those of a fresh call on those 56 tokens (positions start over at 0). With the
    params on a mesh, as a run's are, the refill reuses the first prefill's program."""
    graphdef, params, meta = model("gpt2-fp32")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    prefill, _ = compiled_steps(graphdef)
    before = prefill._cache_size()
    out = generate(graphdef, params, meta, PROMPTS, max_len=MAX_LEN, new_tokens=100, sampling=GREEDY)
    assert [len(row) for row in out] == [100] * 3
    assert prefill._cache_size() <= before + 1  # params on the mesh: one new program at most, not two
    shift = MAX_LEN - len(PROMPTS[1]) + 1
    contexts = [(p + row[:shift])[-MAX_LEN // 2:] for p, row in zip(PROMPTS, out)]
    again = generate(graphdef, params, meta, contexts, max_len=MAX_LEN, new_tokens=100 - shift, sampling=GREEDY)
    assert [row[shift:] for row in out] == again


def test_an_int8_cache_stores_codes_and_scales_and_stays_close_to_the_float_cache():
    """Keys and values as int8 with one f32 scale per token and head: each vector is off by
    at most half a step (amax / 254), about 0.4% rms of a head's 8 features; over a 100-token
    prefill of two rows the logits differ from the f32 cache's by 0.7% norm-wise (measured);
    bound 3%. (Greedy decoding of the three prompts gives the same 64 tokens either way:
    measured, not asserted, to spare two compiles.)"""
    graphdef, params, meta = model("llama-gqa-scan-fp32")

    @jax.jit
    def prefill_both(params, meta, tokens):
        lm = nnx.merge(graphdef, params, meta)
        exact, _ = lm.decode(tokens, lm.init_cache(2, MAX_LEN))
        coded, cache = lm.decode(tokens, lm.init_cache(2, MAX_LEN, int8=True))
        return exact, coded, cache

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 100)), jnp.int32)
    exact, coded, cache = prefill_both(params, meta, tokens)
    assert cache.is_int8 and cache.keys.dtype == cache.values.dtype == jnp.int8
    assert cache.key_scales.shape == cache.value_scales.shape == (2, 2, MAX_LEN, 2, 1)
    err = float(jnp.linalg.norm(exact - coded) / jnp.linalg.norm(exact))
    assert 0 < err < 0.03, err


# ----------------------------------------------------------------------------- sampling rules

PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.02])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))[None]


@jax.jit
def _draws(logits, seen, keys, settings):
    return jax.vmap(lambda k: next_token(logits, seen, k, *settings)[0])(keys)


def draws(logits, *, seen=None, **settings):
    """4000 tokens sampled from ``logits`` (1, V), one key each (one compiled program for
    every setting: they are arguments)."""
    seen = jnp.zeros(logits.shape, bool) if seen is None else seen
    keys = jax.random.split(jax.random.key(1), 4000)
    return np.asarray(_draws(logits, seen, keys, Sampling(**settings).arrays()))


@pytest.mark.parametrize("top_k, top_p, allowed", [
    (3, 1.0, [0, 1, 2]),
    (0, 0.6, [0, 1]),           # 0.4 < 0.6, then 0.65 >= 0.6: the nucleus is 2 tokens
    (0, 0.66, [0, 1, 2]),       # 0.65 < 0.66: a third token
    (4, 0.8, [0, 1, 2]),        # over the 4 top-k tokens renormalized (/0.9): 0.44, 0.72, 0.89
    (1, 1.0, [0]),
    (0, 1.0, list(range(7))),
])
def test_top_k_and_top_p_sample_only_the_allowed_tokens_in_proportion(top_k, top_p, allowed):
    """Over 4000 seeds every draw is in the allowed set, and each allowed token's frequency is
    its renormalized probability within 0.03 (4 standard deviations at p = 0.5)."""
    kept = np.asarray(filter_logits(LOGITS, top_k=jnp.int32(top_k), top_p=jnp.float32(top_p)))[0]
    assert np.flatnonzero(np.isfinite(kept)).tolist() == allowed
    tokens = draws(LOGITS, temperature=1.0, top_k=top_k, top_p=top_p)
    assert set(tokens.tolist()) <= set(allowed)
    expected = PROBS[allowed] / PROBS[allowed].sum()
    freq = np.bincount(tokens, minlength=7)[allowed] / len(tokens)
    assert np.abs(freq - expected).max() < 0.03, (freq, expected)


def test_temperature_zero_is_the_argmax_and_temperature_sharpens():
    assert set(draws(LOGITS, temperature=0.0).tolist()) == {0}
    cold = np.bincount(draws(LOGITS, temperature=0.5), minlength=7) / 4000
    p = PROBS ** 2 / (PROBS ** 2).sum()  # softmax(log p / 0.5)
    assert np.abs(cold - p).max() < 0.03


def test_repetition_penalty_follows_its_formula():
    """Seen tokens: a positive logit divided by the penalty, a negative one multiplied (numpy
    reference); the sampled frequencies follow the softmax of the penalized logits."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (3, 16)).astype(np.float32)
    seen = rng.random((3, 16)) < 0.4
    penalized = jax.jit(penalize)
    for penalty in (1.0, 1.3, 0.7):
        want = np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)
        np.testing.assert_allclose(np.asarray(penalized(logits, seen, np.float32(penalty))), want, rtol=1e-6)
    crafted = jnp.asarray([[2.0, 1.5, -1.0, 0.5, -0.5, 0.0, 1.0]])  # the shape of LOGITS: the same program
    seen = jnp.asarray([[True, False, True, False, False, True, False]])
    tokens = draws(crafted, seen=seen, temperature=1.0, repetition_penalty=2.0)
    penalized = np.array([1.0, 1.5, -2.0, 0.5, -0.5, 0.0, 1.0])
    p = np.exp(penalized) / np.exp(penalized).sum()
    assert np.abs(np.bincount(tokens, minlength=7) / 4000 - p).max() < 0.03
    greedy = draws(crafted, seen=seen, temperature=0.0, repetition_penalty=2.0)
    assert set(greedy.tolist()) == {1}  # 2.0 / 2 falls below 1.5


# ----------------------------------------------------------------------------- stop strings and streaming

ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n"


class Chars:
    """A 64-character tokenizer (one id per character), the interface of train.data's."""

    kind, vocab_size = "chars", VOCAB

    def encode(self, text):
        return [ALPHABET.index(c) for c in text]

    def decode(self, ids):
        return "".join(ALPHABET[i] for i in ids)


def test_stop_strings_end_each_row_before_the_string_and_stream_what_it_returns():
    graphdef, params, meta = model("gpt2-fp32")
    prompts = [Chars().decode(p) for p in PROMPTS]  # the same shapes: the same compiled steps
    free = generate_text(graphdef, params, meta, Chars(), prompts, max_len=MAX_LEN, new_tokens=NEW, sampling=GREEDY)
    stop = [free.texts[0][6:9], free.texts[2][3:5]]
    cuts = [min(i for i in (t.find(s) for s in stop) if i >= 0) if any(s in t for s in stop) else None
            for t in free.texts]
    pieces = {0: [], 1: [], 2: []}
    out = generate_text(graphdef, params, meta, Chars(), prompts, max_len=MAX_LEN, new_tokens=NEW, sampling=GREEDY,
                        stop=stop, on_text=lambda row, piece: pieces[row].append(piece))
    for row, (text, cut) in enumerate(zip(free.texts, cuts)):
        assert out.texts[row] == (text if cut is None else text[:cut])
        assert "".join(pieces[row]) == out.texts[row]
        assert not any(s in out.texts[row] for s in stop)
    assert cuts[0] <= 6 and cuts[2] <= 3
    if all(c is not None for c in cuts):  # every row stopped: the loop ended early
        assert len(out.times) < NEW
    assert out.tokens[0] == Chars().encode(free.texts[0])[: len(out.tokens[0])]


def test_streaming_holds_back_a_possible_stop_string_or_an_incomplete_character():
    assert _settled("to be or\n", ["\n\n"]) == len("to be or")
    assert _settled("to be or\n", ["or not"]) == len("to be or\n")
    assert _settled("to be o", ["or not"]) == len("to be ")
    bytes_ = ByteTokenizer()
    partial = bytes_.decode(bytes_.encode("café")[:-1])  # é's first byte only
    assert partial == "caf\ufffd" and _settled(partial, []) == 3
