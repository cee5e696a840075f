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
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import opt_einsum
from flax import core as flax_core
from flax import errors as flax_errors
from flax import linen as nn
from flax.linen import dtypes as linen_dtypes

from mpx import capture, ops
from mpx.fp8 import Fp8Meta
from mpx.naming import Naming
from mpx.policy import Policy, kind_overrides

FP8_COLLECTION = "fp8_meta"
"""The variable collection of FP8 state: one variable ``meta`` (an `Fp8Meta`) per fp8 matmul."""

CAPTURED = "captured"
"""The variable of `FP8_COLLECTION` (at the root) holding the FP8 metas of the captured
matmuls (those that no layer hook reached), by matmul path."""


@dataclasses.dataclass
class _Supplied:
    """FP8 metas given from outside the variables (``metas``), or, when None, where to
    record what to create (``created``: path -> (Fp8Config, stack))."""

    metas: Mapping[str, Fp8Meta] | None
    created: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Active:
    policy: Policy
    kinds_spec: Mapping[str, str] | None  # path pattern -> kind, as the user gave it
    record: list | None  # every matmul of the traced root call, for `matmuls_linen`
    layer_kinds: dict = dataclasses.field(default_factory=dict)  # path -> kind of the layer ops seen
    supplied: _Supplied | None = None  # a `Wrapped` model's FP8 state, passed by its caller

    @functools.cached_property
    def kinds(self) -> list:  # (compiled path pattern, kind), first match wins
        return kind_overrides(self.kinds_spec)

    def layer_op(self, path: str):
        """The policy op of the layer op at ``path`` (seen while tracing), or None."""
        kind = self.layer_kinds.get(path)
        return None if kind is None else self.policy.for_op(path, kind)


_ACTIVE: contextvars.ContextVar[_Active | None] = contextvars.ContextVar("mpx_linen_policy", default=None)


class PolicyDotGeneral(nn.Module):
    """A ``lax.dot_general`` that obeys ``policy``: a ``dot_general_cls`` for ``nn.Dense`` /
    ``nn.DenseGeneral`` (bind ``policy`` and ``kind`` with ``functools.partial``).

    The op's path is that of the layer that owns this module (``"encoder/fc1"``), its kind
    ``kind``. In fp8 it keeps an `Fp8Meta` as variable ``meta`` of `FP8_COLLECTION` and,
    when that collection is mutable, writes back the meta the FP8 matmul returns, so a
    second call in the same step combines by max in the backward pass. Other precisions
    cast both operands to the op's dtype. ``precision`` and ``preferred_element_type``
    are ignored: the policy decides.
    """

    policy: Policy
    kind: str = "dense"

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **_):
        path = "/".join(str(p) for p in self.path[:-1])
        active = _ACTIVE.get()
        if active is not None:
            active.layer_kinds[path] = self.kind
        op = self.policy.for_op(path, self.kind)
        if not op.is_fp8:
            return ops.dot_general(lhs, rhs, dimension_numbers, op)[0]
        try:
            present = self.has_variable(FP8_COLLECTION, "meta")
            if not present and not self.is_initializing():
                raise ValueError(
                    f"op {path!r} ({self.kind}) runs in fp8 but the variables have no "
                    f"{FP8_COLLECTION}/{'/'.join(self.path)}/meta; init the model under the same policy "
                    f"(mpx.apply_policy(model, policy).init, which runs inside mpx.linen.policy_context) and "
                    f"pass {{'params': ..., {FP8_COLLECTION!r}: ...}} to apply"
                )
            meta = self.variable(FP8_COLLECTION, "meta", Fp8Meta.init, op.fp8)
        except flax_errors.ScopeCollectionNotFound:
            raise ValueError(
                f"op {path!r} ({self.kind}) runs in fp8 inside a lifted transform (nn.scan, nn.vmap, ...) "
                f"that does not carry the {FP8_COLLECTION!r} collection; add {FP8_COLLECTION!r}: 0 to its "
                f"variable_axes, next to 'params': 0, so that each layer keeps its own FP8 state"
            ) from None
        out, new_meta = ops.dot_general(lhs, rhs, dimension_numbers, op, meta.value)
        if self.is_mutable_collection(FP8_COLLECTION):
            meta.value = new_meta
        return out


