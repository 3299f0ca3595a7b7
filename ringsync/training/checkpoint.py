"""Checkpoints: everything a run needs to continue exactly, in one .npz, written atomically.

The file holds the parameters by name (so `np.load(path)["fc0.weight"]` just works), the
optimizer's momentum under `optimizer/<name>`, and a JSON `meta` record: step, epoch, the
position inside the epoch, the seed, the global batch and the model's shape. The random
state is a function of those: the model starts from `seed`, and epoch e's sample order is
default_rng([seed, e]). The current epoch's permutation is stored as well, and checked on
resume, so a NumPy whose generator changed cannot silently replay different batches.

With gradient compression (`--compression`), each rank's compression state (its error-feedback
residual, PowerSGD's Q matrices, the step counter) is gathered to rank 0 and stored under
`compression/<rank>/<name>`, one group per rank; the meta record then names the compressor's
signature and the number of ranks whose state it holds. Arrays whose dtype NumPy's .npz cannot
describe (ml_dtypes' bfloat16) are stored as their raw bytes, their dtype named in the meta.

Writes go to a temporary file in the same folder, flushed to disk, then renamed over the
target: a crash mid-write leaves the old checkpoint intact, never a torn one.
"""
from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..files import atomic_write

FORMAT = "ringsync-checkpoint-1"
OPTIM_PREFIX = "optimizer/"
COMPRESSION_PREFIX = "compression/"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says why, in one line."""


def save_checkpoint(path: str | Path, params: Mapping[str, np.ndarray],
                    optimizer: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                    compression: Sequence[Mapping[str, np.ndarray]] | None = None) -> None:
    """Write parameters, optimizer state and `meta` (JSON-able) to `path`, atomically.

    `compression`, if given, is every rank's compression state in rank order (rank r's arrays
    go under `compression/r/`); the meta then records how many ranks' states the file holds.
    """
    arrays = {name: np.asarray(v) for name, v in params.items()}
    arrays.update({OPTIM_PREFIX + name: np.asarray(v) for name, v in optimizer.items()})
    meta = {"format": FORMAT, **meta}
    if compression is not None:
        raw_dtypes = {}
        for rank, state in enumerate(compression):
            for name, value in state.items():
                key = f"{COMPRESSION_PREFIX}{rank}/{name}"
                arrays[key], raw = _storable(np.asarray(value))
                if raw:
                    raw_dtypes[key] = raw
        meta["compression_state_ranks"] = len(compression)
        meta["compression_raw_dtypes"] = raw_dtypes
    arrays["meta"] = np.array(json.dumps(meta))
    atomic_write(path, lambda f: np.savez(f, **arrays))


def _storable(a: np.ndarray) -> tuple[np.ndarray, list | None]:
    """An array .npz can hold without pickle; a dtype it cannot describe (kind 'V', as
    ml_dtypes' bfloat16 appears) becomes raw bytes plus [dtype name, shape] to undo it."""
    if a.dtype.kind != "V" or a.dtype.names is not None:
        return a, None
    return np.ascontiguousarray(a).view(np.uint8).reshape(-1), [a.dtype.name, list(a.shape)]


def _restored(a: np.ndarray, raw: list) -> np.ndarray:
    name, shape = raw
    return a.view(_dtype(name)).reshape(tuple(shape))


def pack_state(state: Mapping[str, np.ndarray]) -> np.ndarray:
    """A dict of arrays as one uint8 array (a JSON header of names, dtypes and shapes, its
    length in 8 bytes before it, then the arrays' bytes), so ranks can gather it in one call."""
    names = sorted(state)
    arrays = [np.asarray(state[n], order="C") for n in names]   # (ascontiguousarray makes 0-d 1-d)
    header = json.dumps([[n, a.dtype.name, list(a.shape)] for n, a in zip(names, arrays)]).encode()
    parts = [np.frombuffer(np.array([len(header)], dtype="<u8").tobytes(), np.uint8),
             np.frombuffer(header, np.uint8), *(a.reshape(-1).view(np.uint8) for a in arrays)]
    return np.concatenate(parts)


def unpack_state(blob: np.ndarray) -> dict[str, np.ndarray]:
    """pack_state's dict back (copies, in the arrays' own dtypes and shapes)."""
    blob = np.ascontiguousarray(blob, dtype=np.uint8)
    n = int(blob[:8].view("<u8")[0])
    out, offset = {}, 8 + n
    for name, dtype, shape in json.loads(blob[8:offset].tobytes()):
        dt = _dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        out[name] = blob[offset:offset + size].copy().view(dt).reshape(tuple(shape))
        offset += size
    return out


def _dtype(name: str) -> np.dtype:
    """np.dtype(name), including ml_dtypes' names (bfloat16), which NumPy learns on its import."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes  # noqa: F401 - registers bfloat16 & co. with NumPy

        return np.dtype(name)


def load_checkpoint(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    """Read (params, optimizer state, meta) back; raise CheckpointError with a one-line reason."""
    params, optim, _, meta = load_checkpoint_with_compression(path)
    return params, optim, meta


def load_checkpoint_with_compression(path: str | Path) -> tuple[
        dict[str, np.ndarray], dict[str, np.ndarray], list[dict[str, np.ndarray]], dict]:
    """(params, optimizer state, every saved rank's compression state in rank order, meta);
    the list is empty when the checkpoint holds none. CheckpointError with a one-line reason."""
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
    params = {k: v for k, v in arrays.items()
              if not k.startswith(OPTIM_PREFIX) and not k.startswith(COMPRESSION_PREFIX)}
    optim = {k[len(OPTIM_PREFIX):]: v for k, v in arrays.items() if k.startswith(OPTIM_PREFIX)}
    nranks = meta.get("compression_state_ranks", 0)
    raw_dtypes = meta.get("compression_raw_dtypes", {})
    if not isinstance(nranks, int) or nranks < 0 or not isinstance(raw_dtypes, dict):
        raise CheckpointError(f"--resume {path}: invalid compression record in the meta")
    compression: list[dict[str, np.ndarray]] = [{} for _ in range(nranks)]
    for key, value in arrays.items():
        if not key.startswith(COMPRESSION_PREFIX):
            continue
        rank, sep, name = key[len(COMPRESSION_PREFIX):].partition("/")
        if not (sep and rank.isdigit() and int(rank) < nranks):
            raise CheckpointError(f"--resume {path}: stray compression state {key!r}")
        try:
            compression[int(rank)][name] = _restored(value, raw_dtypes[key]) if key in raw_dtypes else value
        except Exception as exc:  # noqa: BLE001 - e.g. bfloat16 state without ml_dtypes
            raise CheckpointError(f"--resume {path}: cannot read {key} "
                                  f"({type(exc).__name__}: {exc})") from None
    return params, optim, compression, meta
