"""
The relay through a real listening gateway on loopback, in front of an
in-process fake upstream: bytes, headers, streaming, failures and backpressure.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from lmgate.gate.call import REQUEST_ID_HEADER
from tests.helpers import (
    ALLOWED_KEY,
    AUTH,
    Collector,
    FakeUpstream,
    call,
    clientAgent,
    closedPort,
    jsonAnswer,
    startGateway,
)

CHAT = "/openai/v1/chat/completions"


class RelayTests(TestCase):
    async def test_nonStreamingByteForByte(self) -> None:
        """Status, end-to-end headers and body come back unchanged; the request
        went to the upstream's path with the raw query; one record is written."""
        upstream = FakeUpstream()
        answer = b'{"id": "chatcmpl-1",  "model": "gpt-x", "usage": {"prompt_tokens": 3, "completion_tokens": 2}}'

        def handler(request: Request) -> bytes:
            request.setResponseCode(201, b"Made")
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"x-request-id", b"req_123")
            request.setHeader(b"openai-processing-ms", b"287")
            return answer

        upstream.handler = handler
        gate = startGateway(self, upstream)
        response, body, reason = await call(self, gate.url + CHAT + "?api-version=2024-10-21&x=%2F", body=b'{"model":"m"}')
        self.assertEqual((response.code, response.phrase, body), (201, b"Made", answer))
        self.assertTrue(isinstance(reason, (ResponseDone,)))
        self.assertEqual(response.headers.getRawHeaders(b"x-request-id"), [b"req_123"])
        self.assertEqual(response.headers.getRawHeaders(b"openai-processing-ms"), [b"287"])
        self.assertEqual(len(response.headers.getRawHeaders(REQUEST_ID_HEADER, [])), 1)
        seen = upstream.seen[0]
        self.assertEqual(seen.uri, b"/v1/chat/completions?api-version=2024-10-21&x=%2F")
        self.assertEqual(seen.body, b'{"model":"m"}')
        self.assertEqual(seen.headers.getRawHeaders(b"authorization"), [b"Bearer " + ALLOWED_KEY])
        self.assertEqual(seen.headers.getRawHeaders(b"host"), [f"127.0.0.1:{gate.upstreamPort}".encode()])
        self.assertEqual(seen.headers.getRawHeaders(b"content-length"), [b"13"])
        [record] = await gate.sink.waitFor(1)
        self.assertEqual(
            (record.status, record.error, record.provider, record.lmgate_id, record.owner, record.endpoint),
            (201, None, "openai", "app1", "team-a", CHAT),
        )
        self.assertEqual((record.request_bytes, record.response_bytes), (13, len(answer)))
        self.assertEqual(record.request_id, response.headers.getRawHeaders(REQUEST_ID_HEADER)[0].decode())
        self.assertEqual(record.upstream_request_id, "req_123")
        self.assertNotIn("0123456789abcdef", json.dumps(record.asDict()))

    async def test_nothingAddedToTheResponse(self) -> None:
        """No default Content-Type, Server or Date appears when the upstream sent none."""
        upstream = FakeUpstream()

        def bare(request: Request) -> bytes:
            request.responseHeaders.removeHeader(b"server")
            request.responseHeaders.removeHeader(b"date")
            request.responseHeaders.removeHeader(b"content-type")
            return b"plain"

        upstream.handler = bare
        gate = startGateway(self, upstream)
        response, body, _ = await call(self, gate.url + CHAT)
        names = sorted(name.lower() for name, _ in response.headers.getAllRawHeaders())
        upstreamNames = sorted(
            name.lower() for name, _ in upstream.seen[0].request.responseHeaders.getAllRawHeaders()
        )
        # The client's Agent keeps Content-Length out of response.headers, as it
        # does for the gateway: compare the rest.
        expected = sorted(set(upstreamNames) - {b"content-length"} | {REQUEST_ID_HEADER})
        self.assertEqual(names, expected)
        self.assertEqual(body, b"plain")

    async def test_hopByHopNotRelayed(self) -> None:
        """Connection-scoped request headers stop at the gateway."""
        gate = startGateway(self)
        headers = dict(AUTH)
        headers.update({b"Connection": [b"close, X-Secret"], b"X-Secret": [b"1"], b"Keep-Alive": [b"5"], b"X-Keep": [b"y"]})
        await call(self, gate.url + CHAT, headers=headers)
        seen = gate.upstream.seen[0].headers
        self.assertFalse(seen.hasHeader(b"x-secret") or seen.hasHeader(b"keep-alive"))
        self.assertEqual(seen.getRawHeaders(b"x-keep"), [b"y"])

    async def test_gzipRelayedUntouched(self) -> None:
        """A compressed body stays compressed, byte for byte, with its Content-Encoding."""
        upstream = FakeUpstream()
        compressed = gzip.compress(json.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 1}}).encode())

        def handler(request: Request) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-encoding", b"gzip")
            return compressed

        upstream.handler = handler
        gate = startGateway(self, upstream)
        response, body, _ = await call(self, gate.url + CHAT, headers={**AUTH, b"Accept-Encoding": [b"gzip"]})
        self.assertEqual(body, compressed)
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertEqual(gate.upstream.seen[0].headers.getRawHeaders(b"accept-encoding"), [b"gzip"])
        [record] = await gate.sink.waitFor(1)
        self.assertEqual(record.response_bytes, len(compressed))

    async def test_redirectReturnedNotFollowed(self) -> None:
        """An upstream redirect reaches the client as it was; the upstream sees one request."""
        upstream = FakeUpstream()

        def redirect(request: Request) -> bytes:
            request.setResponseCode(307)
            request.setHeader(b"location", b"http://127.0.0.1:1/elsewhere")
            return b""

        upstream.handler = redirect
        gate = startGateway(self, upstream)
        response, _, _ = await call(self, gate.url + CHAT)
        self.assertEqual(response.code, 307)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"http://127.0.0.1:1/elsewhere"])
        self.assertEqual(len(upstream.seen), 1)

    async def test_noCookieJar(self) -> None:
        """A cookie set on one caller's response never rides on another call."""
        upstream = FakeUpstream()
        upstream.handler = jsonAnswer({}, headers={b"set-cookie": b"session=secret; Path=/"})
        gate = startGateway(self, upstream)
        response, _, _ = await call(self, gate.url + CHAT)
        self.assertEqual(response.headers.getRawHeaders(b"set-cookie"), [b"session=secret; Path=/"])
        await call(self, gate.url + CHAT)
        self.assertFalse(upstream.seen[1].headers.hasHeader(b"cookie"))

    async def test_unknownPrefix(self) -> None:
        """An unknown prefix is a 404 in JSON, recorded, and nothing goes upstream."""
        gate = startGateway(self)
        response, body, _ = await call(self, gate.url + "/nope/v1/x")
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(body)["error"]["type"], "not_found")
        self.assertEqual(gate.upstream.seen, [])
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.status, record.error, record.provider), (404, "not_found", None))

    async def test_pathEscapeRefused(self) -> None:
        """An encoded dot segment is a 400 in the provider's shape, never relayed."""
        gate = startGateway(self)
        response, body, _ = await call(self, gate.url + "/openai/v1/%2e%2e/admin")
        self.assertEqual(response.code, 400)
        self.assertEqual(json.loads(body)["error"]["type"], "bad_request")
        self.assertEqual(gate.upstream.seen, [])

    async def test_health(self) -> None:
        """C{GET /healthz} answers 200 C{ok} without a key, and writes no record."""
        gate = startGateway(self)
        response, body, _ = await call(self, gate.url + "/healthz", method=b"GET", body=None, headers={})
        self.assertEqual((response.code, body), (200, b"ok"))
        self.assertEqual(gate.sink.records, [])

    async def test_refusalsInProviderShape(self) -> None:
        """No key and an unknown key are 403s in each provider's own error shape; the upstream sees nothing."""
        gate = startGateway(self)
        cases = [
            ("/openai/v1/chat/completions", {}, lambda b: b["error"]["type"] == "invalid_request_error"),
            ("/anthropic/v1/messages", {b"x-api-key": [b"sk-ant-unknown-000000"]}, lambda b: b["type"] == "error"),
            ("/gemini/v1beta/models/m:generateContent?key=AIzaUnknown000", {}, lambda b: b["error"]["status"] == "PERMISSION_DENIED"),
            ("/bedrock/model/m/converse", {b"Authorization": [b"Bearer bedrock-unknown"]}, lambda b: "message" in b),
        ]
        for path, headers, check in cases:
            response, body, _ = await call(self, gate.url + path, headers=headers)
            self.assertEqual(response.code, 403, path)
            self.assertTrue(check(json.loads(body)), (path, body))
            self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
            self.assertNotIn(b"Unknown000", body)
        self.assertEqual(gate.upstream.seen, [])
        records = await gate.sink.waitFor(4)
        self.assertEqual([r.error for r in records], ["forbidden"] * 4)
        self.assertEqual([r.lmgate_id for r in records], [None] * 4)
        self.assertIsNone(records[0].key)
        self.assertNotIn("Unknown000", json.dumps([r.asDict() for r in records]))

    async def test_sigv4Explained(self) -> None:
        """A SigV4-signed Bedrock request is refused with an explanation, not relayed."""
        gate = startGateway(self)
        sig = b"AWS4-HMAC-SHA256 Credential=AKIAEXAMPLE0000000000/20261123/us-east-1/bedrock/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc"
        response, body, _ = await call(self, gate.url + "/bedrock/model/m/converse", headers={b"Authorization": [sig]})
        self.assertEqual(response.code, 403)
        self.assertIn("AWS_BEARER_TOKEN_BEDROCK", json.loads(body)["message"])
        self.assertEqual(gate.upstream.seen, [])


    async def test_spooledBodyByteForByte(self) -> None:
        """A request body too large to keep in memory (twisted.web spools it to a
        file) reaches the upstream whole and unchanged, sent by the gateway's own
        cooperator; the record counts its bytes."""
        from lmgate.gate.gateway import KEEP_BODY_LIMIT

        upstream = FakeUpstream()
        gate = startGateway(self, upstream)
        body = b'{"model": "m", "input": "' + bytes(range(97, 123)) * ((KEEP_BODY_LIMIT * 3) // 26) + b'"}'
        response, _, _ = await call(self, gate.url + CHAT, body=body)
        self.assertEqual(response.code, 200)
        self.assertEqual((len(upstream.seen[0].body), upstream.seen[0].body == body), (len(body), True))
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.request_bytes, record.model), (len(body), None))


