# Two entry points: `make demo` and `make test`. Each creates .venv when missing and installs the pinned
# dependencies plus the four packages (editable) before running.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.qflux-installed
PACKAGES := packages/qflux-core packages/qflux-kontext packages/qflux-qwen packages/qflux-quant

.PHONY: demo test bench lint install clean

install: $(STAMP)

$(STAMP): constraints.txt requirements-dev.txt $(foreach p,$(PACKAGES),$(p)/pyproject.toml)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -r requirements-dev.txt $(foreach p,$(PACKAGES),-e $(p))
	touch $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo-kontext  # a fresh run each time; the embedding cache (.qflux-cache) is kept
	$(VENV)/bin/qflux train --config configs/demo-kontext.yaml

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check packages tests benchmarks

clean:
	rm -rf $(VENV) runs .qflux-cache
