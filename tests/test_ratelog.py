"""Floodable log lines are kept to a bounded rate."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from lmgate.ops.ratelog import RateLimitedLog


class RateLimitedLogTests(SynchronousTestCase):
    def test_burstThenSummary(self) -> None:
        """At most C{burst} lines per window, then one line counting the rest."""
        events: list[dict[str, Any]] = []
        clock = Clock()
        log = RateLimitedLog(Logger(observer=events.append), clock, burst=3, interval=60)
        for n in range(100):
            log.info("kind", "line {n}", n=n)
        self.assertEqual(len(events), 3)
        clock.advance(60)
        log.info("kind", "line {n}", n=100)
        self.assertEqual([e.get("count") for e in events[3:]], [97, None])
        self.assertEqual(events[-1]["n"], 100)
