"""Names in a trace: how mpx names what it emits, and how those names are read back.

Two kinds of ``jax.named_scope``:

- ``mpx[<path>]`` around every policy op (`mpx.ops.dot_general`), forward and backward:
  profiles, `mpx.inspect.fp8_gemms` and the compiled-program readers (`mpx.program`) find an
  op's computations by it; `op_paths` reads it back from a name stack or an HLO ``op_name``.
- ``mpx@<n>`` around the n-th module method call of a capture trace (`Naming`): a matmul
  written without a layer hook is named by the innermost call it ran in. These markers
  live in the trace only; the evaluated program is named without them.

`equations` walks a jaxpr's equations, nested jaxprs included, each with its full name stack.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import jax
from jax.extend import core as jcore

_OP = re.compile(r"mpx\[([^\]]+)\]")
_CALL_PREFIX = "mpx@"
_CALL = re.compile(re.escape(_CALL_PREFIX) + r"(\d+)")


def op_scope(path: str) -> str:
    """The ``jax.named_scope`` of the policy op at ``path``: ``mpx[<path>]``."""
    return f"mpx[{path}]"


def op_paths(name: str) -> list[str]:
    """The policy-op paths in a name stack (or a compiled op's ``op_name``), outermost
    first; the innermost (last) is the op that emitted the computation.

    >>> op_paths("jit(step)/mpx[blocks/0/fc]/dot_general")
    ['blocks/0/fc']
    """
    return _OP.findall(name)


def is_call_marker(scope: str) -> bool:
    """Whether one component of a name stack is a capture marker (``mpx@<n>``)."""
    return scope.startswith(_CALL_PREFIX)


class Naming:
    """The module-method calls of one trace: each gets a marker scope ``mpx@<n>``.

    ``with naming.call(path, method):`` around a module method call; the matmuls traced
    inside carry the marker in their name stack, the innermost marker names them
    (`innermost`).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._active: list[str] = []

    @contextlib.contextmanager
    def call(self, path: str, method: str, *, name: str = "") -> Iterator[None]:
        """Mark a call of ``method`` on the module at ``path``. A root module (empty path)
        called inside another module's call (a nested ``apply``) is named after the
        caller: ``<caller path>/<name>``."""
        if not path and self._active:
            path = "/".join(p for p in (self._active[-1], name) if p)
        self.calls.append((path, method))
        self._active.append(path)
        try:
            with jax.named_scope(f"{_CALL_PREFIX}{len(self.calls) - 1}"):
                yield
        finally:
            self._active.pop()

    def innermost(self, name_stack: str) -> int | None:
        """The index in `calls` of the innermost call marked in ``name_stack``, or None."""
        marks = _CALL.findall(name_stack)
        return int(marks[-1]) if marks else None


def subjaxprs(params) -> list:
    """The jaxprs an equation holds in its ``params`` (a call's, a scan's body, a cond's
    branches, ...), opened: ``Jaxpr``, never ``ClosedJaxpr``."""
    out = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jcore.ClosedJaxpr):
                out.append(item.jaxpr)
            elif isinstance(item, jcore.Jaxpr):
                out.append(item)
    return out


def equations(jaxpr, stack: str = "") -> Iterator[tuple[object, str]]:
    """Every equation of ``jaxpr`` and of the jaxprs nested in it, in order, as
    ``(eqn, name stack)``: the stack joins the scopes of the equations around it with
    the equation's own."""
    for eqn in jaxpr.eqns:
        where = f"{stack}/{eqn.source_info.name_stack}"
        yield eqn, where
        for sub in subjaxprs(eqn.params):
            yield from equations(sub, where)
