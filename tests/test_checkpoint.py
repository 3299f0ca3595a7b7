"""Checkpoint files: atomic writes, round trips, and one-line errors for bad files."""
import json

import numpy as np
import pytest

from ringsync.files import atomic_write
from ringsync.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def half_then_crash(f):
        f.write(b"new but incomplete")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        atomic_write(target, half_then_crash)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_round_trip_keeps_names_state_and_meta(tmp_path):
    path = tmp_path / "c.npz"
    params = {"fc0.weight": np.arange(6.0).reshape(2, 3), "fc0.bias": np.ones(3, np.float32)}
    save_checkpoint(path, params, {"fc0.weight": np.full((2, 3), 0.5)}, {"step": 7, "seed": 1})
    got, optim, meta = load_checkpoint(path)
    assert set(got) == set(params) and all(np.array_equal(got[k], params[k]) for k in params)
    assert got["fc0.bias"].dtype == np.float32 and np.array_equal(optim["fc0.weight"], np.full((2, 3), 0.5))
    assert meta["step"] == 7 and meta["seed"] == 1
    with np.load(path) as f:                                 # plain NumPy can read it, no pickle
        assert json.loads(str(f["meta"]))["step"] == 7


def test_bad_files_raise_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(CheckpointError, match="not an .npz"):
        load_checkpoint(tmp_path / "text.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(2))
    with pytest.raises(CheckpointError, match="no meta"):
        load_checkpoint(tmp_path / "plain.npz")
    np.savez(tmp_path / "other.npz", meta=np.array(json.dumps({"format": "something-else"})))
    with pytest.raises(CheckpointError, match="not a ringsync"):
        load_checkpoint(tmp_path / "other.npz")
