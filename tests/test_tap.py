"""The daemon's service tree: pieces not covered end to end elsewhere."""

from __future__ import annotations

import gc
import signal
from typing import Any

from twisted.internet.error import ReactorNotRunning
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from lmgate.daemon.services import FreezeService
from lmgate.daemon.signals import StopSignalGuard


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


class _StoppingReactor:
    """Records system event triggers; runs calls from other threads at once; stops once."""

    def __init__(self) -> None:
        self.triggers: list[tuple[str, str, Any]] = []
        self.stops = 0

    def addSystemEventTrigger(self, phase: str, event: str, f: Any) -> object:
        self.triggers.append((phase, event, f))
        return len(self.triggers)

    def removeSystemEventTrigger(self, trigger: object) -> None:
        raise ValueError("already fired")

    def callFromThread(self, f: Any, *args: Any) -> None:
        f(*args)

    def stop(self) -> None:
        if self.stops:
            raise ReactorNotRunning("Can't stop reactor that isn't running.")
        self.stops += 1


class StopSignalGuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        self.twisted: list[int] = []
        # Stand-ins for the handlers the reactor installs while starting up.
        signal.signal(signal.SIGTERM, lambda signum, frame: self.twisted.append(signum))
        signal.signal(signal.SIGINT, lambda signum, frame: self.twisted.append(signum))
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def messages(self) -> list[str]:
        return [formatEvent(e) for e in self.events if "again" in formatEvent(e) or "shutting down" in formatEvent(e)]

    def test_secondStopSignalIsOnlyLogged(self) -> None:
        """Once the reactor runs, the first SIGINT or SIGTERM stops it; any later one
        (SIGINT then the supervisor's SIGTERM, or a second Ctrl-C) is only logged."""
        reactor = _StoppingReactor()
        guard = StopSignalGuard(reactor)
        guard.startService()
        self.assertEqual([(phase, event) for phase, event, _ in reactor.triggers], [("after", "startup")])
        reactor.triggers[0][2]()  # the reactor has started and installed its handlers
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        guard.stopService()  # the drain runs; the handlers stay
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        self.assertEqual(reactor.stops, 1)
        self.assertEqual(self.twisted, [])
        self.assertEqual(self.messages(), [
            "Received SIGINT, shutting down.",
            "Received SIGTERM again: already shutting down",
            "Received SIGTERM again: already shutting down",
        ])

    def test_stoppedForAnotherReason(self) -> None:
        """The reactor already stopping for another reason (a worker whose supervisor
        died): a SIGTERM then is only logged."""
        reactor = _StoppingReactor()
        guard = StopSignalGuard(reactor)
        guard.startService()
        reactor.triggers[0][2]()
        reactor.stop()
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        self.assertEqual(reactor.stops, 1)
        self.assertEqual(self.messages(), ["Received SIGTERM again: already shutting down"])

    def test_notStartedNotInstalled(self) -> None:
        """Stopped before the reactor ran (an in-process service tree): the handlers stay as they were."""
        reactor = _StoppingReactor()
        guard = StopSignalGuard(reactor)
        guard.startService()
        guard.stopService()
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        self.assertEqual(self.twisted, [signal.SIGTERM])
        self.assertEqual(reactor.stops, 0)
