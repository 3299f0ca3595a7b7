# ringsync: `make test` and `make demo` are the two commands a user types on a fresh machine.
# Both create .venv when missing and install what they need: the project, its test tools and
# an MPI from PyPI (the mpich wheel puts mpiexec inside the venv). To use a system MPI instead:
#   make test MPI=system MPIEXEC=mpirun MPIEXEC_FLAGS="--oversubscribe"   (Open MPI)

PYTHON     ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
MPI        ?= pypi
MPIEXEC    ?= $(if $(filter pypi,$(MPI)),$(VENV)/bin/mpiexec,mpiexec)
MPIEXEC_FLAGS ?=
RANKS      ?= 1 2 3 4
# Every MPI run has a wall-clock limit, so a hung rank can never stall the suite.
MPI_TIMEOUT ?= 300
TEST_TIMEOUT ?= 120

.PHONY: all test test-serial test-mpi test-gpu demo demo-ring lint clean

all: test

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(filter pypi,$(MPI)),$(PY) -m pip install -q mpich)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: test-serial test-mpi

test-serial: $(VENV)/.installed
	RINGSYNC_TEST_MPIEXEC="$(MPIEXEC) $(MPIEXEC_FLAGS)" $(PY) -m pytest tests -q -m "not mpi" -p no:cacheprovider --timeout $(TEST_TIMEOUT)

test-mpi: $(VENV)/.installed
	@set -e; for n in $(RANKS); do \
	  echo "== MPI tests on $$n rank(s) =="; \
	  timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n $$n $(PY) -m pytest tests -q -m mpi \
	    --with-mpi -p no:cacheprovider --timeout $(TEST_TIMEOUT) -W ignore::pytest.PytestUnraisableExceptionWarning; \
	done

# GPU tests: install CuPy (GPU_EXTRA=gpu-cuda11 / gpu-cuda13 for other CUDA majors), refuse
# with the reason when no CuPy or device is usable, then the tests marked gpu: serial ones (training jobs), MPI ones on 1 and 2 ranks.
GPU_EXTRA  ?= gpu
GPU_RANKS  ?= 1 2
test-gpu: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[$(GPU_EXTRA)]'
	$(PY) -c "import sys; from ringsync.buffers import main; sys.exit(main(['--require-gpu']))"
	RINGSYNC_TEST_MPIEXEC="$(MPIEXEC) $(MPIEXEC_FLAGS)" $(PY) -m pytest tests -q -m "gpu and not mpi" \
	  -p no:cacheprovider --timeout 600 -rs
	@set -e; for n in $(GPU_RANKS); do \
	  echo "== GPU tests on $$n rank(s) =="; \
	  timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n $$n $(PY) -m pytest tests -q -m gpu \
	    --with-mpi -p no:cacheprovider --timeout $(TEST_TIMEOUT) -rs -W ignore::pytest.PytestUnraisableExceptionWarning; \
	done

demo: demo-ring

demo-ring: $(VENV)/.installed
	timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n 4 $(PY) examples/ring_demo.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check ringsync tests benchmarks examples

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
