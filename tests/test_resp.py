"""
The limits store's Redis client (lmgate/limits/resp.py): RESP encoding and
parsing at any split, pipelined replies matched in order, failures handed to
the right callers, the watchdog; and, against a real redis-server, AUTH with a
user and SELECT of a database on each connection.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lmgate.limits.redis import RedisStore, parseRedisUrl
from lmgate.limits.resp import (
    ProtocolError,
    RedisClient,
    RedisConnectionError,
    RedisError,
    RedisProtocol,
    ReplyParser,
    encodeCommand,
)
from lmgate.limits.store import Figure, StoreUnavailable
from tests.redisserver import skipUnlessRedis, startRedis

#: Every kind of reply, as Redis sends it, and as the parser gives it.
REPLIES = [
    (b"+OK\r\n", "OK"),
    (b":-42\r\n", -42),
    (b"$5\r\nh\xc3\xa9y!\r\n", "h\u00e9y!"),
    (b"$0\r\n\r\n", ""),
    (b"$-1\r\n", None),
    (b"$4\r\na\r\nb\r\n", "a\r\nb"),  # CRLF inside a bulk string is data
    (b"*-1\r\n", None),
    (b"*0\r\n", []),
    (b"*3\r\n$1\r\n0\r\n*2\r\n$3\r\nk:1\r\n$3\r\nk:2\r\n:7\r\n", ["0", ["k:1", "k:2"], 7]),
]


class EncodeTests(SynchronousTestCase):
    def test_command(self) -> None:
        """Text as UTF-8, integers in decimal, bytes as they are, each a bulk string with its byte length."""
        self.assertEqual(
            encodeCommand(["EVALSHA", "ab", 0, "h\u00e9", b"\x00\r\n", -5]),
            b"*6\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n0\r\n$3\r\nh\xc3\xa9\r\n$3\r\n\x00\r\n\r\n$2\r\n-5\r\n",
        )


class ParserTests(SynchronousTestCase):
    def test_everyKind(self) -> None:
        """Each kind of reply, alone and all in one piece."""
        for data, expected in REPLIES:
            self.assertEqual(ReplyParser().feed(data), [expected], data)
        self.assertEqual(ReplyParser().feed(b"".join(d for d, _ in REPLIES)), [e for _, e in REPLIES])

    def test_anySplit(self) -> None:
        """Fed in two pieces split at every byte, and byte by byte: the same replies, nothing twice."""
        stream = b"".join(d for d, _ in REPLIES)
        expected = [e for _, e in REPLIES]
        for cut in range(len(stream) + 1):
            parser = ReplyParser()
            self.assertEqual(parser.feed(stream[:cut]) + parser.feed(stream[cut:]), expected, cut)
        parser = ReplyParser()
        got = []
        for i in range(len(stream)):
            got += parser.feed(stream[i : i + 1])
        self.assertEqual(got, expected)

    def test_errorReply(self) -> None:
        """An error reply comes out as a RedisError with Redis's words, in its place among the replies."""
        replies = ReplyParser().feed(b"+OK\r\n-NOSCRIPT No matching script.\r\n:1\r\n")
        self.assertEqual(replies[0], "OK")
        self.assertIsInstance(replies[1], RedisError)
        self.assertEqual(str(replies[1]), "NOSCRIPT No matching script.")
        self.assertEqual(replies[2], 1)

    def test_notRESP(self) -> None:
        """Bytes that are not RESP raise ProtocolError (the connection is dropped), never a wrong reply."""
        for data in [b"?what\r\n", b":12x\r\n", b"$3\r\nabcd\r\n", b"*" + b"*1\r\n" * 40, b"+" + b"x" * 70000]:
            with self.assertRaises(ProtocolError, msg=data[:20]):
                ReplyParser().feed(data)


def connected(replyTimeout: float = 1.0) -> tuple[RedisProtocol, StringTransport, Clock]:
    clock = Clock()
    protocol = RedisProtocol(clock, replyTimeout)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport, clock


