"""
C{twistd lmgate --workers N}: N worker processes sharing one listening socket.

The supervisor (the process twistd runs) binds the socket, then starts N
C{twistd -n lmgate --worker-fd FD --worker-index I} children that inherit it and
accept on it (C{adoptStreamPort}); the kernel spreads connections over them.
Each worker is a whole gateway: its own allow-list copy (reloaded on its own
and on SIGHUP), its own upstream pool, and its own stats file
(C{stats.jsonl} → C{stats-w1.jsonl}, C{stats-w2.jsonl}, ...), so records are
never interleaved. The supervisor forwards SIGHUP and SIGUSR1, restarts a worker
that dies, and on SIGTERM stops accepting, lets every worker drain and flush,
and exits 0 once all have. A worker's standard input is a pipe from the
supervisor: if the supervisor dies without stopping it (SIGKILL, a crash), the
pipe ends and the worker drains and exits too, rather than holding the port.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet import abstract, fdesc
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import ReactorNotRunning
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from lmgate.config import Settings
from lmgate.errors import ConfigError
from lmgate.relay.twistedprivate import acceptOneAtATime, serverEndpointAddress

log = Logger()

RESTART_DELAY = 1.0


def workerStatsPath(path: str, index: int) -> str:
    """C{var/stats/stats.jsonl} → C{var/stats/stats-w2.jsonl}."""
    root, ext = os.path.splitext(path)
    return f"{root}-w{index}{ext}"


def listeningSocket(reactor: Any, settings: Settings) -> socket.socket:
    """
    Bind the socket the workers share.

    @raise ConfigError: C{listen} is not a TCP endpoint, or cannot be bound.
    """
    from twisted.internet.endpoints import serverFromString

    try:
        endpoint = serverFromString(reactor, settings.listen)
    except Exception as e:
        raise ConfigError(settings.source, "listen", f"not a usable endpoint ({e})") from None
    if not isinstance(endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)):
        raise ConfigError(settings.source, "listen", "--workers needs a tcp: endpoint (the workers share one TCP socket)")
    family = socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint) else socket.AF_INET
    port, interface, backlog = serverEndpointAddress(endpoint)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        from lmgate.daemon.listen import cannotListen

        raise ConfigError(settings.source, "listen", cannotListen(settings.listen, e)) from None
    sock.setblocking(False)
    os.set_inheritable(sock.fileno(), True)
    return sock


def describeEnding(reason: Failure) -> str:
    """
    How a child process ended, for the log: C{"exit 0"}, C{"exit 3"}, or C{"killed by
    signal 9 (SIGKILL)"}. A process killed by a signal has no exit code, so the exit
    code alone would read C{exit None}.
    """
    code = getattr(reason.value, "exitCode", None)
    number = getattr(reason.value, "signal", None)
    if code is not None or number is None:
        return f"exit {code}" if code is not None else f"ended: {reason.getErrorMessage()}"
    try:
        return f"killed by signal {number} ({signal.Signals(number).name})"
    except ValueError:
        return f"killed by signal {number}"


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: "Supervisor", index: int) -> None:
        self.supervisor, self.index = supervisor, index
        self.ended: Deferred[None] = Deferred()
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        lines = (self._partial.get(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            if line:
                log.info("[w{index}] {line}", index=self.index, line=line.decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        self.supervisor.workerEnded(self, describeEnding(reason), getattr(reason.value, "exitCode", None))
        self.ended.callback(None)


class Supervisor(Service):
    """Starts, watches, signals and stops the worker processes."""

    def __init__(self, reactor: Any, settings: Settings, configPath: str | None, listen: str | None, count: int) -> None:
        self._reactor, self._settings, self._count = reactor, settings, count
        self._configPath, self._listen = configPath, listen
        self._socket: socket.socket | None = None
        self._workers: dict[int, tuple[Any, _Worker]] = {}
        self._stopping = False
        #: Workers that exited non-zero when stopped (one that lost records, say).
        self.uncleanStops = 0

    def startService(self) -> None:
        Service.startService(self)
        self._socket = listeningSocket(self._reactor, self._settings)
        for index in range(1, self._count + 1):
            self._spawn(index)
        for signum in (signal.SIGHUP, signal.SIGUSR1):
            signal.signal(signum, self._forwarder(signum))
        log.info("Started {count} workers on {listen}", count=self._count, listen=self._settings.listen)

    def _forwarder(self, signum: int) -> Any:
        def forward(number: int, frame: Any) -> None:
            self._reactor.callFromThread(self.signalWorkers, signum)

        return forward

    def signalWorkers(self, signum: int) -> None:
        log.info("Forwarding {signal} to the workers", signal=signal.Signals(signum).name)
        for transport, _ in list(self._workers.values()):
            try:
                transport.signalProcess(signum)
            except Exception:
                pass

    def _spawn(self, index: int) -> None:
        assert self._socket is not None
        fd = self._socket.fileno()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        args = [twistd, "-n", "--pidfile=", "--logfile=-", "lmgate", "--worker-fd", str(fd), "--worker-index", str(index)]
        if self._configPath is not None:
            args += ["--config", self._configPath]
        if self._listen is not None:
            args += ["--listen", self._listen]
        worker = _Worker(self, index)
        transport = self._reactor.spawnProcess(
            worker, twistd, args, env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r", fd: fd}
        )
        self._workers[index] = (transport, worker)

    def workerEnded(self, worker: _Worker, ending: str, code: int | None = None) -> None:
        """
        A worker process ended: unless stopping, log how and start it again.

        @param ending: how it ended, from L{describeEnding} ("exit 1", "killed by signal 9 (SIGKILL)").
        @param code: its exit code; None when a signal ended it.
        """
        self._workers.pop(worker.index, None)
        if self._stopping:
            if code is not None and code != 0:  # None: ended by a signal (the TERM sent before it installed its handlers)
                self.uncleanStops += 1
                log.error("Worker {index} stopped with {ending}", index=worker.index, ending=ending)
            return
        log.error("Worker {index} ended ({ending}); starting it again", index=worker.index, ending=ending)
        self._reactor.callLater(RESTART_DELAY, self._respawn, worker.index)

    def _respawn(self, index: int) -> None:
        if not self._stopping and index not in self._workers:
            self._spawn(index)

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        self._stopping = True
        ended = [worker.ended for _, worker in self._workers.values()]
        self.signalWorkers(signal.SIGTERM)

        def closeSocket(result: object) -> object:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
            return result

        return DeferredList(ended).addBoth(closeSocket)


class AdoptedListener(Service):
    """A worker's listener: the supervisor's socket, adopted (one accept at a time); closed when stopping."""

    def __init__(self, reactor: Any, fd: int, site: Any) -> None:
        self._reactor, self._fd, self._site = reactor, fd, site
        self._port: Any = None

    def startService(self) -> None:
        Service.startService(self)
        with socket.socket(fileno=os.dup(self._fd)) as probe:
            family = probe.family
        self._port = self._reactor.adoptStreamPort(self._fd, family, self._site)
        os.close(self._fd)  # the port holds its own duplicate
        # One accept per wake-up. Twisted's port accepts up to 100 connections
        # per wake-up and raises that as traffic grows, so when a client opens its
        # keep-alive connections in a burst (every pool does), the worker woken
        # first took them all and the other workers idled. Every worker is woken
        # for each new connection; taking one at a time lets the least busy one
        # take the next.
        acceptOneAtATime(self._port)

    def stopService(self) -> Any:
        Service.stopService(self)
        if self._port is not None:
            return self._port.stopListening()
        return None


class _PipeEnd(abstract.FileDescriptor):
    """Reads a pipe only to learn that it ended."""

    def __init__(self, reactor: Any, fd: int, ended: Any) -> None:
        super().__init__(reactor)
        self._fd, self._ended = fd, ended
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> Any:
        return fdesc.readFromFD(self._fd, lambda data: None)

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._ended()


class SupervisorWatch(Service):
    """
    In a worker: stop the worker (a normal drained stop) when its standard
    input, the supervisor's end of a pipe, closes: the supervisor is gone.
    """

    def __init__(self, reactor: Any, fd: int = 0) -> None:
        self._reactor, self._fd = reactor, fd
        self._reader: _PipeEnd | None = None

    def startService(self) -> None:
        super().startService()
        self._reader = _PipeEnd(self._reactor, self._fd, self._supervisorGone)
        self._reader.startReading()

    def _supervisorGone(self) -> None:
        self._reader = None
        if self.running:
            log.error("The supervisor is gone (its pipe closed): this worker stops")
            try:
                self._reactor.stop()
            except ReactorNotRunning:
                pass  # already stopping

    def stopService(self) -> None:
        super().stopService()
        if self._reader is not None:
            self._reader.stopReading()
            self._reader = None