def _promote_keep_kernel(*args, dtype=None, inexact=True):
    """Flax linen's ``promote_dtype``, except that the kernel (the second array) keeps its
    storage dtype: an FP8 or int8 matmul quantizes the master weight itself (one rounding)."""
    inputs, kernel, *rest = args
    inputs, *rest = linen_dtypes.promote_dtype(inputs, *rest, dtype=dtype, inexact=inexact)
    return [inputs, kernel, *rest]


def _op_kind(module: nn.Module, path: str, kinds) -> str:
    for regex, kind in kinds:
        if regex.fullmatch(path):
            return kind
    return "einsum" if isinstance(module, nn.Einsum) else "dense"


def _einsum(module: nn.Einsum, active: _Active, kind: str, op, inputs, einsum_str=None):
    """``nn.Einsum.__call__`` with the einsum as one policy dot_general.

    nn.Einsum calls ``jnp.einsum`` itself (no ``dot_general_cls``), so its forward is
    re-done here with the module's own fields; parameter names, shapes and initializers
    are nn.Einsum's.
    """
    einsum_str = nn.merge_param("einsum_str", module.einsum_str, einsum_str).replace(" ", "")
    if "->" not in einsum_str or einsum_str.count(",") != 1:
        raise ValueError(f"nn.Einsum equation {einsum_str!r} must be explicit ('->') with exactly two operands")
    kernel = module.param("kernel", module.kernel_init, module.shape, module.param_dtype)
    bias = None
    if module.use_bias:
        # The bias covers the output axes that come from the kernel (as nn.Einsum does it).
        operands, result, _ = opt_einsum.parser.parse_einsum_input((einsum_str, inputs, kernel))
        rhs_axes = {c: i for i, c in enumerate(operands.split(",")[1])}
        bias_shape = [module.shape[rhs_axes[c]] for c in result if c in rhs_axes]
        broadcast = [module.shape[rhs_axes[c]] if c in rhs_axes else 1 for c in result]
        bias = module.param("bias", module.bias_init, bias_shape, module.param_dtype)
    promote = _promote_keep_kernel if op.is_quantized else module.promote_dtype
    inputs, kernel, bias = promote(inputs, kernel, bias, dtype=op.dtype)
    dims, perm = ops.einsum_dimension_numbers(einsum_str, inputs.ndim, kernel.ndim)
    dot = PolicyDotGeneral(policy=active.policy, kind=kind, parent=module)
    y = jnp.transpose(dot(inputs, kernel, dims), perm)
    return y if bias is None else y + jnp.reshape(bias, broadcast)


def _intercept(next_fun, args, kwargs, context):
    module, active = context.module, _ACTIVE.get()
    if active is None:
        return next_fun(*args, **kwargs)
    root = module.scope is not None and module.scope.parent is None
    if not _IN_ROOT.get() and root:
        return _capture_root(module, active, context, next_fun, args, kwargs)
    return _module_call(module, active, context, next_fun, args, kwargs)


def _module_call(module, active: _Active, context, next_fun, args, kwargs):
    """One module method call inside the root call: the layer hook for Dense /
    DenseGeneral / Einsum, the call as it is otherwise."""
    # The root of an apply nested in a module's call (a head applied with the embedding's
    # kernel) has no variables of its own to keep FP8 state in: its matmul is captured
    # under the caller's path instead of taking the layer hook.
    nested_root = module.scope is not None and module.scope.parent is None and _DEPTH.get() > 0
    with capture.setting(_DEPTH, _DEPTH.get() + 1):
        if (nested_root or active.supplied is not None  # a Wrapped model's variables hold no FP8 state
                or context.method_name != "__call__"
                or not isinstance(module, (nn.Dense, nn.DenseGeneral, nn.Einsum))):
            return next_fun(*args, **kwargs)
        return _layer_call(module, active, next_fun, args, kwargs)


def _layer_call(module, active: _Active, next_fun, args, kwargs):
    """A Dense / DenseGeneral / Einsum call through its policy op (the layer hook)."""
    path = "/".join(str(p) for p in module.path)
    kind = _op_kind(module, path, active.kinds)
    op = active.policy.for_op(path, kind)
    if isinstance(module, nn.Einsum):
        return _einsum(module, active, kind, op, *args, **kwargs)
    if module.dot_general_cls is not None or module.dot_general is not None:
        return next_fun(*args, **kwargs)  # the layer's own choice stands
    # The layer's own forward with the policy's op and dtype (an fp8 op gets the master
    # kernel). The fields are swapped on the bound module for this call only: a clone on
    # the same scope would work too, but would show up twice in capture_intermediates.
    dot = functools.partial(PolicyDotGeneral, policy=active.policy, kind=kind)
    promote = _promote_keep_kernel if op.is_quantized else module.promote_dtype
    with _swapped(module, dot_general_cls=dot, dtype=op.dtype, promote_dtype=promote):
        return next_fun(*args, **kwargs)


