"""A ringsync-train job whose last rank raises in its third gradient computation.

    mpiexec -n 3 python tests/sync_fail_job.py --sync async --max-steps 50

test_sync_jobs.py runs it: the whole job must end at once (the abort hook), with no hang.
"""
import sys

from mpi4py import MPI

from ringsync.training import train

calls = 0
original = train.Trainer.compute_gradients


def compute_gradients(self, xb, yb):
    global calls
    calls += 1
    if calls == 3 and MPI.COMM_WORLD.Get_rank() == MPI.COMM_WORLD.Get_size() - 1:
        raise RuntimeError("injected failure in a worker")
    return original(self, xb, yb)


train.Trainer.compute_gradients = compute_gradients
sys.exit(train.main(sys.argv[1:]))
