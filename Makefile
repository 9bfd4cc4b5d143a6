# Two entry points: `make demo` and `make test`. Each creates .venv when missing and installs the pinned
# dependencies plus the four packages (editable) before running.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qflux-installed
PACKAGES := packages/qflux-core packages/qflux-kontext packages/qflux-qwen packages/qflux-quant packages/qflux-flux2

.PHONY: demo test test-floor bench lint install clean

install: $(STAMP)

$(STAMP): constraints.txt requirements-dev.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -r requirements-dev.txt $(foreach p,$(PACKAGES),-e $(p))
	touch $(STAMP)

# One torch thread: the tiny model gains nothing from two, and on a busy 2-core machine they make a step ~10x slower.
demo: $(STAMP)
	rm -rf runs/demo-kontext  # a fresh run each time; the embedding cache (.qflux-cache) is kept
	OMP_NUM_THREADS=1 $(VENV)/bin/qflux train --config configs/demo-kontext.yaml

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile  # two workers, a test file per worker: 12 min instead of 21 on 2 cores

# The trainer tests on the lowest versions the packages declare (not part of CI; needs PyPI): a second venv
# with every third-party floor of qflux-core/-kontext/-qwen pinned (`==floor`, generated from their
# pyproject.toml by tests/floor_constraints.py). torch/torchvision: the declared floors (2.6 / 0.21) are not
# on this machine's disk and PyPI's are multi-GB CUDA builds, so FLOOR_OVERRIDES installs what is on disk.
# safetensors: qflux-core's own floor (0.4.3) cannot be installed beside qflux-qwen's diffusers 0.38, which
# requires 0.8, so the combined venv takes 0.8.
FLOOR_VENV ?= .venv-floor
FLOOR_PACKAGES := packages/qflux-core packages/qflux-kontext packages/qflux-qwen
FLOOR_OVERRIDES ?= --override torch==2.14.1 --override torchvision==0.29.1 --override safetensors==0.8.0
FLOOR_TESTS ?= tests/training/test_train_kontext.py tests/training/test_train_qwen.py tests/realshape \
	packages/qflux-kontext/tests packages/qflux-qwen/tests tests/data/test_data_sources.py tests/test_dependency_floors.py

test-floor:
	test -x $(FLOOR_VENV)/bin/python || $(PYTHON) -m venv $(FLOOR_VENV)
	echo '*' > $(FLOOR_VENV)/.gitignore  # keep the second venv out of git status
	$(PYTHON) tests/floor_constraints.py $(FLOOR_OVERRIDES) $(notdir $(FLOOR_PACKAGES)) > $(FLOOR_VENV)/floors.txt
	$(FLOOR_VENV)/bin/python -m pip install -q -c $(FLOOR_VENV)/floors.txt pytest $(foreach p,$(FLOOR_PACKAGES),-e $(p))
	$(FLOOR_VENV)/bin/python -m pip freeze --exclude-editable > $(FLOOR_VENV)/installed.txt
	$(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider $(FLOOR_TESTS)

lint: $(STAMP)
	$(VENV)/bin/ruff check packages tests benchmarks

clean:
	rm -rf $(VENV) $(FLOOR_VENV) runs .qflux-cache
