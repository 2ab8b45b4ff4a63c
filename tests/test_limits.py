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
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lmgate.gate.channel import Limits
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


class RawGatewayCase(TestCase):
    """A gateway on loopback with limits and a fake clock for its channels, driven with raw bytes."""

    timeout = 15  # a connection that is never answered fails the test, soon

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


class LimitTests(RawGatewayCase):

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


class FormBodyTests(SynchronousTestCase):
    """twisted.web's form parsing never runs for a gateway request."""

    def test_formBodyNeverParsed(self) -> None:
        """
        twisted.web's C{Request.requestReceived} parses a form-encoded POST body
        into C{args}; L{GatewayRequest}'s own never does: C{args} stays empty
        and the body stays as it came, to be relayed.
        """
        from twisted.web.resource import Resource
        from twisted.web.server import Request, Site
        from twisted.web.test.requesthelper import DummyChannel

        from lmgate.gate.channel import GatewayRequest

        seen: list[tuple[Any, bytes]] = []

        class Seeing(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                seen.append((request.args, request.content.read()))
                return b""

        for kind in (Request, GatewayRequest):
            channel: Any = DummyChannel()
            channel.site = Site(Seeing())
            request = kind(channel)
            request.requestHeaders.setRawHeaders(b"content-type", [b"application/x-www-form-urlencoded"])
            request.gotLength(7)
            request.handleContentChunk(b"a=1&b=2")
            request.requestReceived(b"POST", b"/openai/v1/x", b"HTTP/1.1")
        self.assertEqual(seen[0][0], {b"a": [b"1"], b"b": [b"2"]})  # Twisted's own: parsed
        self.assertEqual(seen[1], ({}, b"a=1&b=2"))  # the gateway's: bytes, untouched


class HeaderDeadlineTests(RawGatewayCase):
    """C{header_timeout} runs from a request's first byte, and from the connection's opening."""

    async def test_trickledRequestLine(self) -> None:
        """A request line sent a byte at a time, never complete, gets 408 at the header deadline."""
        client = await self.send(b"G")
        for byte in b"ET /openai/v1/models":
            await _settle()
            self.clock.advance(0.5)
            if client.closed.called:
                break
            client.transport.write(bytes([byte]))
        await client.closed
        self.assertEqual(client.status(), 408)
        self.assertEqual(client.body()["error"]["type"], "request_timeout")

    async def test_silentConnection(self) -> None:
        """A connection that sends nothing is answered 408 at the header deadline, not the idle timeout."""
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.gate.port), client)
        await _settle()
        self.clock.advance(10.5)
        await client.closed
        self.assertEqual(client.status(), 408)

    async def test_nextRequestFromItsFirstByte(self) -> None:
        """After a response, an idle keep-alive connection is not timed by the header deadline;
        the next request's deadline starts at its first byte."""
        client = await self.send(b"GET /openai/v1/models HTTP/1.1\r\nHost: g\r\n" + KEY + b"\r\n")
        for _ in range(100):
            await _settle()
            if b"\r\n\r\n" in client.data:
                break
        self.assertEqual(client.status(), 200)
        self.clock.advance(30)  # idle, well past header_timeout, within client_timeout
        await _settle()
        self.assertFalse(client.closed.called)
        client.data = b""
        client.transport.write(b"GET /op")
        await _settle()
        self.clock.advance(10.5)
        await client.closed
        self.assertEqual(client.status(), 408)


