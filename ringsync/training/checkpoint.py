"""Checkpoints: everything a run needs to continue exactly, in one .npz, written atomically.

The file holds the parameters by name (so `np.load(path)["fc0.weight"]` just works), the
optimizer's momentum under `optimizer/<name>`, and a JSON `meta` record: step, epoch, the
position inside the epoch, the seed, the global batch and the model's shape. The random
state is a function of those: the model starts from `seed`, and epoch e's sample order is
default_rng([seed, e]). The current epoch's permutation is stored as well, and checked on
resume, so a NumPy whose generator changed cannot silently replay different batches.

Writes go to a temporary file in the same folder, flushed to disk, then renamed over the
target: a crash mid-write leaves the old checkpoint intact, never a torn one.
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write

FORMAT = "ringsync-checkpoint-1"
OPTIM_PREFIX = "optimizer/"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why, in one line."""


def save_checkpoint(path: str | Path, params: Mapping[str, np.ndarray],
                    optimizer: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Write parameters, optimizer state and `meta` (JSON-able) to `path`, atomically."""
    arrays = {name: np.asarray(v) for name, v in params.items()}
    arrays.update({OPTIM_PREFIX + name: np.asarray(v) for name, v in optimizer.items()})
    arrays["meta"] = np.array(json.dumps({"format": FORMAT, **meta}))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Read (params, optimizer state, meta) back; raise CheckpointError with a one-line reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"--resume {path}: not an .npz checkpoint (truncated or another format)")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
        meta = json.loads(str(arrays.pop("meta")))
    except KeyError:
        raise CheckpointError(f"--resume {path}: not a ringsync checkpoint (no meta record)") from None
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one clear line
        raise CheckpointError(f"--resume {path}: unreadable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"--resume {path}: not a {FORMAT} file")
    params = {k: v for k, v in arrays.items() if not k.startswith(OPTIM_PREFIX)}
    optim = {k[len(OPTIM_PREFIX):]: v for k, v in arrays.items() if k.startswith(OPTIM_PREFIX)}
    return params, optim, meta
