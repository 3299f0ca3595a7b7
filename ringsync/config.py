"""Every RINGSYNC_* environment variable is read through these helpers.

Each setting is an explicit argument somewhere; the environment only supplies its default.
The README's configuration table lists them all. A malformed value raises ValueError
naming the variable, rather than being silently ignored.
"""
from __future__ import annotations

import os


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None or value.strip() == "" else value.strip()


def env_str(name: str, default: str, choices: tuple[str, ...] | None = None) -> str:
    """A string setting, optionally restricted to `choices` (compared lower-case)."""
    value = _raw(name)
    if value is None:
        return default
    if choices is not None:
        value = value.lower()
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def env_float(name: str, default: float | None, minimum: float = 0.0) -> float | None:
    """A number >= `minimum`; unset (or empty) gives `default`."""
    value = _raw(name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number; got {value!r}") from None
    if not number >= minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    return number


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """A whole number >= `minimum`; unset (or empty) gives `default`."""
    value = _raw(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{name} must be a whole number; got {value!r}") from None
    if number < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    return number


def env_bool(name: str, default: bool) -> bool:
    """1/true/yes/on or 0/false/no/off."""
    value = _raw(name)
    if value is None:
        return default
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 1 or 0 (true/false); got {value!r}")
