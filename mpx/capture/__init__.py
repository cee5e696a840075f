"""Every matmul of a model's call under a policy, whatever Python call produced it.

Layers that take a ``dot_general`` hook (``nn.Dense``, ``nnx.Linear``, ...) are put under a
policy by swapping the hook. Code that calls ``lax.dot_general``, ``jnp.dot``,
``jnp.matmul``, ``jnp.einsum`` or ``@`` itself has no hook; all of them become the same
``dot_general`` primitive once traced. `Captured` works there: it traces the model's root
call to a jaxpr, finds every ``dot_general`` in it and names each by the module call it ran
in, and evaluates the jaxpr again with each such matmul replaced by `mpx.ops.dot_general`
under the policy, FP8 meta included. The model's code is not touched.

* `mpx.capture._root`: `Root`, what the NNX and linen glue provide (the call as a pure
  function of the model's state, and how to mark its module calls);
* `mpx.capture._analysis`: which matmuls are captured, their names and kinds (`Matmul`);
* `mpx.capture._evaluate`: the jaxpr evaluated again with them as policy ops;
* `mpx.capture._captured`: `Captured`, the three together (trace, FP8 state, apply).

A module called twice gives the same names twice, and its FP8 meta is threaded from the
first call to the second (amaxes combine by max). Matmuls inside ``lax.scan`` get one meta
per iteration, stacked along a leading axis (a scanned layer stack: one per layer); a module
rebuilt inside a transform (``nnx.scan``) is named by the call around it.
"""

from mpx.capture._analysis import Matmul
from mpx.capture._captured import Captured, Trace, create_metas
from mpx.capture._root import Root, setting, split_arrays

__all__ = ["Captured", "Matmul", "Root", "Trace", "create_metas", "setting", "split_arrays"]
