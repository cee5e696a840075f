"""Small helpers shared by several test modules."""

import jax
import numpy as np


def fp8_gpu() -> bool:
    """The first device is a GPU of compute capability >= 8.9 (Ada/Hopper: FP8 tensor cores)."""
    dev = jax.devices()[0]
    if dev.platform != "gpu":
        return False
    major, minor = (int(p) for p in str(getattr(dev, "compute_capability", "0.0")).split(".")[:2])
    return (major, minor) >= (8, 9)


def paragraph(i: int) -> str:
    """Document ``i`` of a tiny corpus: a unique marker ``¶NNN``, a few lines, some unicode."""
    words = ["thou", "art", "more", "lovely", "and", "more", "temperate", "été", "naïve", "🙂"]
    lines = [" ".join(words[(i + k + j) % len(words)] for j in range(3 + (i + k) % 5)) for k in range(1 + i % 4)]
    return f"¶{i:03d} " + "\n".join(lines) + "\n"


def texts(source) -> list[str]:
    return [source[i]["text"].decode() for i in range(len(source))]


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
