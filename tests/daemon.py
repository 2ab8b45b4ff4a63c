"""
Running the real daemon for end-to-end tests: C{twistd -n lmgate} as a child
process on loopback, stopped by PID in cleanup.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
from typing import Any, Callable

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


#: Every port L{freePort} handed out: only these are moved when a start loses a bind race.
_chosen: set[int] = set()

#: How a start that could not listen names the port: LMGate's one line
#: ("cannot listen on tcp:PORT:interface=...: address already in use") or Twisted's own
#: ("Couldn't listen on 127.0.0.1:PORT: [Errno 98] Address already in use.").
_CANNOT_LISTEN = re.compile(rb"(?:cannot listen on [a-z0-9]+:|Couldn't listen on [^\s:]*:)(\d+)\b")

#: Starts on fresh ports after losing a bind race, at most, per daemon or script.
RACE_RETRIES = 5


def freePort() -> int:
    """
    A loopback port free at this moment, bound by the daemon soon after. Another
    process may take it in between (tests run in parallel): L{Daemon} and
    L{racedPorts} notice that start failing and start again on a fresh port.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    _chosen.add(port)
    return port


def racedPorts(output: bytes) -> set[int]:
    """
    The ports chosen by L{freePort} that a failed start's C{output} says were
    already in use: a bind race lost to another process, not a fault of the
    code under test. Empty for any other failure, and for ports a test took on
    purpose (those never came from L{freePort}).
    """
    if b"address already in use" not in output.lower():
        return set()
    return {int(port) for port in _CANNOT_LISTEN.findall(output)} & _chosen


def movePort(text: str, old: int, new: int) -> str:
    """C{text} (a config file, an argument, an environment value) with port C{old} as C{new}:
    every C{:OLD} not followed by another digit, as in C{tcp:OLD:...} and C{http://host:OLD}."""
    return re.sub(rf"(?<=:){old}(?!\d)", str(new), text)


def moveCasePorts(case: object, old: int, new: int) -> None:
    """The test case's attributes holding port C{old} (C{self.port}, C{self.admin} ...) now hold C{new}."""
    for name, value in list(vars(case).items()):
        if type(value) is int and value == old:
            setattr(case, name, new)


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


