"""Data sets and sharding: global batch t holds the same samples whatever the rank count."""
import numpy as np
import pytest

from ringsync.training.data import (
    DataError,
    epoch_permutation,
    load_digits_dataset,
    load_npz_dataset,
    shard_indices,
    steps_per_epoch,
    synthetic_dataset,
)


@pytest.mark.parametrize("p", [1, 2, 3, 4])
def test_p_ranks_take_exactly_the_global_batch(p):
    n, per_rank = 103, 6
    perm = epoch_permutation(seed=5, epoch=2, n=n)
    steps = steps_per_epoch(n, per_rank * p)
    one_rank = epoch_permutation(seed=5, epoch=2, n=n)
    for t in range(steps):
        shards = [shard_indices(perm, t, per_rank, r, p) for r in range(p)]
        assert all(len(s) == per_rank for s in shards)      # every rank, every step: a full batch
        glued = np.concatenate(shards)
        assert np.array_equal(glued, shard_indices(one_rank, t, per_rank * p, 0, 1))
    assert steps == n // (per_rank * p)


def test_each_epoch_is_a_fresh_permutation_from_the_seed():
    a, b = epoch_permutation(1, 0, 50), epoch_permutation(1, 1, 50)
    assert sorted(a) == list(range(50)) and not np.array_equal(a, b)
    assert np.array_equal(a, epoch_permutation(1, 0, 50))


def test_digits_split_is_fixed_and_disjoint():
    d = load_digits_dataset()
    assert d.features == 64 and d.classes == 10
    assert len(d.x_train) + len(d.x_test) == 1797 and 300 < len(d.x_test) < 400
    assert d.x_train.max() <= 1.0
    assert np.array_equal(load_digits_dataset().y_test, d.y_test)


def test_digits_read_directly_match_scikit_learns_loader():
    from sklearn.datasets import load_digits

    from ringsync.training.data import _digits_arrays

    x, y = _digits_arrays()
    ref = load_digits()
    assert np.array_equal(x, ref.data) and np.array_equal(y, ref.target)


def test_synthetic_any_size():
    d = synthetic_dataset(samples=500, features=3, classes=4, seed=1)
    assert len(d.x_train) + len(d.x_test) == 500 and d.features == 3 and d.classes <= 4
    with pytest.raises(ValueError, match="samples"):
        synthetic_dataset(samples=1)


def test_npz_round_trip_and_clear_errors(tmp_path):
    x, y = np.random.default_rng(0).standard_normal((40, 3)), np.arange(40) % 3
    good = tmp_path / "good.npz"
    np.savez(good, X=x, y=y)
    d = load_npz_dataset(good)
    assert d.name == "good" and d.features == 3 and d.classes == 3
    with pytest.raises(DataError, match="no such file"):
        load_npz_dataset(tmp_path / "missing.npz")
    np.savez(tmp_path / "noy.npz", X=x)
    with pytest.raises(DataError, match="missing array"):
        load_npz_dataset(tmp_path / "noy.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match="not a readable"):
        load_npz_dataset(tmp_path / "junk.npz")
    np.savez(tmp_path / "float_y.npz", X=x, y=y * 0.5)
    with pytest.raises(DataError, match="integer labels"):
        load_npz_dataset(tmp_path / "float_y.npz")
    np.savez(tmp_path / "short_y.npz", X=x, y=y[:5])
    with pytest.raises(DataError, match="shape"):
        load_npz_dataset(tmp_path / "short_y.npz")