class ProtocolTests(SynchronousTestCase):
    def test_pipelined(self) -> None:
        """Commands go out at once, one after the other; replies reach their callers in order, split anywhere."""
        protocol, transport, _ = connected()
        first, second = protocol.execute("GET", "a"), protocol.execute("EVALSHA", "x", 0)
        self.assertEqual(transport.value(), encodeCommand(["GET", "a"]) + encodeCommand(["EVALSHA", "x", 0]))
        got: list[object] = []
        first.addCallback(got.append)
        second.addErrback(lambda f: got.append(f.value))
        protocol.dataReceived(b"$1\r\n1\r\n-NOSCR")
        self.assertEqual(got, ["1"])
        protocol.dataReceived(b"IPT gone\r\n")
        self.assertIsInstance(got[1], RedisError)
        self.assertEqual(str(got[1]), "NOSCRIPT gone")

    def test_gatheredWhileBusy(self) -> None:
        """
        On an eager connection, a command on an idle connection goes out at
        once; those made while others wait for answers go out together at the
        end of the reactor's turn (one write), in order.
        """
        protocol, transport, clock = connected()
        protocol._eager = True  # what makeEager says of a plain TCP connection
        first = protocol.execute("EVALSHA", "a", 0)
        self.assertEqual(transport.value(), encodeCommand(["EVALSHA", "a", 0]))
        transport.clear()
        second, third = protocol.execute("EVALSHA", "b", 0), protocol.execute("EVALSHA", "c", 0)
        self.assertEqual(transport.value(), b"")
        clock.advance(0)
        self.assertEqual(transport.value(), encodeCommand(["EVALSHA", "b", 0]) + encodeCommand(["EVALSHA", "c", 0]))
        protocol.dataReceived(b"+1\r\n+2\r\n+3\r\n")
        self.assertEqual([self.successResultOf(d) for d in (first, second, third)], ["1", "2", "3"])
        transport.clear()
        protocol.execute("PING")  # idle again: at once
        self.assertEqual(transport.value(), encodeCommand(["PING"]))

    def test_cancelledTakesItsReply(self) -> None:
        """A command its caller gave up on still takes its own reply: the next command gets the next one."""
        protocol, _, _ = connected()
        gaveUp = protocol.execute("EVALSHA", "slow", 0)
        gaveUp.addErrback(lambda f: f.trap(CancelledError))
        gaveUp.cancel()
        later = protocol.execute("PING")
        protocol.dataReceived(b"+late\r\n+PONG\r\n")
        self.assertEqual(self.successResultOf(later), "PONG")

    def test_lostFailsWaiting(self) -> None:
        """A lost connection fails every waiting command with RedisConnectionError, and later ones at once."""
        protocol, _, _ = connected()
        lost: list[Deferred[object]] = []
        protocol.onLost = lambda: lost.append(Deferred())
        waiting = [protocol.execute("PING"), protocol.execute("PING")]
        protocol.connectionLost(Failure(ConnectionError("reset by peer")))
        for d in waiting:
            self.assertIn("reset by peer", str(self.failureResultOf(d, RedisConnectionError).value))
        self.failureResultOf(protocol.execute("PING"), RedisConnectionError)
        self.assertEqual(len(lost), 1)

    def test_watchdog(self) -> None:
        """Commands waiting with no reply for the reply timeout: the connection is dropped; replies coming keep it."""
        protocol, transport, clock = connected(replyTimeout=1.0)
        clock.advance(5)  # idle: nothing waits, nothing dropped
        self.assertFalse(transport.disconnecting)
        protocol.execute("PING")
        for _ in range(6):  # a reply every 0.4 s: progress
            clock.advance(0.4)
            protocol.execute("PING")
            protocol.dataReceived(b"+PONG\r\n")
        self.assertFalse(transport.disconnecting)
        clock.advance(1.6)  # no reply for more than the timeout
        self.assertTrue(transport.disconnecting)

    def test_garbageDrops(self) -> None:
        """Bytes that are not RESP, or a reply nobody asked for, drop the connection."""
        protocol, transport, _ = connected()
        protocol.dataReceived(b"+unasked\r\n")
        self.assertTrue(transport.disconnecting)
        protocol, transport, _ = connected()
        protocol.execute("PING")
        protocol.dataReceived(b"%3\r\n")
        self.assertTrue(transport.disconnecting)


