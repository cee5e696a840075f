# One command each: `make test` (fresh machine -> venv -> deps -> tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# XLA's GPU compiler (the CUDA PJRT plugin, for the installed jaxlib) and ptxas, from PyPI: the
# tests compile programs for an H100 without one (tests/test_h100.py). Kept in a directory of
# its own, loaded only where a program is compiled for a GPU (mpx.program.use_plugin): in the
# venv itself every `import jax` would print CUDA driver lines.
CUDA_COMPILER := $(VENV)/cuda-compiler
CUDA_STAMP    := $(CUDA_COMPILER)/.installed
# The same for Cloud TPUs: libtpu (the version jax[tpu] of the installed jax asks for) compiles
# for v5e, v5p, v6e and v7x without the chip (tests/test_tpu.py); loaded only by
# mpx.program.ensure_compiler, never by an ordinary run.
TPU_COMPILER := $(VENV)/tpu-compiler
TPU_STAMP    := $(TPU_COMPILER)/.installed

.PHONY: test train install cuda-compiler tpu-compiler clean

install: $(STAMP)

cuda-compiler: $(CUDA_STAMP)

tpu-compiler: $(TPU_STAMP)

$(TPU_STAMP): $(STAMP)
	req=$$($(PY) -c 'import importlib.metadata as m; print(next(r.split(";")[0] for r in m.requires("jax") if r.startswith("libtpu")))') && \
	$(PY) -m pip install --quiet --no-deps --target $(TPU_COMPILER) "$$req"
	touch $(TPU_STAMP)

$(CUDA_STAMP): $(STAMP)
	v=$$($(PY) -c 'import jaxlib; print(jaxlib.__version__)') && \
	$(PY) -m pip install --quiet --no-deps --target $(CUDA_COMPILER) \
		"jax-cuda12-plugin==$$v" "jax-cuda12-pjrt==$$v" "nvidia-cuda-nvcc-cu12>=12.6.85"
	touch $(CUDA_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

# Two workers (CI has 2 cores); whole test files per worker, so module fixtures build once.
JOBS ?= 2
test: $(STAMP) $(CUDA_STAMP) $(TPU_STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile tests

# Fresh machine -> venv -> quickstart: train (fp8, CPU, a few minutes), evaluate, sample.
QUICKSTART ?= configs/quickstart.yaml
train: $(STAMP)
	$(PY) -m train train $(QUICKSTART)
	$(PY) -m train eval $(QUICKSTART)
	$(PY) -m train generate $(QUICKSTART) --tokens 200

clean:
	rm -rf $(VENV) .pytest_cache
