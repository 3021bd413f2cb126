"""Readers for streaming sources: what a network link looks like to ``kvcodec.open``."""
from __future__ import annotations

import time


class RateLimitedReader:
    """A forward-only reader that delivers at most ``bits_per_s`` (a simulated link).

    Wraps any object with ``read(n)``; ``bytes_read`` counts what was delivered.
    """

    def __init__(self, raw, bits_per_s: float, block: int = 1 << 16):
        self.raw, self.rate, self.block = raw, bits_per_s / 8.0, block
        self.bytes_read = 0
        self._start = None

    def read(self, n: int = -1) -> bytes:
        if self._start is None:
            self._start = time.perf_counter()
        n = self.block if n is None or n < 0 else min(n, self.block)
        data = self.raw.read(n)
        self.bytes_read += len(data)
        due = self._start + self.bytes_read / self.rate
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return data

    def close(self):
        close = getattr(self.raw, "close", None)
        if close:
            close()