# Set while a root module's call is handled (and during the capture's own trace of it):
# the calls inside are not roots of their own.
_IN_ROOT: contextvars.ContextVar[bool] = contextvars.ContextVar("mpx_linen_in_root", default=False)
# How many module calls are running inside the root call.
_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("mpx_linen_depth", default=0)


def _capture_root(module: nn.Module, active: _Active, context, next_fun, args, kwargs):
    """The root call of ``init`` / ``apply`` under the policy, every matmul included.

    The call is traced as the pure function ``apply(variables, *args)`` of an unbound copy
    of the model; `mpx.capture.Captured` puts the matmuls that no layer hook reached under
    the policy (their FP8 meta at ``fp8_meta/captured/<path>``, created on ``init``) and
    the layers' own policy ops run as they are. Updated mutable collections are written
    back to the outer call.
    """
    with capture.setting(_IN_ROOT, True):
        return _root_call(module, active, context, next_fun, args, kwargs)


def _root_call(module: nn.Module, active: _Active, context, next_fun, args, kwargs):
    """`_capture_root`'s work: init, `Wrapped`'s trace, or apply."""
    method = context.method_name
    initializing = module.is_initializing()
    if initializing:  # creates the parameters and the layers' FP8 state
        out = _module_call(module, active, context, next_fun, args, kwargs)
    rngs = {name: module.make_rng(name) for name in module.scope.rngs if name != "params"}
    arrays, rebuild = capture.split_arrays(args, kwargs)
    unbound = module.clone(parent=None)
    mutable = _inner_mutable(module.scope.mutable)
    intermediates = _capture_intermediates()

    def fn(params, rest, rngs, arrays):
        a, kw = rebuild(arrays)
        variables = {"params": params, **rest} if params is not None else rest
        return unbound.apply(variables, *a, rngs=rngs, method=method, mutable=mutable,
                             capture_intermediates=intermediates, **kw)

    captured = capture.Captured(fn, active.policy, kinds=active.kinds_spec, naming=_naming_and_root,
                                layer_op=active.layer_op)
    variables = dict(module.variables)
    params = variables.pop("params", None)
    fp8 = dict(variables.pop(FP8_COLLECTION, {}))
    metas = fp8.pop(CAPTURED, {})
    rest = {**variables, **({FP8_COLLECTION: fp8} if fp8 else {})}
    if active.supplied is not None:
        if active.supplied.metas is None:  # Wrapped.init_fp8 / matmuls: trace only
            trace = captured.trace(params, rest, rngs, arrays)
            if active.record is not None:
                active.record.extend(trace.matmuls)
            active.supplied.created.update(captured.meta_specs(trace))
            return next_fun(*args, **kwargs)
        metas = active.supplied.metas
    if initializing:
        trace = captured.trace(params, rest, rngs, arrays)
        if active.record is not None:
            active.record.extend(trace.matmuls)
        metas = captured.init(params, rest, rngs, arrays, trace=trace)
        if metas:
            module.put_variable(FP8_COLLECTION, CAPTURED, metas)
        return out
    out, updates = captured.apply(metas, params, rest, rngs, arrays)
    for col, tree_ in updates.items():
        if col in ("params", FP8_COLLECTION) or not module.is_mutable_collection(col):
            continue
        for name, value in tree_.items():
            module.put_variable(col, name, value)
    return out


def _capture_intermediates():
    """The ``capture_intermediates`` of the apply being run (flax keeps it in its module
    context), for the traced apply to capture the same; False where it cannot be read."""
    from flax.linen import module as linen_module

    stack = getattr(getattr(linen_module, "_context", None), "capture_stack", None)
    return stack[-1] if stack else False


def _inner_mutable(outer):
    """The traced apply's ``mutable``: the outer call's, plus the FP8 collection (so that a
    layer called twice threads its meta); never False, so the apply returns its updates."""
    if outer is True or isinstance(outer, flax_core.scope.DenyList):
        return outer
    outer = [outer] if isinstance(outer, str) else list(outer or [])
    return [*outer, FP8_COLLECTION] if FP8_COLLECTION not in outer else outer


