# Two commands do everything on a fresh Debian machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# torch's version is pinned here (not in pyproject); the build is what pip's index offers: this machine's local
# index has the CPU wheel, PyPI's Linux x86-64 wheel is the CUDA build (README, docs/GPU.md).
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install data test demo bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

# Fashion-MNIST from Debian's package (the embedded default data set).
data:
	@[ -f $(FMNIST) ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist >/dev/null; } \
	  || echo "could not install dataset-fashion-mnist; real-data tests will be skipped"

# The layer contract (pyproject.toml [tool.importlinter]: layers import only downward, no circle), then the suite.
test: install data
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest

# The main job: train the default recipe on the real Fashion-MNIST training set, evaluate on the real test set.
DEMO_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)
demo: install data
	$(BIN)/vggnet train --out $(DEMO_DIR)
	$(BIN)/vggnet eval $(DEMO_DIR)

# Reference vs vggnet in one process (docs/BENCHMARKS.md); waits up to 5 minutes for a quiet machine first. On a CPU
# with AMX the speed sections run a second time with AMX hidden from oneDNN: the column of bf16 CPUs without AMX.
bench: install data
	$(BIN)/vggnet bench --wait-idle 300 --out docs/bench.json
	@if grep -qw amx_tile /proc/cpuinfo; then ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 $(BIN)/vggnet bench \
	  --only peak,train,infer,e2e --out docs/bench-no-amx.json; fi

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
