"""The command line's inputs (ringsync-model's subcommands share them): sizes, lists, ranks,
rates, algorithm names, a calibration file. Each bad one is an argparse error or fail():
exit 2 with one line."""
from __future__ import annotations

import argparse

from ..cli import fail, int_at_least, parse_rate
from . import algorithms as alg
from .params import Calibration

PROG = "ringsync-model"
MAX_P = 4096
def list_of(parse):
    def parse_list(text: str) -> list:
        items = [parse(item) for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"an empty list: {text!r}")
        return items
    return parse_list


def rate(text: str) -> int | None:
    """A link rate: 1gbit, 25gbit, ... (none: unshaped)."""
    return parse_rate(text)


def p_count(text: str) -> int:
    p = int_at_least(1)(text)
    if p > MAX_P:
        raise argparse.ArgumentTypeError(f"p must be <= {MAX_P}, got {p}")
    return p


def algorithm_name(text: str) -> str:
    if text != "auto" and text not in alg.ALGORITHMS:
        raise argparse.ArgumentTypeError(f"unknown algorithm {text!r}; one of auto, {', '.join(alg.ALGORITHMS)}")
    return text


def calibration_of(path: str | None) -> Calibration:
    if path is None:
        return Calibration()
    try:
        return Calibration.load(path)
    except ValueError as exc:
        fail(PROG, f"--calibration: {exc}")


def write_or_fail(path: str, save) -> None:
    """save(path), or exit 2 with one line if the file cannot be written."""
    try:
        save(path)
    except OSError as exc:
        fail(PROG, f"cannot write {path}: {exc.strerror or exc}")
