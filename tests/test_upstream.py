"""
The relay hop's own parts: the strict, bounded response parser; name
resolution that always answers; and failures on the way to the upstream
reaching the call (a prompt 502 and one record), never a hang.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IHostnameResolver, IHostResolution
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.http_headers import Headers
from zope.interface import implementer

from lmgate.relay.upstream import (
    UPSTREAM_HEADER_BYTES,
    UPSTREAM_HEADER_LINES,
    BoundedHTTPClientParser,
    RelayAgent,
    RelayPool,
    ReportingResolver,
    Upstream,
    UpstreamHeadInvalid,
)
from tests.helpers import ALLOWED_KEY, call, startGateway

CHAT = "/openai/v1/chat/completions"

#: Heads an upstream must not get past the gateway, and why.
HOSTILE_HEADS = [
    ("bare CR in the status line", b"HTTP/1.1 200 OK\rSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\nok"),
    ("NUL in a header value", b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok"),
    ("bare CR in a header value", b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\nok"),
    ("ESC in a header value", b"HTTP/1.1 200 OK\r\nX-A: \x1b[31mred\r\nContent-Length: 2\r\n\r\nok"),
    ("DEL in a header value", b"HTTP/1.1 200 OK\r\nX-A: a\x7f\r\nContent-Length: 2\r\n\r\nok"),
    ("NUL in the reason phrase", b"HTTP/1.1 200 O\x00K\r\nContent-Length: 2\r\n\r\nok"),
    ("control byte in a header name", b"HTTP/1.1 200 OK\r\nX-\x01A: 1\r\nContent-Length: 2\r\n\r\nok"),
    ("space in a header name", b"HTTP/1.1 200 OK\r\nX A: 1\r\nContent-Length: 2\r\n\r\nok"),
    ("space before the colon", b"HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 2\r\n\r\nok"),
    ("separator in a header name", b"HTTP/1.1 200 OK\r\nX(A): 1\r\nContent-Length: 2\r\n\r\nok"),
    ("empty header name", b"HTTP/1.1 200 OK\r\n: 1\r\nContent-Length: 2\r\n\r\nok"),
    ("no colon", b"HTTP/1.1 200 OK\r\nX-A\r\nContent-Length: 2\r\n\r\nok"),
    ("a folded line", b"HTTP/1.1 200 OK\r\nX-A: 1\r\n Set-Cookie: injected=1\r\nContent-Length: 2\r\n\r\nok"),
    ("a two-digit status", b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok"),
    ("not HTTP", b"ICY 200 OK\r\nContent-Length: 2\r\n\r\nok"),
]


def headOf(size: int, lines: int, status: bytes = b"HTTP/1.1 200 OK") -> bytes:
    """
    A response head of exactly C{size} bytes (status line to blank line, line
    ends included) with C{lines} header lines, one of them C{Content-Length: 2};
    the rest are C{X-NNNN:} lines of about equal length.
    """
    fixed = status + b"\r\n" + b"Content-Length: 2\r\n" + b"\r\n"
    room, fillers = size - len(fixed), lines - 1
    assert fillers >= 1 and room >= fillers * 10
    base, extra = divmod(room, fillers)
    filler = [b"X-%04d: " % i + b"a" * (base + (1 if i < extra else 0) - 10) + b"\r\n" for i in range(fillers)]
    head = status + b"\r\n" + b"".join(filler) + b"Content-Length: 2\r\n\r\n"
    assert len(head) == size, (len(head), size)
    return head


class _Parsed:
    def __init__(self) -> None:
        from twisted.web._newclient import Request as ClientRequest
        from twisted.web._newclient import TransportProxyProducer

        self.parser = BoundedHTTPClientParser(ClientRequest(b"GET", b"/", Headers(), None), lambda rest: None)
        self.parser.makeConnection(TransportProxyProducer(StringTransport()))
        self.responses: list[Any] = []
        self.parser._responseDeferred.addCallback(self.responses.append)


class ParserTests(SynchronousTestCase):
    """The response head: what passes, what fails, and where the bounds are."""

    def parse(self, data: bytes, chunk: int = 0) -> Any:
        """The response for C{data}, fed whole or C{chunk} bytes at a time; raises as the parser does."""
        parsed = _Parsed()
        pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
        for piece in pieces:
            parsed.parser.dataReceived(piece)
        return parsed.responses[0] if parsed.responses else None

    def test_hostileHeadsFail(self) -> None:
        """Control bytes (but HTAB), names that are not tokens, folded lines, bad status lines: the call fails."""
        for name, head in HOSTILE_HEADS:
            with self.assertRaises(UpstreamHeadInvalid, msg=name):
                self.parse(head)

    def test_validHeadsPass(self) -> None:
        """HTAB and obs-text in values and phrase, no phrase, bare LF line ends: parsed as sent."""
        response = self.parse(b"HTTP/1.1 200 Fine\tand \xe9\r\nX-A: a\tb \xff\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual((response.code, response.phrase), (200, b"Fine\tand \xe9"))
        self.assertEqual(response.headers.getRawHeaders(b"x-a"), [b"a\tb \xff"])
        self.assertEqual(self.parse(b"HTTP/1.1 204\r\n\r\n").code, 204)
        self.assertEqual(self.parse(b"HTTP/1.1 200 OK\nX-A: 1\nContent-Length: 0\n\n").headers.getRawHeaders(b"x-a"), [b"1"])

    def test_connectionHeaderKept(self) -> None:
        """The upstream's Connection header is in the response's headers, for the relay to drop what it names."""
        response = self.parse(b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(response.headers.getRawHeaders(b"connection"), [b"X-Hop"])

    def test_oneLineMayFillTheHead(self) -> None:
        """A single header line far over 16 KiB passes while the head is within 256 KiB; a byte more fails."""
        status, end = b"HTTP/1.1 204 No Content\r\n", b"\r\n\r\n"
        fits = status + b"X-Big: " + b"a" * (UPSTREAM_HEADER_BYTES - len(status) - len(end) - 7) + end
        self.assertEqual(len(fits), UPSTREAM_HEADER_BYTES)
        for chunk in (0, 65536, 1000):
            response = self.parse(fits, chunk)
            self.assertEqual(len(response.headers.getRawHeaders(b"x-big")[0]), UPSTREAM_HEADER_BYTES - len(status) - 11)
            over = fits[: len(status) + 7] + b"a" + fits[len(status) + 7 :]
            with self.assertRaises(UpstreamHeadInvalid):
                self.parse(over, chunk)
        with self.assertRaises(UpstreamHeadInvalid):  # a line that never ends
            self.parse(status + b"X-Big: " + b"a" * UPSTREAM_HEADER_BYTES)

    def test_headBound(self) -> None:
        """A head of exactly 256 KiB in many lines passes; one byte more fails."""
        self.assertEqual(self.parse(headOf(UPSTREAM_HEADER_BYTES, 300)).code, 200)
        with self.assertRaises(UpstreamHeadInvalid):
            self.parse(headOf(UPSTREAM_HEADER_BYTES + 1, 300))
        with self.assertRaises(UpstreamHeadInvalid):
            self.parse(headOf(UPSTREAM_HEADER_BYTES + 1, 300), 4096)

    def test_lineCountBound(self) -> None:
        """1000 header lines pass; 1001 fail."""
        self.assertEqual(self.parse(headOf(30000, UPSTREAM_HEADER_LINES)).code, 200)
        with self.assertRaises(UpstreamHeadInvalid):
            self.parse(headOf(30000, UPSTREAM_HEADER_LINES + 1))


class _RawUpstream(Protocol):
    """Answers each request with the head its path names (C{/case/N}), then closes."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers, self.buffer = answers, b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer:
            path = self.buffer.split(b" ", 2)[1]
            index = int(path.rsplit(b"/", 1)[1]) if path.rsplit(b"/", 1)[1].isdigit() else 0
            self.transport.write(self.answers[index])
            self.transport.loseConnection()


