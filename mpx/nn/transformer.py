"""A GPT-2-style decoder (LM and sequence classifier) whose ops obey a precision policy.

Shapes: B batch, T sequence, D d_model, H heads, K = D // H, F d_ff, V vocab, C classes.
Module paths (what policy rules match): ``embed``, ``pos_embed``, ``blocks/{i}/ln1``,
``blocks/{i}/attn/{qkv,logits,softmax,values,out}``, ``blocks/{i}/ln2``,
``blocks/{i}/mlp/{fc,proj}``, ``ln_f``, ``head`` (LM) or ``classifier``, ``loss``.
With ``scan_layers`` the blocks are one stacked module (every parameter and FP8 meta
gains a leading layer axis) and the paths lose the index: ``blocks/attn/qkv``, ...
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mpx.nn.apply import apply_policy
from mpx.nn.layers import Linear
from mpx.nn.op import CrossEntropy, DotGeneral, Softmax
from mpx.policy import Policy


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape of a decoder. ``tie_embeddings``: the LM head reuses the token embedding.

    ``scan_layers``: build the blocks as one stack (``nnx.vmap``) and run them with
    ``nnx.scan``: one block is compiled instead of ``num_layers``. ``remat``: recompute
    each block's activations in the backward pass (``nnx.remat``) instead of storing them.
    """

    vocab_size: int
    d_model: int
    num_heads: int
    num_layers: int
    d_ff: int
    max_len: int
    dropout: float = 0.0
    tie_embeddings: bool = True
    scan_layers: bool = False
    remat: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}); "
                f"e.g. num_heads={_divisor_hint(self.d_model, self.num_heads)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("tie_embeddings", "scan_layers", "remat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")


def _divisor_hint(d: int, h: int) -> int:
    return min((k for k in range(1, d + 1) if d % k == 0), key=lambda k: abs(k - h))


GPT2_SMALL = TransformerConfig(vocab_size=50257, d_model=768, num_heads=12, num_layers=12, d_ff=3072, max_len=1024)
GPT2_MEDIUM = TransformerConfig(vocab_size=50257, d_model=1024, num_heads=16, num_layers=24, d_ff=4096, max_len=1024)


def _ln(d, policy, rngs):
    return nnx.LayerNorm(d, epsilon=1e-5, param_dtype=policy.param_dtype, rngs=rngs)


