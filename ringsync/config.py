"""Every RINGSYNC_* environment variable is read through these helpers.

Each setting is an explicit argument somewhere; the environment only supplies its default.
docs/configuration.md lists them all. A malformed value raises ValueError
naming the variable, rather than being silently ignored.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, fields


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


# --- the settings every rank must share ---------------------------------------------------------
# Each of these changes which messages a rank sends (the algorithm, the segment size, whether a
# call opens with the agreement check, how a fusion bucket is cut, whether a step starts with a
# barrier). Ranks that read different values would send different messages and hang or crash,
# so they are read once, at init(), frozen, and compared across ranks there (context.py).

ALGORITHMS = ("auto", "doubling", "pipelined", "ring")
TIMING_MODES = ("off", "passive", "barrier")
TRANSPORTS = ("auto", "p2p", "shm")
DEFAULT_SMALL_BYTES = 16 * 1024
DEFAULT_SEGMENT_BYTES = 512 * 1024
DEFAULT_FUSION_BYTES = 64 * 1024 * 1024
DEFAULT_FIRST_BUCKET_BYTES = 1024 * 1024       # PyTorch DDP's first bucket


@dataclass(frozen=True)
class Settings:
    """The shared settings, one field per RINGSYNC_* variable (docs/configuration.md)."""

    allreduce: str = "auto"                    # RINGSYNC_ALLREDUCE: auto picks by size
    small_bytes: int = DEFAULT_SMALL_BYTES     # RINGSYNC_SMALL_BYTES: auto's small-buffer limit
    segment_bytes: int = DEFAULT_SEGMENT_BYTES  # RINGSYNC_SEGMENT_BYTES: pipelined ring segments
    check_agreement: bool = True               # RINGSYNC_CHECK_AGREEMENT
    check_finite: bool = False                 # RINGSYNC_CHECK_FINITE
    fusion_threshold: int = DEFAULT_FUSION_BYTES  # RINGSYNC_FUSION_THRESHOLD (0: no fusion)
    first_bucket_bytes: int = DEFAULT_FIRST_BUCKET_BYTES  # RINGSYNC_FIRST_BUCKET_BYTES: backward buckets
    timing: str = "passive"                    # RINGSYNC_TIMING
    timing_every: int = 1000                   # RINGSYNC_TIMING_EVERY
    cuda_aware: str = "auto"                   # RINGSYNC_CUDA_AWARE: auto, 0 or 1
    staging_segment: int = 1 << 20             # RINGSYNC_STAGING_SEGMENT (bytes)
    transport: str = "auto"                    # RINGSYNC_TRANSPORT: auto, p2p or shm (within a node)
    node_size: int = 0                         # RINGSYNC_NODE_SIZE: simulated nodes of k ranks (0: real)
    shm_slot_bytes: int = 1 << 20              # RINGSYNC_SHM_SLOT_BYTES: a rank's shared slot
    shm_small_bytes: int = 1 << 18             # RINGSYNC_SHM_SMALL_BYTES: gathered bytes per rank
    model: str = ""                            # RINGSYNC_MODEL: a calibration file's content hash ("": none)

    @classmethod
    def from_env(cls) -> Settings:
        """Read every shared setting from the environment (ValueError names a bad variable)."""
        return cls(
            allreduce=env_str("RINGSYNC_ALLREDUCE", "auto", ALGORITHMS),
            small_bytes=env_int("RINGSYNC_SMALL_BYTES", DEFAULT_SMALL_BYTES),
            segment_bytes=env_int("RINGSYNC_SEGMENT_BYTES", DEFAULT_SEGMENT_BYTES, minimum=1),
            check_agreement=env_bool("RINGSYNC_CHECK_AGREEMENT", True),
            check_finite=env_bool("RINGSYNC_CHECK_FINITE", False),
            fusion_threshold=env_int("RINGSYNC_FUSION_THRESHOLD", DEFAULT_FUSION_BYTES),
            first_bucket_bytes=env_int("RINGSYNC_FIRST_BUCKET_BYTES", DEFAULT_FIRST_BUCKET_BYTES),
            timing=env_str("RINGSYNC_TIMING", "passive", TIMING_MODES),
            timing_every=env_int("RINGSYNC_TIMING_EVERY", 1000),
            cuda_aware=env_str("RINGSYNC_CUDA_AWARE", "auto", ("auto", "0", "1")),
            staging_segment=env_int("RINGSYNC_STAGING_SEGMENT", 1 << 20, minimum=1),
            transport=env_str("RINGSYNC_TRANSPORT", "auto", TRANSPORTS),
            node_size=env_int("RINGSYNC_NODE_SIZE", 0),
            shm_slot_bytes=env_int("RINGSYNC_SHM_SLOT_BYTES", 1 << 20, minimum=64),
            shm_small_bytes=env_int("RINGSYNC_SHM_SMALL_BYTES", 1 << 18),
            model=content_hash(env_str("RINGSYNC_MODEL", "")),
        )

    def small_limit(self, p: int, shared_node: bool, slot_bytes: int = 0) -> int:
        """The largest all-reduce (bytes) that rides on the opening, every rank reducing all p
        buffers: RINGSYNC_SMALL_BYTES; with every rank on one node in shared memory, also any
        buffer whose p-1 other copies, read by each rank, total at most RINGSYNC_SHM_SMALL_BYTES
        (reading a neighbour's memory costs no message), within one slot."""
        if not shared_node or p < 2:
            return self.small_bytes
        return min(max(self.small_bytes, self.shm_small_bytes // (p - 1)), slot_bytes)

    def encode(self) -> bytes:
        """The settings as text, one `VARIABLE=value` per line: what ranks compare at init()."""
        return "\n".join(f"{var}={value}" for var, value in self.variables().items()).encode()

    def variables(self) -> dict[str, str]:
        """{RINGSYNC_* name: value as text}, in the dataclass's field order."""
        return {f"RINGSYNC_{f.name.upper()}": str(getattr(self, f.name)).lower() for f in fields(self)}


def content_hash(path: str) -> str:
    """The hash of a file's content ("" for no file): RINGSYNC_MODEL's file is compared across
    ranks by what it says, not by where it lies."""
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            return hashlib.blake2b(f.read(), digest_size=16).hexdigest()
    except OSError as exc:
        raise ValueError(f"RINGSYNC_MODEL: cannot read the calibration file {path!r}: {exc.strerror}") from None


def differing_settings(texts: list[bytes]) -> str | None:
    """None if every rank's encoded Settings agree; else 'VAR: value on ranks 0, 2; other on rank 1; ...'."""
    tables = [dict(line.split("=", 1) for line in t.decode().splitlines()) for t in texts]
    parts = []
    for var in tables[0]:
        values: dict[str, list[int]] = {}
        for q, table in enumerate(tables):
            values.setdefault(table.get(var, "?"), []).append(q)
        if len(values) > 1:
            parts.append(f"{var}: " + "; ".join(
                f"{v!r} on rank{'s' if len(qs) > 1 else ''} {', '.join(map(str, qs))}" for v, qs in values.items()))
    return " | ".join(parts) or None
