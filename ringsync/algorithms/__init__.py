"""The collective algorithms: pure functions over a buffer and an MPI communicator.

ring.py is where a learner starts. The others are the same ideas tuned for size:
pipelined.py (the ring in cache-sized segments), gathered.py and doubling.py (small buffers),
tree.py (broadcast and barrier), staged.py (the ring for GPU buffers staged through the host).
"""
