"""
Signals while the daemon runs: SIGHUP and SIGUSR1 handled on the reactor
thread, SIGTERM/SIGINT stopping the reactor once, and twistd's own log file
reopened after an external rotation.
"""

from __future__ import annotations

import signal
from typing import Any, Callable

from twisted.application.service import Service
from twisted.logger import Logger

from lmgate.relay.twistedprivate import twistdLogFile

log = Logger()

#: twistd's log files, found when the signal service starts; SIGUSR1 reopens them.
_logFiles: list[Any] = []


class SignalService(Service):
    """
    Installs LMGate's signal handlers while running: SIGHUP reloads the
    allow-list (stock twistd would die on it), SIGUSR1 reopens the stats file
    for external rotation tools.
    """

    def __init__(self, reactor: Any, handlers: dict[int, Callable[[], object]]) -> None:
        self._reactor, self._handlers = reactor, handlers
        self._previous: dict[int, Any] = {}

    def startService(self) -> None:
        super().startService()
        logFile = twistdLogFile()
        if logFile is not None and logFile not in _logFiles:
            _logFiles.append(logFile)
        for signum, handler in self._handlers.items():
            self._previous[signum] = signal.signal(signum, self._handlerFor(handler))

    def _handlerFor(self, handler: Callable[[], object]) -> Callable[[int, Any], None]:
        def onSignal(signum: int, frame: Any) -> None:
            self._reactor.callFromThread(self._run, signum, handler)

        return onSignal

    def _run(self, signum: int, handler: Callable[[], object]) -> None:
        log.info("Received {signal}", signal=signal.Signals(signum).name)
        try:
            handler()
        except Exception:
            log.failure("Handling {signal} failed", signal=signal.Signals(signum).name)

    def stopService(self) -> None:
        super().stopService()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


class StopSignalGuard(Service):
    """
    SIGTERM and SIGINT stop the reactor once. Twisted's own handlers call
    C{reactor.stop} on every one, so a second signal while draining (Ctrl-C in
    a terminal reaches the supervisor and its workers, and the supervisor then
    signals the workers too; or a worker already stopping because its
    supervisor died) raised C{ReactorNotRunning} with a traceback. Installed
    once the reactor runs (Twisted installs its handlers while starting up),
    these stop the reactor if it still runs and otherwise only log.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._trigger: Any = None

    def startService(self) -> None:
        super().startService()
        self._trigger = self._reactor.addSystemEventTrigger("after", "startup", self._install)

    def _install(self) -> None:
        self._trigger = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._onSignal)

    def _onSignal(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._stop, signal.Signals(signum).name)

    def _stop(self, name: str) -> None:
        from twisted.internet.error import ReactorNotRunning

        try:
            self._reactor.stop()
        except ReactorNotRunning:
            log.info("Received {signal} again: already shutting down", signal=name)
        else:
            log.info("Received {signal}, shutting down.", signal=name)

    def stopService(self) -> None:
        # The handlers stay until the reactor has stopped (Twisted then restores
        # the ones it found): a signal during the drain must still only log.
        super().stopService()
        if self._trigger is not None:
            try:
                self._reactor.removeSystemEventTrigger(self._trigger)
            except ValueError:
                pass
            self._trigger = None


def reopenTwistdLog() -> None:
    """Reopen twistd's log file by its path (after an external tool renamed it)."""
    for logFile in _logFiles:
        logFile.reopen()
