# The two commands a new user needs:  make demo  (set up + run the demo job)  and  make test.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build that lies on our machines' disk; elsewhere PyPI's build of the same version (CUDA on Linux).
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-fast mutation docs model evaluate grid gpu-wheels clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"  # first, so nothing pulls a different torch build
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/unclip-batch run manifests/demo.parquet --output out/demo --allow-failures  # its last row fails on purpose
	$(VENV)/bin/unclip-batch report out/demo  # out/demo/report/index.html: open it in a browser

test: setup
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -v --durations=30

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# Mutation testing of the job's runtime modules with the fast suite ([tool.mutmut] in pyproject.toml): the score
# and the survivors. Resumes where a stopped run stopped; `rm -rf mutants` starts over.
mutation: setup
	$(VENV)/bin/mutmut run --max-children $$(nproc) || true
	$(PY) tests/mutation_report.py

# The reference pages generated from the code (docs/cli.md, errors.md, outputs.md); tests/test_docs.py checks them.
docs: setup
	$(PY) docs/generate.py

# Retrain the embedded model from nothing (a little over 3 h on 2 CPU cores: README) and measure the committed one.
model: setup
	$(PY) -m unclip_lab.train out/shapes  # resumes an interrupted run; --model out/shapes to use it

evaluate: setup
	$(PY) -m unclip_lab.evaluate --model default

# A picture of the demo job's output (run make demo first), under out/ so the tree stays clean; the
# README's copy is manifests/demo_grid.png: copy it there when the model changes.
grid: setup
	$(PY) manifests/grid.py out/demo out/demo_grid.png

# What benchmarks/gpu_run.sh installs on a lent GPU machine (Python 3.12, no network, no diffusers), into .whl/.
gpu-wheels: setup
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==10.2.0

clean:
	rm -rf out .pytest_cache mutants
