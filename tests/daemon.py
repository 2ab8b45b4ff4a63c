"""
Running the real daemon for end-to-end tests: C{twistd -n lmgate} as a child
process on loopback, stopped by PID in cleanup.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
LMGATE = os.path.join(os.path.dirname(sys.executable), "lmgate")
PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def freePort() -> int:
    """A loopback port free at this moment (bound by the daemon soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def portTaken(port: int) -> bool:
    """Something listens on 127.0.0.1:C{port}, or it cannot be bound."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def pause(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    return d


class _Watch(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data

    def errReceived(self, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Failure) -> None:
        code = 0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None)
        if code is None and reason.check(ProcessTerminated):
            code = -(reason.value.signal or 0)
        self.ended.callback(code if code is not None else -1)


class Daemon:
    """One C{twistd -n lmgate} process with its own directory and config."""

    def __init__(self, case: TestCase, config: str, directory: str, env: dict[str, str] | None = None) -> None:
        self.case, self.directory = case, directory
        self.configPath = os.path.join(directory, "lmgate.yaml")
        with open(self.configPath, "w") as f:
            f.write(config)
        self.env = dict(os.environ, PYTHONPATH=PROJECT, **(env or {}))
        self.env.pop("LMGATE_CONFIG", None)
        self.watch = _Watch()
        self.process: Any = None

    def start(self, *extra: str, logfile: str = "-") -> None:
        args = [TWISTD, "-n", "--pidfile=", f"--logfile={logfile}", "lmgate", "--config", self.configPath, *extra]
        self.process = reactor.spawnProcess(  # type: ignore[attr-defined]
            self.watch, TWISTD, args, env=self.env, path=self.directory
        )
        self.case.addCleanup(self._kill)

    def startDemo(self, *extra: str) -> None:
        """C{twistd -n lmgate} with no configuration: the README's embedded demo."""
        args = [TWISTD, "-n", "--pidfile=", "--logfile=-", "lmgate", *extra]
        self.process = reactor.spawnProcess(  # type: ignore[attr-defined]
            self.watch, TWISTD, args, env=self.env, path=self.directory
        )
        self.case.addCleanup(self._kill)

    def startTac(self) -> None:
        """C{twistd -ny lmgate.tac} with LMGATE_CONFIG naming this daemon's file."""
        args = [TWISTD, "-ny", os.path.join(PROJECT, "lmgate.tac"), "--pidfile=", "--logfile=-"]
        env = dict(self.env, LMGATE_CONFIG=self.configPath)
        self.process = reactor.spawnProcess(self.watch, TWISTD, args, env=env, path=self.directory)  # type: ignore[attr-defined]
        self.case.addCleanup(self._kill)

    async def _kill(self) -> None:
        if not self.watch.ended.called:
            try:
                self.process.signalProcess("KILL")
            except Exception:
                pass
            await self.watch.ended

    def signal(self, name: str) -> None:
        self.process.signalProcess(getattr(signal, "SIG" + name))

    async def waitUntilHealthy(self, port: int, attempts: int = 150) -> None:
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, pool=pool)
        for _ in range(attempts):
            if self.watch.ended.called:
                raise AssertionError(f"lmgate exited early:\n{self.watch.output.decode(errors='replace')}")
            try:
                response = await agent.request(b"GET", f"http://127.0.0.1:{port}/healthz".encode())
                body = await readBody(response)
                if response.code == 200 and body == b"ok":
                    return
            except Exception:
                pass
            await pause(0.1)
        raise AssertionError(f"lmgate did not become healthy:\n{self.watch.output.decode(errors='replace')}")

    async def stop(self) -> int:
        """SIGTERM, and the exit code."""
        self.signal("TERM")
        return await self.watch.ended


def readRecords(path: str) -> list[dict[str, Any]]:
    """Every record in a stats file and its rotated siblings."""
    directory, name = os.path.split(path)
    records = []
    for entry in sorted(os.listdir(directory)):
        if entry.startswith(name):
            with open(os.path.join(directory, entry), "rb") as f:
                for line in f:
                    records.append(json.loads(line))
    return records


def inThread(f: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
    from twisted.internet.threads import deferToThread

    return deferToThread(f, *args, **kwargs)