def listenRaw(case: TestCase, answers: list[bytes]) -> int:
    """A raw TCP upstream on loopback sending C{answers[N]} to C{/.../N}."""
    factory = Factory.forProtocol(lambda: _RawUpstream(answers))
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    case.addCleanup(port.stopListening)
    return int(port.getHost().port)


class _Whole(Protocol):
    def __init__(self, request: bytes) -> None:
        self.request, self.data = request, b""
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.done.callback(self.data)


async def rawCall(port: int, path: str) -> tuple[int, dict[bytes, list[bytes]], bytes, bytes]:
    """
    One request over a raw socket (a client with no line limit of its own):
    the status, the headers (lower-case names), the body and the head as received.
    """
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    request = b"GET %s HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer %s\r\nConnection: close\r\n\r\n" % (path.encode(), ALLOWED_KEY)
    protocol = _Whole(request)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    data = await protocol.done
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.lower(), []).append(value.strip())
    return int(lines[0].split(b" ")[1]), headers, body, head


class HostileUpstreamTests(TestCase):
    """A raw-socket upstream on loopback, through the gateway: what the client gets, what is recorded."""

    async def test_hostileHeadsAre502(self) -> None:
        """Each malformed head: a 502 in the provider's shape, nothing of the head relayed, one
        C{upstream_malformed} record."""
        port = listenRaw(self, [head for _, head in HOSTILE_HEADS])
        gate = startGateway(self, upstreamURL=f"http://127.0.0.1:{port}")
        for index, (name, _) in enumerate(HOSTILE_HEADS):
            status, headers, body, head = await rawCall(gate.port, f"/openai/v1/case/{index}")
            self.assertEqual(status, 502, name)
            self.assertEqual(json.loads(body)["error"]["code"], "upstream_unreachable", name)
            self.assertNotIn(b"injected", head, name)
            self.assertNotIn(b"x-a", headers, name)
        records = await gate.sink.waitFor(len(HOSTILE_HEADS))
        self.assertEqual({(r.status, r.error) for r in records}, {(502, "upstream_malformed")})
        self.assertEqual(len(records), len(HOSTILE_HEADS))

    async def test_namedHopByHopDropped(self) -> None:
        """Headers the upstream's Connection header names stop at the gateway, with the Connection header."""
        head = b"HTTP/1.1 200 OK\r\nConnection: X-Hop, keep-alive\r\nX-Hop: secret\r\nX-Keep: 1\r\nContent-Length: 2\r\n\r\nok"
        port = listenRaw(self, [head])
        gate = startGateway(self, upstreamURL=f"http://127.0.0.1:{port}")
        status, headers, body, raw = await rawCall(gate.port, "/openai/v1/models")
        self.assertEqual((status, body, headers.get(b"x-keep")), (200, b"ok", [b"1"]))
        self.assertNotIn(b"x-hop", raw.lower())
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.status, record.error), (200, None))

    async def test_headBoundaries(self) -> None:
        """Through the gateway: one header line filling the head to 256 KiB and a 256 KiB head of many
        lines are relayed whole; a byte more is a 502 C{upstream_malformed}."""
        status, end = b"HTTP/1.1 200 OK\r\n", b"Content-Length: 2\r\n\r\n"
        value = b"v" * (UPSTREAM_HEADER_BYTES - len(status) - len(end) - len(b"X-Big: \r\n"))
        oneLine = status + b"X-Big: " + value + b"\r\n" + end
        self.assertEqual(len(oneLine), UPSTREAM_HEADER_BYTES)
        answers = [
            oneLine + b"ok",
            status + b"X-Big: v" + value + b"\r\n" + end + b"ok",
            headOf(UPSTREAM_HEADER_BYTES, 500) + b"ok",
            headOf(UPSTREAM_HEADER_BYTES + 1, 500) + b"ok",
        ]
        port = listenRaw(self, answers)
        gate = startGateway(self, upstreamURL=f"http://127.0.0.1:{port}")
        code, headers, body, _ = await rawCall(gate.port, "/openai/v1/case/0")
        self.assertEqual((code, headers[b"x-big"], body), (200, [value], b"ok"))
        code, _, _, _ = await rawCall(gate.port, "/openai/v1/case/1")
        self.assertEqual(code, 502)
        code, headers, body, _ = await rawCall(gate.port, "/openai/v1/case/2")
        self.assertEqual((code, len(headers[b"x-0000"][0]), body), (200, len(headOf(UPSTREAM_HEADER_BYTES, 500).split(b"\r\n")[1]) - 8, b"ok"))
        code, _, _, _ = await rawCall(gate.port, "/openai/v1/case/3")
        self.assertEqual(code, 502)
        records = await gate.sink.waitFor(4)
        self.assertEqual([(r.status, r.error) for r in records], [(200, None), (502, "upstream_malformed"), (200, None), (502, "upstream_malformed")])


