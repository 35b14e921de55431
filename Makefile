# Two commands on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first: on these machines pip takes the CPU wheel already on disk,
# and the later `torch>=2.1` requirement is then satisfied, so nothing pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: setup test demo bench bench-interop bench-train lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[torch,examples,dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python examples/demo.py

bench: setup
	$(BIN)/python bench/bench_select.py

bench-interop: setup
	$(BIN)/python bench/bench_interop.py

bench-train: setup
	$(BIN)/python bench/bench_train.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) out build *.egg-info jprune/*.so