class FailureTests(TestCase):
    async def test_unreachable(self) -> None:
        """A refused connection is a 502 with a JSON body and an C{upstream_unreachable} record,
        whose byte counts are the request body sent and the error body answered."""
        gate = startGateway(self, upstreamURL=f"http://127.0.0.1:{closedPort(self)}")
        response, body, _ = await call(self, gate.url + CHAT)
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["error"]["type"], "api_error")
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.status, record.error), (502, "upstream_unreachable"))
        self.assertEqual((record.request_bytes, record.response_bytes), (2, len(body)))

    async def test_tlsFailure(self) -> None:
        """An upstream whose certificate is not trusted fails the TLS handshake: 502, recorded,
        nothing sent; once its certificate is trusted, calls go through."""
        import os

        from twisted.internet.ssl import PrivateCertificate
        from twisted.web.client import BrowserLikePolicyForHTTPS, HTTPConnectionPool
        from twisted.web.server import Site

        from lmgate.relay.upstream import Upstream
        from tests.test_daemon import makeCertificate

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        keyPath, certPath = makeCertificate(directory)
        with open(keyPath) as k, open(certPath) as c:
            certificate = PrivateCertificate.loadPEM(c.read() + k.read())
        untrusted = FakeUpstream()
        port = reactor.listenSSL(0, Site(untrusted), certificate.options(), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        gate = startGateway(self, upstreamURL=f"https://127.0.0.1:{port.getHost().port}")  # the platform's trust
        response, body, _ = await call(self, gate.url + CHAT)
        self.assertEqual(response.code, 502)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.status, record.error), (502, "upstream_unreachable"))
        self.assertEqual(untrusted.seen, [])

        # The same upstream, its certificate trusted: relayed over TLS, Host and all.
        from twisted.internet.ssl import Certificate

        from lmgate.relay.upstream import RelayAgent

        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(open(certPath).read()))
        gate.gateway.upstream = Upstream(RelayAgent(reactor, pool, policy, connectTimeout=5), pool)
        response, body, _ = await call(self, gate.url + CHAT)
        self.assertEqual(response.code, 200)
        self.assertEqual(untrusted.seen[0].headers.getRawHeaders(b"host"), [b"127.0.0.1:%d" % port.getHost().port])

    async def test_responseTimeout(self) -> None:
        """No response headers within C{timeouts.response}: 504, recorded, upstream dropped."""
        clock = Clock()
        upstream = FakeUpstream()
        upstream.handler = lambda request: NOT_DONE_YET
        gate = startGateway(self, upstream, clock=clock, responseTimeout=30.0)
        arrived = upstream.arrived()
        pending = Deferred.fromCoroutine(call(self, gate.url + "/anthropic/v1/messages"))
        seen = await arrived
        upstreamGone = seen.request.notifyFinish()
        clock.advance(29.9)
        self.assertFalse(pending.called)
        clock.advance(0.2)
        response, body, _ = await pending
        self.assertEqual(response.code, 504)
        self.assertEqual(json.loads(body)["error"]["type"], "timeout_error")
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.status, record.error, record.latency_ms), (504, "upstream_timeout", 30100.0))
        await self.assertFailure(upstreamGone, Exception)

    async def test_midBodyFailureIsTruncation(self) -> None:
        """An upstream that dies mid-body leaves the client with a truncated body, never a clean end."""
        upstream = FakeUpstream()
        upstream.handler = lambda request: NOT_DONE_YET
        gate = startGateway(self, upstream)
        arrived = upstream.arrived()
        responseD = clientAgent(self).request(b"POST", (gate.url + CHAT).encode(), Headers(AUTH))
        seen = await arrived
        seen.request.setHeader(b"content-type", b"text/event-stream")
        seen.request.write(b"data: {}\n\n")
        response = await responseD
        collector = Collector()
        first = collector.nextChunk()
        response.deliverBody(collector)
        await first
        seen.request.channel.transport.abortConnection()
        reason = await collector.done
        self.assertEqual(response.code, 200)
        self.assertFalse(isinstance(reason, (ResponseDone,)))
        self.assertTrue(isinstance(reason, (ResponseFailed, PotentialDataLoss)))
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.status, record.error), (200, "upstream_reset"))

    async def test_idleUpstreamCut(self) -> None:
        """An upstream silent for C{timeouts.idle} mid-body: the client's connection is aborted."""
        clock = Clock()
        upstream = FakeUpstream()

        def stall(request: Request) -> Any:
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b"data: 1\n\n")
            return NOT_DONE_YET

        upstream.handler = stall
        gate = startGateway(self, upstream, clock=clock, idleTimeout=5.0)
        agent = clientAgent(self)
        response = await agent.request(b"POST", (gate.url + CHAT).encode(), Headers(AUTH))
        collector = Collector()
        first = collector.nextChunk()
        response.deliverBody(collector)
        self.assertEqual(await first, b"data: 1\n\n")
        clock.advance(4.9)
        self.assertFalse(collector.done.called)
        clock.advance(0.2)
        reason = await collector.done
        self.assertFalse(isinstance(reason, (ResponseDone,)))
        [record] = await gate.sink.waitFor(1)
        self.assertEqual(record.error, "upstream_timeout")


