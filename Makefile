# The two commands a new user needs:  make demo  (set up + run the demo job)  and  make test.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build that lies on our machines' disk; elsewhere PyPI's build of the same version (CUDA on Linux).
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"  # first, so nothing pulls a different torch build
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/unclip-batch run manifests/demo.parquet --output out/demo

test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -v --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf out .pytest_cache
