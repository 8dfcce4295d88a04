# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
# Both create .venv on first use. TORCH_SPEC pins the CPU build that lies on the dev/CI machines;
# on a GPU machine run `make TORCH_SPEC=torch serve` to keep or fetch a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup serve test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[serve,test,gpu]"
	touch $@

serve: setup
	$(BIN)/shardline serve

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
