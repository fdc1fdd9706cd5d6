# The two commands of the README: `make demo` (the main job) and `make test` (everything CI runs).
# Both create and fill .venv first when needed.
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-offline test test-fast lint bench

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python examples/serving_demo.py

demo-offline: $(STAMP)
	$(VENV)/bin/python examples/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check vllm_surgery tests examples benchmarks
	$(VENV)/bin/ruff format --check vllm_surgery tests examples benchmarks

test: lint
	$(VENV)/bin/python -m pytest -m "" -q

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/sensitivity_pass.py