@contextlib.contextmanager
def _naming_and_root(naming: Naming) -> Iterator[None]:
    with capture.setting(_IN_ROOT, True), module_naming(naming):
        yield


@contextlib.contextmanager
def _swapped(module: nn.Module, **fields) -> Iterator[None]:
    old = {name: getattr(module, name) for name in fields}
    for name, value in fields.items():
        object.__setattr__(module, name, value)  # linen modules are frozen dataclasses
    try:
        yield
    finally:
        for name, value in old.items():
            object.__setattr__(module, name, value)


@contextlib.contextmanager
def _activate(policy: Policy, kinds: Mapping[str, str] | None, record: list | None,
              supplied: _Supplied | None = None) -> Iterator[None]:
    with capture.setting(_ACTIVE, _Active(policy, kinds, record, supplied=supplied)), nn.intercept_methods(_intercept):
        yield


def _naming_interceptor(naming: Naming):
    def intercept(next_fun, args, kwargs, context):
        module = context.module
        path = "/".join(str(p) for p in module.path)
        with naming.call(path, context.method_name, name=module.name or type(module).__name__):
            return next_fun(*args, **kwargs)

    return intercept


@contextlib.contextmanager
def module_naming(naming: Naming) -> Iterator[None]:
    """Mark every linen module method call for `mpx.capture.Captured` (its ``naming``)."""
    with nn.intercept_methods(_naming_interceptor(naming)):
        yield


def policy_context(policy: Policy, *, kinds: Mapping[str, str] | None = None):
    """Run unmodified linen models under ``policy`` inside this ``with`` block.

    Every ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Einsum`` call computes in its op's
    dtype through a `PolicyDotGeneral` (fp8 ops with their meta in `FP8_COLLECTION`).
    Ops are named by their path in the parameter tree and are of kind ``dense``
    (``einsum`` for nn.Einsum) unless ``kinds`` maps a matching path pattern (policy
    syntax: ``*`` one segment, ``**`` any) to another kind, e.g. ``{"head": "head"}``.
    A layer given its own ``dot_general_cls`` / ``dot_general`` keeps it. The innermost
    context wins. It acts when the model is traced: enter it inside the jitted function.
    `mpx.apply_policy` wraps a module's ``init`` and ``apply`` in it (`PolicyModule`).
    """
    return _activate(policy, kinds, None)


def matmuls_linen(model: nn.Module, policy: Policy, *args, kinds: Mapping[str, str] | None = None,
                  **kwargs) -> list[capture.Matmul]:
    """Every matmul ``model`` runs on ``args``/``kwargs`` under ``policy`` (see
    `mpx.capture.Matmul`), in trace order: layer ops, captured matmuls and those left
    outside the policy with the reason. Traces ``model.init`` abstractly (nothing is
    computed) under `policy_context`."""
    found: list = []

    def init(*a):
        key = jax.random.key(0)
        return model.init({"params": key, "dropout": key}, *a, **kwargs)

    with _activate(policy, kinds, found):
        jax.eval_shape(init, *args)
    return found


