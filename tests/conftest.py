"""Shared fixtures: ringsync initialized on MPI.COMM_WORLD for tests marked mpi."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def rs():
    """ringsync, initialized on MPI.COMM_WORLD (for tests marked mpi)."""
    import ringsync

    ringsync.init()
    return ringsync
