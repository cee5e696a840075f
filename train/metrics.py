"""Throughput and model-FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / (devices x peak dense BF16 FLOP/s of one device).
Model FLOPs per token (forward + backward, nanoGPT / PaLM appendix B):

    6 * N  +  12 * L * T * D

with N the parameters outside the embeddings (the matmul weights every token goes
through; the tied head counts), L layers, T sequence length, D d_model; the second
term is the attention score and value matmuls. Peak BF16 is the reference also for
FP8 runs, so FP8's gain shows as MFU above what BF16 can reach. On a device whose peak
is not known (a CPU) MFU is not reported.
"""

from __future__ import annotations

import jax
import numpy as np

# Dense BF16 peak FLOP/s per device, from the vendors' data sheets (SXM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def peak_flops(device: jax.Device | None = None) -> float | None:
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in kind:
            return flops
    return None


def embedding_params(shape) -> int:
    """The parameters of a `mpx.nn.TransformerConfig` that a token reads by lookup, not by a
    matmul: the position table (gpt2 layout; the llama layout has none) and, with an untied
    head, the token embedding (the head's own kernel is the vocabulary matmul)."""
    positions = shape.max_len * shape.d_model if shape.layout == "gpt2" else 0
    return positions + (0 if shape.tie_embeddings else shape.vocab_size * shape.d_model)


def flops_per_token(params, *, num_layers: int, seq_len: int, d_model: int, embedding_params: int) -> float:
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) - embedding_params
    return 6.0 * n + 12.0 * num_layers * seq_len * d_model


def mfu(tokens_per_second: float, flops_token: float, *, devices: int, peak: float | None) -> float | None:
    if peak is None:
        return None
    return tokens_per_second * flops_token / (devices * peak)
