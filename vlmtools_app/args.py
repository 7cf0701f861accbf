"""Argument types the commands share."""
from __future__ import annotations

import argparse


def at_least(minimum: int):
    """An argparse ``type``: a whole number no smaller than ``minimum`` (counts of questions, samples, tokens)."""
    def count(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text}: at least {minimum}")
        return value

    count.__name__ = f"count (at least {minimum})"
    return count