class _Receiver:
    """An IResolutionReceiver that keeps what it was told."""

    def __init__(self) -> None:
        self.began, self.completed = 0, 0
        self.addresses: list[Any] = []

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        self.began += 1

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.completed += 1


class ReportingResolverTests(SynchronousTestCase):
    """Every resolution ends: with the addresses, or with none when anything went wrong."""

    def resolveWith(self, resolve: Any) -> _Receiver:
        receiver = _Receiver()
        ReportingResolver(reactor, resolve).resolveHostName(receiver, "api.example", 443)  # type: ignore[arg-type]
        return receiver

    def test_addresses(self) -> None:
        """Both families are delivered, then the resolution completes once."""
        answer = [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", 443)),
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::1", 443, 0, 0)),
        ]
        receiver = self.resolveWith(lambda *args: succeed(answer))
        self.assertEqual(
            receiver.addresses, [IPv4Address("TCP", "192.0.2.1", 443), IPv6Address("TCP", "2001:db8::1", 443, 0, 0)]
        )
        self.assertEqual((receiver.began, receiver.completed), (1, 1))

    def test_failuresEndWithNoAddress(self) -> None:
        """A codec that cannot be loaded, a name the codec refuses, getaddrinfo raising at once: no address, complete."""

        def raiseNow(*args: Any) -> Deferred[Any]:
            raise LookupError("unknown encoding: idna")

        for resolve in (
            lambda *args: fail(LookupError("unknown encoding: idna")),
            lambda *args: fail(UnicodeError("encoding with 'idna' codec failed")),
            lambda *args: fail(socket.gaierror(-2, "Name or service not known")),
            raiseNow,
        ):
            receiver = self.resolveWith(resolve)
            self.assertEqual((receiver.addresses, receiver.completed), ([], 1))

    def test_aNameTheCodecRefuses(self) -> None:
        """With the real getaddrinfo (in the thread pool, run here in line): a 64-character label
        raises UnicodeError there, and the resolution still completes."""
        receiver = _Receiver()
        inLine = ReportingResolver(reactor, lambda *args: succeed(args).addCallback(lambda a: socket.getaddrinfo(*a)))
        inLine.resolveHostName(receiver, "a" * 64 + ".invalid", 80)  # type: ignore[arg-type]
        self.assertEqual((receiver.addresses, receiver.completed), ([], 1))