class HeadRefusalTests(RawGatewayCase):
    """Route and key are decided when the headers are complete: a refused body is never read."""

    async def test_noKeyAnsweredBeforeTheBody(self) -> None:
        """No key, a body announced with C{Expect: 100-continue}: 403 at once, no C{100 Continue},
        the connection closed; one record, with the error body's size."""
        client = await self.answer(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Length: 900\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        self.assertEqual(client.status(), 403)
        self.assertNotIn(b"100 Continue", client.data)
        self.assertIn(b"connection: close", client.data.lower())
        body = client.data.split(b"\r\n\r\n", 1)[1]
        [record] = self.gate.sink.records
        self.assertEqual((record.status, record.error, record.request_bytes, record.response_bytes),
                         (403, "forbidden", 0, len(body)))
        self.assertEqual(self.gate.upstream.seen, [])

    async def test_unknownKeyWithPartOfTheBody(self) -> None:
        """An unknown key: the body bytes that came with the headers are counted, none waited for."""
        client = await self.answer(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer nope-nope-nope\r\n"
            b"Content-Length: 900\r\n\r\n" + b"x" * 100
        )
        self.assertEqual(client.status(), 403)
        [record] = self.gate.sink.records
        self.assertEqual((record.request_bytes, record.model), (100, None))

    async def test_refusedCallsReadTheModelFromTheBody(self) -> None:
        """A refused call's record names the model of the body received with it (OpenAI,
        Anthropic, chunked), and its sizes are the body bytes both ways."""
        body = b'{"model": "gpt-4o-mini", "messages": []}'
        cases = [
            (b"POST /openai/v1/chat/completions", b"Content-Length: %d\r\n\r\n" % len(body) + body, len(body)),
            (b"POST /anthropic/v1/messages", b"Content-Length: %d\r\n\r\n" % len(body) + body, len(body)),
            (b"POST /openai/v1/chat/completions",
             b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body), len(body)),
        ]
        for line, rest, size in cases:
            client = await self.answer(line + b" HTTP/1.1\r\nHost: g\r\n" + rest)
            self.assertEqual(client.status(), 403)
            record = self.gate.sink.records[-1]
            self.assertEqual((record.model, record.request_bytes, record.response_bytes),
                             ("gpt-4o-mini", size, len(client.data.split(b"\r\n\r\n", 1)[1])))
        self.assertEqual(len(self.gate.sink.records), 3)

    async def test_routeErrorsAtHeaders(self) -> None:
        """Unknown provider and bad targets are answered before the body too."""
        for target in (b"/nowhere/v1/x", b"/openai/v1/../x"):
            client = await self.answer(b"POST " + target + b" HTTP/1.1\r\nHost: g\r\n" + KEY
                                       + b"Content-Length: 900\r\nExpect: 100-continue\r\n\r\n")
            self.assertIn(client.status(), (400, 404))
            self.assertNotIn(b"100 Continue", client.data)
        self.assertEqual(len(self.gate.sink.records), 2)

    async def test_allowedKeyGetsContinue(self) -> None:
        """An allowed key with C{Expect: 100-continue} gets C{100 Continue}, sends its body, is relayed."""
        body = b'{"model": "m"}'
        client = await self.send(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: g\r\nConnection: close\r\n" + KEY
            + b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body)
        )
        client.got = Deferred()
        await client.got
        self.assertEqual(client.data, b"HTTP/1.1 100 Continue\r\n\r\n")
        client.transport.write(body)
        await client.closed
        self.assertIn(b"HTTP/1.1 200 ", client.data)
        self.assertEqual(self.gate.upstream.seen[0].body, body)
        [record] = self.gate.sink.records
        self.assertEqual(record.request_bytes, len(body))


class ChannelRefusalTests(RawGatewayCase):
    """Refusals by the channel are counted by reason, get an access-log line, and log at a bounded rate."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.limits = Limits(headerBytes=4096, headerCount=20, headerTimeout=10, clientTimeout=60, maxBody=1000)
        self.lines: list[bytes] = []
        writer = type("Writer", (), {"writeLine": lambda _, line: self.lines.append(line)})()
        self.gate = startGateway(self, siteLimits=self.limits, siteClock=self.clock, accessLog=writer)
        self.reasons: list[str] = []
        self.gate.site.observeRefusal = self.reasons.append

    async def test_eachRefusalCountedAndLogged(self) -> None:
        """431, 413, 400 (ours and twisted.web's) and 408 each give one reason and one access line."""
        await self.answer(b"GET /openai/v1/models HTTP/1.1\r\nHost: g\r\nX-Pad: " + b"a" * 5000 + b"\r\n\r\n")
        await self.answer(b"POST /openai/v1/x HTTP/1.1\r\nHost: g\r\n" + KEY + b"Content-Length: 5000\r\n\r\n")
        await self.answer(b"GET /openai/v1/models HTTP/1.1\r\nHost: g\r\nHost: g\r\n\r\n")
        bad = await self.answer(b"GET /openai/v1/models HTTP/1.1\r\nHost: g\r\nContent-Length: x\r\n\r\n")
        self.assertEqual(bad.body()["error"]["type"], "bad_request")
        client = await self.send(b"GET /openai/v1/mo")
        await _settle()
        self.clock.advance(10.5)
        await client.closed
        self.assertEqual(self.reasons, ["headers_too_large", "request_too_large", "bad_request", "bad_request", "header_timeout"])
        self.assertEqual([line.split(b'" ', 2)[2].split(b" ")[0] for line in self.lines],
                         [b"431", b"413", b"400", b"400", b"408"])
        self.assertIn(b'"POST /openai/v1/x HTTP/1.1" 413', self.lines[1])
        self.assertEqual(self.gate.sink.records, [])  # not calls: no usage record

    async def test_logLinesBounded(self) -> None:
        """Many refusals log a bounded number of lines."""
        from twisted.logger import globalLogPublisher

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for _ in range(15):
            await self.answer(b"GET /openai/v1/models HTTP/1.1\r\nHost: g\r\nHost: g\r\n\r\n")
        refusals = [e for e in events if "Refused a request" in e.get("log_format", "")]
        self.assertEqual(len(refusals), 10)
        self.assertEqual(len(self.reasons), 15)
        self.assertEqual(len(self.lines), 15)


def _settle() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(0.05, d.callback, None)  # type: ignore[attr-defined]
    return d
