# Two commands do all the set-up on a fresh machine: `make serve` and `make test`.
# Both create .venv on first use. TORCH_SPEC pins the CPU build that lies on the dev/CI machines;
# on a GPU machine run `make TORCH_SPEC=torch serve` to keep or fetch a CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup serve test typecheck clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[serve,test,gpu]"
	touch $@

serve: setup
	$(BIN)/shardline serve

test: setup typecheck
	$(BIN)/python -m pytest -q

# mypy over worker/, cluster/, router/ and shardline/ under their installed `shardline.*` names
# (.ci/typecheck.py says why mypy is not pointed at the folders directly).
typecheck: setup
	$(BIN)/python .ci/typecheck.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