async def waitFor(condition: Callable[[], object], what: str, seconds: float = 30.0, interval: float = 0.05) -> None:
    """
    Poll C{condition} until it is true: what a daemon test waits on instead of
    a fixed pause, which a loaded machine outlasts. Bounded: after C{seconds},
    an C{AssertionError} naming C{what} was awaited.
    """
    for _ in range(max(1, int(seconds / interval))):
        if condition():
            return
        await pause(interval)
    if not condition():
        raise AssertionError(f"waited {seconds} s for {what}")


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
    """
    One C{twistd -n lmgate} process with its own directory and config.

    A start that fails because a port from L{freePort} was taken in the
    meantime by another process is repeated (at most L{RACE_RETRIES} times) on
    a fresh port, by L{waitUntilHealthy} or L{restartIfRaced}: the port is
    replaced in the config file, the arguments and the environment, and in the
    test case's attributes, so C{self.port} and friends follow.
    """

    def __init__(self, case: TestCase, config: str, directory: str, env: dict[str, str] | None = None) -> None:
        self.case, self.directory = case, directory
        self.configPath = os.path.join(directory, "lmgate.yaml")
        with open(self.configPath, "w") as f:
            f.write(config)
        self.env = dict(os.environ, PYTHONPATH=PROJECT, **(env or {}))
        self.env.pop("LMGATE_CONFIG", None)
        self.watch = _Watch()
        self.process: Any = None
        self.moved: dict[int, int] = {}  # port chosen -> the port it was moved to after a lost race
        self._launch: tuple[list[str], dict[str, str]] | None = None
        self._retries = 0

    def _spawn(self, args: list[str], env: dict[str, str]) -> None:
        if self._launch is None:
            self.case.addCleanup(self._kill)
        self._launch = (args, env)
        self.watch = _Watch()
        self.process = reactor.spawnProcess(  # type: ignore[attr-defined]
            self.watch, TWISTD, args, env=env, path=self.directory
        )

    def start(self, *extra: str, logfile: str = "-", pidfile: str = "") -> None:
        args = [TWISTD, "-n", f"--pidfile={pidfile}", f"--logfile={logfile}", "lmgate", "--config", self.configPath, *extra]
        self._spawn(args, self.env)

    def startDemo(self, *extra: str) -> None:
        """C{twistd -n lmgate} with no configuration: the README's embedded demo."""
        self._spawn([TWISTD, "-n", "--pidfile=", "--logfile=-", "lmgate", *extra], self.env)

    def startTac(self) -> None:
        """C{twistd -ny lmgate.tac} with LMGATE_CONFIG naming this daemon's file."""
        args = [TWISTD, "-ny", os.path.join(PROJECT, "lmgate.tac"), "--pidfile=", "--logfile=-"]
        self._spawn(args, dict(self.env, LMGATE_CONFIG=self.configPath))

    def port(self, chosen: int) -> int:
        """Where port C{chosen} is now (itself, unless a lost bind race moved it)."""
        while chosen in self.moved:
            chosen = self.moved[chosen]
        return chosen

    def restartIfRaced(self) -> bool:
        """
        The process ended: if that is because a port from L{freePort} was taken
        by another process between its choice and the bind, start it again the
        same way on a fresh port, and say so. C{False} for any other ending,
        and once L{RACE_RETRIES} restarts were used.
        """
        assert self._launch is not None and self.watch.ended.called
        taken = racedPorts(self.watch.output)
        if not taken or self._retries >= RACE_RETRIES:
            return False
        self._retries += 1
        args, env = self._launch
        with open(self.configPath) as f:
            config = f.read()
        for old in taken:
            new = freePort()
            config = movePort(config, old, new)
            args = [movePort(arg, old, new) for arg in args]
            env = {name: movePort(value, old, new) for name, value in env.items()}
            self.env = {name: movePort(value, old, new) for name, value in self.env.items()}
            moveCasePorts(self.case, old, new)
            self.moved[old] = new
        with open(self.configPath, "w") as f:
            f.write(config)
        self._spawn(args, env)
        return True

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
            if self.watch.ended.called:  # ended: every byte of its output is in
                if self.restartIfRaced():
                    continue
                raise AssertionError(f"lmgate exited early:\n{self.watch.output.decode(errors='replace')}")
            try:
                url = f"http://127.0.0.1:{self.port(port)}/healthz"
                # Bounded: a port lost to another process may accept and never answer.
                response = await agent.request(b"GET", url.encode()).addTimeout(5, reactor)
                body = await readBody(response)
                if response.code == 200 and body == b"ok":
                    return
            except Exception:
                pass
            await pause(0.1)
        raise AssertionError(f"lmgate did not become healthy:\n{self.watch.output.decode(errors='replace')}")

    async def waitUntilHealthyTLS(self, port: int, attempts: int = 150) -> None:
        """Until the TLS listener on C{port} answers C{/healthz} (bounded; a lost bind race starts it again)."""
        import ssl

        def probe(current: int) -> bool:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            try:
                with socket.create_connection(("127.0.0.1", current), timeout=2) as raw:
                    with context.wrap_socket(raw) as tls:
                        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        return b" 200 " in tls.recv(100)
            except OSError:
                return False

        for _ in range(attempts):
            if self.watch.ended.called and not self.restartIfRaced():
                raise AssertionError(f"lmgate exited early:\n{self.watch.output.decode(errors='replace')}")
            if await inThread(probe, self.port(port)):
                return
            await pause(0.1)
        raise AssertionError("the TLS listener did not come up")

    async def stop(self) -> int:
        """SIGTERM, and the exit code."""
        self.signal("TERM")
        return await self.watch.ended


def daemonDirectory(case: TestCase, key: str) -> tuple[str, str]:
    """A fresh directory for a daemon test, with an allow-list admitting C{key} (id C{app},
    owner C{team-a}): the directory and the allow-list's path."""
    directory = os.path.abspath(case.mktemp())
    os.makedirs(directory)
    allowlistPath = os.path.join(directory, "allowlist.csv")
    with open(allowlistPath, "w") as f:
        f.write(f"id,api_key,owner,added\napp,{key},team-a,2026-12-01\n")
    return directory, allowlistPath


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