class Attention(nnx.Module):
    """Causal multi-head self-attention. x (B, T, D), mask (B, T) bool valid -> (B, T, D)."""

    def __init__(self, config: TransformerConfig, policy: Policy, *, rngs: nnx.Rngs):
        d = config.d_model
        self.num_heads = config.num_heads
        self.qkv = Linear(d, 3 * d, param_dtype=policy.param_dtype, rngs=rngs)
        self.logits = DotGeneral("attention_logits")
        self.softmax = Softmax()
        self.values = DotGeneral("attention_values")
        self.out = Linear(d, d, param_dtype=policy.param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(self, x, mask=None, *, deterministic: bool = True, rngs=None):
        b, t, d = x.shape
        h = self.num_heads
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)  # (B, T, D) each
        q, k, v = (a.reshape(b, t, h, d // h) for a in (q, k, v))  # (B, T, H, K)
        q = q * jnp.asarray(1.0 / jnp.sqrt(d // h), q.dtype)
        logits = self.logits(q, k, (((3,), (3,)), ((0, 2), (0, 2))))  # (B, H, T, S)
        allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if mask is not None:
            allowed = allowed & mask[:, None, None, :]
        # A large finite negative keeps a fully masked row (a padding query) free of NaN.
        logits = jnp.where(allowed, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = self.softmax(logits)
        probs = self.dropout(probs, deterministic=deterministic, rngs=rngs)
        out = self.values(probs, v, (((3,), (1,)), ((0, 1), (0, 2))))  # (B, H, T, K)
        out = out.transpose(0, 2, 1, 3).reshape(b, t, d)
        return self.out(out)


class MLP(nnx.Module):
    """x (B, T, D) -> fc (B, T, F) -> GELU -> proj (B, T, D)."""

    def __init__(self, config: TransformerConfig, policy: Policy, *, rngs: nnx.Rngs):
        self.fc = Linear(config.d_model, config.d_ff, param_dtype=policy.param_dtype, rngs=rngs)
        self.proj = Linear(config.d_ff, config.d_model, param_dtype=policy.param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(self, x, *, deterministic: bool = True, rngs=None):
        h = jax.nn.gelu(self.fc(x), approximate=True)
        return self.dropout(self.proj(h), deterministic=deterministic, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm block: x + attn(ln1(x)), then + mlp(ln2(x)). (B, T, D) -> (B, T, D)."""

    def __init__(self, config: TransformerConfig, policy: Policy, *, rngs: nnx.Rngs):
        self.ln1 = _ln(config.d_model, policy, rngs)
        self.attn = Attention(config, policy, rngs=rngs)
        self.ln2 = _ln(config.d_model, policy, rngs)
        self.mlp = MLP(config, policy, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(self, x, mask=None, *, deterministic: bool = True, rngs=None):
        a = self.attn(self.ln1(x), mask, deterministic=deterministic, rngs=rngs)
        x = x + self.dropout(a, deterministic=deterministic, rngs=rngs).astype(x.dtype)
        return x + self.mlp(self.ln2(x), deterministic=deterministic, rngs=rngs).astype(x.dtype)


def _stacked_blocks(config: TransformerConfig, policy: Policy, rngs: nnx.Rngs) -> Block:
    """``num_layers`` blocks as one module whose every array has a leading layer axis."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return Block(config, policy, rngs=rngs)

    return make(rngs)


class Decoder(nnx.Module):
    """Token + position embeddings, N blocks, final norm. tokens (B, T) -> features (B, T, D)."""

    def __init__(self, config: TransformerConfig, policy: Policy, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.d_model, param_dtype=policy.param_dtype, rngs=rngs)
        self.pos_embed = nnx.Embed(config.max_len, config.d_model, param_dtype=policy.param_dtype, rngs=rngs)
        if config.scan_layers:
            self.blocks = _stacked_blocks(config, policy, rngs)
        else:
            self.blocks = nnx.List([Block(config, policy, rngs=rngs) for _ in range(config.num_layers)])
        self.ln_f = _ln(config.d_model, policy, rngs)
        self.dropout = nnx.Dropout(config.dropout)
        self.loss = CrossEntropy()

    def features(self, tokens, mask=None, *, deterministic: bool = True, rngs=None):
        t = tokens.shape[1]
        if t > self.config.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len {self.config.max_len} of this model")
        x = self.embed(tokens) + self.pos_embed(jnp.arange(t))[None]  # (B, T, D)
        x = self.dropout(x, deterministic=deterministic, rngs=rngs)
        # Each block draws its dropout key from a key of its own: the same in both layouts.
        n = self.config.num_layers
        keys = jax.random.split(rngs.dropout(), n) if rngs is not None and not deterministic else [None] * n

        def run(block, x, key):
            block_rngs = None if key is None else nnx.Rngs(dropout=key)
            return block(x, mask, deterministic=deterministic, rngs=block_rngs)

        if self.config.remat:
            run = nnx.remat(run)
        if self.config.scan_layers:
            keys = None if keys[0] is None else keys

            @nnx.scan(in_axes=(0, nnx.Carry, 0 if keys is not None else None), out_axes=nnx.Carry)
            def scanned(block, x, key):
                return run(block, x, key)

            x = scanned(self.blocks, x, keys)
        else:
            for block, key in zip(self.blocks, keys):
                x = run(block, x, key)
        return self.ln_f(x)


class TransformerLM(Decoder):
    """Decoder LM. tokens (B, T) int -> logits (B, T, V). Built under ``policy``."""

    def __init__(self, config: TransformerConfig, *, policy: Policy, rngs: nnx.Rngs):
        super().__init__(config, policy, rngs=rngs)
        if config.tie_embeddings:
            self.head = DotGeneral("head")
        else:
            self.head = Linear(config.d_model, config.vocab_size, kind="head", use_bias=False,
                               param_dtype=policy.param_dtype, rngs=rngs)
        apply_policy(self, policy)

    def __call__(self, tokens, mask=None, *, deterministic: bool = True, rngs=None):
        x = self.features(tokens, mask, deterministic=deterministic, rngs=rngs)
        if isinstance(self.head, DotGeneral):
            return self.head(x, self.embed.embedding[...], (((2,), (1,)), ((), ())))  # (B, T, V)
        return self.head(x)


class SequenceClassifier(Decoder):
    """Decoder + mean pooling over valid tokens + linear classifier.

    tokens (B, T) int, mask (B, T) bool -> logits (B, C). Padding positions (mask False)
    affect neither attention nor pooling. Its body's paths equal `TransformerLM`'s, so a
    pre-trained LM's parameters load into it directly.
    """

    def __init__(self, config: TransformerConfig, num_classes: int, *, policy: Policy, rngs: nnx.Rngs):
        super().__init__(config, policy, rngs=rngs)
        self.classifier = Linear(config.d_model, num_classes, kind="head", param_dtype=policy.param_dtype, rngs=rngs)
        apply_policy(self, policy)

    def __call__(self, tokens, mask=None, *, deterministic: bool = True, rngs=None):
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        x = self.features(tokens, mask, deterministic=deterministic, rngs=rngs).astype(jnp.float32)
        w = mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)  # (B, D)
        return self.classifier(pooled)
