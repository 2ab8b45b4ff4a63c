"""
Exact usage on every stream, through an in-process gateway and a fake
OpenAI-like upstream: the body it receives, the stream the client receives,
the record.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import NOT_DONE_YET, Request

from lmgate.config import Settings
from lmgate.daemon.reload import applySettings
from lmgate.policy.settings import PolicySettings
from tests.helpers import Running, call, jsonAnswer, startGateway
from tests.test_fallback import byModel, withAliases

CHAT = "/openai/v1/chat/completions"
BODY = b'{"messages": [{"role": "user", "content": "hi"}], "stream": true, "model": "gpt-4o-mini"}'
REWRITTEN = BODY[:-1] + b',"stream_options":{"include_usage":true}}'


def chunk(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\r\n\r\n"


CONTENT = [
    chunk({"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini-2024", "choices": [{"index": 0, "delta": {"content": w}}]})
    for w in ("Hello", " there", "")
]
USAGE_CHUNK = chunk({"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini-2024", "choices": [],
                     "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}})
DONE = b"data: [DONE]\r\n\r\n"
#: What a client that did not ask for usage gets from the upstream.
PLAIN = b": keepalive\r\n\r\n" + b"".join(CONTENT) + DONE


def openaiLike(request: Request) -> Any:
    """
    Streams like OpenAI: the usage chunk only when the request asked for it;
    each write splits an event at an awkward place (inside a line ending,
    inside the usage chunk's JSON), one reactor turn apart.
    """
    content: Any = request.content
    content.seek(0)
    body = json.loads(content.read())
    stream = b": keepalive\r\n\r\n" + b"".join(CONTENT)
    if (body.get("stream_options") or {}).get("include_usage"):
        stream += USAGE_CHUNK
    stream += DONE
    request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
    cuts = sorted({0, 15, 16, len(stream) - len(DONE) - 40, len(stream) - len(DONE) - 1, len(stream) - 3, len(stream)})
    pieces = [stream[a:b] for a, b in zip(cuts, cuts[1:])]

    def writeNext() -> None:
        if request._disconnected:  # type: ignore[attr-defined]
            return
        if not pieces:
            request.finish()
            return
        request.write(pieces.pop(0))
        reactor.callLater(0.001, writeNext)  # type: ignore[attr-defined]

    writeNext()
    return NOT_DONE_YET


def streamingGateway(case: TestCase, on: bool = True) -> Running:
    gate = startGateway(case)
    gate.upstream.handler = openaiLike
    gate.gateway.streamUsage = on
    return gate


class StreamUsageGatewayTests(TestCase):
    async def test_offByDefault(self) -> None:
        """Without C{policy.stream_usage} the body goes upstream as sent, and the record's usage is absent."""
        gate = startGateway(self)
        gate.upstream.handler = openaiLike
        self.assertFalse(gate.gateway.streamUsage)
        response, body, _ = await call(self, gate.url + CHAT, body=BODY)
        self.assertEqual((response.code, body), (200, PLAIN))
        self.assertEqual(gate.upstream.seen[0].body, BODY)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.usage_source, record.input_tokens), ("absent", None))

    async def test_usageRecordedAndKeptFromTheClient(self) -> None:
        """
        On: the upstream gets the body with only the option inserted (its
        length in Content-Length, asked for an uncompressed answer); the
        client gets exactly the stream it would get without the option; the
        record has the counts, and the bytes the client got.
        """
        gate = streamingGateway(self)
        response, body, _ = await call(
            self, gate.url + CHAT, body=BODY, headers={b"Authorization": [b"Bearer sk-test-allowed-0123456789abcdef"], b"Accept-Encoding": [b"gzip"]}
        )
        self.assertEqual((response.code, body), (200, PLAIN))
        self.assertIs(response.length, UNKNOWN_LENGTH)
        seen = gate.upstream.seen[0]
        self.assertEqual(seen.body, REWRITTEN)
        self.assertEqual(seen.headers.getRawHeaders(b"content-length"), [b"%d" % len(REWRITTEN)])
        self.assertEqual(seen.headers.getRawHeaders(b"accept-encoding"), [b"identity"])
        [record] = await gate.sink.waitFor(1)
        self.assertEqual(
            (record.usage_source, record.input_tokens, record.output_tokens, record.model, record.response_bytes),
            ("response", 7, 3, "gpt-4o-mini-2024", len(PLAIN)),
        )
        self.assertEqual(record.request_bytes, len(BODY))

    async def test_clientAskedForUsage(self) -> None:
        """A client that asked for usage itself gets its stream as it comes, the usage chunk included."""
        gate = streamingGateway(self)
        asked = BODY[:-1] + b', "stream_options": {"include_usage": true}}'
        response, body, _ = await call(self, gate.url + CHAT, body=asked)
        self.assertIn(USAGE_CHUNK, body)
        self.assertEqual(gate.upstream.seen[0].body, asked)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.usage_source, record.input_tokens, record.response_bytes), ("response", 7, len(body)))

    async def test_otherRequestsUntouched(self) -> None:
        """Non-streaming bodies, the Responses API and other formats are sent as they came."""
        gate = startGateway(self)
        gate.gateway.streamUsage = True
        for path, body in [
            (CHAT, b'{"model": "m", "stream": false}'),
            ("/openai/v1/responses", b'{"model": "m", "stream": true}'),
            ("/anthropic/v1/messages", b'{"model": "m", "stream": true}'),
        ]:
            await call(self, gate.url + path, body=body, headers={b"Authorization": [b"Bearer sk-test-allowed-0123456789abcdef"], b"x-api-key": [b"sk-test-allowed-0123456789abcdef"]})
        self.assertEqual([s.body for s in gate.upstream.seen], [b'{"model": "m", "stream": false}', b'{"model": "m", "stream": true}', b'{"model": "m", "stream": true}'])

    async def test_errorAnswerRelayedAsItIs(self) -> None:
        """An upstream refusing the request (a JSON error, with its Content-Length) reaches the client unchanged."""
        gate = startGateway(self)
        gate.gateway.streamUsage = True
        gate.upstream.handler = jsonAnswer({"error": {"message": "no", "choices": [], "usage": {}}}, 400)
        response, body, _ = await call(self, gate.url + CHAT, body=BODY)
        self.assertEqual((response.code, json.loads(body)["error"]["message"]), (400, "no"))
        self.assertEqual(response.length, len(body))

    async def test_streamWithContentLength(self) -> None:
        """An event stream the upstream framed with Content-Length: the client's is unframed (it is shorter) and ends cleanly."""
        gate = streamingGateway(self)
        whole = b"".join(CONTENT) + USAGE_CHUNK + DONE

        def framed(request: Request) -> bytes:
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"content-length", b"%d" % len(whole))
            return whole

        gate.upstream.handler = framed
        response, body, ended = await call(self, gate.url + CHAT, body=BODY)
        self.assertEqual((body, type(ended)), (b"".join(CONTENT) + DONE, ResponseDone))
        self.assertIs(response.length, UNKNOWN_LENGTH)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.usage_source, record.response_bytes, record.error), ("response", len(body), None))

    async def test_compressedStreamNeverAltered(self) -> None:
        """An upstream that compresses the stream anyway: relayed byte for byte (the usage chunk included), counts still recorded."""
        gate = streamingGateway(self)
        whole = gzip.compress(b"".join(CONTENT) + USAGE_CHUNK + DONE)

        def gzipped(request: Request) -> bytes:
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"content-encoding", b"gzip")
            return whole

        gate.upstream.handler = gzipped
        response, body, _ = await call(self, gate.url + CHAT, body=BODY)
        self.assertEqual(body, whole)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.usage_source, record.input_tokens), ("response", 7))

    async def test_aliasAndFallback(self) -> None:
        """With an alias, every attempt sends the body with its model rewritten and the option inserted."""
        gate = streamingGateway(self)

        def down(request: Request) -> bytes:
            request.setResponseCode(503)
            return b"{}"

        gate.upstream.handler = byModel({"first": down, "second": openaiLike})
        withAliases(gate, [{"provider": "openai", "model": "first"}, {"provider": "openai", "model": "second"}])
        aliased = BODY.replace(b'"gpt-4o-mini"', b'"chat"')
        response, body, _ = await call(self, gate.url + CHAT, body=aliased)
        self.assertEqual(body, PLAIN)
        expected = [REWRITTEN.replace(b'"gpt-4o-mini"', b'"%s"' % m) for m in (b"first", b"second")]
        self.assertEqual([s.body for s in gate.upstream.seen], expected)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.attempts, record.usage_source, record.output_tokens), (2, "response", 3))

    async def test_unifiedEndpoint(self) -> None:
        """The unified C{/v1} endpoint: the alias resolved, the option inserted, the usage chunk kept from the client."""
        gate = streamingGateway(self)
        withAliases(gate, [{"provider": "openai", "model": "second"}])
        response, body, _ = await call(self, gate.url + "/v1/chat/completions", body=BODY.replace(b'"gpt-4o-mini"', b'"chat"'))
        self.assertEqual(body, PLAIN)
        self.assertEqual(gate.upstream.seen[0].body, REWRITTEN.replace(b'"gpt-4o-mini"', b'"second"'))

    async def test_slowClientStillPausesUpstream(self) -> None:
        """Filtering keeps backpressure: a client that stops reading pauses the upstream's stream of chunks."""
        from tests.helpers import ALLOWED_KEY
        from tests.test_relay import _Firehose, _rawClient, _turn

        producers: list[_Firehose] = []

        def firehose(request: Request) -> Any:
            request.setHeader(b"content-type", b"text/event-stream")
            producer = _Firehose(request, 256 * 1024 * 1024)
            event = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"x" * 4000 + b'"}}]}\n\n'
            producer._chunk = event * (65536 // len(event))
            producers.append(producer)
            request.registerProducer(producer, True)
            producer.resumeProducing()
            return NOT_DONE_YET

        gate = streamingGateway(self)
        gate.upstream.handler = firehose
        head = f"POST {CHAT} HTTP/1.1\r\nHost: gate\r\nAuthorization: Bearer {ALLOWED_KEY.decode()}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
        client = await _rawClient(gate.port, head.encode() + BODY, paused=True)
        while not producers:
            await _turn()
        await producers[0].paused
        self.assertLess(producers[0].sent, 64 * 1024 * 1024)  # loopback buffers hold some megabytes; the rest waited
        self.assertEqual(gate.upstream.seen[0].body, REWRITTEN)
        client.transport.abortConnection()
        [record] = await gate.sink.waitFor(1)
        self.assertEqual(record.error, "client_disconnected")

    def test_reload(self) -> None:
        """C{applySettings} (start-up and SIGHUP) turns it on and off."""

        class Site:
            accessLogWriter = None

            def setLimits(self, limits: object) -> None:
                pass

        gate = startGateway(self)
        gateway = gate.gateway
        applySettings(Settings(policy=PolicySettings(streamUsage=True)), gateway, Site())
        self.assertTrue(gateway.streamUsage)
        applySettings(Settings(), gateway, Site())
        self.assertFalse(gateway.streamUsage)


class AuditedStreamUsageTests(TestCase):
    """With the audit trail: the audited response is what the client received."""

    maxBody = 1024 * 1024
    from tests.test_audit import AuditedCallTests  # here, not at the top: trial would run its tests in this module too

    gateway = AuditedCallTests.gateway
    lines = AuditedCallTests.lines
    del AuditedCallTests

    async def test_auditKeepsWhatTheClientReceived(self) -> None:
        """The audit line's response is the stream without the usage chunk; its request, the body sent upstream."""
        gate = self.gateway()
        gate.upstream.handler = openaiLike
        gate.gateway.streamUsage = True
        response, body, _ = await call(self, gate.url + CHAT, body=BODY)
        self.assertEqual(body, PLAIN)
        [record] = await gate.sink.waitFor(1)
        [line] = self.lines()
        self.assertEqual((line["response_body"], line["response_bytes"]), (PLAIN.decode(), record.response_bytes))
        self.assertEqual(line["request_body"], REWRITTEN.decode())
        self.assertEqual(record.usage_source, "response")
