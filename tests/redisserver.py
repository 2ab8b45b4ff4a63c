"""
A real C{redis-server} for tests: started on a free loopback port with no
persistence, in a temporary directory, stopped by PID in cleanup. It can be
hung (SIGSTOP) and resumed (SIGCONT), and killed and started again on the same
port, for the fault tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

REDIS_SERVER = shutil.which("redis-server")

#: Why tests that need Redis are skipped, or None when it is installed.
NO_REDIS = None if REDIS_SERVER else "redis-server not found (apt-get install redis-server)"


def skipUnlessRedis(case: Any) -> Any:
    """Skip the decorated test or test case, saying what to install, when C{redis-server} is missing."""
    if NO_REDIS is not None:
        case.skip = NO_REDIS
    return case


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int, tls: bool = False) -> bool:
    """One blocking PING (loopback, short timeout): whether Redis answers PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
            s = raw
            if tls:
                context = ssl.create_default_context()
                context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # only: is it up?
                s = context.wrap_socket(raw)
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """
    One C{redis-server} child process.

    @ivar port: its loopback port (kept across L{restart}).
    """

    @property
    def url(self) -> str:
        """C{redis://127.0.0.1:PORT/0}, or C{rediss://...} when it serves TLS."""
        return f"{'rediss' if self._tls else 'redis'}://127.0.0.1:{self.port}/0"

    def __init__(self, extraArgs: tuple[str, ...] = (), tls: tuple[str, str] | None = None) -> None:
        """
        @param tls: (key, certificate) PEM paths: serve TLS only (C{rediss://}),
            the certificate also its own CA; clients need no certificate.
        """
        if NO_REDIS is not None:
            raise SkipTest(NO_REDIS)
        self._tls = tls
        self.port = _freePort()
        self._dir = tempfile.mkdtemp(prefix="lmgate-redis-")
        self._extra = extraArgs
        self._process: subprocess.Popen[bytes] | None = None
        self.stopped = False

    def start(self) -> None:
        """Start it and wait (bounded, 10 s) until it answers PING."""
        assert REDIS_SERVER is not None
        for attempt in range(5):
            listen = ["--port", str(self.port)]
            if self._tls is not None:
                key, cert = self._tls
                listen = ["--port", "0", "--tls-port", str(self.port), "--tls-key-file", key, "--tls-cert-file", cert, "--tls-ca-cert-file", cert, "--tls-auth-clients", "no"]
            self._process = subprocess.Popen(
                [REDIS_SERVER, *listen, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", self._dir, *self._extra],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if _ping(self.port, self._tls is not None):
                    return
                if self._process.poll() is not None:
                    break  # lost the port to another process: try a fresh one (first start only)
                time.sleep(0.02)  # helper start-up, not a unit test: the child needs real time
            self._kill()
            self.port = _freePort()
        raise RuntimeError("redis-server did not start")

    def hang(self) -> None:
        """SIGSTOP: connections stay open and nothing is answered."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        """SIGCONT after L{hang}."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)
        self.stopped = False

    def kill(self) -> None:
        """Kill it (SIGKILL: what a crash does) and wait for it to be gone."""
        self._kill()

    def restart(self) -> None:
        """Kill it and start a fresh one (empty: no persistence) on the same port."""
        self._kill()
        self.start()

    def _kill(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        if self.stopped:
            os.kill(process.pid, signal.SIGCONT)
            self.stopped = False
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)

    def command(self, *args: str) -> bytes:
        """One blocking command (inline, loopback), its raw reply: for checks and set-up."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(" ".join(args).encode() + b"\r\n")
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data

    def stop(self) -> None:
        """Kill it and remove its directory."""
        self._kill()
        shutil.rmtree(self._dir, ignore_errors=True)


def startRedis(case: TestCase, extraArgs: tuple[str, ...] = (), tls: tuple[str, str] | None = None) -> RedisServer:
    """A running L{RedisServer}, stopped in C{case}'s cleanup (skips C{case} when redis-server is missing)."""
    server = RedisServer(extraArgs, tls)
    server.start()
    case.addCleanup(server.stop)
    return server


def waitFor(clock: IReactorTime, condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> Deferred[None]:
    """
    Fires when C{condition()} holds, polled on C{clock} (the real reactor in
    these tests); fails with C{AssertionError} after C{timeout} seconds.
    """
    deadline = clock.seconds() + timeout

    async def poll() -> None:
        while not condition():
            if clock.seconds() > deadline:
                raise AssertionError(f"condition not met within {timeout} s")
            await deferLater(clock, interval, lambda: None)

    return Deferred.fromCoroutine(poll())
