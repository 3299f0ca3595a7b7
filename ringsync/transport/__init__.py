"""How bytes move between ranks.

p2p.py: point-to-point over mpi4py, every message as raw bytes (what the algorithms use).
gpu.py: CuPy device buffers, and the two ways they reach MPI (CUDA-aware or pinned staging).
"""
