"""What a program holds and moves: its collectives' bytes by kind and element type, read from
the optimized HLO, and the peak memory of `mpx.program.report`."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import mpx
from mpx.program._hlo import collectives

from helpers import require_compiler


def test_one_collective_of_each_kind_on_8_h100s_moves_the_bytes_counted_by_hand():
    """A shard_map program on 8 compile-only H100s with one collective of each kind, each
    asynchronous (start/done, counted once): an all-gather counts its result (the f8 weight
    each device ends with), the others their operand; the all-reduce inside a loop of 5
    counts 5 times."""
    require_compiler("h100", "cuda-compiler", "H100")
    mesh = mpx.program.make_mesh((8,), ("x",))

    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P("x"),) * 4,
                       out_specs=(P(), P("x"), P(), P("x"), P("x")), check_vma=False)
    def program(w, g, s, a):  # per device: w (32, 128) f8, g (64, 32) bf16, s (1, 16) f32, a (16, 8) f32
        gathered = jax.lax.all_gather(w, "x", tiled=True)  # (256, 128) f8
        scattered = jax.lax.psum_scatter(g, "x", scatter_dimension=0, tiled=True)  # (8, 32) bf16
        # each trip reduces its own input (sin keeps XLA from summing once after the loop)
        looped = jax.lax.fori_loop(0, 5, lambda i, c: jax.lax.psum(jnp.sin(c) + s, "x"), jnp.zeros((1, 16)))
        exchanged = jax.lax.all_to_all(a, "x", 0, 0, tiled=True)
        shifted = jax.lax.ppermute(a, "x", [(i, (i + 1) % 8) for i in range(8)])
        return gathered, scattered, looped, exchanged, shifted

    sharded = NamedSharding(mesh, P("x"))
    args = (jax.ShapeDtypeStruct((256, 128), jnp.float8_e4m3fn, sharding=sharded),
            jax.ShapeDtypeStruct((512, 32), jnp.bfloat16, sharding=sharded),
            jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=sharded),
            jax.ShapeDtypeStruct((128, 8), jnp.float32, sharding=sharded))
    report = mpx.program.report(program, *args, target="h100", mesh=mesh)
    assert report.collective_bytes_by_kind() == {
        "all-gather": 256 * 128 * 1, "reduce-scatter": 64 * 32 * 2, "all-reduce": 5 * 16 * 4,
        "all-to-all": 16 * 8 * 4, "collective-permute": 16 * 8 * 4}
    [gather] = report.collectives_of("all-gather")
    assert (gather.dtype, gather.bytes, gather.launches) == ("f8e4m3fn", 256 * 128, 1)
    [scatter] = report.collectives_of("reduce-scatter")
    assert (scatter.dtype, scatter.bytes, scatter.result_bytes) == ("bf16", 64 * 32 * 2, 8 * 32 * 2)
    [reduce] = report.collectives_of("all-reduce")
    assert (reduce.bytes, reduce.launches) == (64, 5)
    assert report.collective_bytes("all-gather", dtype="bf16") == 0
    assert report.collective_bytes() == sum(report.collective_bytes_by_kind().values())
    assert report.summary()["collective_bytes"] == report.collective_bytes_by_kind()
    assert report.peak_bytes > report.argument_bytes > 0


# Collectives as XLA writes them after its combiners and on the CPU: one instruction of several
# buffers (asynchronous, then synchronous), and a reduce-scatter wrapped in async-start.
COMBINED = """\
HloModule combined

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%scatter (p: f32[64,4]) -> f32[8,4] {
  %p = f32[64,4]{1,0} parameter(0)
  ROOT %rs = f32[8,4]{1,0} reduce-scatter(%p), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
}

ENTRY %main (w: bf16[4,16], v: f8e4m3fn[2,16], g: f32[10], h: bf16[3,3], s: f32[64,4]) -> f32[8,4] {
  %w = bf16[4,16]{1,0} parameter(0)
  %v = f8e4m3fn[2,16]{1,0} parameter(1)
  %g = f32[10]{0} parameter(2)
  %h = bf16[3,3]{1,0} parameter(3)
  %s = f32[64,4]{1,0} parameter(4)
  %ag = ((bf16[4,16]{1,0}, f8e4m3fn[2,16]{1,0}), (bf16[32,16]{1,0}, f8e4m3fn[16,16]{1,0})) all-gather-start(%w, %v), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %agd = (bf16[32,16]{1,0}, f8e4m3fn[16,16]{1,0}) all-gather-done(%ag)
  %ar = (f32[10]{0}, bf16[3,3]{1,0}) all-reduce(%g, %h), replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  %rss = ((f32[64,4]{1,0}), f32[8,4]{1,0}) async-start(%s), calls=%scatter
  ROOT %rsd = f32[8,4]{1,0} async-done(%rss)
}
"""


def test_a_combined_collective_counts_each_of_its_buffers():
    found = [(c.name, c.kind, c.dtype, c.bytes, c.result_bytes) for c in collectives(COMBINED)]
    assert found == [
        ("ag", "all-gather", "bf16", 32 * 16 * 2, 32 * 16 * 2),
        ("ag", "all-gather", "f8e4m3fn", 16 * 16, 16 * 16),
        ("ar", "all-reduce", "f32", 10 * 4, 10 * 4),
        ("ar", "all-reduce", "bf16", 3 * 3 * 2, 3 * 3 * 2),
        ("rs", "reduce-scatter", "f32", 64 * 4 * 4, 8 * 4 * 4),
    ]


@pytest.mark.parametrize("text", ["HloModule empty\n\nENTRY %main (x: f32[2]) -> f32[2] {\n"
                                  "  ROOT %x = f32[2]{0} parameter(0)\n}\n"])
def test_a_program_without_collectives_moves_nothing(text):
    assert collectives(text) == []
