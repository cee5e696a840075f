"""mpx._naming: the name a policy op gets is the one every reader finds, however deep the
op sits in the program."""

import jax
import jax.numpy as jnp
from jax import lax

import mpx
from mpx import _naming as naming, ops


def test_an_op_scope_reads_back_as_its_path_innermost_last():
    assert naming.op_paths(naming.op_scope("blocks/0/mlp/fc")) == ["blocks/0/mlp/fc"]
    stack = f"jit(step)/{naming.op_scope('outer')}/transpose/{naming.op_scope('h_0/attn/c_attn')}/dot_general"
    assert naming.op_paths(stack) == ["outer", "h_0/attn/c_attn"]
    assert naming.op_paths("jit(step)/dense/dot_general") == []


def test_call_markers_name_the_innermost_call_and_only_markers_are_markers():
    calls = naming.Naming()

    def model(x):  # the calls are marked while the model is traced, as capture does it
        with calls.call("encoder", "__call__"):
            h = x * 2.0
            with calls.call("encoder/fc", "__call__"):
                return h * 3.0

    outer, inner = (str(e.source_info.name_stack) for e in jax.make_jaxpr(model)(1.0).eqns)
    assert calls.calls == [("encoder", "__call__"), ("encoder/fc", "__call__")]
    assert calls.innermost(inner) == 1 and calls.innermost(outer) == 0 and calls.innermost("a/b") is None
    assert [s for s in inner.split("/") if naming.is_call_marker(s)] == ["mpx@0", "mpx@1"]
    assert not naming.is_call_marker(naming.op_scope("mpx@0"))


def test_the_walk_finds_policy_ops_inside_jit_scan_and_remat_with_their_names():
    """What mpx.ops.dot_general names is what the walk reads, nested three deep."""
    op = mpx.parse_policy("bf16").for_op("blocks/fc", "dense")
    dims = (((1,), (0,)), ((), ()))

    @jax.jit
    def fn(x, ws):
        @jax.checkpoint
        def body(h, w):
            return ops.dot_general(h, w, dims, op)[0].astype(h.dtype), None

        return lax.scan(body, x, ws)[0] @ jnp.eye(4)

    jaxpr = jax.make_jaxpr(fn)(jnp.ones((2, 4)), jnp.ones((3, 4, 4)))
    found = [naming.op_paths(where) for eqn, where in naming.equations(jaxpr.jaxpr)
             if eqn.primitive.name == "dot_general"]
    assert found == [["blocks/fc"], []]  # the policy op in the scan body, then the plain `@`
    assert mpx.inspect.dot_generals(fn, jnp.ones((2, 4)), jnp.ones((3, 4, 4)))[0][1] == ("bfloat16", "bfloat16")
