"""RINGSYNC_* parsing: defaults when unset, clear errors naming the variable when malformed."""
import pytest

from ringsync import config


def test_unset_and_empty_give_the_default(monkeypatch):
    monkeypatch.delenv("RINGSYNC_X", raising=False)
    assert config.env_float("RINGSYNC_X", 60.0) == 60.0
    monkeypatch.setenv("RINGSYNC_X", " ")
    assert config.env_int("RINGSYNC_X", 3) == 3


def test_values_are_parsed(monkeypatch):
    monkeypatch.setenv("RINGSYNC_X", "2.5")
    assert config.env_float("RINGSYNC_X", None) == 2.5
    monkeypatch.setenv("RINGSYNC_X", "Barrier")
    assert config.env_str("RINGSYNC_X", "off", ("off", "barrier")) == "barrier"
    monkeypatch.setenv("RINGSYNC_X", "yes")
    assert config.env_bool("RINGSYNC_X", False) is True


@pytest.mark.parametrize("func,value", [
    (lambda: config.env_float("RINGSYNC_X", 1.0), "fast"),
    (lambda: config.env_float("RINGSYNC_X", 1.0), "-1"),
    (lambda: config.env_int("RINGSYNC_X", 1), "1.5"),
    (lambda: config.env_bool("RINGSYNC_X", False), "maybe"),
    (lambda: config.env_str("RINGSYNC_X", "a", ("a", "b")), "c"),
])
def test_malformed_values_name_the_variable(monkeypatch, func, value):
    monkeypatch.setenv("RINGSYNC_X", value)
    with pytest.raises(ValueError, match="RINGSYNC_X"):
        func()
