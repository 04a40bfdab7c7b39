# Two commands for a fresh machine; each sets up its own virtual environment.
#   make demo   run the demo grid (packaged MiniLM, STS-B, W2/W4, LSQ vs SQuAT) and print Table 1
#   make test   install the dev extras and run the test suite
# Quiet unless something fails: the install steps print one line each.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# CPU-only torch first: otherwise pip pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

$(VENV)/.demo:
	@echo "setting up $(VENV) (torch, squat and the packaged MiniLM)"
	@python3 -m venv $(VENV)
	@$(PIP) install -q --upgrade pip
	@$(PIP) install -q $(TORCH)
	@$(PIP) install -q -e ".[demo]"
	@touch $@

# pyproject.toml: a changed dev extra (pytest-xdist came in) is installed by the next `make test`
$(VENV)/.dev: $(VENV)/.demo pyproject.toml
	@echo "installing the dev extras"
	@$(PIP) install -q -e ".[dev]"
	@touch $@

.PHONY: demo test lint bench clean
demo: $(VENV)/.demo
	@$(VENV)/bin/squat sweep recipes/demo.yaml --out runs --reports reports

test: $(VENV)/.dev
	@$(PY) -m pytest -q -n auto --dist loadfile --durations=15

lint: $(VENV)/.dev
	@$(VENV)/bin/ruff check squat_cli tests bench

clean:
	rm -rf $(VENV) runs reports .pytest_cache
