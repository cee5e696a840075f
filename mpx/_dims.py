"""Dimension numbers of ``lax.dot_general``, shared by the FP8 and int8 matmuls (their
custom gradients are ``dot_general``s of their own)."""

from __future__ import annotations

from typing import Literal


def normalize_dims(dimension_numbers):
    """``((lhs contracting, rhs contracting), (lhs batch, rhs batch))`` as tuples (hashable)."""
    (lc, rc), (lb, rb) = dimension_numbers
    return ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))


def free_axes(ndim: int, contracting, batch) -> list[int]:
    """The axes of an operand that are neither contracted nor batch, in increasing order."""
    return [a for a in range(ndim) if a not in contracting and a not in batch]


def transpose_dims(dims, x_ndim: int, y_ndim: int, *, wrt: Literal["lhs", "rhs"]):
    """Dimension numbers and output permutation for the gradient of a ``dot_general``.

    For ``out = dot_general(x, y, dims)`` (out axes: batch, x free, y free) the gradient
    wrt x is ``transpose(dot_general(g, y, dims_g), perm)``; wrt y, swap the roles.
    Returns ``(dims_g, perm)``.
    """
    (xc, yc), (xb, yb) = dims
    if wrt == "rhs":
        xc, yc, xb, yb, x_ndim, y_ndim = yc, xc, yb, xb, y_ndim, x_ndim
        first_free = "y"
    else:
        first_free = "x"
    x_free = free_axes(x_ndim, xc, xb)
    y_free = free_axes(y_ndim, yc, yb)
    nb = len(xb)
    # Output axes of the forward dot: batch, then lhs free, then rhs free; g contracts y's.
    if first_free == "x":
        g_y = list(range(nb + len(x_free), nb + len(x_free) + len(y_free)))
    else:  # roles swapped: "x" is the forward rhs, whose free axes come second
        g_y = list(range(nb, nb + len(y_free)))
    dims_g = ((tuple(g_y), tuple(y_free)), (tuple(range(nb)), tuple(yb)))
    # Result axes: batch, g's x-free axes, then y's contracting axes in increasing order.
    y_contract_sorted = sorted(yc)
    perm = []
    for a in range(x_ndim):
        if a in xb:
            perm.append(xb.index(a))
        elif a in x_free:
            perm.append(nb + x_free.index(a))
        else:
            partner = yc[xc.index(a)]
            perm.append(nb + len(x_free) + y_contract_sorted.index(partner))
    return dims_g, tuple(perm)