class StreamingTests(TestCase):
    async def test_eventsRelayedOnArrival(self) -> None:
        """The first event reaches the client before the upstream sends the second."""
        upstream = FakeUpstream()
        upstream.handler = lambda request: NOT_DONE_YET
        gate = startGateway(self, upstream)
        arrived = upstream.arrived()
        agent = clientAgent(self)
        responseD = agent.request(b"POST", (gate.url + CHAT).encode(), Headers(AUTH))
        seen = await arrived
        seen.request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        seen.request.write(b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n')
        response = await responseD
        collector = Collector()
        first = collector.nextChunk()
        response.deliverBody(collector)
        self.assertEqual(await first, b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n')
        second = collector.nextChunk()
        seen.request.write(b"data: [DONE]\n\n")
        self.assertEqual(await second, b"data: [DONE]\n\n")
        seen.request.finish()
        self.assertTrue(isinstance((await collector.done), (ResponseDone,)))
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.streaming, record.error), (True, None))

    async def test_clientDisconnectDropsUpstream(self) -> None:
        """A client that leaves mid-stream makes the gateway drop the upstream connection at once."""
        upstream = FakeUpstream()
        upstream.handler = lambda request: NOT_DONE_YET
        gate = startGateway(self, upstream)
        arrived = upstream.arrived()
        client = await _rawClient(gate.port, _post(CHAT))
        seen = await arrived
        upstreamGone = seen.request.notifyFinish()
        seen.request.setHeader(b"content-type", b"text/event-stream")
        seen.request.write(b"data: 1\n\n")
        await client.received(b"data: 1")
        client.transport.abortConnection()
        await self.assertFailure(upstreamGone, Exception)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.status, record.error), (200, "client_disconnected"))

    async def test_clientDisconnectBeforeResponse(self) -> None:
        """A client that leaves before the response abandons the upstream request; recorded as 499."""
        upstream = FakeUpstream()
        upstream.handler = lambda request: NOT_DONE_YET
        gate = startGateway(self, upstream)
        arrived = upstream.arrived()
        client = await _rawClient(gate.port, _post(CHAT))
        seen = await arrived
        upstreamGone = seen.request.notifyFinish()
        client.transport.abortConnection()
        await self.assertFailure(upstreamGone, Exception)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.status, record.error), (499, "client_disconnected"))

    async def test_slowClientPausesUpstream(self) -> None:
        """A client that stops reading pauses the upstream instead of growing the gateway's memory."""
        upstream = FakeUpstream()
        total = 256 * 1024 * 1024
        producers: list[_Firehose] = []

        def firehose(request: Request) -> Any:
            request.setHeader(b"content-type", b"application/octet-stream")
            producer = _Firehose(request, total)
            producers.append(producer)
            request.registerProducer(producer, True)
            producer.resumeProducing()
            return NOT_DONE_YET

        upstream.handler = firehose
        gate = startGateway(self, upstream)
        client = await _rawClient(gate.port, _post(CHAT), paused=True)
        while not producers:
            await _turn()
        producer = producers[0]
        await producer.paused
        # Loopback socket buffers hold some megabytes; the rest waited upstream.
        self.assertLess(producer.sent, 64 * 1024 * 1024)
        client.transport.abortConnection()
        await gate.sink.waitFor(1)

    async def test_stalledReaderCut(self) -> None:
        """A client that stops reading for C{client_timeout} is cut, the upstream
        dropped, and the call recorded as C{client_timeout}; the upstream idle
        timer does not fire while the client is what holds things back."""
        clock = Clock()
        upstream = FakeUpstream()
        producers: list[_Firehose] = []

        def firehose(request: Request) -> Any:
            request.setHeader(b"content-type", b"application/octet-stream")
            producer = _Firehose(request, 256 * 1024 * 1024)
            producers.append(producer)
            request.registerProducer(producer, True)
            producer.resumeProducing()
            return NOT_DONE_YET

        upstream.handler = firehose
        gate = startGateway(self, upstream, clock=clock, idleTimeout=5.0, clientTimeout=60.0)
        client = await _rawClient(gate.port, _post(CHAT), paused=True)
        while not producers:
            await _turn()
        await producers[0].paused
        for _ in range(500):  # the upstream may pause before the client's buffer fills: wait for the tee
            if any(_teePaused(call) for call in gate.gateway.active):
                break
            await _turn()
        self.assertTrue(any(_teePaused(call) for call in gate.gateway.active))
        upstreamGone = upstream.seen[0].request.notifyFinish()
        clock.advance(59)
        self.assertEqual(gate.sink.records, [])
        clock.advance(2)
        await self.assertFailure(upstreamGone, Exception)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual(record.error, "client_timeout")
        client.transport.abortConnection()

    async def test_largeStreamFlatMemory(self) -> None:
        """A 50 MB response streams through with the process's memory flat (no whole-body copy)."""
        upstream = FakeUpstream()
        total = 50 * 1024 * 1024
        producers: list[_Firehose] = []

        def firehose(request: Request) -> Any:
            request.setHeader(b"content-type", b"text/event-stream")
            producer = _Firehose(request, total, line=True)
            producers.append(producer)
            request.registerProducer(producer, True)
            producer.resumeProducing()
            return NOT_DONE_YET

        upstream.handler = firehose
        gate = startGateway(self, upstream)
        before = _rss()
        agent = clientAgent(self)
        response = await agent.request(b"POST", (gate.url + CHAT).encode(), Headers(AUTH))
        counter = _Counter()
        response.deliverBody(counter)
        reason = await counter.done
        self.assertTrue(isinstance(reason, (ResponseDone,)))
        self.assertEqual(counter.count, total)
        self.assertLess(max(producers[0].rssSamples) - before, 30 * 1024 * 1024)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual(record.response_bytes, total)


