# ggraft: two commands on a fresh machine — `make demo` and `make test`.
# Both create (or refresh, when pyproject.toml changes) the project virtualenv in .venv.
# torch is the CPU build that lies on this machine's disk (2.13.0); llama-cpp-python is pinned
# in pyproject.toml and builds from source the first time (about 6 minutes on 2 cores).

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ggraft-installed

# llama.cpp's AMX path crashes on every quantized model (ggml-org/llama.cpp#20824): on x86-64 the
# engine is built without it (REPACK and AVX-512 stay). Other machines build as llama.cpp chooses.
NO_AMX := -mno-amx-int8 -mno-amx-tile -mno-amx-bf16
ifeq ($(shell uname -m),x86_64)
LLAMA_CMAKE_ARGS := -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'
endif

.PHONY: venv test demo bench families-table clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" $(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

test: venv
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/python -m fixtures.demo

bench: venv
	mkdir -p benchmarks/.work/results
	$(BIN)/python benchmarks/bench_convert.py | tee benchmarks/.work/results/convert.txt
	$(BIN)/python benchmarks/bench_convert.py --family qwen3vl | tee benchmarks/.work/results/convert-qwen3vl.txt
	$(BIN)/python benchmarks/bench_check.py | tee benchmarks/.work/results/check.txt
	$(BIN)/python benchmarks/bench_pack.py | tee benchmarks/.work/results/pack.txt
	$(BIN)/python benchmarks/bench_run.py | tee benchmarks/.work/results/run.txt
	$(BIN)/python benchmarks/bench_merge.py | tee benchmarks/.work/results/merge.txt
	$(BIN)/python benchmarks/bench_bridge.py | tee benchmarks/.work/results/bridge.txt
	$(BIN)/python benchmarks/update_readme.py

families-table: venv
	$(BIN)/python docs/families_table.py

clean:
	rm -rf $(VENV) .cache
