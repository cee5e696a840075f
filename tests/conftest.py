"""Suite-wide settings.

Every test process, and every command-line run a test starts, shares one persistent JAX
compilation cache for the session: the end-to-end tests start the same tiny training
program in many fresh processes (a run, its resume, its eval), and each would otherwise
compile it again. The cache key holds the program, the compile options and XLA_FLAGS, so a
hit is the program the process would have built; nothing a test checks depends on whether
a program came from the cache. A fresh directory per session (pytest's tmp root, shared by
xdist workers through the environment they inherit), so nothing carries over between runs.
"""

import os
import shutil
import tempfile

CACHE = "JAX_COMPILATION_CACHE_DIR"


def pytest_configure(config):
    if getattr(config.option, "loadscopereorder", False):
        # pytest-xdist >= 3.6 hands out --dist loadfile's modules sorted by how many tests each
        # has, not in collection order: LONGEST_FIRST below would be ignored and a long module
        # of few tests (test_bench: a long fixture) would start last, alone, while the other worker idles.
        config.option.loadscopereorder = False
    if hasattr(config, "workerinput") or CACHE in os.environ:
        return  # an xdist worker: inherits the controller's directory (or the user chose one)
    os.environ[CACHE] = config._mpx_own_cache = tempfile.mkdtemp(prefix="mpx-jax-cache-")
    # Programs of the tiny test models compile in well under the default 1 s threshold.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_unconfigure(config):
    own = getattr(config, "_mpx_own_cache", None)  # only the directory this session made, never a user's
    if own is not None and os.environ.get(CACHE) == own:
        shutil.rmtree(os.environ.pop(CACHE), ignore_errors=True)


# The longest modules first (CPU seconds of each module run alone, measured on a shared 2-core
# machine: e2e 182, notebooks 181, h100 160, run_safety 139, any_model 132, nn 92, scan 86,
# bench 77, divergence 65, fp8_guarantees 50, quantize 47, int8 46, loop 38, failures 38; every
# other module under 30): pytest-xdist's loadfile hands whole modules to whichever worker is free,
# in collection order (see pytest_configure), so a long module collected last would run
# alone at the end while the other worker idles.
LONGEST_FIRST = ("test_train_e2e", "test_notebooks", "test_h100", "test_run_safety", "test_any_model",
                 "test_nn", "test_scan", "test_bench", "test_divergence", "test_fp8_guarantees",
                 "test_generate", "test_weights", "test_tpu", "test_llama", "test_quantize", "test_int8", "test_loop",
                 "test_failures")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: order within a module kept
