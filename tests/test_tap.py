"""The daemon's service tree: pieces not covered end to end elsewhere."""

from __future__ import annotations

import gc
import signal

from twisted.trial.unittest import SynchronousTestCase

from lmgate.tap import FreezeService, StopSignalGuard


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


class _TriggerReactor:
    """Records system event triggers and calls from other threads."""

    def __init__(self) -> None:
        self.triggers: list[tuple[str, str, object]] = []
        self.fromThread: list[tuple[object, tuple[object, ...], dict[str, object]]] = []

    def addSystemEventTrigger(self, phase: str, event: str, f: object) -> object:
        self.triggers.append((phase, event, f))
        return len(self.triggers)

    def removeSystemEventTrigger(self, trigger: object) -> None:
        raise ValueError("already fired")

    def callFromThread(self, f: object, *args: object, **kwargs: object) -> None:
        self.fromThread.append((f, args, kwargs))


class StopSignalGuardTests(SynchronousTestCase):
    def setUp(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.addCleanup(signal.signal, signum, signal.getsignal(signum))
        self.stops: list[int] = []
        # Stand-ins for the handlers the reactor installs while starting up.
        signal.signal(signal.SIGTERM, lambda signum, frame: self.stops.append(signum))
        signal.signal(signal.SIGINT, lambda signum, frame: self.stops.append(signum))

    def test_secondStopSignalIsOnlyLogged(self) -> None:
        """After start-up the first SIGTERM or SIGINT stops as before; any later one
        (SIGINT then the supervisor's SIGTERM, or a second Ctrl-C) is only logged."""
        reactor = _TriggerReactor()
        guard = StopSignalGuard(reactor)
        guard.startService()
        self.assertEqual([(phase, event) for phase, event, _ in reactor.triggers], [("after", "startup")])
        reactor.triggers[0][2]()  # the reactor has started and installed its handlers
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        self.assertEqual(self.stops, [signal.SIGINT])
        self.assertEqual(len(reactor.fromThread), 2)
        self.assertEqual(reactor.fromThread[0][2], {"signal": "SIGTERM"})
        guard.stopService()

    def test_notStartedNotWrapped(self) -> None:
        """Stopped before the reactor ran (an in-process service tree): the handlers stay as they were."""
        reactor = _TriggerReactor()
        guard = StopSignalGuard(reactor)
        guard.startService()
        guard.stopService()
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        self.assertEqual(self.stops, [signal.SIGTERM, signal.SIGTERM])
