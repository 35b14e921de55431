# Two commands on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first: on these machines pip takes the CPU wheel already on disk,
# and the later `torch>=2.1` requirement is then satisfied, so nothing pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: setup kernel test demo structured bench bench-interop bench-compact bench-train bench-structured lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[torch,examples,dev]"
	$(BIN)/pip install -q --no-deps torch-pruning==1.6.0  # the structural anchor (bench, tests/test_shrink_torch.py); no deps: torch stays the CPU wheel
	touch $@

# The native CPU kernel (jprune/_cpu_select*.so), rebuilt when its source, setup.py or the installed
# jaxlib's FFI headers change, and once after an install: on a fresh venv pip builds it before jaxlib
# is installed there, with the build environment's headers; this builds it against the jaxlib that runs it.
FFI_HEADERS := $(wildcard $(VENV)/lib/python3*/site-packages/jaxlib/include/xla/ffi/api/*.h)
$(VENV)/.kernel: jprune/_cpu_select.cc setup.py $(FFI_HEADERS) $(VENV)/.installed
	$(BIN)/pip install -q --no-deps -e .
	touch $@

kernel: $(VENV)/.kernel

setup: $(VENV)/.installed $(VENV)/.kernel

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/python examples/demo.py

structured: setup
	$(BIN)/python examples/structured_speed.py

bench: setup
	$(BIN)/python bench/bench_select.py

bench-interop: setup
	$(BIN)/python bench/bench_interop.py

bench-compact: setup
	$(BIN)/python bench/bench_compact.py

bench-train: setup
	$(BIN)/python bench/bench_train.py

bench-structured: setup
	$(BIN)/python bench/bench_structured.py

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) out build *.egg-info jprune/*.so
