"""The daemon's service tree: pieces not covered end to end elsewhere."""

from __future__ import annotations

import gc

from twisted.trial.unittest import SynchronousTestCase

from lmgate.tap import FreezeService


class FreezeServiceTests(SynchronousTestCase):
    def test_freezesAfterACollection(self) -> None:
        """Started, it collects once and freezes what is left, so later full collections are short."""
        calls: list[str] = []
        self.patch(gc, "collect", lambda *a: calls.append("collect") or 0)
        self.patch(gc, "freeze", lambda: calls.append("freeze"))
        service = FreezeService()
        service.startService()
        self.assertTrue(service.running)
        self.assertEqual(calls, ["collect", "freeze"])
