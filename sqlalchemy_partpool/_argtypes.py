"""Argument types shared by the ``partpool`` command and its ``migrate`` subcommands."""

from __future__ import annotations

import argparse

__all__ = ["positive_int", "seconds", "seconds_or_zero"]


def positive_int(value: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value!r}")
    return number


def _float_seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None


def seconds(value: str) -> float:
    """An argparse type: a finite number of seconds greater than 0."""
    number = _float_seconds(value)
    if not (0 < number < float("inf")):
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value!r}")
    return number


def seconds_or_zero(value: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more."""
    number = _float_seconds(value)
    if not (0 <= number < float("inf")):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value!r}")
    return number
