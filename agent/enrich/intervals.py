"""Interval tables answered for many addresses at once, equal to one `bisect_right` per address.

The scalar tables (scope, policy networks) keep the start of every interval as Python ints; this
keeps the same starts as numpy arrays: IPv4 as uint64, IPv6 as 16-byte big-endian strings, whose
byte order is their numeric order, so `searchsorted` gives the interval of each address.
Tests compare it with the scalar bisect at every boundary and on random addresses.
"""

from __future__ import annotations

import numpy as np


def s16(hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
    """128-bit addresses given as two uint64 words -> big-endian 'S16' (orders like the integers)."""
    b = np.empty((len(hi), 2), dtype=">u8")
    b[:, 0], b[:, 1] = hi, lo
    return b.view("S16").ravel()


class IntervalIndex:
    """Index of the interval holding each address, for sorted interval starts per version."""

    def __init__(self, starts4: list[int], starts6: list[int]):
        self.starts4 = np.array(starts4, dtype=np.uint64)
        m = (1 << 64) - 1
        self.starts6 = s16(np.array([s >> 64 for s in starts6], dtype=np.uint64),
                           np.array([s & m for s in starts6], dtype=np.uint64))

    def index(self, v4: np.ndarray, hi: np.ndarray, lo: np.ndarray) -> np.ndarray:
        out = np.empty(len(v4), dtype=np.int64)
        out[v4] = np.searchsorted(self.starts4, lo[v4], side="right") - 1
        six = ~v4
        if six.any():
            out[six] = np.searchsorted(self.starts6, s16(hi[six], lo[six]), side="right") - 1
        return out
