"""`pip install mpx` brings the library only; the training application's dependencies come
with the `train` extra, and `python -m train` without them says how to install them."""

import pathlib
import subprocess
import sys
import tomllib

from train.__main__ import TRAIN_EXTRA

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = {"jax", "flax", "optax", "ml_dtypes", "orbax-checkpoint"}


def _names(requirements):
    import re

    return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0] for r in requirements}


def test_the_library_depends_on_the_library_set_and_the_app_on_its_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _names(project["dependencies"]) == LIBRARY
    assert _names(project["optional-dependencies"]["train"]) == set(TRAIN_EXTRA.values())


def test_importing_mpx_imports_no_application_dependency():
    """Everything mpx (layers, linen, capture, inspect, the step) imports no module of the
    extra beyond what its own dependencies import (flax itself brings yaml): a library
    user's environment need not have them."""
    code = ("import sys; extra = {extra!r}; import jax, flax, flax.linen, flax.nnx, optax; "
            "before = {{m for m in extra if m in sys.modules}}; "
            "import mpx, mpx.nn, mpx.linen, mpx.capture, mpx.inspect; "
            "print(sorted(m for m in extra if m in sys.modules and m not in before))").format(extra=sorted(TRAIN_EXTRA))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


def test_the_cli_without_its_extra_says_what_to_install(tmp_path):
    """yaml made unimportable (as in an environment with the library only): one line naming
    the missing package and the install command, exit status 2, no traceback."""
    code = ("import sys; sys.modules['yaml'] = None; from train.__main__ import main; "
            "sys.exit(main(['eval', 'configs/quickstart.yaml']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert "pyyaml is not installed" in out.stderr and "pip install 'mpx[train]'" in out.stderr
    assert "Traceback" not in out.stderr
