"""A shared resource's busy time (the DRAM system): jobs fill the earliest idle cycles after they are ready.

Memory transfers are made of many independent 32-byte transactions, so a transfer may be split
across idle gaps left by transfers reserved earlier (a fluid, work-conserving arbiter that serves
requests in the order the pipeline issues them and lets later requests use the holes).
"""

from __future__ import annotations

import bisect


class Timeline:
    """Disjoint busy intervals [start, end) of one resource, kept sorted and merged."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.busy = 0.0

    def reserve(self, ready: float, duration: float) -> tuple[float, float]:
        """Occupy ``duration`` cycles of idle time from ``ready`` on; returns (first start, last end)."""
        if duration <= 0:
            return ready, ready
        self.busy += duration
        pieces: list[tuple[float, float]] = []
        t, left = ready, duration
        i = bisect.bisect_right(self.ends, t)  # first interval still busy after t
        while left > 0:
            if i < len(self.starts) and self.starts[i] <= t:
                t = self.ends[i]
                i += 1
                continue
            gap_end = self.starts[i] if i < len(self.starts) else float("inf")
            use = min(left, gap_end - t)
            pieces.append((t, t + use))
            left -= use
            t += use
        for s, e in pieces:
            self._insert(s, e)
        return pieces[0][0], pieces[-1][1]

    def _insert(self, s: float, e: float) -> None:
        i = bisect.bisect_left(self.starts, s)
        self.starts.insert(i, s)
        self.ends.insert(i, e)
        # merge with neighbours that touch
        if i + 1 < len(self.starts) and self.starts[i + 1] <= self.ends[i]:
            self.ends[i] = max(self.ends[i], self.ends.pop(i + 1))
            self.starts.pop(i + 1)
        if i > 0 and self.ends[i - 1] >= self.starts[i]:
            self.ends[i - 1] = max(self.ends[i - 1], self.ends.pop(i))
            self.starts.pop(i)

    def forget_before(self, t: float) -> None:
        """Drop intervals that end before ``t`` (no later request can be ready that early)."""
        k = bisect.bisect_left(self.ends, t)
        if k:
            del self.starts[:k]
            del self.ends[:k]

    @property
    def end(self) -> float:
        return self.ends[-1] if self.ends else 0.0
