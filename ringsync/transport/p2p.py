"""Point-to-point messages over mpi4py, as raw bytes.

Every algorithm hands MPI its buffers as `[array, BYTE]`: ringsync never asks MPI to reduce
anything, so MPI needs no datatype for float16 (not every MPI library has one) or for any
other dtype; it only moves bytes. Both sides of a message always agree on its size: the
agreement check (agreement.py) makes sure of it before any algorithm runs.
"""
from __future__ import annotations

from mpi4py import MPI

BYTE = MPI.BYTE
