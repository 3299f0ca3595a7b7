"""Data-parallel training in the Horovod style, on ringsync's public API:

    mpiexec -n 4 python examples/train_mlp.py

The five Horovod steps: init; shard the data by rank; wrap the optimizer in
DistributedOptimizer; broadcast rank 0's parameters; train. (`ringsync-train` is the
full-featured version of this loop: checkpoints, progress bar, report.)
"""
import hashlib

import numpy as np
from sklearn.datasets import load_digits

import ringsync as rs
from ringsync.training.nn import MLP

rs.init()                                                   # 1. one process per rank

digits = load_digits()
x, y = digits.data.astype(np.float32) / 16.0, digits.target
batch = 32                                                  # per rank; the global batch is size() * 32

model = MLP([64, 128, 10], seed=rs.rank())                  # deliberately different on each rank...
opt = rs.DistributedOptimizer(rs.SGD(model.params, lr=0.1, momentum=0.9))   # 3. averaged gradients
rs.broadcast_parameters(model.params, root=0)               # 4. ...until rank 0's weights are copied out

global_batch = batch * rs.size()
for epoch in range(10):
    order = np.random.default_rng(epoch).permutation(len(x))          # same order on every rank
    for start in range(0, len(x) - global_batch + 1, global_batch):
        mine = order[start + rs.rank() * batch: start + (rs.rank() + 1) * batch]   # 2. this rank's shard
        loss, acc = model.loss_and_grad(x[mine], y[mine])   # forward + backward on the shard
        opt.step()                                          # 5. all-reduce (average) grads, update
    if rs.rank() == 0:
        print(f"epoch {epoch + 1}: last batch loss {loss:.4f}, accuracy {acc:.3f}")

loss, acc = model.evaluate(x, y)
digest = np.frombuffer(hashlib.sha256(model.params.data.tobytes()).digest(), dtype=np.uint8)
hashes = rs.allgather(digest).reshape(rs.size(), -1)        # every rank's hash, on every rank
if rs.rank() == 0:
    print(f"all {len(x)} samples: loss {loss:.4f}, accuracy {acc:.3f}; "
          f"model identical on every rank: {bool((hashes == hashes[0]).all())}")
