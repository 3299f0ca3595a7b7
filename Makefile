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

.PHONY: all test test-serial test-mpi demo demo-ring lint clean straggler

all: test

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(filter pypi,$(MPI)),$(PY) -m pip install -q mpich)
	$(PY) -m pip install -q -e '.[dev,plot]'
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

# Train the MLP on scikit-learn's digits over 4 ranks: loss, test accuracy, and proof that
# every rank ends with the same parameters, bit for bit.
demo: $(VENV)/.installed
	timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n 4 $(VENV)/bin/ringsync-train

demo-ring: $(VENV)/.installed
	timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n 4 $(PY) examples/ring_demo.py

# A straggler experiment end to end: rank 2 sleeps 50 ms per step; the report prices it.
straggler: $(VENV)/.installed
	mkdir -p build/straggler
	timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n 4 $(VENV)/bin/ringsync-train --epochs 2 \
	  --straggler 2:0.05 --report build/straggler/report.json --timeline build/straggler/trace.json
	$(VENV)/bin/ringsync-report build/straggler/report.json --plot build/straggler/straggler.png
	@echo "timeline: build/straggler/trace.json (open in https://ui.perfetto.dev)"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check ringsync tests benchmarks examples

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
