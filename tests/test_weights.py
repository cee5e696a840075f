"""Weights in and out in the naming other tools use (`train.weights`, `train.hub`), and the
tokenizers that come with them.

The hub checkpoints here are built by this module from the architectures' definitions
(GPT-2: Conv1D weights stored (in, out), a fused c_attn; Llama: nn.Linear weights stored
(out, in), separate q/k/v projections, grouped-query attention), and their logits are
computed by float64 numpy forwards written here (GPT-2: LayerNorm, tanh GELU, learned
positions; Llama: RMSNorm, rotary positions with Hugging Face's rotate_half pairing,
SwiGLU); they share no code with mpx.
"""

import dataclasses
import itertools
import json
import math
import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx

import mpx
import mpx.nn as mn
from train import weights
from train.data.tokenizers import SentencePieceTokenizer, import_tokenizer, load_tokenizer

from helpers import paragraph, tiny_lm_run

# ----------------------------------------------------------------------------- hub checkpoints, built here

V, D, H, F, L, T = 50, 16, 4, 24, 2, 7


def gpt2_checkpoint(seed=0, *, v=V, d=D, f=F, layers=L, positions=8, prefix="transformer.") -> dict[str, np.ndarray]:
    """A random GPT-2 as GPT2LMHeadModel saves it: Conv1D weights (in, out), c_attn fused
    q|k|v, a tied head (no lm_head.weight), and the causal-mask buffers ``attn.bias``."""
    rng = np.random.default_rng(seed)
    mat = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    vec = lambda n, c=0.0: (c + 0.1 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
    w = {"wte.weight": mat(v, d), "wpe.weight": mat(positions, d), "ln_f.weight": vec(d, 1), "ln_f.bias": vec(d)}
    for i in range(layers):
        p = f"h.{i}."
        w.update({p + "ln_1.weight": vec(d, 1), p + "ln_1.bias": vec(d), p + "ln_2.weight": vec(d, 1),
                  p + "ln_2.bias": vec(d), p + "attn.c_attn.weight": mat(d, 3 * d), p + "attn.c_attn.bias": vec(3 * d),
                  p + "attn.c_proj.weight": mat(d, d), p + "attn.c_proj.bias": vec(d),
                  p + "mlp.c_fc.weight": mat(d, f), p + "mlp.c_fc.bias": vec(f), p + "mlp.c_proj.weight": mat(f, d),
                  p + "mlp.c_proj.bias": vec(d),
                  p + "attn.bias": np.tril(np.ones((positions, positions), np.float32))[None, None]})
    return {prefix + k: a for k, a in w.items()}


def llama_checkpoint(seed=0, *, heads=H, kv_heads=2) -> dict[str, np.ndarray]:
    """A random Llama as LlamaForCausalLM saves it: nn.Linear weights (out, in), separate
    q/k/v projections with ``kv_heads`` key/value heads, an untied ``lm_head.weight``."""
    rng = np.random.default_rng(seed)
    mat = lambda *s: (rng.standard_normal(s) * 0.3).astype(np.float32)  # noqa: E731
    k = D // heads
    w = {"model.embed_tokens.weight": mat(V, D), "model.norm.weight": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
         "lm_head.weight": mat(V, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
                  p + "post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(D)).astype(np.float32),
                  p + "self_attn.q_proj.weight": mat(heads * k, D), p + "self_attn.k_proj.weight": mat(kv_heads * k, D),
                  p + "self_attn.v_proj.weight": mat(kv_heads * k, D), p + "self_attn.o_proj.weight": mat(D, heads * k),
                  p + "mlp.gate_proj.weight": mat(F, D), p + "mlp.up_proj.weight": mat(F, D),
                  p + "mlp.down_proj.weight": mat(D, F)})
    return w


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _causal_attention(q, k, v):
    """q (T, K), k, v (T, K) of one head -> (T, K)."""
    t = q.shape[0]
    logits = q @ k.T / math.sqrt(q.shape[-1])
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
    return _softmax(logits) @ v


def gpt2_logits(w, tokens, *, heads=H, eps=1e-5) -> np.ndarray:
    """GPT-2's forward in float64: tokens (T,) -> logits (T, V), tied head."""
    w = {k.removeprefix("transformer."): np.asarray(a, np.float64) for k, a in w.items()}
    t, layers = len(tokens), len({k.split(".")[1] for k in w if k.startswith("h.")})

    def layer_norm(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w[p + ".weight"] + w[p + ".bias"]

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = w["wte.weight"][tokens] + w["wpe.weight"][:t]
    for i in range(layers):
        p = f"h.{i}."
        qkv = layer_norm(x, p + "ln_1") @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = (a.reshape(t, heads, -1) for a in np.split(qkv, 3, axis=-1))
        out = np.concatenate([_causal_attention(q[:, h], k[:, h], v[:, h]) for h in range(heads)], axis=-1)
        x = x + out @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        hidden = gelu_tanh(layer_norm(x, p + "ln_2") @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
        x = x + hidden @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    return layer_norm(x, "ln_f") @ w["wte.weight"].T


def llama_logits(w, tokens, *, heads=H, kv_heads=2, base=10000.0, eps=1e-5) -> np.ndarray:
    """Llama's forward in float64 (Hugging Face's modeling): tokens (T,) -> logits (T, V)."""
    w = {k: np.asarray(a, np.float64) for k, a in w.items()}
    t, k_dim = len(tokens), D // heads
    inv_freq = 1.0 / base ** (np.arange(0, k_dim, 2) / k_dim)
    freqs = np.arange(t)[:, None] * inv_freq[None]  # (T, K/2)
    cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))

    def rotate_half(a):
        return np.concatenate([-a[..., k_dim // 2:], a[..., :k_dim // 2]], axis=-1)

    def rope(a):  # (T, N, K)
        return a * cos[:, None] + rotate_half(a) * sin[:, None]

    def rms_norm(x, name):
        return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w[name]

    def silu(x):
        return x / (1 + np.exp(-x))

    x = w["model.embed_tokens.weight"][tokens]
    for i in range(L):
        p = f"model.layers.{i}."
        h = rms_norm(x, p + "input_layernorm.weight")
        q = rope((h @ w[p + "self_attn.q_proj.weight"].T).reshape(t, heads, k_dim))
        k = rope((h @ w[p + "self_attn.k_proj.weight"].T).reshape(t, kv_heads, k_dim))
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(t, kv_heads, k_dim)
        group = heads // kv_heads  # query head h reads key/value head h // group (repeat_kv)
        out = np.concatenate([_causal_attention(q[:, j], k[:, j // group], v[:, j // group]) for j in range(heads)], -1)
        x = x + out @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, p + "post_attention_layernorm.weight")
        gated = silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + gated @ w[p + "mlp.down_proj.weight"].T
    return rms_norm(x, "model.norm.weight") @ w["lm_head.weight"].T


GPT2 = mn.TransformerConfig(vocab_size=V, d_model=D, num_heads=H, num_layers=L, d_ff=F, max_len=8)
LLAMA = mn.TransformerConfig(vocab_size=V, d_model=D, num_heads=H, num_layers=L, d_ff=F, max_len=8, layout="llama",
                             num_kv_heads=2, tie_embeddings=False)


def abstract_model(config: mn.TransformerConfig, policy="fp32"):
    """``(graphdef, params)``: the model's graph and its params' shapes and dtypes, traced
    without running an initializer (building the arrays would compile each one)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: mn.TransformerLM(config, policy=mpx.parse_policy(policy),
                                                                          rngs=nnx.Rngs(0))))
    return graphdef, params


def mpx_logits(params: dict, config: mn.TransformerConfig, tokens) -> np.ndarray:
    """mpx's forward (the fp32 policy) of ``params`` (a pure dict), one jitted program."""
    graphdef, state = abstract_model(config)
    nnx.replace_by_pure_dict(state, params)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    return np.asarray(forward(state, np.asarray(tokens)[None]))[0]


# ----------------------------------------------------------------------------- the name maps


def random_params(config, policy="fp32", seed=0) -> dict:
    """The model's params (a pure dict), random, in their param dtype."""
    _, state = abstract_model(config, policy)
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), nnx.to_pure_dict(state))


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("layout, scan, tie", list(itertools.product(["gpt2", "llama"], [False, True], [True, False])))
def test_export_then_import_gives_the_params_bit_for_bit(layout, scan, tie):
    """to_hub -> from_hub is the identity, in the model's own tree (layer indices, a stacked
    layer axis), every tensor named and shaped as the architecture stores it."""
    config = dataclasses.replace(GPT2 if layout == "gpt2" else LLAMA, scan_layers=scan, tie_embeddings=tie)
    params = random_params(config)
    tensors = weights.to_hub(params, config)
    reference = gpt2_checkpoint(prefix="") if layout == "gpt2" else llama_checkpoint()
    reference = {k: a.shape for k, a in reference.items() if not re.search(r"\.attn\.bias$", k)}
    if tie:
        reference.pop("lm_head.weight", None)
    else:
        reference["lm_head.weight"] = (V, D)
    assert {k: a.shape for k, a in tensors.items()} == reference
    back = weights.from_hub(tensors, config, dtype=np.float32)
    want, got = _flat(params), _flat(back)
    assert want.keys() == got.keys()
    assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)


def test_a_bf16_model_goes_through_a_file_in_bf16_and_back_unchanged(tmp_path):
    """The file keeps the params' dtype (BF16 in the header, as PyTorch writes it); read
    back, they are the same bits."""
    config = dataclasses.replace(LLAMA, scan_layers=True)
    params = random_params(config, {"preset": "bf16", "params": "bf16"})
    path = weights.write_safetensors(tmp_path / "m.safetensors", weights.to_hub(params, config), {"note": "x"})
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    assert header["model.embed_tokens.weight"]["dtype"] == "BF16" and header["__metadata__"]["format"] == "pt"
    tensors, metadata = weights.read_safetensors(path)
    assert metadata == {"format": "pt", "note": "x"}
    back = weights.from_hub(tensors, config, dtype=jax.numpy.bfloat16)
    want, got = _flat(params), _flat(back)
    assert all(got[k].dtype == want[k].dtype == jax.numpy.bfloat16 and np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="exists; give a new file"):
        weights.write_safetensors(path, {})


def test_a_gpt2_checkpoint_gives_the_logits_of_gpt2():
    """GPT2LMHeadModel's naming (``transformer.`` prefix, tied head, mask buffers, said and
    skipped) into mpx's gpt2 layout: logits within 2e-5 of the float64 GPT-2 (they are of
    size ~3.5; the float32 forward's rounding measured 1.4e-6; a wrong map is off by ~1)."""
    hub, tokens = gpt2_checkpoint(), [3, 17, 0, 49, 8, 8, 21]
    said = []
    params = weights.from_hub(hub, GPT2, dtype=np.float32, say=said.append)
    assert said == ["skipped 2 tensors that hold no parameters (mpx computes them): transformer.h.0.attn.bias, "
                    "transformer.h.1.attn.bias"]
    want, got = gpt2_logits(hub, tokens), mpx_logits(params, GPT2, tokens)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


@pytest.mark.parametrize("scan", [False, True])
def test_a_llama_checkpoint_gives_the_logits_of_llama(scan):
    """LlamaForCausalLM's naming (q, k, v joined into mpx's qkv kernel, every projection
    transposed, 4 query heads on 2 key/value heads, an untied head), unrolled or stacked
    into a scanned model: logits within 2e-5 of the float64 Llama (size ~4; float32
    rounding measured 1.2e-6; rotary pairs taken as (2i, 2i+1) are off by ~1)."""
    config = dataclasses.replace(LLAMA, scan_layers=scan)
    hub, tokens = llama_checkpoint(), [3, 17, 0, 49, 8, 8, 21]
    want, got = llama_logits(hub, tokens), mpx_logits(weights.from_hub(hub, config, dtype=np.float32), config, tokens)
    assert np.abs(want).max() > 1.0
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_every_problem_of_a_file_is_in_one_error():
    """A missing, a misshaped and an unexpected tensor, a head the tied model has no place
    for: one error naming each, with the shapes."""
    hub = gpt2_checkpoint(prefix="")
    del hub["h.1.mlp.c_fc.bias"]
    hub["h.0.attn.c_proj.weight"] = np.zeros((D, D + 1), np.float32)
    hub["h.0.attn.q_norm.weight"] = np.zeros((D,), np.float32)
    hub["lm_head.weight"] = np.ones((V, D), np.float32)
    with pytest.raises(weights.WeightsError) as raised:
        weights.from_hub(hub, GPT2)
    message = str(raised.value)
    assert "(1 missing, 1 misshaped, 1 unexpected)" in message, message
    for line in ("missing: h.1.mlp.c_fc.bias, expected shape (24,)",
                 "misshaped: h.0.attn.c_proj.weight has shape (16, 17), expected (16, 16)",
                 "unexpected: h.0.attn.q_norm.weight (16,)",
                 "unexpected: lm_head.weight (50, 16), a head of its own, but this model ties its head"):
        assert line in message, message
    untied = dataclasses.replace(GPT2, tie_embeddings=False)
    with pytest.raises(weights.WeightsError, match=r"missing: lm_head.weight, expected shape \(50, 16\) \(a file "
                                                   "without one ties its head to the embedding"):
        weights.from_hub(gpt2_checkpoint(), untied)
    with pytest.raises(weights.WeightsError, match="names its tensors as a llama model does"):
        weights.from_hub(llama_checkpoint(), GPT2)


def test_a_config_the_weights_contradict_is_one_error_naming_its_keys(tmp_path):
    """Read from the file before any tensor is matched: each model.* key the weights
    contradict, with both values."""
    from train.config import load_config
    from train.hub import check_shape

    (tmp_path / "run.yaml").write_text(tiny_lm_run("w", tmp_path))
    config = load_config(tmp_path / "run.yaml", ["model.d_model=32", "model.num_layers=3", "data.seq_len=8",
                                                 "model.layout=llama", "model.num_heads=4"])
    hub = llama_checkpoint()
    with pytest.raises(ValueError) as raised:
        check_shape(hub, config, vocab_size=40, weights="w.safetensors")
    message = str(raised.value)
    for line in ("model.d_model: the weights have 16, the config says 32", "model.num_layers: the weights have 2, "
                 "the config says 3", "model.d_ff: the weights have 24, the config says 64",
                 "model.vocab_size: the weights have 50, the config says null (the tokenizer's 40); set "
                 "model.vocab_size=50", "model.tie_embeddings: the weights have false, the config says true"):
        assert line in message, message
    config = load_config(tmp_path / "run.yaml", ["model.d_model=16", "model.num_layers=2", "model.d_ff=24", "model.max_len=8", "data.seq_len=8",
                                                 "model.layout=llama", "model.num_heads=4",
                                                 "model.tie_embeddings=false"])
    with pytest.raises(ValueError, match="model.num_kv_heads: the weights have 2, the config says null"):
        check_shape(hub, config, vocab_size=50)
    with pytest.raises(ValueError, match="the weights have 50 token rows and the tokenizer 60 ids"):
        check_shape(hub, config, vocab_size=60)


# ----------------------------------------------------------------------------- tokenizers


def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> character table: printable bytes are themselves, the others are
    shifted past 255 in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}


def write_bpe(directory: pathlib.Path, merges=(("t", "h"), ("th", "e"), ("Ġ", "a"), ("o", "r"), ("Ġ", "th"))):
    """A byte-level BPE as GPT-2 ships one: vocab.json (the 256 byte pieces, then each merge's
    result) and merges.txt (a version line, one merge a line)."""
    chars = _byte_chars()
    vocab = {chars[b]: b for b in range(256)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return directory / "vocab.json", directory / "merges.txt"


def test_a_byte_level_bpe_from_vocab_and_merges_round_trips_text(tmp_path):
    vocab, merges = write_bpe(tmp_path / "bpe")
    tok = import_tokenizer([merges, vocab])  # either order
    assert tok.kind == "bpe" and tok.vocab_size == 261
    text = "the thought\n\tthé  naïve 🙂 <|endoftext|>"
    ids = tok.encode(text)
    assert ids[:3] == [257, 260, ord("o")] and tok.decode(ids) == text  # "the", " th", "o"
    assert tok.decode(ids + [999]) == text  # an id past the vocabulary (a padded model row) is skipped
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.encode(text) == ids and again.definition == tok.definition
    assert import_tokenizer([tmp_path / "bpe"]).encode(text) == ids  # a directory holding the pair
    (tmp_path / "bad.txt").write_text("x y\n")
    with pytest.raises(ValueError, match="out of vocabulary"):
        import_tokenizer([vocab, tmp_path / "bad.txt"])
    with pytest.raises(ValueError, match="cannot tell the tokenizer"):
        import_tokenizer([vocab])


def test_a_sentencepiece_model_file_imports(tmp_path):
    trained = SentencePieceTokenizer.train([paragraph(i) for i in range(30)], vocab_size=300)
    directory = tmp_path
    (directory / "tokenizer.model").write_bytes(trained.model_proto)
    text = paragraph(3)
    for given in ([directory / "tokenizer.model"], [directory]):
        tok = import_tokenizer(given)
        assert tok.kind == "sentencepiece" and tok.encode(text) == trained.encode(text) and tok.decode(tok.encode(text)) == text
    (directory / "other.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="cannot read .*other.model as a SentencePiece model"):
        import_tokenizer([directory / "other.model"])


# ----------------------------------------------------------------------------- the commands


def test_an_imported_run_generates_exports_resumes_and_fine_tunes(tmp_path, capsys):
    """import (a GPT-2 file with its BPE; a config it contradicts is refused, leaving nothing)
    -> generate samples the GPT-2's own greedy tokens
    -> export --format safetensors gives the file's tensors back bit for bit -> train resumes
    from step 0 for 2 steps -> the sentiment fine-tune config starts from the imported run
    with its tokenizer."""
    from train.__main__ import main

    vocab, merges = write_bpe(tmp_path / "bpe")
    bpe = import_tokenizer([vocab, merges])
    hub = gpt2_checkpoint(v=bpe.vocab_size, d=32, f=64, layers=1, positions=32)
    path = weights.write_safetensors(tmp_path / "gpt2.safetensors", hub)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(paragraph(i) for i in range(40)))
    (tmp_path / "run.yaml").write_text(tiny_lm_run("imported", tmp_path / "data", precision="fp32"))
    run = tmp_path / "run"
    shape = [f"run_dir={run}", f"data.files=[{corpus}]", "data.batch_size=2", "data.validation_fraction=0.2",
             "model.num_heads=4"]
    files = ["--weights", str(path), "--tokenizer", str(vocab), "--tokenizer", str(merges)]
    assert main(["import", str(tmp_path / "run.yaml"), *shape, "model.d_model=64", *files]) == 2
    assert "model.d_model: the weights have 32, the config says 64" in capsys.readouterr().err and not run.exists()
    assert main(["import", str(tmp_path / "run.yaml"), *shape, *files]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 tensors that hold no parameters" in out and f"into {run} at step 0, tokenizer bpe (261 ids)" in out
    assert (run / "tokenizer" / "vocab.json").is_file() and "imported" in (run / "history.jsonl").read_text()

    prompt = "the other"
    assert main(["generate", str(tmp_path / "run.yaml"), *shape, "--prompt", prompt, "--tokens", "3",
                 "--temperature", "0"]) == 0
    ids = bpe.encode(prompt)
    for _ in range(3):
        ids.append(int(np.argmax(gpt2_logits(hub, ids, heads=4)[-1])))
    assert capsys.readouterr().out.endswith(prompt + bpe.decode(ids[len(bpe.encode(prompt)):]) + "\n")

    assert main(["export", str(tmp_path / "run.yaml"), *shape, "--format", "safetensors",
                 "--out", str(tmp_path / "out.safetensors")]) == 0
    exported, _ = weights.read_safetensors(tmp_path / "out.safetensors")
    original = {k.removeprefix("transformer."): a for k, a in hub.items() if not re.search(r"\.attn\.bias$", k)}
    assert exported.keys() == original.keys() and all(np.array_equal(exported[k], original[k]) for k in original)

    assert main(["train", str(tmp_path / "run.yaml"), *shape, "train.steps=2"]) == 0
    out = capsys.readouterr().out
    assert f"resumed from checkpoint at step 0 in {run}" in out and "finished at step 2" in out, out

    csv = tmp_path / "tweets.csv"
    csv.write_text("text,sentiment\n" + "".join(f"{w} day,{'positive' if i % 2 else 'negative'}\n"
                                                for i, w in enumerate(["good", "bad", "fine", "awful"] * 10)))
    finetune = pathlib.Path(__file__).resolve().parents[1] / "configs" / "finetune_sentiment.yaml"
    tiny = ["model.d_model=32", "model.num_heads=4", "model.num_layers=1", "model.d_ff=64", "model.max_len=32",
            "data.seq_len=32", "data.source=local", f"data.path={csv}", f"data.data_dir={tmp_path / 'data'}",
            "data.batch_size=2", "data.validation_fraction=0.2", "train.steps=2", "train.eval_every=0",
            "train.log_every=1", "optim.warmup_steps=1", "checkpoint.every=2", "logging.tensorboard=false",
            "logging.progress=false", "precision=fp32", "model.dropout=0"]
    assert main(["train", str(finetune), f"finetune.init_from={run}", f"run_dir={tmp_path / 'ft'}", *tiny]) == 0
    out = capsys.readouterr().out
    assert f"encoding with the tokenizer of {run} (bpe, 261 ids)" in out, out
    assert f"fine-tuning from {run} (step 2): body params loaded, new head" in out and "finished at step 2" in out, out