class PolicyModule:
    """A linen module under ``policy``: what `mpx.apply_policy` returns for one. Its
    ``init`` and ``apply`` are the module's, run inside `policy_context` (so inside the
    jitted function that calls them, where the context acts); the variables are the plain
    module's plus the FP8 collection::

        model = mpx.apply_policy(MyModel(), policy, kinds={"head": "head"})
        params, fp8_meta = mpx.split(model.init(key, x))
        y = model.apply({"params": params, "fp8_meta": fp8_meta}, x)   # in loss_fn

    ``module``, ``policy`` and ``kinds`` are what it was made with. A module used inside
    a bigger one is under the policy when the bigger one is.
    """

    def __init__(self, module: nn.Module, policy: Policy, *, kinds: Mapping[str, str] | None = None):
        self.module, self.policy, self.kinds = module, policy, dict(kinds or {})

    def __repr__(self) -> str:
        return f"PolicyModule({type(self.module).__name__}, kinds={self.kinds})"

    def init(self, rngs, *args, **kwargs):
        """``module.init(rngs, *args, **kwargs)`` under the policy: params and FP8 state."""
        with policy_context(self.policy, kinds=self.kinds):
            return self.module.init(rngs, *args, **kwargs)

    def init_with_output(self, rngs, *args, **kwargs):
        """``module.init_with_output(rngs, *args, **kwargs)`` under the policy."""
        with policy_context(self.policy, kinds=self.kinds):
            return self.module.init_with_output(rngs, *args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        """``module.apply(variables, *args, **kwargs)`` under the policy."""
        with policy_context(self.policy, kinds=self.kinds):
            return self.module.apply(variables, *args, **kwargs)

    def matmuls(self, *args, **kwargs) -> list[capture.Matmul]:
        """Every matmul of a call on these inputs (see `mpx.capture.Matmul`)."""
        return matmuls_linen(self.module, self.policy, *args, kinds=self.kinds, **kwargs)


class Wrapped:
    """An object that holds a linen module and calls its ``apply`` itself (a model hub's
    model class, called as ``obj(input_ids, params=params)``), under ``policy``.

    `mpx.apply_policy` returns one for such an object. The object is used as it is; every
    matmul of the module's ``apply`` is captured (see `mpx.capture`), and the FP8 state,
    which the object's own variables cannot hold, is passed in by the caller::

        model = mpx.apply_policy(hub_model, policy, kinds={"lm_head": "head"})
        fp8_meta = model.init_fp8(input_ids, params=params)   # a dict by matmul path
        logits = model(fp8_meta, input_ids, params=params).logits   # in loss_fn

    ``kinds``: path pattern -> op kind, as for `policy_context`.
    """

    def __init__(self, obj, policy: Policy, *, kinds: Mapping[str, str] | None = None):
        if isinstance(obj, nn.Module):
            raise TypeError("Wrapped is for objects that call a linen module's apply themselves; a linen module "
                            "itself goes under the policy with mpx.apply_policy(module, policy), whose init and "
                            "apply run under mpx.linen.policy_context (its FP8 state in its variables)")
        if not callable(obj):
            raise TypeError(f"Wrapped needs a callable model object, got {type(obj).__name__}")
        self.obj, self.policy, self.kinds = obj, policy, dict(kinds or {})

    def _traced(self, record, *args, **kwargs) -> dict:
        supplied = _Supplied(None)
        with _activate(self.policy, self.kinds, record, supplied):
            jax.eval_shape(lambda: [self.obj(*args, **kwargs), None][1])  # any output type: only the trace counts
        return supplied.created

    def init_fp8(self, *args, **kwargs) -> dict:
        """Fresh FP8 metas of the object's fp8 matmuls on these example inputs."""
        specs = self._traced(None, *args, **kwargs)
        return capture.create_metas(specs)

    def matmuls(self, *args, **kwargs) -> list[capture.Matmul]:
        """Every matmul of a call on these inputs (see `mpx.capture.Matmul`)."""
        record: list = []
        self._traced(record, *args, **kwargs)
        return record

    def __call__(self, fp8_meta: Mapping[str, Fp8Meta], *args, **kwargs):
        """``obj(*args, **kwargs)`` with every matmul under the policy, FP8 state ``fp8_meta``."""
        with _activate(self.policy, self.kinds, None, _Supplied(fp8_meta)):
            return self.obj(*args, **kwargs)


def split_linen(variables: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(params, fp8_meta)`` of linen ``variables``: what `mpx.init_train_state` and the
    ``loss_fn`` of `mpx.train_step` take. ``fp8_meta`` is ``{}`` when no op runs in fp8."""
    other = sorted(set(variables) - {"params", FP8_COLLECTION})
    if other:
        raise ValueError(
            f"variables hold collections {other} besides params and {FP8_COLLECTION}; mpx.train_step "
            f"carries only those two. Keep the others yourself (e.g. close over them in loss_fn) and "
            f"pass the variables without them"
        )
    return variables["params"], variables.get(FP8_COLLECTION, {})


def split_variables(variables: Mapping[str, Any]) -> tuple[Any, Any]:
    """Alias of `mpx.split` for linen variables, kept for one release."""
    return split_linen(variables)


def linen_matmuls(model: nn.Module, policy: Policy, *args, kinds: Mapping[str, str] | None = None,
                  **kwargs) -> list[capture.Matmul]:
    """Alias of `mpx.matmuls` for a linen module, kept for one release."""
    return matmuls_linen(model, policy, *args, kinds=kinds, **kwargs)


def linen_ops(model: nn.Module, policy: Policy, *args, kinds: Mapping[str, str] | None = None, **kwargs):
    """Alias of the ``(path, kind)`` pairs of `mpx.matmuls` (ops under the policy, each once), kept for one
    release."""
    found = matmuls_linen(model, policy, *args, kinds=kinds, **kwargs)
    return list(dict.fromkeys((m.path, m.kind) for m in found if m.op is not None))
