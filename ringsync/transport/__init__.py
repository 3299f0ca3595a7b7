"""How bytes move between ranks.

p2p.py: point-to-point over mpi4py, every message as raw bytes (what the algorithms use).
shm.py: the node's shared segment (POSIX shared memory): slots, sync points, poison; shared windows.
memcopy.py: copies into and out of shared memory that step around a trap in memcpy.
gpu.py: CuPy device buffers, and the two ways they reach MPI (CUDA-aware or pinned staging).
"""
