# One command each: `make test` (fresh machine -> venv -> deps -> tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test train install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[train,dev]'
	touch $(STAMP)

# Two workers (CI has 2 cores); whole test files per worker, so module fixtures build once.
JOBS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile tests

# Fresh machine -> venv -> quickstart: train (fp8, CPU, a few minutes), evaluate, sample.
QUICKSTART ?= configs/quickstart.yaml
train: $(STAMP)
	$(PY) -m train train $(QUICKSTART)
	$(PY) -m train eval $(QUICKSTART)
	$(PY) -m train generate $(QUICKSTART) --tokens 200

clean:
	rm -rf $(VENV) .pytest_cache
