# MegaDual's two commands:  `make demo` (set up + run the embedded end-to-end job)
#                           `make test` (set up + run the test suite; what CI runs)
# Both are idempotent: the virtual environment is rebuilt only when its inputs change.

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.megadual-installed
RUN    ?= runs/demo
# One thread per process: the machines this runs on have 2 cores, and oversubscription
# makes small steps many times slower.
export OMP_NUM_THREADS ?= 1

EXT_SOURCES := $(wildcard kernels/csrc/*.cpp kernels/csrc/*.h kernels/csrc/cuda/*.cu kernels/csrc/cuda/*.cuh)

.PHONY: setup test demo bench gpu-wheels gpu-check clean

setup: $(STAMP)

# torch==2.13.0 goes in first and alone: anything that depends on torch installed before it
# would pull the registry's newest (CUDA, multi-GB) build. The constraint file keeps it there
# when a dependency (lpips -> torchvision) would otherwise upgrade it. --no-build-isolation
# builds the extension against that torch instead of a fresh one in an isolated environment.
$(STAMP): setup.py constraints-cpu.txt $(EXT_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet "setuptools>=70" wheel
	$(PY) -m pip install --quiet --constraint constraints-cpu.txt --no-build-isolation -e '.[dev]'
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/megadual demo --out $(RUN)

bench: $(STAMP)
	$(PY) benchmarks/backbone.py

# On a machine with pip access: the wheels a registry-less GPU machine needs, into .whl/.
gpu-wheels: $(STAMP)
	tools/gpu_wheels.sh .whl

# On the GPU machine (its own python3 with a CUDA torch; no venv): build, test, measure.
GPU_OUT ?= runs/gpu-check
gpu-check:
	python3 tools/gpu_check.py $(GPU_OUT)

clean:
	rm -rf $(VENV) build *.egg-info megadual/_C*.so