class _Endpoint:
    """Connections made when the test says so."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Deferred[object], object]] = []

    def connect(self, factory: object) -> Deferred[object]:
        d: Deferred[object] = Deferred()
        self.attempts.append((d, factory))
        return d

    def succeed(self) -> tuple[RedisProtocol, StringTransport]:
        d, factory = self.attempts[-1]
        protocol = factory.buildProtocol(None)  # type: ignore[attr-defined]
        transport = StringTransport()
        protocol.makeConnection(transport)
        d.callback(protocol)
        return protocol, transport


class ClientTests(SynchronousTestCase):
    def test_waitsForConnection(self) -> None:
        """Commands before the connection wait, in order, and go out with AUTH and SELECT first; a withdrawn one never goes."""
        endpoint, clock = _Endpoint(), Clock()
        client = RedisClient(endpoint, clock, username="gw", password="pw", db=2)
        client.start()
        first, withdrawn, second = client.execute("PING", "1"), client.execute("PING", "2"), client.execute("PING", "3")
        withdrawn.addErrback(lambda f: f.trap(CancelledError))
        withdrawn.cancel()
        protocol, transport = endpoint.succeed()
        self.assertEqual(transport.value(), encodeCommand(["AUTH", "gw", "pw"]) + encodeCommand(["SELECT", 2]))
        transport.clear()
        protocol.dataReceived(b"+OK\r\n+OK\r\n")
        self.assertEqual(transport.value(), encodeCommand(["PING", "1"]) + encodeCommand(["PING", "3"]))
        protocol.dataReceived(b"+1\r\n+3\r\n")
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), ("1", "3"))

    def test_reconnects(self) -> None:
        """A failed connection and a lost one are tried again after 0.1 s, doubling up to 1 s; success resets the delay."""
        endpoint, clock = _Endpoint(), Clock()
        client = RedisClient(endpoint, clock)
        client.start()
        delays = []
        for _ in range(6):
            endpoint.attempts[-1][0].errback(ConnectionRefusedError())
            (retry,) = clock.getDelayedCalls()
            delays.append(round(retry.getTime() - clock.seconds(), 3))
            clock.advance(delays[-1])
        self.assertEqual(delays, [0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
        protocol, _ = endpoint.succeed()
        waiting = client.execute("PING")
        self.assertNoResult(waiting)  # sent, waiting for its reply
        protocol.connectionLost(Failure(ConnectionError("gone")))
        self.failureResultOf(waiting, RedisConnectionError)
        clock.advance(0.1)
        self.assertEqual(len(endpoint.attempts), 8)  # again after 0.1 s, not the last 1 s
        self.successResultOf(client.stop())
        clock.advance(5)
        self.assertEqual(len(endpoint.attempts), 8)  # stopped: no more attempts
        self.failureResultOf(client.execute("PING"), RedisConnectionError)


def _raw(port: int, *commands: bytes) -> list[bytes]:
    """Send inline commands on one connection; the raw reply lines (one line each)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"".join(c + b"\r\n" for c in commands))
        data = b""
        while data.count(b"\r\n") < len(commands):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n")[: len(commands)]


@skipUnlessRedis
class AuthTests(TestCase):
    """The store's connection authenticates as the URL's user and uses the URL's database."""

    timeout = 60

    def setUp(self) -> None:
        self.server = startRedis(self)
        self.server.command("ACL", "SETUSER", "gw", "on", ">s3cret", "~lmgate:*", "+@all")
        self.server.command("CONFIG", "SET", "requirepass", "admin-" + os.urandom(4).hex())  # the default user now needs one

    async def admit(self, url: str, timeout: float) -> object:
        store = RedisStore(parseRedisUrl(url), reactor, timeout=timeout)
        store.startService()
        self.addCleanup(store.stopService)
        result = store.admit("r1", [Figure("k", "rule", "requests_per_minute", 5)], 0, 0, 60)
        assert isinstance(result, Deferred)
        return await result

    def test_userPasswordDatabase(self) -> Deferred[None]:
        """redis://gw:s3cret@.../3: admitted, and the counter is in database 3 (not 0)."""

        async def run() -> None:
            decision = await self.admit(f"redis://gw:s3cret@127.0.0.1:{self.server.port}/3", 2.0)
            self.assertTrue(decision.admitted)  # type: ignore[attr-defined]
            self.assertEqual(
                _raw(self.server.port, b"AUTH gw s3cret", b"SELECT 3", b"EXISTS lmgate:s:k", b"SELECT 0", b"DBSIZE"),
                [b"+OK", b"+OK", b":1", b"+OK", b":0"],
            )

        return Deferred.fromCoroutine(run())

    def test_eager(self) -> Deferred[None]:
        """The connection to Redis sends each command at once (an eager transport, Nagle off), not on the reactor's next turn."""
        from lmgate.relay.eager import EagerClient

        async def run() -> None:
            store = RedisStore(parseRedisUrl(f"redis://gw:s3cret@127.0.0.1:{self.server.port}/0"), reactor, timeout=2.0)
            store.startService()
            self.addCleanup(store.stopService)
            result = store.admit("r1", [Figure("k", "rule", "requests_per_minute", 5)], 0, 0, 60)
            assert isinstance(result, Deferred)
            await result
            protocol = store._redis._protocol
            self.assertIsInstance(protocol.transport, EagerClient)
            # and with Nagle off: a command written while an earlier one's bytes
            # await their acknowledgement leaves at once, not after its reply
            handle = protocol.transport.getHandle()
            self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        return Deferred.fromCoroutine(run())

    def test_wrongPassword(self) -> Deferred[None]:
        """A refused AUTH: the admission fails with StoreUnavailable within its deadline (the caller decides open or closed)."""

        async def run() -> None:
            with self.assertRaises(StoreUnavailable):
                await self.admit(f"redis://gw:wrong@127.0.0.1:{self.server.port}/0", 0.5)
            self.flushLoggedErrors()

        return Deferred.fromCoroutine(run())
