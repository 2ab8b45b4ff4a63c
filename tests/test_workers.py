"""Workers sharing one listening socket: each takes one connection per wake-up; the supervisor's watch; endings."""

from __future__ import annotations

import os
import signal
import socket
import sys

from twisted.internet import reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from lmgate.daemon.workers import AdoptedListener, Supervisor, SupervisorWatch, _Worker, describeEnding
from tests.daemon import pause


class _Counting(Factory):
    def __init__(self) -> None:
        self.count = 0

    def buildProtocol(self, addr: object) -> Protocol:
        self.count += 1
        return Protocol()


class AdoptedListenerTests(TestCase):
    def test_oneAcceptPerWakeUp(self) -> None:
        """
        A worker's listener accepts one connection each time the socket is
        readable, however many wait (Twisted's port would take up to a hundred):
        the workers sharing the socket, all woken, each take one, so a burst is
        not taken whole by the first one woken. Which worker the kernel wakes
        is its own choice and is not asserted; the accept loop is driven by
        hand here, the reactor not reading the port.
        """
        listening = socket.socket()
        listening.bind(("127.0.0.1", 0))
        listening.listen(128)
        listening.setblocking(False)
        self.addCleanup(listening.close)
        factory = _Counting()
        listener = AdoptedListener(reactor, os.dup(listening.fileno()), factory)
        listener.startService()
        self.addCleanup(listener.stopService)
        listener._port.stopReading()  # only the calls below accept
        clients = [socket.create_connection(listening.getsockname()) for _ in range(3)]
        for client in clients:
            self.addCleanup(client.close)
        listener._port.doRead()
        self.assertEqual(factory.count, 1)
        listener._port.doRead()
        self.assertEqual(factory.count, 2)
        listener._port.numberAccepts = 120  # what Twisted's accept loop sets as traffic grows
        self.assertEqual(listener._port.numberAccepts, 1)
        listener._port.doRead()
        self.assertEqual(factory.count, 3)


class _StopRecorder:
    """The real reactor, except that C{stop} is only counted."""

    def __init__(self) -> None:
        self.stops = 0

    def __getattr__(self, name: str) -> object:
        return getattr(reactor, name)

    def stop(self) -> None:
        self.stops += 1


class SupervisorWatchTests(TestCase):
    def pipe(self) -> tuple[int, int]:
        r, w = os.pipe()
        self.open = {r, w}
        self.addCleanup(lambda: [os.close(fd) for fd in self.open])
        return r, w

    def close(self, fd: int) -> None:
        self.open.discard(fd)  # never closed twice: the number may be reused at once
        os.close(fd)

    async def test_pipeEndStopsTheWorker(self) -> None:
        """The supervisor's end of the pipe closes (it died): the worker stops, once."""
        r, w = self.pipe()
        fake = _StopRecorder()
        watch = SupervisorWatch(fake, r)
        watch.startService()
        self.addCleanup(watch.stopService)
        os.write(w, b"anything the supervisor might write is ignored\n")
        await pause(0.05)
        self.assertEqual(fake.stops, 0)
        self.close(w)
        for _ in range(100):
            if fake.stops:
                break
            await pause(0.02)
        self.assertEqual(fake.stops, 1)

    async def test_stoppedWatchIgnoresTheEnd(self) -> None:
        """A worker already stopping stops watching: the pipe closing then changes nothing."""
        r, w = self.pipe()
        fake = _StopRecorder()
        watch = SupervisorWatch(fake, r)
        watch.startService()
        watch.stopService()
        self.close(w)
        await pause(0.1)
        self.assertEqual(fake.stops, 0)
        self.assertNotIn(r, [reader.fileno() for reader in reactor.getReaders()])


class WorkerEndingTests(TestCase):
    async def test_killedWorkerNamesTheSignal(self) -> None:
        """A worker killed by SIGKILL is logged as killed by that signal, not as C{exit None}."""
        supervisor = Supervisor(Clock(), None, None, None, 1)  # a fake clock: the restart never runs
        worker = _Worker(supervisor, 1)
        with capturedLogs() as events:
            reactor.spawnProcess(worker, sys.executable,
                                 [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                                 env=dict(os.environ))
            await worker.ended
        messages = [e["log_format"].format(**e) for e in events if "ended" in e.get("log_format", "")]
        self.assertEqual(messages, ["Worker 1 ended (killed by signal 9 (SIGKILL)); starting it again"])

    def test_describeEnding(self) -> None:
        """Exit codes read as C{exit N}; signals by number and name."""
        self.assertEqual(describeEnding(Failure(ProcessDone(0))), "exit 0")
        self.assertEqual(describeEnding(Failure(ProcessTerminated(exitCode=3))), "exit 3")
        self.assertEqual(describeEnding(Failure(ProcessTerminated(signal=signal.SIGTERM))), "killed by signal 15 (SIGTERM)")
        self.assertEqual(describeEnding(Failure(ProcessTerminated(signal=200))), "killed by signal 200")
