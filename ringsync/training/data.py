"""Data sets and how ranks share them.

Three sources: the digits set shipped inside scikit-learn (1,797 real 8x8 images of
handwritten digits, no download), a synthetic generator of any size, and a user's own
`.npz` file holding arrays `X` (samples, features) and `y` (integer labels).

Sharding, the part that makes data parallelism exact:
  * each epoch has one global permutation of the training set, drawn from (seed, epoch);
  * global batch t is samples perm[t*G : (t+1)*G], where G = ranks * per-rank batch;
  * rank r takes the r-th slice of B = G / ranks samples of it.
So global batch t holds the same samples whatever the rank count, and p ranks with batch B
compute exactly the average gradient that 1 rank with batch p*B computes. Every rank gets
the same number of steps by construction: an epoch has floor(N / G) steps, and the ragged
tail of fewer than G samples is dropped for that epoch (the next epoch's permutation puts
different samples there), so no rank can ever wait on a batch another rank does not have.
"""
from __future__ import annotations

import importlib.util
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEST_FRACTION = 0.2
SPLIT_SEED = 12345        # the train/test split is fixed, whatever the training seed


class DataError(ValueError):
    """A data set that cannot be used; the message says why, in one line."""


@dataclass
class Dataset:
    """A train/test split: X as float rows, y as int64 labels 0..classes-1."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int

    @property
    def features(self) -> int:
        return self.x_train.shape[1]


def split(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float = TEST_FRACTION) -> Dataset:
    """Shuffle once with a fixed seed and hold out `test_fraction` of the samples for testing."""
    order = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    n_test = max(1, round(len(x) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    classes = int(y.max()) + 1
    return Dataset(name, x[train], y[train], x[test], y[test], classes)


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits pixels and labels, as sklearn.datasets.load_digits() returns them.

    Importing scikit-learn costs about a second per process, paid by every rank of every
    job; so the CSV that scikit-learn ships is read directly when it is where scikit-learn
    keeps it, and load_digits() is the fallback.
    """
    spec = importlib.util.find_spec("sklearn")          # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
        if csv.is_file():
            table = np.loadtxt(csv, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data, digits.target.astype(np.int64)


def load_digits_dataset() -> Dataset:
    """scikit-learn's bundled digits: 1,797 8x8 images, pixels 0..16 scaled to 0..1."""
    x, y = _digits_arrays()
    return split("digits", x.astype(np.float64) / 16.0, y)


def synthetic_dataset(samples: int = 10_000, features: int = 64, classes: int = 10,
                      seed: int = 0) -> Dataset:
    """Gaussian blobs: one random centre per class, unit noise around it. Any size, learnable."""
    for name, value, low in (("samples", samples, 2), ("features", features, 1), ("classes", classes, 2)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    rng = np.random.default_rng([seed, 7])
    centres = rng.standard_normal((classes, features)) * 0.4    # overlapping: learnable, not trivial
    y = rng.integers(0, classes, size=samples)
    x = centres[y] + rng.standard_normal((samples, features))
    return split("synthetic", x, y.astype(np.int64))


def load_npz_dataset(path: str | Path) -> Dataset:
    """A user's data: an .npz with X (samples, features) and y (integer labels >= 0)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data {path}: no such file")
    if not zipfile.is_zipfile(path):
        raise DataError(f"--data {path}: not a readable .npz file (truncated or another format)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("X", "y") if k not in f.files]
            if missing:
                raise DataError(f"--data {path}: missing array(s) {', '.join(missing)} "
                                f"(found: {', '.join(f.files) or 'none'})")
            x, y = f["X"], f["y"]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one clear line
        raise DataError(f"--data {path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"--data {path}: need X of shape (n, features) and y of shape (n,); "
                        f"got X {x.shape} and y {y.shape}")
    if len(x) < 2:
        raise DataError(f"--data {path}: need at least 2 samples, got {len(x)}")
    if not np.issubdtype(x.dtype, np.number) or not np.isfinite(x).all():
        raise DataError(f"--data {path}: X must hold finite numbers")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise DataError(f"--data {path}: y must hold integer labels >= 0, got dtype {y.dtype}")
    return split(path.stem, x.astype(np.float64), y.astype(np.int64))


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The global sample order of one epoch: the same on every rank, whatever the rank count."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Full global batches in an epoch (the ragged tail is dropped, so every rank steps alike)."""
    return n // global_batch


def shard_indices(perm: np.ndarray, step: int, batch_size: int, rank: int, size: int) -> np.ndarray:
    """Rank `rank`'s sample indices for global batch `step`: its slice of perm's step-th batch."""
    start = step * batch_size * size + rank * batch_size
    return perm[start:start + batch_size]
