"""Put an existing Flax linen model under a precision policy.

`mpx.apply_policy` returns a `PolicyModule`: the model whose ``init`` and ``apply`` run
inside `policy_context`, so that every matmul of the model computes as the policy says,
whatever code wrote it. ``nn.Dense``, ``nn.DenseGeneral`` and ``nn.Einsum`` go through a
`PolicyDotGeneral` (their FP8 meta at ``fp8_meta/<layer path>/PolicyDotGeneral_0/meta``);
every other ``dot_general`` the model runs (``lax.dot_general``, ``jnp.dot`` / ``matmul`` /
``einsum``, ``@``, an embedding's ``attend``, a nested ``apply``) is captured at the root
call (`mpx.capture`), its FP8 meta at ``fp8_meta/captured/<matmul path>``. The model's
code is not touched and its parameter tree is the plain model's, so a plain checkpoint
loads::

    policy = mpx.parse_policy("fp8")
    model = mpx.apply_policy(MyModel(), policy, kinds={"head": "head"})  # path pattern -> op kind
    params, fp8_meta = mpx.split(model.init(key, x))

    def loss_fn(params, fp8_meta, batch, rng):
        y = model.apply({"params": params, "fp8_meta": fp8_meta}, batch["x"])
        return jnp.mean((y.astype(jnp.float32) - batch["y"]) ** 2)

    state = mpx.init_train_state(params, opt, policy=policy, fp8_meta=fp8_meta)
    step = mpx.make_train_step(loss_fn, opt)

A layer called twice in a step threads its meta from the first call to the second (the
context makes the FP8 collection mutable for the traced apply), so its amaxes combine by
max; `mpx.train_step` advances the meta from what the gradient observed. Under
``nn.scan`` over layers add ``"fp8_meta": 0`` to ``variable_axes`` (one meta per layer);
captured matmuls inside a scan get one meta per iteration by themselves. Layers you
write yourself can take the op directly (no context needed):
``nn.Dense(n, dot_general_cls=functools.partial(PolicyDotGeneral, policy=policy))``.
An object that holds a linen module and its params and calls ``apply`` itself (a model
hub's class) becomes a `Wrapped` under `mpx.apply_policy`.

Where each part lives: `mpx.linen._context` (`policy_context`, the method interceptor),
`mpx.linen._layers` (the layer hook) and `mpx.linen._dot` (`PolicyDotGeneral`),
`mpx.linen._root` (the root call under capture), `mpx.linen._active` (the policy in force, the
FP8 collection's names), `mpx.linen._module` (`PolicyModule`), `mpx.linen._wrapped`
(`Wrapped`), `mpx.linen._aliases` (the old names, for one release).
"""

from mpx.linen._active import CAPTURED, FP8_COLLECTION
from mpx.linen._aliases import linen_matmuls, linen_ops, split_variables
from mpx.linen._context import policy_context
from mpx.linen._dot import PolicyDotGeneral
from mpx.linen._module import PolicyModule
from mpx.linen._wrapped import Wrapped

__all__ = [
    "CAPTURED",
    "FP8_COLLECTION",
    "PolicyDotGeneral",
    "PolicyModule",
    "Wrapped",
    "linen_matmuls",
    "linen_ops",
    "policy_context",
    "split_variables",
]
