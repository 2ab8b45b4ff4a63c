"""
What a client can make LMGate hold is bounded, and each bound is answered with
its own status and a JSON body before anything reaches routing or an upstream.
Driven over real loopback sockets with raw bytes; timers on a fake clock.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from lmgate.channel import Limits
from tests.helpers import ALLOWED_KEY, startGateway

KEY = b"Authorization: Bearer " + ALLOWED_KEY + b"\r\n"


class RawClient(Protocol):
    """Sends bytes, collects the answer, and tells when the connection closed."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[bytes] = Deferred()
        self.got: Deferred[None] | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.got is not None:
            d, self.got = self.got, None
            d.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(self.data)

    def status(self) -> int:
        return int(self.data.split(b" ", 2)[1])

    def body(self) -> Any:
        return json.loads(self.data.split(b"\r\n\r\n", 1)[1])


class LimitTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.limits = Limits(
            headerBytes=4096, headerCount=20, headerTimeout=10, clientTimeout=60, maxBody=1000, routeMaxBody={b"anthropic": 5000}
        )
        self.gate = startGateway(self, siteLimits=self.limits, siteClock=self.clock)

    async def send(self, data: bytes) -> RawClient:
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.gate.port), client)
        self.addCleanup(lambda: client.transport.abortConnection() if client.transport.connected else None)
        client.transport.write(data)
        return client

    async def answer(self, data: bytes) -> RawClient:
        client = await self.send(data)
        await client.closed
        return client

    async def test_headersTooLarge(self) -> None:
        """Header bytes past the limit: 431, nothing relayed."""
        client = await self.answer(b"GET /openai/v1/models HTTP/1.1\r\nHost: g\r\n" + KEY + b"X-Pad: " + b"a" * 5000 + b"\r\n\r\n")
        self.assertEqual(client.status(), 431)
        self.assertEqual(client.body()["error"]["type"], "headers_too_large")
        self.assertEqual(self.gate.upstream.seen, [])

    async def test_tooManyHeaders(self) -> None:
        """Header lines past the count: 431."""
        headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(25))
        client = await self.answer(b"GET /openai/v1/models HTTP/1.1\r\nHost: g\r\n" + KEY + headers + b"\r\n")
        self.assertEqual(client.status(), 431)

    async def test_twoHostLines(self) -> None:
        """Two Host lines are refused even when they agree."""
        client = await self.answer(b"GET /openai/v1/models HTTP/1.1\r\nHost: g\r\nHost: g\r\n" + KEY + b"\r\n")
        self.assertEqual(client.status(), 400)
        self.assertEqual(self.gate.upstream.seen, [])

    async def test_noHost(self) -> None:
        """An HTTP/1.1 request without Host is refused."""
        client = await self.answer(b"GET /openai/v1/models HTTP/1.1\r\n" + KEY + b"\r\n")
        self.assertEqual(client.status(), 400)

    async def test_bodyTooLargeByContentLength(self) -> None:
        """A Content-Length past the limit is refused before the body is read."""
        client = await self.answer(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: g\r\n" + KEY + b"Content-Length: 1001\r\n\r\n"
        )
        self.assertEqual(client.status(), 413)
        self.assertEqual(self.gate.upstream.seen, [])

    async def test_perRouteBodyLimit(self) -> None:
        """A route with its own C{max_body} admits a larger body."""
        body = b"x" * 3000
        client = await self.answer(
            b"POST /anthropic/v1/messages HTTP/1.1\r\nHost: g\r\nConnection: close\r\n" + KEY + b"Content-Length: 3000\r\n\r\n" + body
        )
        self.assertEqual(client.status(), 200)
        self.assertEqual(self.gate.upstream.seen[0].body, body)

    async def test_chunkedBodyTooLarge(self) -> None:
        """A chunked body is counted as it arrives, and cut past the limit."""
        chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
        client = await self.answer(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: g\r\n" + KEY + b"Transfer-Encoding: chunked\r\n\r\n" + chunk + chunk
        )
        self.assertEqual(client.status(), 413)
        self.assertEqual(self.gate.upstream.seen, [])

    async def test_slowHeaders(self) -> None:
        """Headers not complete within C{header_timeout}: 408 (slowloris)."""
        client = await self.send(b"GET /openai/v1/models HTTP/1.1\r\nHost: g\r\n")
        await _settle()
        self.clock.advance(9)
        client.transport.write(b"X-A: 1\r\n")  # progress does not extend the header deadline
        await _settle()
        self.clock.advance(1.5)
        await client.closed
        self.assertEqual(client.status(), 408)

    async def test_stalledBody(self) -> None:
        """A body that stops arriving for C{client_timeout}: 408."""
        client = await self.send(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: g\r\n" + KEY + b"Content-Length: 100\r\n\r\nabc")
        await _settle()
        self.clock.advance(61)
        await client.closed
        self.assertEqual(client.status(), 408)
        self.assertEqual(self.gate.upstream.seen, [])

    async def test_formBodyNotParsed(self) -> None:
        """A form-encoded body is relayed as bytes, never parsed by twisted.web."""
        body = b"a=1&" * 100
        client = await self.answer(
            b"POST /openai/v1/x HTTP/1.1\r\nHost: g\r\nConnection: close\r\n" + KEY
            + b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        self.assertEqual(client.status(), 200)
        self.assertEqual(self.gate.upstream.seen[0].body, body)
        from lmgate.channel import GatewayRequest

        self.assertFalse(GatewayRequest._parsePOSTFormSubmission)


def _settle() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(0.05, d.callback, None)  # type: ignore[attr-defined]
    return d
