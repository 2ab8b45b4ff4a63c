"""
Log lines that a client or an upstream could provoke by the thousand, kept to a
bounded rate: at most C{burst} per C{interval} seconds per kind, then one line
saying how many were left out.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger


class RateLimitedLog:
    def __init__(self, log: Logger, clock: IReactorTime, burst: int = 10, interval: float = 60.0) -> None:
        self._log, self._clock, self._burst, self._interval = log, clock, burst, interval
        self._windows: dict[str, tuple[float, int, int]] = {}  # kind -> (window start, emitted, suppressed)

    def info(self, category: str, format: str, **kwargs: Any) -> None:
        """Log C{format} unless this category already used its burst in the current window."""
        now = self._clock.seconds()
        start, emitted, suppressed = self._windows.get(category, (now, 0, 0))
        if now - start >= self._interval:
            if suppressed:
                self._log.info(
                    "Left out {count} more log lines about {category}", count=suppressed, category=category
                )
            start, emitted, suppressed = now, 0, 0
        if emitted < self._burst:
            self._log.info(format, **kwargs)
            emitted += 1
        else:
            suppressed += 1
        self._windows[category] = (start, emitted, suppressed)