@implementer(IHostnameResolver)
class _RaisingResolver:
    """A resolver that raises when asked, as one that cannot load its codec may."""

    def resolveHostName(self, *args: Any, **kwargs: Any) -> IHostResolution:
        raise LookupError("unknown encoding: idna")


@implementer(IHostnameResolver)
class _SilentResolver:
    """A resolver that begins and never answers, as one behind an unreachable name server does."""

    def resolveHostName(self, receiver: Any, *args: Any, **kwargs: Any) -> IHostResolution:
        resolution = _Unanswered()
        receiver.resolutionBegan(resolution)
        return resolution


@implementer(IHostResolution)
class _Unanswered:
    name = "upstream.invalid"

    def cancel(self) -> None:
        pass


class _RaisingPool(RelayPool):
    def getConnection(self, key: Any, endpoint: Any) -> Deferred[Any]:
        raise RuntimeError("the pool broke")


class _RaisingAgent:
    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        raise RuntimeError("the agent broke")


class BeforeConnectingTests(TestCase):
    """A failure before any connection attempt reaches the call: a prompt 502 and one record."""

    async def assertPrompt502(self, gate: Any) -> None:
        response, body, _ = await call(self, gate.url + CHAT)
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["error"]["code"], "upstream_unreachable")
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.status, record.error), (502, "upstream_unreachable"))

    def relayWith(self, gate: Any, pool: Any = None, resolver: Any = None, connectTimeout: float = 5) -> None:
        pool = pool or RelayPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        agent = RelayAgent(reactor, pool, BrowserLikePolicyForHTTPS(), connectTimeout=connectTimeout, resolver=resolver)
        gate.gateway.upstream = Upstream(agent, pool)

    async def test_resolutionBoundedByTheConnectTimeout(self) -> None:
        """
        A name resolution that never answers is bounded by timeouts.connect, as
        connecting is: 504 upstream_timeout after it, not after
        timeouts.response (30 s here: the test's own 10 s limit fails it).
        """
        gate = startGateway(self, upstreamURL="http://upstream.invalid:1", responseTimeout=30)
        self.relayWith(gate, resolver=_SilentResolver(), connectTimeout=0.2)
        response, body, _ = await call(self, gate.url + CHAT)
        self.assertEqual(response.code, 504)
        self.assertEqual(json.loads(body)["error"]["code"], "upstream_timeout")
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.status, record.error), (504, "upstream_timeout"))

    test_resolutionBoundedByTheConnectTimeout.timeout = 10  # type: ignore[attr-defined]

    async def test_lateResolutionAfterTheTimeout(self) -> None:
        """
        The system resolver answering after the connection attempt gave up:
        the call already had its 504, and the late addresses are dropped
        quietly (the attempt was cancelled: no error logged, nothing connects).
        """
        late: list[Deferred[Any]] = []

        def slowly(*args: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            late.append(d)
            return d

        gate = startGateway(self, upstreamURL="http://upstream.invalid:1", responseTimeout=30)
        self.relayWith(gate, resolver=ReportingResolver(reactor, slowly), connectTimeout=0.2)
        response, body, _ = await call(self, gate.url + CHAT)
        self.assertEqual((response.code, json.loads(body)["error"]["code"]), (504, "upstream_timeout"))
        late[0].callback([(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 1))])
        self.assertEqual(self.flushLoggedErrors(), [])

    test_lateResolutionAfterTheTimeout.timeout = 10  # type: ignore[attr-defined]

    async def test_codecCannotBeLoaded(self) -> None:
        """getaddrinfo raising something other than socket.gaierror (the idna codec could not be
        loaded): 502 at once, not a 504 after C{timeouts.response}."""

        def noCodec(*args: Any, **kwargs: Any) -> Any:
            raise LookupError("unknown encoding: idna")

        self.patch(socket, "getaddrinfo", noCodec)
        gate = startGateway(self, upstreamURL="http://localhost:1", responseTimeout=20)
        await self.assertPrompt502(gate)

    async def test_resolverRaises(self) -> None:
        """A resolver that raises when asked: 502."""
        gate = startGateway(self, upstreamURL="http://upstream.invalid:1")
        self.relayWith(gate, resolver=_RaisingResolver())
        await self.assertPrompt502(gate)

    async def test_poolRaises(self) -> None:
        """A pool that raises instead of failing its Deferred: 502."""
        gate = startGateway(self)
        self.relayWith(gate, pool=_RaisingPool(reactor, persistent=True))
        await self.assertPrompt502(gate)

    async def test_agentRaises(self) -> None:
        """Any agent that raises: 502."""
        gate = startGateway(self)
        gate.gateway.upstream = Upstream(_RaisingAgent())  # type: ignore[arg-type]
        await self.assertPrompt502(gate)

    async def test_resolverFailureIsDNSLookupError(self) -> None:
        """The agent's Deferred fails with DNSLookupError when resolution failed in any way."""
        pool = RelayPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        resolver = ReportingResolver(reactor, lambda *args: fail(LookupError("unknown encoding: idna")))
        agent = RelayAgent(reactor, pool, BrowserLikePolicyForHTTPS(), resolver=resolver)
        with self.assertRaises(DNSLookupError):
            await agent.request(b"GET", b"http://upstream.invalid:1/x")
