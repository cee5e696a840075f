"""How to store Adam's second moment in 8 bits: three forms against f32 moments.

    python results/optim_second_moment.py > results/optim_second_moment.json

A 2-layer MLP (64-256-256-16, GELU) regresses a fixed random teacher MLP of the same
shape plus noise; AdamW at lr 3e-3, b2 0.999, weight decay 1e-4, batches of 128, 300
steps, seed 0. The first moment is E4M3 with block absmax scales (blocks of 128) in every
form; the second is:

* ``nu``: nu itself, E4M3, block absmax;
* ``sqrt``: sqrt(nu), E4M3, block absmax (squared back when read);
* ``coat``: (x / amax)^k with one k per block chosen so that the block's range
  (max / smallest nonzero) fills E4M3's normal range 448 / 2**-6, at most 16, then E4M3
  (read back as amax * y^(1/k)); the dynamic range expansion of COAT (Xi et al., 2024),
  `mpx.optim._blocks.quantize_expanded`;

each with nonzero values never stored as 0 (``floor``), and ``nu`` also without it, to
show why that matters. Reported per form: the final training loss against f32 moments'
(each form trains on its own), and the update error: along the f32 run, a shadow state of
the form fed the same gradients gives its update, compared with the f32 update by
``|u - u_f32| / |u_f32|`` over all parameters (the mean over steps, and the largest), and
how many second-moment elements read back as 0 where f32's is not.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mpx.optim import _adam, _blocks

STEPS, LR, B2, WD, BATCH, BLOCK = 300, 3e-3, 0.999, 1e-4, 128, 128
SIZES = (64, 256, 256, 16)


def mlp_init(key):
    params = {}
    for i, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        key, k = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(k, (n_in, n_out)) / np.sqrt(n_in)
        params[f"b{i}"] = jnp.zeros((n_out,))
    return params


def mlp(params, x):
    for i in range(len(SIZES) - 1):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < len(SIZES) - 2:
            x = jax.nn.gelu(x)
    return x


def loss_fn(params, batch):
    x, y = batch
    return jnp.mean(jnp.square(mlp(params, x) - y))


def batches(key, teacher):
    for step in range(STEPS):
        kx, kn = jax.random.split(jax.random.fold_in(key, step))
        x = jax.random.normal(kx, (BATCH, SIZES[0]))
        yield x, mlp(teacher, x) + 0.05 * jax.random.normal(kn, (BATCH, SIZES[-1]))


def forms():
    """name -> (first, second moment codec): each second-moment form beside f32's first
    moment (its own error), then the first moment alone in E4M3, then both together."""
    f32, _ = _adam.codecs("f32", BLOCK)
    mu = _adam.fp8_codec(BLOCK)
    nu_plain = lambda floor: _adam.Codec(lambda x: _blocks.quantize(x, BLOCK, floor=floor),  # noqa: E731
                                         _blocks.dequantize)
    sqrt = _adam.Codec(lambda x: _blocks.quantize(jnp.sqrt(x), BLOCK, floor=True),
                       lambda q: jnp.square(_blocks.dequantize(q)))
    coat = _adam.fp8_expanded_codec(BLOCK)  # mpx.optim's choice
    return {
        "nu": (f32, nu_plain(True)),
        "nu_no_floor": (f32, nu_plain(False)),
        "sqrt": (f32, sqrt),
        "coat": (f32, coat),
        "mu_only": (mu, f32),
        "mu+nu": (mu, nu_plain(True)),
        "mu+sqrt": (mu, sqrt),
        "mu+coat": (mu, coat),
        "bf16 (reference)": _adam.codecs("bf16", BLOCK),
    }


def optimizer(mu_codec, nu_codec):
    return optax.chain(_adam.scale_by_adam_with(mu_codec, nu_codec, b1=0.9, b2=B2, eps=1e-8),
                       optax.add_decayed_weights(WD), optax.scale_by_learning_rate(LR))


def train(opt, params, data):
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for batch in data:
        params, state, loss = step(params, state, batch)
        losses.append(float(loss))
    return losses


def shadow_errors(reference, form, nu_codec, params, data):
    """Along ``reference``'s run, ``form`` fed the same gradients: per-step update error and
    second-moment elements read back as 0 where the reference's are not."""
    ref_state, state = reference.init(params), form.init(params)

    @jax.jit
    def step(params, ref_state, state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        ref_updates, ref_state = reference.update(grads, ref_state, params)
        updates, state = form.update(grads, state, params)
        diff = optax.tree.norm(jax.tree.map(jnp.subtract, updates, ref_updates)) / optax.tree.norm(ref_updates)
        nu_form = _adam._decode(nu_codec, grads, state[0].nu)
        zeros = sum(jnp.sum((v == 0) & (r > 0)) for v, r in zip(jax.tree.leaves(nu_form),
                                                                 jax.tree.leaves(ref_state[0].nu)))
        return optax.apply_updates(params, ref_updates), ref_state, state, diff, zeros

    errors, zeros = [], 0
    for batch in data:
        params, ref_state, state, diff, z = step(params, ref_state, state, batch)
        errors.append(float(diff))
        zeros = max(zeros, int(z))
    return errors, zeros


def main():
    key = jax.random.key(0)
    params = mlp_init(jax.random.fold_in(key, 1))
    teacher = mlp_init(jax.random.fold_in(key, 2))
    data = list(batches(jax.random.fold_in(key, 3), teacher))
    f32 = optimizer(*_adam.codecs("f32", BLOCK))
    f32_losses = train(f32, params, data)
    final = lambda losses: float(np.mean(losses[-20:]))  # noqa: E731 - one batch's loss is noisy
    rows = {"f32": {"final_loss": final(f32_losses)}}
    for name, (mu_codec, nu_codec) in forms().items():
        losses = train(optimizer(mu_codec, nu_codec), params, data)
        errors, zeros = shadow_errors(f32, optimizer(mu_codec, nu_codec), nu_codec, params, data)
        rows[name] = {
            "final_loss": final(losses),
            "vs_f32_percent": 100 * (final(losses) / final(f32_losses) - 1),
            "update_error_mean": float(np.mean(errors)),
            "update_error_max": float(np.max(errors)),
            "nu_read_as_zero_max": zeros,
        }
        print(name, rows[name], file=sys.stderr)
    json.dump({"problem": {"sizes": SIZES, "steps": STEPS, "lr": LR, "b2": B2, "batch": BATCH, "block": BLOCK,
                           "final_loss": "mean training loss of the last 20 steps"},
               "versions": {"jax": jax.__version__, "optax": optax.__version__}, "forms": rows},
              sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