# -- helpers ------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _teePaused(call: Any) -> bool:
    """Whether a call's response body is held back (its tee paused by a full client buffer)."""
    tee = call._relaying.tee if call._relaying is not None else None
    return tee is not None and tee.paused


def _turn() -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(0.01, d.callback, None)  # type: ignore[attr-defined]
    return d


def _post(path: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: gate\r\nAuthorization: Bearer {ALLOWED_KEY.decode()}\r\n"
        "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    ).encode()


@implementer(IPushProducer)
class _Firehose:
    """Writes C{total} bytes as fast as the consumer takes them, and tells when it was paused."""

    def __init__(self, request: Request, total: int, line: bool = False) -> None:
        self.request, self.remaining, self.sent = request, total, 0
        self.paused: Deferred[None] = Deferred()
        self.rssSamples: list[int] = []
        self._running = False
        self._chunk = (b"data: " + b"x" * (65536 - 8) + b"\n\n") if line else b"x" * 65536

    def resumeProducing(self) -> None:
        self._running = True
        while self._running and self.remaining > 0:
            chunk = self._chunk[: self.remaining]
            self.remaining -= len(chunk)
            self.sent += len(chunk)
            self.request.write(chunk)
            if self.sent % (4 * 1024 * 1024) == 0:
                self.rssSamples.append(_rss())
        if self.remaining == 0 and self._running:
            self._running = False
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self._running = False
        if not self.paused.called:
            self.paused.callback(None)

    def stopProducing(self) -> None:
        self._running = False
        self.remaining = 0


class _Counter(Protocol):
    def __init__(self) -> None:
        self.count = 0
        self.done: Deferred[Any] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.count += len(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(reason.value)


class _RawClient(Protocol):
    def __init__(self, request: bytes, paused: bool) -> None:
        self._request, self._paused = request, paused
        self.data = b""
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    def connectionMade(self) -> None:
        self.transport.write(self._request)
        if self._paused:
            self.transport.pauseProducing()  # stop reading: the kernel buffers fill, then the gateway's

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for marker, d in list(self._waiting):
            if marker in self.data:
                self._waiting.remove((marker, d))
                d.callback(None)

    def received(self, marker: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if marker in self.data:
            d.callback(None)
        else:
            self._waiting.append((marker, d))
        return d


async def _rawClient(port: int, request: bytes, paused: bool = False) -> _RawClient:
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    protocol = _RawClient(request, paused)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    return protocol


class UpstreamMisbehaviourTests(TestCase):
    """Upstreams that break HTTP give a documented outcome and one record."""

    async def rawUpstream(self, answer: bytes) -> str:
        """A TCP upstream that answers every request with C{answer} and closes."""
        from twisted.internet.protocol import Factory

        class Answer(Protocol):
            def dataReceived(self, data: bytes) -> None:
                if b"\r\n\r\n" in data:
                    self.transport.write(answer)
                    self.transport.loseConnection()

        port = reactor.listenTCP(0, Factory.forProtocol(Answer), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    async def outcome(self, answer: bytes) -> tuple[int, Any]:
        gate = startGateway(self, upstreamURL=await self.rawUpstream(answer))
        response, body, reason = await call(self, gate.url + CHAT)
        [record] = await gate.sink.waitFor(1)
        return response.code, record

    async def test_tooManyHeaders(self) -> None:
        """200,000 response headers: 502, not memory."""
        head = b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 200000 + b"Content-Length: 0\r\n\r\n"
        code, record = await self.outcome(head)
        self.assertEqual((code, record.status, record.error), (502, 502, "upstream_malformed"))

    async def test_giantHeader(self) -> None:
        """One header line longer than the whole head may be: 502."""
        code, record = await self.outcome(b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 300000 + b"\r\n\r\n")
        self.assertEqual((code, record.error), (502, "upstream_malformed"))

    async def test_invalidStatus(self) -> None:
        """An invalid status line: 502."""
        code, record = await self.outcome(b"HTTP/1.1 abc Nope\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual((code, record.error), (502, "upstream_malformed"))

    async def test_invalidFraming(self) -> None:
        """A bad chunk size before any body byte was relayed: the client still gets a 502."""
        code, record = await self.outcome(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n")
        self.assertEqual((code, record.status, record.error), (502, 502, "upstream_reset"))

    async def test_resetBeforeHeaders(self) -> None:
        """A connection closed before any response: 502, C{upstream_reset}."""
        code, record = await self.outcome(b"")
        self.assertEqual((code, record.error), (502, "upstream_reset"))

    async def test_shortBody(self) -> None:
        """A body shorter than its Content-Length: truncation, recorded."""
        code, record = await self.outcome(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        self.assertEqual((code, record.error, record.response_bytes), (200, "upstream_reset", 3))

    async def test_redirectToAnotherHost(self) -> None:
        """A redirect elsewhere is relayed to the client, never followed."""
        code, record = await self.outcome(b"HTTP/1.1 302 Found\r\nLocation: http://10.9.9.9/x\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual((code, record.error), (302, None))


class _Lines:
    """An access-log writer that keeps its lines."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def writeLine(self, line: bytes) -> None:
        self.lines.append(line)


class AccessLogTests(TestCase):
    def test_escapeAsTwisted(self) -> None:
        """The access line's escaping is twisted.web's, byte for byte, for every byte
        value alone and for mixed values (its plain-value shortcut changes nothing)."""
        from twisted.web.http import _escape

        from lmgate.gate.gateway import _logEscape

        values: list[bytes | str] = [bytes([b]) for b in range(256)]
        values += [b"", b"GET", b"/v1/models?x=1&key=sk-...&y=%20", b"it's", b'say "hi"', b"it's \"both\"",
                   b"back\\slash", b"tab\there", b"caf\xc3\xa9", b"line\nbreak", b"\x7f", "127.0.0.1", "::1",
                   b"openai-python/1.99 (x86_64; Linux) 'q' \"dq\""]
        for value in values:
            self.assertEqual(_logEscape(value), _escape(value), repr(value))

    async def test_oneCombinedLinePerRequestWithoutKeys(self) -> None:
        """Every request, refused ones included, queues one combined-format line;
        no key is in it: headers are not logged and a C{key=} query value is masked."""
        secret = ALLOWED_KEY.decode()  # Gemini clients send their key in the URL
        lines = _Lines()
        gate = startGateway(self, FakeUpstream(), accessLog=lines)
        url = gate.url + f"/gemini/v1beta/models/g:generateContent?alt=sse&key={secret}"
        headers = {b"User-Agent": [b"sdk/1.0"], b"Referer": [b"app"]}
        response, _, _ = await call(self, url, headers=headers)
        self.assertEqual(response.code, 200)
        refused, _, _ = await call(self, gate.url + CHAT, headers={b"Authorization": [b"Bearer sk-unknown-key-000000000"]})
        self.assertEqual(refused.code, 403)
        await call(self, gate.url + CHAT)  # an Authorization header: never in the line
        self.assertEqual(len(lines.lines), 3)
        first, second, third = (line.decode("ascii") for line in lines.lines)
        self.assertRegex(
            first,
            r'^"127\.0\.0\.1" - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] '
            r'"POST /gemini/v1beta/models/g:generateContent\?alt=sse&key=\S+ HTTP/1\.1" 200 \d+ "app" "sdk/1\.0"\n$',
        )
        self.assertRegex(second, r'"POST /openai/v1/chat/completions HTTP/1\.1" 403 \d+ "-" "-"\n$')
        self.assertRegex(third, r'"POST /openai/v1/chat/completions HTTP/1\.1" 200 ')
        for line in (first, second, third):
            self.assertNotIn(secret, line)
            self.assertNotIn("sk-unknown-key", line)


class ParserPauseTests(TestCase):
    """The upstream connection is paused for a response's body only when nothing takes it at once."""

    def parse(self, parserClass: Any, deliverAtOnce: bool) -> tuple[Any, list[str], Any]:
        from twisted.internet.testing import StringTransport
        from twisted.web._newclient import Request as ClientRequest
        from twisted.web._newclient import TransportProxyProducer

        calls: list[str] = []

        class Counting(StringTransport):
            def pauseProducing(self) -> None:
                calls.append("pause")
                super().pauseProducing()

            def resumeProducing(self) -> None:
                calls.append("resume")
                super().resumeProducing()

        transport = Counting()
        parser = parserClass(ClientRequest(b"GET", b"/", Headers(), None), lambda rest: None)
        parser.makeConnection(TransportProxyProducer(transport))
        body = Collector()
        responses: list[Any] = []
        parser._responseDeferred.addCallback(responses.append)
        if deliverAtOnce:
            parser._responseDeferred.addCallback(lambda _: responses[0].deliverBody(body))
        parser.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
        return transport, calls, (responses[0], body)

    def test_stockParserPausesAndResumes(self) -> None:
        """Twisted's own parser: a pause and a resume (two system calls) for every response."""
        from twisted.web._newclient import HTTPClientParser

        transport, calls, _ = self.parse(HTTPClientParser, deliverAtOnce=True)
        self.assertEqual(calls, ["pause", "resume"])

    def test_deliveredAtOnceNeverPaused(self) -> None:
        """The relay takes the body in the same call: the connection is never paused."""
        from lmgate.relay.upstream import BoundedHTTPClientParser

        transport, calls, (_, body) = self.parse(BoundedHTTPClientParser, deliverAtOnce=True)
        self.assertNotIn("pause", calls)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(body.body, b"ab")

    def test_deliveredLaterStaysPausedUntilThen(self) -> None:
        """Nobody takes the body yet: the connection is paused, and resumed when someone does."""
        from lmgate.relay.upstream import BoundedHTTPClientParser

        transport, calls, (response, _) = self.parse(BoundedHTTPClientParser, deliverAtOnce=False)
        self.assertEqual(calls, ["pause"])
        self.assertEqual(transport.producerState, "paused")
        later = Collector()
        response.deliverBody(later)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(later.body, b"ab")


class RelayAgentTests(TestCase):
    """The relay's agent: each upstream origin's endpoint and Host are built once; bad input fails the call."""

    def agent(self) -> Any:
        from twisted.web.client import BrowserLikePolicyForHTTPS, HTTPConnectionPool

        from lmgate.relay.upstream import RelayAgent

        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        return RelayAgent(reactor, pool, BrowserLikePolicyForHTTPS(), connectTimeout=5)

    async def test_hostHeaderAndOriginBuiltOnce(self) -> None:
        """Requests to one origin share one endpoint; Host is the origin's, the raw target is kept."""
        from twisted.web.server import Site

        upstream = FakeUpstream()
        port = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        agent = self.agent()
        base = b"http://127.0.0.1:%d" % port.getHost().port
        for target in (b"/v1/models?a=%2F&b", b"/v1/chat/completions"):
            response = await agent.request(b"GET", base + target, Headers({b"x-a": [b"1"]}))
            collector = Collector()
            response.deliverBody(collector)
            await collector.done
            self.assertEqual(response.code, 200)
        self.assertEqual([seen.uri for seen in upstream.seen], [b"/v1/models?a=%2F&b", b"/v1/chat/completions"])
        self.assertEqual(upstream.seen[0].headers.getRawHeaders(b"host"), [b"127.0.0.1:%d" % port.getHost().port])
        self.assertEqual(upstream.seen[0].headers.getRawHeaders(b"x-a"), [b"1"])
        self.assertEqual(len(agent._origins), 1)

    def test_hostValues(self) -> None:
        """Default ports are left out of Host; IPv6 hosts are bracketed."""
        agent = self.agent()
        self.assertEqual(agent._origin(b"https://api.example.com").hostHeader, b"api.example.com")
        self.assertEqual(agent._origin(b"http://h.example:80").hostHeader, b"h.example")
        self.assertEqual(agent._origin(b"http://h.example:8000").hostHeader, b"h.example:8000")
        self.assertEqual(agent._origin(b"http://[::1]:8000").hostHeader, b"[::1]:8000")
        self.assertEqual(agent._origin(b"https://[::1]").key, (b"https", b"::1", 443))

    async def test_badInputFailsTheCall(self) -> None:
        """A bad method, a target with spaces or control bytes, or another scheme: a failed Deferred."""
        from twisted.web.error import SchemeNotSupported

        agent = self.agent()
        for method, uri, kind in (
            (b"GE T", b"http://127.0.0.1:1/x", ValueError),
            (b"GET", b"http://127.0.0.1:1/a b", ValueError),
            (b"GET", b"http://127.0.0.1:1/a\x00", ValueError),
            (b"GET", b"ftp://127.0.0.1:1/x", SchemeNotSupported),
        ):
            with self.assertRaises(kind):
                await agent.request(method, uri)
        self.assertEqual(agent._origins, {})


class AccessLogTimeTests(TestCase):
    async def test_lineCarriesTheTimeOfTheCall(self) -> None:
        """The line's time is the call's own second (not a cached one up to a second old)."""
        clock = Clock()
        lines = _Lines()
        gate = startGateway(self, FakeUpstream(), accessLog=lines, siteClock=clock)
        clock.advance(1767225605.75)  # 2026-01-01T00:00:05.75Z
        await call(self, gate.url + CHAT)
        clock.advance(0.5)  # 06.25: twisted.web's cached time still says 05 until 06.75
        await call(self, gate.url + CHAT)
        self.assertIn(b"[01/Jan/2026:00:00:05 +0000]", lines.lines[0])
        self.assertIn(b"[01/Jan/2026:00:00:06 +0000]", lines.lines[1])


class ShutdownConnectionTests(TestCase):
    """Shutting down: keep-alive connections take no new call, and none is left unrecorded."""

    async def rawConnection(self, port: int) -> tuple[Any, list[bytes], Deferred[None]]:
        """A raw client connection: its protocol, the bytes it got, and a Deferred for its close."""
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        received: list[bytes] = []
        closed: Deferred[None] = Deferred()

        class Raw(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.append(data)

            def connectionLost(self, reason: Any = None) -> None:
                closed.callback(None)

        protocol = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Raw())
        self.addCleanup(lambda: protocol.transport.loseConnection())
        return protocol, received, closed

    def post(self, path: bytes = CHAT.encode()) -> bytes:
        return (b"POST " + path + b" HTTP/1.1\r\nHost: gate\r\nAuthorization: Bearer " + ALLOWED_KEY
                + b"\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")

    async def test_requestWhileDrainingIsRefusedAndRecorded(self) -> None:
        """A request on a connection opened before the shutdown: 503 in the provider's
        shape, Connection: close, the connection closed, and a record (shutdown)."""
        gate = startGateway(self, FakeUpstream())
        protocol, received, closed = await self.rawConnection(gate.port)
        await gate.gateway.drain(1.0)  # nothing in flight: drained at once; now refusing
        protocol.transport.write(self.post(b"/anthropic/v1/messages"))
        await closed
        head, _, body = b"".join(received).partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
        self.assertIn(b"connection: close", head.lower())
        self.assertEqual(json.loads(body)["error"]["type"], "overloaded_error")
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.status, record.error, record.provider), (503, "shutdown", "anthropic"))
        self.assertEqual(gate.upstream.seen, [])

    async def test_healthSaysDraining(self) -> None:
        """While draining, /healthz on an open connection answers 503, so a load balancer takes the gateway out."""
        gate = startGateway(self, FakeUpstream())
        protocol, received, closed = await self.rawConnection(gate.port)
        await gate.gateway.drain(1.0)
        protocol.transport.write(b"GET /healthz HTTP/1.1\r\nHost: gate\r\nConnection: close\r\n\r\n")
        await closed
        head, _, body = b"".join(received).partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 503 "), head)
        self.assertEqual(body, b"draining")

    async def test_idleClosedBusyClosedAfterItsResponse(self) -> None:
        """closeIdle: an idle keep-alive connection closes at once; one with a call in
        flight gets its whole response (with Connection: close), then closes."""
        upstream = FakeUpstream()
        held: list[Request] = []
        upstream.handler = lambda request: (held.append(request), NOT_DONE_YET)[1]
        gate = startGateway(self, upstream)
        _, _, idleClosed = await self.rawConnection(gate.port)
        busy, received, busyClosed = await self.rawConnection(gate.port)
        arrived = upstream.arrived()
        busy.transport.write(self.post())
        await arrived
        gate.site.closeIdle()
        await idleClosed
        self.assertFalse(busyClosed.called)
        held[0].setHeader(b"content-type", b"application/json")
        held[0].write(b'{"id": "x"}')
        held[0].finish()
        await busyClosed
        head, _, body = b"".join(received).partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"connection: close", head.lower())
        self.assertIn(b'{"id": "x"}', body)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.status, record.error), (200, None))

    async def test_closeAllCutsWhatIsLeft(self) -> None:
        """closeAll: every client connection still open is cut."""
        from tests.daemon import pause

        gate = startGateway(self, FakeUpstream())
        _, _, closed = await self.rawConnection(gate.port)
        for _ in range(100):  # bounded: until the site has seen the connection
            if gate.site.channels:
                break
            await pause(0.01)
        gate.site.closeAll()
        await closed
        self.assertEqual(gate.site.channels, set())
