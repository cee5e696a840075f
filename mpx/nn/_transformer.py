"""A decoder (LM and sequence classifier) whose ops obey a precision policy, in two layouts.

* ``gpt2``: learned position table, LayerNorm, GELU MLP (``fc``, ``proj``), biases.
* ``llama``: rotary positions (no table), RMSNorm, SwiGLU MLP (``gate``, ``up``, ``down``),
  no biases.

Either layout's attention may group its heads (``num_kv_heads`` < ``num_heads``).

Shapes: B batch, T sequence, D d_model, H heads, G key/value heads, K = D // H, F d_ff,
V vocab, C classes. Module paths (what policy rules match): ``embed``, ``pos_embed``
(gpt2), ``blocks/{i}/ln1``, ``blocks/{i}/attn/{qkv,logits,softmax,values,out}``,
``blocks/{i}/ln2``, ``blocks/{i}/mlp/{fc,proj}`` (gpt2) or ``blocks/{i}/mlp/{gate,up,down}``
(llama), ``ln_f``, ``head`` (LM) or ``classifier``, ``loss``. With ``scan_layers`` the
blocks are one stacked module (every parameter and FP8 meta gains a leading layer axis)
and the paths lose the index: ``blocks/attn/qkv``, ...
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mpx import _probe, program
from mpx._checks import did_you_mean, is_int, is_positive_finite
from mpx._naming import op_scope
from mpx._sharding import mark
from mpx.nn._apply import apply_nnx
from mpx.fp8 import keeping_weights_whole, remat_saving_fp8, saved_in_fp8
from mpx.nn._kvcache import KVCache, LayerKV, load, place, store
from mpx.nn._layers import Linear
from mpx.nn._op_modules import CrossEntropy, DotGeneral, Softmax
from mpx.nn._rotary import apply_rotary, rotary_angles
from mpx.nn._sharding import KEYS_VALUES, QUERIES, RESIDUAL
from mpx.policy import OpPrecision, Policy


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape of a decoder. ``tie_embeddings``: the LM head reuses the token embedding.

    ``layout``: ``gpt2`` (learned positions, LayerNorm, GELU MLP, biases) or ``llama``
    (rotary positions of base ``rope_base``, RMSNorm, SwiGLU MLP, no biases; ``max_len``
    only bounds the sequence). ``num_kv_heads``: key/value heads, a divisor of
    ``num_heads`` whose query heads share them in groups (grouped-query attention; 1:
    multi-query; None: ``num_heads``, plain multi-head). ``norm_eps``: the epsilon of
    every norm.

    ``scan_layers``: build the blocks as one stack (``nnx.vmap``) and run them with
    ``nnx.scan``: one block is compiled instead of ``num_layers``. ``remat``: recompute
    each block's activations in the backward pass (``nnx.remat``) instead of storing them.
    ``remat_policy`` (with ``remat``): what the recomputation keeps: ``full`` nothing but
    each block's input; ``fp8`` also what the block's FP8 ops save for their backward (the
    E4M3 codes of each matmul's operands, weights included, and of `saved_in_fp8`'s
    inputs: `mpx.fp8.remat_saving_fp8`), so the backward requantizes nothing and, under
    FSDP, gathers no weight again; the rest (norms, attention, the matmuls' outputs) is
    recomputed. It needs per-tensor FP8 ops (the row / block / mx recipes save their
    operands in the compute dtype).
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
    remat_policy: str = "full"
    layout: str = "gpt2"
    num_kv_heads: int | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``num_kv_heads``, or ``num_heads`` when it is None."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff", "max_len"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads}); "
                f"e.g. num_heads={_divisor_hint(self.d_model, self.num_heads)} "
                f"or d_model={max(self.num_heads, round(self.d_model / self.num_heads) * self.num_heads)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        for name in ("tie_embeddings", "scan_layers", "remat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {', '.join(map(repr, REMAT_POLICIES))}, "
                             f"got {self.remat_policy!r}{did_you_mean(self.remat_policy, REMAT_POLICIES)}")
        if self.remat_policy != "full" and not self.remat:
            raise ValueError(f"remat_policy={self.remat_policy!r} says what recomputation keeps, but remat is off: "
                             "set remat=True, or leave remat_policy at 'full'")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {self.layout!r}"
                             f"{did_you_mean(self.layout, LAYOUTS)}")
        if self.num_kv_heads is not None and (not is_int(self.num_kv_heads) or self.num_kv_heads < 1):
            raise ValueError(f"num_kv_heads must be a positive integer or null (num_heads), got {self.num_kv_heads!r}")
        if self.num_heads % self.kv_heads:
            divisors = [k for k in range(1, self.num_heads + 1) if self.num_heads % k == 0]
            raise ValueError(f"num_kv_heads ({self.kv_heads}) must divide num_heads ({self.num_heads}); "
                             f"e.g. num_kv_heads={_divisor_hint(self.num_heads, self.kv_heads)} "
                             f"(one of {', '.join(map(str, divisors))})")
        if not is_positive_finite(self.norm_eps):
            raise ValueError(f"norm_eps must be a positive number, got {self.norm_eps!r}")
        if not is_positive_finite(self.rope_base) or self.rope_base <= 1:
            raise ValueError(f"rope_base must be a number > 1 (Llama uses 10000 or 500000), got {self.rope_base!r}")
        if self.layout == "gpt2" and self.rope_base != 10000.0:
            raise ValueError(f"rope_base ({self.rope_base}) sets rotary positions, which layout='gpt2' does not have "
                             "(it learns a position table): set layout='llama', or leave rope_base at 10000")
        if self.layout == "llama" and (self.d_model // self.num_heads) % 2:
            raise ValueError(f"d_model // num_heads ({self.d_model // self.num_heads}) must be even with layout='llama' "
                             f"(rotary positions turn each head's features in pairs); e.g. d_model="
                             f"{self.d_model + self.num_heads}")


LAYOUTS = ("gpt2", "llama")
REMAT_POLICIES = ("full", "fp8")


def _divisor_hint(d: int, h: int) -> int:
    return min((k for k in range(1, d + 1) if d % k == 0), key=lambda k: abs(k - h))


GPT2_SMALL = TransformerConfig(vocab_size=50257, d_model=768, num_heads=12, num_layers=12, d_ff=3072, max_len=1024)
GPT2_MEDIUM = TransformerConfig(vocab_size=50257, d_model=1024, num_heads=16, num_layers=24, d_ff=4096, max_len=1024)


def _norm(config: TransformerConfig, policy: Policy, rngs: nnx.Rngs) -> nnx.Module:
    """The layout's norm over D. Its statistics are float32 whatever its dtype (Flax's
    norms promote them), and the presets run the whole norm in fp32."""
    norm = nnx.RMSNorm if config.layout == "llama" else nnx.LayerNorm
    return norm(config.d_model, epsilon=config.norm_eps, param_dtype=policy.param_dtype, rngs=rngs)


# fp16 stays explicit: jax's XLA attention asks for an F16_F16_F32 dot, which CPU and TPU
# reject when compiled under jit (jax 0.10, 0.11).
_FUSED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def fused_attention_allowed(logits: OpPrecision | None, softmax: OpPrecision | None,
                            values: OpPrecision | None) -> bool:
    """Whether ``jax.nn.dot_product_attention`` computes what these three ops were given.

    It multiplies q k^T and probs v in the dtype of its inputs (with f32 logits) and takes
    the softmax in f32: so both matmuls must be neither fp8 nor int8 and share a dtype
    (bf16 or fp32; see `_FUSED_DTYPES` for fp16), and the softmax must be fp32 (every
    preset's choice).
    Before a policy was applied (``None``) nothing is decided and the explicit path runs.
    """
    if logits is None or softmax is None or values is None:
        return False
    if logits.is_quantized or values.is_quantized:
        return False
    dtype = jnp.dtype(logits.dtype)
    return dtype == jnp.dtype(values.dtype) and dtype in _FUSED_DTYPES and softmax.precision == "fp32"


class Attention(nnx.Module):
    """Causal multi-head self-attention. x (B, T, D), mask (B, T) bool valid -> (B, T, D).

    One ``qkv`` projection gives H query heads and G key/value heads (grouped-query
    attention when G < H: query head h reads key/value head h // (H / G)). In the llama
    layout queries and keys are turned by their positions (`mpx.nn._rotary`) and no
    projection has a bias.

    Two paths, the same ops for the policy (``logits``, ``softmax``, ``values`` stay named
    op modules either way, so rules and `mpx.inspect.describe` see them):

    * fused: ``jax.nn.dot_product_attention`` when `fused_attention_allowed` says it gives
      what the policy asks (bf16 or fp32 matmuls, fp32 softmax) and no dropout is
      applied to the attention probabilities (the fused kernel has none);
    * explicit: softmax(q k^T) v through the three op modules, materialising the fp32
      (B, H, T, S) probabilities; fp8, int8 or fp16 attention matmuls and attention dropout
      run here.

    A padding query (mask False) with no valid key at or before it (left padding) has
    nothing to attend to. The explicit path gives it a uniform row (a large finite
    negative, not -inf); the fused path lets it attend to itself, so no row is empty on
    any backend. Either way its output is finite, and as a key it stays masked for every
    other query, so it never reaches a valid position. Every other row is the same
    softmax on both paths.
    """

    def __init__(self, config: TransformerConfig, policy: Policy, *, rngs: nnx.Rngs):
        d = config.d_model
        self.num_heads, self.num_kv_heads = config.num_heads, config.kv_heads
        self.rope_base = config.rope_base if config.layout == "llama" else None  # None: no rotary positions
        bias = config.layout == "gpt2"
        qkv_features = (self.num_heads + 2 * self.num_kv_heads) * (d // self.num_heads)
        self.qkv = Linear(d, qkv_features, use_bias=bias, param_dtype=policy.param_dtype, rngs=rngs)
        self.logits = DotGeneral("attention_logits")
        self.softmax = Softmax()
        self.values = DotGeneral("attention_values")
        self.out = Linear(d, d, use_bias=bias, param_dtype=policy.param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout)

    def uses_fused(self, *, deterministic: bool = True) -> bool:
        """Whether a call with this ``deterministic`` takes the fused path. Never while
        `mpx.inspect.sensitivity` traces the model: it measures the two attention matmuls,
        which only the explicit path runs as ops of their own."""
        dropout_active = self.dropout.rate > 0 and not deterministic
        allowed = fused_attention_allowed(self.logits.precision, self.softmax.precision, self.values.precision)
        return allowed and not dropout_active and _probe.active() is None

    def __call__(self, x, mask=None, *, deterministic: bool = True, rngs=None):
        b, t, d = x.shape
        q, k, v = self._project(x, jnp.arange(t))
        if self.uses_fused(deterministic=deterministic):
            if mask is not None:
                # Valid keys; a query with none at or before it (a leading padding query)
                # attends to itself instead, so no row is empty whatever the backend does there.
                mask = mask.astype(bool)
                empty = jnp.cumsum(mask, axis=1) == 0  # (B, T)
                mask = mask[:, None, :] | (empty[:, :, None] & jnp.eye(t, dtype=bool))  # (B, T, S)
            out = self._fused(q, k, v, mask)  # (B, T, H, K)
        else:
            mask = None if mask is None else mask.astype(bool)[:, None, :]  # (B, 1, S)
            out = self._explicit(q, k, v, mask, deterministic=deterministic, rngs=rngs)  # (B, T, H, K)
        return self.out(out.reshape(b, t, d))

    def cached(self, x, layer: LayerKV, *, positions, start, allowed):
        """Attention of new tokens over a cache: x (B, T, D) at ``positions`` (B, T) -> (out
        (B, T, D), layer).

        Their keys and values are written into this layer's cache ``layer`` (B, S, G, K)
        from slot ``start`` (B,) of each row (`mpx.nn._kvcache.store`), and each token
        attends to the slots ``allowed`` (B, T, S) gives it (`mpx.nn._kvcache.place`). The
        same ``qkv``, ``logits``, ``softmax``, ``values`` and ``out`` ops as a full call, on
        the same path (fused or explicit); an FP8 op's meta is only read (delayed scaling
        quantizes with the stored scale).
        """
        b, t, d = x.shape
        q, k, v = self._project(x, positions)
        layer = store(layer, k, v, start)
        keys, values = load(layer, k.dtype)
        if self.uses_fused():
            out = self._fused(q, keys, values, allowed, causal=False)
        else:
            out = self._explicit(q, keys, values, allowed, causal=False, deterministic=True, rngs=None)
        return self.out(out.reshape(b, t, d)), layer

    def _project(self, x, positions):
        """x (B, T, D) -> q (B, T, H, K), k, v (B, T, G, K); q and k turned by ``positions``
        ((T,) or (B, T)) in the llama layout."""
        b, t, d = x.shape
        h, g, kd = self.num_heads, self.num_kv_heads, d // self.num_heads
        q, k, v = jnp.split(self.qkv(x), [h * kd, (h + g) * kd], axis=-1)  # (B, T, H*K), (B, T, G*K) x 2
        q, k, v = q.reshape(b, t, h, kd), k.reshape(b, t, g, kd), v.reshape(b, t, g, kd)
        if self.rope_base is not None:
            cos, sin = rotary_angles(positions, kd, self.rope_base)  # (T, K/2) or (B, T, K/2) each
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return mark(q, QUERIES), mark(k, KEYS_VALUES), mark(v, KEYS_VALUES)

    def _fused(self, q, k, v, mask, *, causal: bool = True):
        """q (B, T, H, K), k, v (B, S, G, K) -> (B, T, H, K) by ``jax.nn.dot_product_attention``
        (which groups the query heads itself when G < H). ``mask`` (B, T, S) bool or None:
        the keys each query may read, besides the causal mask when ``causal``.

        On a GPU (bf16/fp16) cuDNN flash attention, else, or where cuDNN refuses the shape,
        jax's XLA path (``implementation=None`` is XLA as of jax 0.11). The (B, 1, T, S)
        mask is a shape cuDNN accepts.
        """
        dtype = self.logits.dtype
        q, k, v = (a.astype(dtype) for a in (q, k, v))
        allowed = None if mask is None else mask[:, None]  # (B, 1, T, S)
        attend = functools.partial(jax.nn.dot_product_attention, q, k, v, mask=allowed,
                                   scale=1.0 / float(q.shape[-1]) ** 0.5, is_causal=causal)
        # Named as the logits op: its matmuls are this layer's policy ops (mpx.capture and
        # fp8_gemms read the name), not matmuls left outside the policy.
        with jax.named_scope(op_scope(self.logits.precision.path)):
            if program.platform_of(q) == "gpu" and dtype != jnp.float32:
                try:  # cuDNN flash attention; jax's default (None) is its XLA path
                    return attend(implementation="cudnn")
                except (NotImplementedError, ValueError, RuntimeError):
                    pass  # a shape or version cuDNN does not take: the XLA path below
            return attend(implementation=None)

    def _explicit(self, q, k, v, mask, *, causal: bool = True, deterministic, rngs):
        """q (B, T, H, K), k, v (B, S, G, K) -> (B, T, H, K) through the logits, softmax and
        values ops; ``mask`` as for `_fused` ((B, 1, S) broadcasts over the queries). Each
        key/value head is repeated for the H / G query heads of its group (the (B, H, T, S)
        probabilities this path materialises are far larger anyway)."""
        t, s, kdim = q.shape[1], k.shape[1], q.shape[-1]
        group = q.shape[2] // k.shape[2]
        if group > 1:
            k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)  # (B, S, H, K)
        q = q * jnp.asarray(1.0 / jnp.sqrt(kdim), q.dtype)
        logits = self.logits(q, k, (((3,), (3,)), ((0, 2), (0, 2))))  # (B, H, T, S)
        allowed = jnp.tril(jnp.ones((t, s), bool))[None, None] if causal else jnp.ones((1, 1, t, s), bool)
        if mask is not None:
            allowed = allowed & mask[:, None]
        # A large finite negative keeps a fully masked row (a padding query) free of NaN;
        # finite in the softmax's dtype too (float32's min would become -inf in bf16/fp16).
        lowest = jnp.finfo(self.softmax.dtype or jnp.float32).min
        logits = jnp.where(allowed, logits.astype(jnp.float32), lowest)
        probs = self.softmax(logits)
        probs = self.dropout(probs, deterministic=deterministic, rngs=rngs)
        out = self.values(probs, v, (((3,), (1,)), ((0, 1), (0, 2))))  # (B, H, T, K)
        return out.transpose(0, 2, 1, 3)  # (B, T, H, K)


class MLP(nnx.Module):
    """x (B, T, D) -> fc (B, T, F) -> GELU -> proj (B, T, D)."""

    def __init__(self, config: TransformerConfig, policy: Policy, *, rngs: nnx.Rngs):
        self.fc = Linear(config.d_model, config.d_ff, param_dtype=policy.param_dtype, rngs=rngs)
        self.proj = Linear(config.d_ff, config.d_model, param_dtype=policy.param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(self, x, *, deterministic: bool = True, rngs=None):
        h = _activation(self.fc, functools.partial(jax.nn.gelu, approximate=True), self.fc(x))
        return self.dropout(self.proj(h), deterministic=deterministic, rngs=rngs)


class SwiGLU(nnx.Module):
    """x (B, T, D) -> down(silu(gate(x)) * up(x)) (B, T, D); gate, up (B, T, F); no biases."""

    def __init__(self, config: TransformerConfig, policy: Policy, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_ff
        self.gate = Linear(d, f, use_bias=False, param_dtype=policy.param_dtype, rngs=rngs)
        self.up = Linear(d, f, use_bias=False, param_dtype=policy.param_dtype, rngs=rngs)
        self.down = Linear(f, d, use_bias=False, param_dtype=policy.param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(self, x, *, deterministic: bool = True, rngs=None):
        h = _activation(self.gate, lambda g, u: jax.nn.silu(g) * u, self.gate(x), self.up(x))
        return self.dropout(self.down(h), deterministic=deterministic, rngs=rngs)


def _activation(first: Linear, fn, *xs):
    """``fn(*xs)``, the MLP's activation of its first matmul's output; its inputs kept for the
    backward as E4M3 copies (`mpx.fp8.saved_in_fp8`) when that matmul is fp8 and its config
    says ``saved_activations=fp8``."""
    op = getattr(first.dot_general, "precision", None)
    if op is not None and op.is_fp8 and op.fp8.saved_activations == "fp8":
        return saved_in_fp8(fn, *xs)
    return fn(*xs)


class Block(nnx.Module):
    """Pre-norm block: x + attn(ln1(x)), then + mlp(ln2(x)). (B, T, D) -> (B, T, D).
    The layout picks the norms (LayerNorm or RMSNorm) and the MLP (GELU or SwiGLU)."""

    def __init__(self, config: TransformerConfig, policy: Policy, *, rngs: nnx.Rngs):
        self.ln1 = _norm(config, policy, rngs)
        self.attn = Attention(config, policy, rngs=rngs)
        self.ln2 = _norm(config, policy, rngs)
        self.mlp = (SwiGLU if config.layout == "llama" else MLP)(config, policy, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(self, x, mask=None, *, deterministic: bool = True, rngs=None):
        x = mark(x, RESIDUAL)
        a = self.attn(self.ln1(x), mask, deterministic=deterministic, rngs=rngs)
        return self._rest(x, a, deterministic=deterministic, rngs=rngs)

    def cached(self, x, layer: LayerKV, **placement):
        """The block over new tokens whose attention reads and extends this layer's cache
        (`Attention.cached`): (x, layer) -> (x, layer)."""
        a, layer = self.attn.cached(self.ln1(x), layer, **placement)
        return self._rest(x, a), layer

    def _rest(self, x, a, *, deterministic: bool = True, rngs=None):
        """The residuals around the attention output ``a`` and the MLP."""
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
    """Token embeddings (+ learned positions in the gpt2 layout), N blocks, final norm.
    tokens (B, T) -> features (B, T, D)."""

    def __init__(self, config: TransformerConfig, policy: Policy, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.d_model, param_dtype=policy.param_dtype, rngs=rngs)
        if config.layout == "gpt2":  # the llama layout turns q and k in each attention instead
            self.pos_embed = nnx.Embed(config.max_len, config.d_model, param_dtype=policy.param_dtype, rngs=rngs)
        if config.scan_layers:
            self.blocks = _stacked_blocks(config, policy, rngs)
        else:
            self.blocks = nnx.List([Block(config, policy, rngs=rngs) for _ in range(config.num_layers)])
        self.ln_f = _norm(config, policy, rngs)
        self.dropout = nnx.Dropout(config.dropout)
        self.loss = CrossEntropy()

    def _remat_policy(self):
        """The ``nnx.remat`` policy of ``config.remat_policy``; ``fp8`` only where some op
        of the blocks saves per-tensor FP8 copies (else it would recompute all, silently)."""
        if self.config.remat_policy == "full":
            return None
        ops = [op.precision for _, op in nnx.iter_graph(self.blocks) if isinstance(op, DotGeneral)]
        if not any(op is not None and op.is_fp8 and op.fp8.per_tensor for op in ops):
            raise ValueError("remat_policy='fp8' keeps the FP8 copies of per-tensor FP8 matmuls, and no matmul of "
                             "the blocks is one under this policy (bf16/int8 ops, or the row/block/mx recipes, "
                             "which save their operands in the compute dtype): use remat_policy='full'")
        return remat_saving_fp8()

    def features(self, tokens, mask=None, *, deterministic: bool = True, rngs=None):
        t = tokens.shape[1]
        if t > self.config.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len {self.config.max_len} of this model")
        x = self.dropout(self._embed(tokens, jnp.arange(t)), deterministic=deterministic, rngs=rngs)
        # Each block draws its dropout key from a key of its own: the same in both layouts.
        n = self.config.num_layers
        keys = jax.random.split(rngs.dropout(), n) if rngs is not None and not deterministic else [None] * n

        keep_fp8 = self.config.remat and self.config.remat_policy == "fp8"

        def run(block, x, key):
            block_rngs = None if key is None else nnx.Rngs(dropout=key)
            # what remat keeps of a weight is its gathered FP8 codes (under FSDP), not a shard
            with keeping_weights_whole() if keep_fp8 else contextlib.nullcontext():
                return block(x, mask, deterministic=deterministic, rngs=block_rngs)

        if self.config.remat:
            run = nnx.remat(run, policy=self._remat_policy())
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

    def features_cached(self, tokens, cache: KVCache, mask=None):
        """tokens (B, T) appended to ``cache`` (mask (B, T) bool: the valid ones, default
        all) -> (features (B, T, D), the cache with them). Inference only: no dropout."""
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        placement, cache = place(cache, mask)
        where = placement._asdict()
        x = self._embed(tokens, placement.positions)
        layers = cache.layers()
        if self.config.scan_layers:
            @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
            def scanned(block, x, layer):
                return block.cached(x, layer, **where)

            x, layers = scanned(self.blocks, x, layers)
        else:
            for i, block in enumerate(self.blocks):
                x, layer = block.cached(x, jax.tree.map(lambda a: a[i], layers), **where)
                layers = jax.tree.map(lambda a, new: a.at[i].set(new), layers, layer)
        return self.ln_f(x), cache.with_layers(layers)

    def init_cache(self, batch: int, length: int | None = None, *, int8: bool = False) -> KVCache:
        """An empty `KVCache` for ``batch`` rows of ``length`` slots (default and at most
        ``max_len``), in the dtype the blocks' ``qkv`` projection computes in, or (``int8``)
        as int8 codes with a scale per token and head, read in that dtype."""
        c = self.config
        length = c.max_len if length is None else length
        if not is_int(length) or not 1 <= length <= c.max_len:
            raise ValueError(f"cache length must be an integer in [1, max_len={c.max_len}] (positions beyond the "
                             f"model's max_len were never trained), got {length!r}")
        qkv = (self.blocks.attn if c.scan_layers else self.blocks[0].attn).qkv
        return KVCache.init(layers=c.num_layers, batch=batch, length=length, kv_heads=c.kv_heads,
                            head_dim=c.d_model // c.num_heads, dtype=qkv.dtype or qkv.param_dtype, int8=int8)

    def _embed(self, tokens, positions):
        """tokens (B, T) at ``positions`` ((T,) or (B, T)) -> (B, T, D): the token embedding,
        plus the position table's rows in the gpt2 layout."""
        x = self.embed(tokens)
        if self.config.layout == "gpt2":  # the llama layout turns q and k in each attention instead
            x = x + self.pos_embed(positions)
        return x


class TransformerLM(Decoder):
    """Decoder LM. tokens (B, T) int -> logits (B, T, V). Built under ``policy``."""

    def __init__(self, config: TransformerConfig, *, policy: Policy, rngs: nnx.Rngs):
        super().__init__(config, policy, rngs=rngs)
        if config.tie_embeddings:
            self.head = DotGeneral("head")
        else:
            self.head = Linear(config.d_model, config.vocab_size, kind="head", use_bias=False,
                               param_dtype=policy.param_dtype, rngs=rngs)
        apply_nnx(self, policy)

    def __call__(self, tokens, mask=None, *, deterministic: bool = True, rngs=None):
        return self._logits(self.features(tokens, mask, deterministic=deterministic, rngs=rngs))

    def decode(self, tokens, cache: KVCache, mask=None):
        """tokens (B, T) appended to ``cache`` -> (logits (B, T, V), the cache with them).

        Over a prompt (``mask``: its valid tokens, padded on either side) this is the
        prefill; with one token per row, a decode step. Logits equal a full call's on the
        whole sequence (up to float rounding), at a cost of T positions instead of all.
        Each row needs room for the T tokens (``cache.index + T <= cache.length``; padding
        takes slots too): a write past the end is clamped back over older tokens (the
        index is traced, so this is not checked).

        >>> import mpx, mpx.nn as mn
        >>> from flax import nnx
        >>> lm = mn.TransformerLM(mn.TransformerConfig(vocab_size=32, d_model=16, num_heads=2, num_layers=1,
        ...                       d_ff=32, max_len=8), policy=mpx.parse_policy("fp32"), rngs=nnx.Rngs(0))
        >>> tokens = jnp.array([[3, 1, 4, 1, 5]])
        >>> logits, cache = lm.decode(tokens[:, :4], lm.init_cache(1))
        >>> step, cache = lm.decode(tokens[:, 4:], cache)
        >>> bool(jnp.allclose(step[:, 0], lm(tokens)[:, 4], atol=1e-5)), cache.index.tolist()
        (True, [5])
        """
        x, cache = self.features_cached(tokens, cache, mask)
        return self._logits(x), cache

    def _logits(self, x):
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
        apply_nnx(self, policy)

    def __call__(self, tokens, mask=None, *, deterministic: bool = True, rngs=None):
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        x = self.features(tokens, mask, deterministic=deterministic, rngs=rngs).astype(jnp.float32)
        w = mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(x * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)  # (B, D)
        return self.classifier(pooled)

