"""
Usage readers: every format, whole and split at every boundary, compressed,
normalised; broken input gives null counts and never raises.
"""

from __future__ import annotations

import ast
import base64
import gzip
import json
import os
import zlib
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lmgate.usage.eventstream import event, exception
from lmgate.records.record import Usage
from lmgate.usage import readerFor, requestModel
from tests.helpers import FakeUpstream, call, startGateway

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
LIMIT = 2 * 1024 * 1024


def fixture(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


def sse(*events: tuple[str | None, Any], crlf: bool = False) -> bytes:
    nl = b"\r\n" if crlf else b"\n"
    out = b""
    for name, data in events:
        if name:
            out += b"event: " + name.encode() + nl
        out += b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + nl + nl
    return out


def read(fmt: str, body: bytes, contentType: str, endpoint: bytes = b"/v1/x", pieces: list[bytes] | None = None,
         encoding: str | None = None, status: int = 200, extra: dict[bytes, list[bytes]] | None = None, limit: int = LIMIT) -> Usage:
    headers = {b"content-type": contentType.encode()}
    if encoding:
        headers[b"content-encoding"] = encoding.encode()
    for name, values in (extra or {}).items():
        headers[name] = values[0]
    reader = readerFor(fmt, status, headers.get, endpoint, limit)
    for piece in pieces if pieces is not None else [body]:
        reader.feed(piece)
    return reader.finish()


def counts(u: Usage) -> tuple[Any, ...]:
    return (u.model, u.input_tokens, u.output_tokens, u.cached_tokens, u.cache_write_tokens, u.reasoning_tokens,
            u.streaming, u.providerError, u.usage_source, u.total_tokens)


def compress(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(body)
    if encoding == "deflate":
        return zlib.compress(body)
    if encoding == "deflate-raw":
        c = zlib.compressobj(wbits=-15)
        return c.compress(body) + c.flush()
    if encoding == "br":
        import brotli

        return bytes(brotli.compress(body))
    import zstandard

    return bytes(zstandard.ZstdCompressor().compress(body))


# (name, format, body, content type, endpoint, expected (model, in, out, cached, cache_write, reasoning, streaming))
ANTHROPIC_ERROR_STREAM = sse(
    ("message_start", {"type": "message_start", "message": {"model": "claude-x", "usage": {"input_tokens": 10, "output_tokens": 1}}}),
    ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
)
GEMINI_ARRAY = (
    b'[{"candidates": [{"content": {"parts": [{"text": "a [\\"]} b"}]}}], "usageMetadata": {}, "modelVersion": "gemini-2.0-flash"}\r\n,\r\n'
    b'{"candidates": [{"content": {"parts": [{"text": "c"}]}}], "usageMetadata": {"promptTokenCount": 7}, "modelVersion": "gemini-2.0-flash"}\r\n,\r\n'
    b'{"candidates": [], "usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 4, "thoughtsTokenCount": 2, '
    b'"cachedContentTokenCount": 3, "toolUsePromptTokenCount": 1, "totalTokenCount": 14}, "modelVersion": "gemini-2.0-flash"}]'
)
INVOKE_STREAM = b"".join(
    event("chunk", json.dumps({"bytes": base64.b64encode(json.dumps(e).encode()).decode()}).encode())
    for e in [
        {"type": "message_start", "message": {"model": "claude-3-haiku", "usage": {"input_tokens": 11, "output_tokens": 1}}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
        {"type": "message_delta", "usage": {"output_tokens": 6}},
        {"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": 11, "outputTokenCount": 6}},
    ]
)
CASES: list[tuple[str, str, bytes, str, bytes, tuple[Any, ...]]] = [
    ("openai chat", "openai", fixture("openai/chat_completions.json"), "application/json", b"/v1/chat/completions",
     ("gpt-4o-mini-2024-07-18", 12, 5, 0, None, 0, False)),
    ("openai chat stream with usage", "openai", fixture("openai/chat_completions_stream_usage.sse"), "text/event-stream", b"/v1/chat/completions",
     ("gpt-4-0613", 12, 5, 0, None, 0, True)),
    ("openai chat stream without usage", "openai",
     sse((None, {"model": "gpt-4o", "choices": [{"delta": {"content": "x"}}]}), (None, b"[DONE]")), "text/event-stream", b"/v1/chat/completions",
     ("gpt-4o", None, None, None, None, None, True)),
    ("openai responses stream", "openai", fixture("openai/responses_stream.sse"), "text/event-stream", b"/v1/responses",
     ("gpt-4o-mini-2024-07-18", 22, 6, 0, None, 0, True)),
    ("openai responses", "openai", json.dumps({"object": "response", "model": "o3", "usage": {
        "input_tokens": 100, "input_tokens_details": {"cached_tokens": 40}, "output_tokens": 50,
        "output_tokens_details": {"reasoning_tokens": 30}, "total_tokens": 150}}).encode(), "application/json", b"/v1/responses",
     ("o3", 100, 50, 40, None, 30, False)),
    ("openai embeddings", "openai", json.dumps({"object": "list", "model": "text-embedding-3-small", "data": [],
                                                "usage": {"prompt_tokens": 8, "total_tokens": 8}}).encode(), "application/json", b"/v1/embeddings",
     ("text-embedding-3-small", 8, None, None, None, None, False)),
    ("openai legacy completions", "openai", json.dumps({"object": "text_completion", "model": "gpt-3.5-turbo-instruct",
                                                        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}).encode(),
     "application/json", b"/v1/completions", ("gpt-3.5-turbo-instruct", 5, 7, None, None, None, False)),
    ("anthropic messages", "anthropic", fixture("anthropic/messages.json"), "application/json", b"/v1/messages",
     ("claude-sonnet-4-5-20250929", 1532, 33, 1111, 418, None, False)),
    ("anthropic stream", "anthropic", fixture("anthropic/messages_stream.sse"), "text/event-stream", b"/v1/messages",
     ("claude-sonnet-4-5-20250929", 20, 5, 0, 0, None, True)),
    ("gemini sse", "google", fixture("gemini/stream_generate_content.sse"), "text/event-stream", b"/v1beta/models/gemini-2.5-flash:streamGenerateContent",
     ("gemini-2.5-flash", 18, 115, None, None, 35, True)),
    ("gemini json array stream", "google", GEMINI_ARRAY, "application/json; charset=UTF-8", b"/v1beta/models/gemini-2.0-flash:streamGenerateContent",
     ("gemini-2.0-flash", 8, 6, 3, None, 2, True)),
    ("gemini generateContent", "google", json.dumps({"candidates": [], "modelVersion": "gemini-2.0-flash", "usageMetadata": {
        "promptTokenCount": 9, "candidatesTokenCount": 3, "totalTokenCount": 12}}).encode(), "application/json",
     b"/v1/projects/p/locations/l/publishers/google/models/gemini-2.0-flash:generateContent",
     ("gemini-2.0-flash", 9, 3, None, None, None, False)),
    ("bedrock converse", "bedrock", fixture("bedrock/converse.json"), "application/json", b"/model/amazon.titan-text-lite-v1/converse",
     (None, 8, 10, None, None, None, False)),
    ("bedrock converse cache", "bedrock", json.dumps({"usage": {"inputTokens": 5, "outputTokens": 2, "cacheReadInputTokens": 100,
                                                                "cacheWriteInputTokens": 20, "totalTokens": 127}}).encode(),
     "application/json", b"/model/m/converse", (None, 125, 2, 100, 20, None, False)),
    ("bedrock converse stream", "bedrock", fixture("bedrock/converse_stream.bin"), "application/vnd.amazon.eventstream", b"/model/m/converse-stream",
     (None, 8, 10, None, None, None, True)),
    ("bedrock invoke anthropic", "bedrock", json.dumps({"model": "claude-3-haiku", "usage": {"input_tokens": 4, "cache_read_input_tokens": 6,
                                                                                            "output_tokens": 9}}).encode(),
     "application/json", b"/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke", ("claude-3-haiku", 10, 9, 6, None, None, False)),
    ("bedrock invoke with response stream", "bedrock", INVOKE_STREAM, "application/vnd.amazon.eventstream",
     b"/model/m/invoke-with-response-stream", ("claude-3-haiku", 11, 6, None, None, None, True)),
]


class FormatTests(SynchronousTestCase):
    def check(self, name: str, fmt: str, body: bytes, ctype: str, endpoint: bytes, expected: tuple[Any, ...], **kw: Any) -> None:
        u = read(fmt, body, ctype, endpoint, **kw)
        self.assertEqual(counts(u)[:7], expected, name)

    def test_whole(self) -> None:
        """Every format read in one piece gives its normalised counts."""
        for case in CASES:
            self.check(*case)

    def test_twoPiecesAtEveryBoundary(self) -> None:
        """Split in two at every byte boundary, every format gives the same counts."""
        for name, fmt, body, ctype, endpoint, expected in CASES:
            for i in range(len(body) + 1):
                self.check(f"{name} @{i}", fmt, body, ctype, endpoint, expected, pieces=[body[:i], body[i:]])

    def test_byteByByte(self) -> None:
        """Fed one byte at a time, every format gives the same counts."""
        for name, fmt, body, ctype, endpoint, expected in CASES:
            self.check(name, fmt, body, ctype, endpoint, expected, pieces=[body[i : i + 1] for i in range(len(body))])

    def test_compressed(self) -> None:
        """gzip, deflate (zlib and raw), brotli and zstd bodies are decoded for reading, whole and split."""
        for encoding in ("gzip", "deflate", "deflate-raw", "br", "zstd"):
            header = "deflate" if encoding == "deflate-raw" else encoding
            for name, fmt, body, ctype, endpoint, expected in CASES:
                wire = compress(body, encoding)
                self.check(f"{name} {encoding}", fmt, wire, ctype, endpoint, expected, encoding=header)
                pieces = [wire[i : i + 7] for i in range(0, len(wire), 7)]
                self.check(f"{name} {encoding} split", fmt, wire, ctype, endpoint, expected, encoding=header, pieces=pieces)

    def test_crlfAndCR(self) -> None:
        """SSE with CRLF or lone CR line endings reads the same."""
        body = fixture("anthropic/messages_stream.sse")
        for ending in (b"\r\n", b"\r"):
            converted = body.replace(b"\n", ending)
            for i in range(len(converted) + 1):
                u = read("anthropic", converted, "text/event-stream", b"/v1/messages", pieces=[converted[:i], converted[i:]])
                self.assertEqual((u.input_tokens, u.output_tokens), (20, 5), (ending, i))


class NormalisationTests(SynchronousTestCase):
    def test_totals(self) -> None:
        """total = input + output; input alone without output; None without input."""
        self.assertEqual(Usage(input_tokens=3, output_tokens=4).total_tokens, 7)
        self.assertEqual(Usage(input_tokens=3).total_tokens, 3)
        self.assertIsNone(Usage(output_tokens=3).total_tokens)
        self.assertEqual((Usage().usage_source, Usage(output_tokens=0).usage_source), ("absent", "response"))

    def test_anthropicCacheFieldsAbsent(self) -> None:
        """Absent cache fields stay None; input is what is reported."""
        u = read("anthropic", json.dumps({"usage": {"input_tokens": 5, "output_tokens": 1}}).encode(), "application/json")
        self.assertEqual((u.input_tokens, u.cached_tokens, u.cache_write_tokens), (5, None, None))

    def test_anthropicDeltaOverridesFieldByField(self) -> None:
        """message_delta values override message_start's, field by field."""
        body = sse(
            ("message_start", {"type": "message_start", "message": {"model": "c", "usage": {"input_tokens": 3, "cache_read_input_tokens": 10, "output_tokens": 1}}}),
            ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 9, "input_tokens": None}}),
        )
        u = read("anthropic", body, "text/event-stream")
        self.assertEqual((u.input_tokens, u.cached_tokens, u.output_tokens), (13, 10, 9))

    def test_badCountsAreInvalid(self) -> None:
        """Booleans, negatives, floats and strings are not counts: no count of that usage is believed."""
        body = json.dumps({"usage": {"prompt_tokens": True, "completion_tokens": -1, "prompt_tokens_details": {"cached_tokens": "3"}}}).encode()
        u = read("openai", body, "application/json")
        self.assertEqual((u.input_tokens, u.output_tokens, u.cached_tokens, u.usage_source), (None, None, None, "invalid"))

    def test_geminiThoughtsOnly(self) -> None:
        """Gemini output is candidates + thoughts; either alone counts."""
        body = json.dumps({"usageMetadata": {"promptTokenCount": 2, "thoughtsTokenCount": 5}}).encode()
        u = read("google", body, "application/json", b"/v1beta/models/m:generateContent")
        self.assertEqual((u.output_tokens, u.reasoning_tokens), (5, 5))

    def test_bedrockHeadersForOtherBodies(self) -> None:
        """InvokeModel with a non-Anthropic body takes the token-count headers."""
        u = read("bedrock", b'{"results": []}', "application/json", b"/model/amazon.titan/invoke",
                 extra={b"x-amzn-bedrock-input-token-count": [b"12"], b"x-amzn-bedrock-output-token-count": [b"30"]})
        self.assertEqual((u.input_tokens, u.output_tokens), (12, 30))


class ErrorTests(SynchronousTestCase):
    def test_errorStatusHasNullCounts(self) -> None:
        """4xx and 5xx bodies give null counts."""
        u = read("openai", fixture("openai/chat_completions.json"), "application/json", status=429)
        self.assertEqual(u.usage_source, "absent")

    def test_providerErrorsInsideStreams(self) -> None:
        """Errors sent inside a 200 stream are named."""
        u = read("anthropic", ANTHROPIC_ERROR_STREAM, "text/event-stream")
        self.assertEqual((u.providerError, u.input_tokens), ("overloaded_error", 10))
        u = read("openai", sse((None, {"error": {"type": "server_error", "message": "x"}})), "text/event-stream")
        self.assertEqual(u.providerError, "server_error")
        u = read("openai", sse(("response.failed", {"type": "response.failed", "response": {"error": {"code": "rate_limit_exceeded"}}})), "text/event-stream")
        self.assertEqual(u.providerError, "rate_limit_exceeded")
        u = read("bedrock", exception("throttlingException", b'{"message":"slow down"}'), "application/vnd.amazon.eventstream")
        self.assertEqual(u.providerError, "throttlingException")
        u = read("google", sse((None, {"error": {"code": 503, "status": "UNAVAILABLE", "message": "x"}})), "text/event-stream")
        self.assertEqual(u.providerError, "503")

    def test_brokenInputNeverRaises(self) -> None:
        """Truncated JSON, garbage, a bad CRC and an unknown encoding give null counts."""
        body = fixture("bedrock/converse_stream.bin")
        corrupt = body[:20] + bytes([body[20] ^ 0xFF]) + body[21:]
        for fmt, data, ctype, kw in [
            ("openai", b'{"usage": {"prompt_tokens": 3', "application/json", {}),
            ("anthropic", b"\x00\xff garbage", "text/event-stream", {}),
            ("bedrock", corrupt, "application/vnd.amazon.eventstream", {}),
            ("openai", fixture("openai/chat_completions.json"), "application/json", {"encoding": "compress"}),
            ("openai", b"not gzip", "application/json", {"encoding": "gzip"}),
        ]:
            u = read(fmt, data, ctype, **kw)
            self.assertEqual(u.usage_source, "absent", (fmt, data[:20]))

    def test_overCaptureLimit(self) -> None:
        """A JSON body past the capture limit: usage unknown and said to be truncated, memory bounded."""
        body = json.dumps({"pad": "x" * 5000, "usage": {"prompt_tokens": 1}}).encode()
        u = read("openai", body, "application/json", limit=1024)
        self.assertEqual((u.usage_source, u.input_tokens), ("truncated", None))

    def test_decompressionBomb(self) -> None:
        """A gzip bomb (100 MB of zeros) is read in bounded pieces and gives unknown usage, said to be truncated."""
        bomb = gzip.compress(b"\0" * (100 * 1024 * 1024), compresslevel=9)
        headers = {b"content-type": b"application/json", b"content-encoding": b"gzip"}
        reader: Any = readerFor("openai", 200, headers.get, b"/v1/chat/completions", 1024 * 1024)
        reader.feed(bomb)
        self.assertLessEqual(sum(len(p) for p in reader._parts), 1024 * 1024)
        self.assertEqual(reader.finish().usage_source, "truncated")

    def test_longSSELineDropped(self) -> None:
        """An SSE line longer than the capture limit is dropped, and later events still count."""
        body = b"data: " + b"x" * 5000 + b"\n\n" + fixture("openai/chat_completions_stream_usage.sse")
        u = read("openai", body, "text/event-stream", limit=2048, pieces=[body[i : i + 100] for i in range(0, len(body), 100)])
        self.assertEqual((u.input_tokens, u.output_tokens), (12, 5))


class PurityTests(SynchronousTestCase):
    """Reading usage is bytes in, counts out: the readers stand apart from the web server and the gateway."""

    FORBIDDEN = ("twisted.web", "twisted.internet.reactor", "lmgate.gate", "lmgate.relay", "lmgate.daemon")

    def test_noWebNorGatewayImports(self) -> None:
        """No module of lmgate.usage imports twisted.web, the global reactor, the gateway, the relay or the daemon."""
        import lmgate.usage

        folder = os.path.dirname(lmgate.usage.__file__)
        found = []
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(folder, name), "rb") as f:
                tree = ast.parse(f.read(), name)
            for node in ast.walk(tree):  # function-level imports too
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    modules = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
                else:
                    continue
                found += [(name, m) for m in modules if any(m == f or m.startswith(f + ".") for f in self.FORBIDDEN)]
        self.assertEqual(found, [])

    def test_headersArePlainValues(self) -> None:
        """A reader takes the response's header values through a plain lookup: a dict's C{get} will do."""
        body = fixture("openai/chat_completions.json")
        reader = readerFor("openai", 200, {b"content-type": b"application/json"}.get, b"/v1/chat/completions", LIMIT)
        reader.feed(body)
        self.assertEqual(reader.finish().usage_source, "response")


class RequestModelTests(SynchronousTestCase):
    def test_sources(self) -> None:
        """The request body's model, else the URL's."""
        self.assertEqual(requestModel("openai", b"/v1/chat/completions", b'{"model": "gpt-4o"}'), "gpt-4o")
        self.assertEqual(requestModel("google", b"/v1beta/models/gemini-2.0-flash:generateContent", b"{}"), "gemini-2.0-flash")
        self.assertEqual(requestModel("bedrock", b"/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse", b"{}"),
                         "anthropic.claude-3-haiku-20240307-v1:0")
        self.assertEqual(requestModel("openai", b"/openai/deployments/my-gpt4/chat/completions", b"{}"), "my-gpt4")
        self.assertIsNone(requestModel("openai", b"/v1/chat/completions", b"not json"))


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(st.data())
    def test_anyChunkingSameCounts(self, data: st.DataObject) -> None:
        """Arbitrary chunking of real payloads gives the same counts."""
        name, fmt, body, ctype, endpoint, expected = data.draw(st.sampled_from(CASES))
        cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=12)))
        pieces = [body[a:b] for a, b in zip([0] + cuts, cuts + [len(body)])]
        self.assertEqual(counts(read(fmt, body, ctype, endpoint, pieces=pieces))[:7], expected, name)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(["openai", "anthropic", "google", "bedrock"]),
           st.sampled_from(["application/json", "text/event-stream", "application/vnd.amazon.eventstream", ""]),
           st.sampled_from([None, "gzip", "deflate", "br", "zstd"]),
           st.lists(st.binary(max_size=200), max_size=5))
    def test_arbitraryBytesNeverRaise(self, fmt: str, ctype: str, encoding: str | None, pieces: list[bytes]) -> None:
        """Arbitrary bytes never raise from any reader."""
        read(fmt, b"", ctype, b"/v1beta/models/m:streamGenerateContent", pieces=pieces, encoding=encoding)


#: Values of valid JSON that are not token counts.
HOSTILE_COUNTS: list[Any] = ["10", float("nan"), float("inf"), 10**400, 2**53, -1, 1.5, True, [1], {"n": 1}]


def _b64chunk(inner: Any) -> bytes:
    return event("chunk", json.dumps({"bytes": base64.b64encode(json.dumps(inner).encode()).decode()}).encode())


#: (name, format, content type, endpoint, body with the count C{n} in its usage, the model read)
COUNT_TEMPLATES: list[tuple[str, str, str, bytes, Any, str | None]] = [
    ("openai chat", "openai", "application/json", b"/v1/chat/completions",
     lambda n: json.dumps({"model": "gpt-4o", "usage": {"prompt_tokens": n, "completion_tokens": 2}}).encode(), "gpt-4o"),
    ("openai chat cached", "openai", "application/json", b"/v1/chat/completions",
     lambda n: json.dumps({"model": "gpt-4o", "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                         "prompt_tokens_details": {"cached_tokens": n}}}).encode(), "gpt-4o"),
    ("openai embeddings", "openai", "application/json", b"/v1/embeddings",
     lambda n: json.dumps({"model": "text-embedding-3-small", "usage": {"prompt_tokens": n, "total_tokens": 8}}).encode(),
     "text-embedding-3-small"),
    ("openai chat stream", "openai", "text/event-stream", b"/v1/chat/completions",
     lambda n: sse((None, {"model": "gpt-4o", "choices": []}), (None, {"model": "gpt-4o", "choices": [],
                   "usage": {"prompt_tokens": 3, "completion_tokens": n}}), (None, b"[DONE]")), "gpt-4o"),
    ("openai responses stream", "openai", "text/event-stream", b"/v1/responses",
     lambda n: sse(("response.completed", {"type": "response.completed", "response": {"model": "o3", "usage": {
         "input_tokens": 3, "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": n}}}})), "o3"),
    ("anthropic messages", "anthropic", "application/json", b"/v1/messages",
     lambda n: json.dumps({"model": "claude-x", "usage": {"input_tokens": 3, "cache_read_input_tokens": n, "output_tokens": 2}}).encode(),
     "claude-x"),
    ("anthropic stream start", "anthropic", "text/event-stream", b"/v1/messages",
     lambda n: sse(("message_start", {"type": "message_start", "message": {"model": "claude-x", "usage": {"input_tokens": n, "output_tokens": 1}}}),
                   ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 5}})), "claude-x"),
    ("anthropic stream delta", "anthropic", "text/event-stream", b"/v1/messages",
     lambda n: sse(("message_start", {"type": "message_start", "message": {"model": "claude-x", "usage": {"input_tokens": 3, "output_tokens": 1}}}),
                   ("message_delta", {"type": "message_delta", "usage": {"output_tokens": n}})), "claude-x"),
    ("gemini generateContent", "google", "application/json", b"/v1beta/models/g:generateContent",
     lambda n: json.dumps({"modelVersion": "g", "usageMetadata": {"promptTokenCount": n, "candidatesTokenCount": 2}}).encode(), "g"),
    ("gemini sse", "google", "text/event-stream", b"/v1beta/models/g:streamGenerateContent",
     lambda n: sse((None, {"modelVersion": "g", "usageMetadata": {"promptTokenCount": 3, "thoughtsTokenCount": n}})), "g"),
    ("gemini array stream", "google", "application/json", b"/v1beta/models/g:streamGenerateContent",
     lambda n: b"[" + json.dumps({"modelVersion": "g", "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": n}}).encode() + b"]",
     "g"),
    ("bedrock converse", "bedrock", "application/json", b"/model/m/converse",
     lambda n: json.dumps({"usage": {"inputTokens": n, "outputTokens": 2}}).encode(), None),
    ("bedrock invoke anthropic", "bedrock", "application/json", b"/model/m/invoke",
     lambda n: json.dumps({"model": "claude-x", "usage": {"input_tokens": 3, "output_tokens": n}}).encode(), "claude-x"),
    ("bedrock converse stream", "bedrock", "application/vnd.amazon.eventstream", b"/model/m/converse-stream",
     lambda n: event("metadata", json.dumps({"usage": {"inputTokens": 3, "outputTokens": n}}).encode()), None),
    ("bedrock invoke stream", "bedrock", "application/vnd.amazon.eventstream", b"/model/m/invoke-with-response-stream",
     lambda n: _b64chunk({"type": "message_start", "message": {"model": "claude-x", "usage": {"input_tokens": n, "output_tokens": 1}}}),
     "claude-x"),
    ("bedrock invoke stream metrics", "bedrock", "application/vnd.amazon.eventstream", b"/model/m/invoke-with-response-stream",
     lambda n: _b64chunk({"type": "message_stop", "amazon-bedrock-invocationMetrics": {"inputTokenCount": n, "outputTokenCount": 2}}),
     None),
]


class HostileCountTests(SynchronousTestCase):
    def test_saneCountsAreRead(self) -> None:
        """The templates below, with a sane count, are read (so the hostile cases test the count alone)."""
        for name, fmt, ctype, endpoint, body, model in COUNT_TEMPLATES:
            u = read(fmt, body(7), ctype, endpoint)
            self.assertEqual((u.usage_source, u.model), ("response", model), name)
            self.assertIn(7, (u.input_tokens, u.output_tokens, u.cached_tokens, u.reasoning_tokens, u.input_tokens - 3), name)

    def test_hostileCountsMakeTheUsageInvalid(self) -> None:
        """A count that is a string, NaN, infinite, 400 digits long, 2**53 or more, negative, a float, a
        boolean or a container makes the usage invalid, in every format: no count is kept, the model is."""
        for name, fmt, ctype, endpoint, body, model in COUNT_TEMPLATES:
            for value in HOSTILE_COUNTS:
                u = read(fmt, body(value), ctype, endpoint)
                self.assertEqual(
                    (u.usage_source, u.input_tokens, u.output_tokens, u.cached_tokens, u.cache_write_tokens,
                     u.reasoning_tokens, u.total_tokens, u.model),
                    ("invalid", None, None, None, None, None, None, model), (name, repr(value)[:20]))

    def test_hostileCountsCompressedAndSplit(self) -> None:
        """The same, gzipped and fed a byte at a time."""
        for name, fmt, ctype, endpoint, body, model in COUNT_TEMPLATES:
            for value in ("10", 10**400):
                wire = compress(body(value), "gzip")
                u = read(fmt, wire, ctype, endpoint, encoding="gzip", pieces=[wire[i : i + 1] for i in range(len(wire))])
                self.assertEqual((u.usage_source, u.input_tokens, u.output_tokens), ("invalid", None, None), name)

    def test_invalidStaysInvalid(self) -> None:
        """A later sane usage in the same stream does not make an invalid one believed."""
        body = sse((None, {"model": "m", "usage": {"prompt_tokens": "1", "completion_tokens": 2}}),
                   (None, {"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}))
        u = read("openai", body, "text/event-stream")
        self.assertEqual((u.usage_source, u.input_tokens), ("invalid", None))

    def test_bedrockHeaderCounts(self) -> None:
        """The token-count headers too: digits only, below 2**53."""
        for value in (b"1" * 400, b"9007199254740992", b"-1", b"1.5", b"NaN", b"ten", "١٢".encode()):
            u = read("bedrock", b'{"results": []}', "application/json", b"/model/amazon.titan/invoke",
                     extra={b"x-amzn-bedrock-input-token-count": [value], b"x-amzn-bedrock-output-token-count": [b"30"]})
            self.assertEqual((u.usage_source, u.input_tokens, u.output_tokens), ("invalid", None, None), value)
        u = read("bedrock", b'{"results": []}', "application/json", b"/model/amazon.titan/invoke",
                 extra={b"x-amzn-bedrock-input-token-count": [b" 9007199254740991 "], b"x-amzn-bedrock-output-token-count": [b"0"]})
        self.assertEqual((u.input_tokens, u.output_tokens), (2**53 - 1, 0))

    def test_bedrockHeadersWhenTheBodyIsTooLarge(self) -> None:
        """A body past the capture limit: the token-count headers still give the counts."""
        u = read("bedrock", json.dumps({"pad": "x" * 5000}).encode(), "application/json", b"/model/amazon.titan/invoke", limit=1024,
                 extra={b"x-amzn-bedrock-input-token-count": [b"12"], b"x-amzn-bedrock-output-token-count": [b"30"]})
        self.assertEqual((u.usage_source, u.input_tokens, u.output_tokens), ("response", 12, 30))


def _bombBlock(unit: bytes, encoding: str, size: int) -> bytes:
    """C{size} bytes of repeated C{unit}, compressed."""
    return compress(unit * (size // len(unit)), encoding)


class BoundedDecodingTests(SynchronousTestCase):
    """Compressed bodies are read up to a budget per call and, for streams, per wire chunk."""

    def reader(self, encoding: str, limit: int = LIMIT, ctype: bytes = b"text/event-stream") -> tuple[Any, list[int]]:
        headers = {b"content-type": ctype, b"content-encoding": encoding.encode()}
        reader: Any = readerFor("openai", 200, headers.get, b"/v1/chat/completions", limit)
        scanned: list[int] = []
        take = reader._take

        def counting(piece: bytes) -> None:
            scanned.append(len(piece))
            take(piece)

        reader._take = counting
        return reader, scanned

    def test_oneChunkInflatingPastTheChunkBudget(self) -> None:
        """A stream's wire chunk that inflates past CHUNK_BUDGET is read no further: at most that much
        is scanned, later chunks are not decoded, and the usage is truncated (gzip, deflate, br, zstd)."""
        from lmgate.usage.decoding import CHUNK_BUDGET

        for encoding in ("gzip", "deflate", "br", "zstd"):
            wire = _bombBlock(b"data: x\n\n", encoding, 64 * 1024 * 1024)
            self.assertLess(len(wire), 512 * 1024, encoding)
            reader, scanned = self.reader(encoding)
            reader.feed(wire)
            reader.feed(wire)
            self.assertLessEqual(sum(scanned), CHUNK_BUDGET, encoding)
            self.assertEqual(reader.finish().usage_source, "truncated", encoding)

    def test_budgetPerCall(self) -> None:
        """Chunks each under the chunk budget stop being read past 16 × the capture limit decoded."""
        from lmgate.usage.decoding import BUDGET_FACTOR

        limit = 4096
        body = fixture("openai/chat_completions_stream_usage.sse")
        events = body * (BUDGET_FACTOR * limit // len(body) + 2)
        for encoding in ("gzip", "br", "zstd"):
            wire = compress(events, encoding)
            reader, scanned = self.reader(encoding, limit)
            for i in range(0, len(wire), 100):
                reader.feed(wire[i : i + 100])
            self.assertLessEqual(sum(scanned), BUDGET_FACTOR * limit, encoding)
            self.assertEqual(reader.finish().usage_source, "truncated", encoding)
            # Under the budget, the same stream is read.
            short = compress(body * (BUDGET_FACTOR * limit // len(body) - 1), encoding)
            reader, _ = self.reader(encoding, limit)
            reader.feed(short)
            self.assertEqual(reader.finish().usage_source, "response", encoding)

    def test_identityIsNotBounded(self) -> None:
        """An uncompressed stream costs no more than its wire bytes: it is read to the end."""
        body = fixture("openai/chat_completions_stream_usage.sse")
        u = read("openai", body * 200, "text/event-stream", limit=1024)
        self.assertEqual((u.usage_source, u.input_tokens), ("response", 12))

    def test_zstdPiecesStaySmall(self) -> None:
        """zstd output comes in pieces of at most PIECE bytes, however well the input compresses."""
        from lmgate.usage.decoding import PIECE, decoderFor

        wire = compress(b"\0" * (32 * 1024 * 1024), "zstd")
        sizes = [len(p) for p in decoderFor(b"zstd").decode(wire)]
        self.assertEqual((max(sizes), sum(sizes)), (PIECE, 32 * 1024 * 1024))


class EventStreamFrameTests(SynchronousTestCase):
    def test_largeFrameIsNotBuffered(self) -> None:
        """A frame announcing 20 MiB (more than the capture limit) is not buffered: reading stops, the
        usage is truncated, and the reader holds no more than the frames before it."""
        import struct

        prelude = struct.pack(">II", 20 * 1024 * 1024, 0)
        frame = prelude + struct.pack(">I", zlib.crc32(prelude))
        headers = {b"content-type": b"application/vnd.amazon.eventstream"}
        reader: Any = readerFor("bedrock", 200, headers.get, b"/model/m/converse-stream", 1024 * 1024)
        first = event("messageStart", b'{"role":"assistant"}')
        reader.feed(first + frame[:5])
        reader.feed(frame[5:])
        for _ in range(320):
            reader.feed(b"\0" * 65536)
        self.assertLessEqual(len(reader._buffer._data), len(first) + len(frame))
        self.assertEqual(reader.finish().usage_source, "truncated")

    def test_frameAtTheLimitIsRead(self) -> None:
        """A frame as long as the capture limit is read; split anywhere, frame lengths are followed."""
        metadata = event("metadata", json.dumps({"usage": {"inputTokens": 3, "outputTokens": 4}}).encode())
        pad = event("contentBlockDelta", b'{"p":"' + b"x" * (1000 - len(event("contentBlockDelta", b'{"p":""}'))) + b'"}')
        self.assertEqual(len(pad), 1000)
        body = pad + metadata + pad
        for i in range(len(body) + 1):
            u = read("bedrock", body, "application/vnd.amazon.eventstream", b"/model/m/converse-stream", limit=1024 if i % 2 else 1000,
                     pieces=[body[:i], body[i:]])
            self.assertEqual((u.input_tokens, u.output_tokens), (3, 4), i)
        u = read("bedrock", body, "application/vnd.amazon.eventstream", b"/model/m/converse-stream", limit=999)
        self.assertEqual((u.usage_source, u.input_tokens), ("truncated", None))


class HostileRecordTests(TestCase):
    async def test_recordWrittenForHostileCounts(self) -> None:
        """Through the gateway, with a price table and the metrics sink: each hostile count gives a
        record (usage invalid, counts and cost null) that every sink takes and that serialises."""
        from lmgate.ops.metrics import Fanout, Metrics
        from lmgate.ops.prices import PriceTable
        from tests.test_prices import EXAMPLE

        for value in HOSTILE_COUNTS:
            upstream = FakeUpstream()
            body = json.dumps({"model": "gpt-4o-mini", "usage": {"prompt_tokens": value, "completion_tokens": 2}}).encode()

            def handler(request: Any, body: bytes = body) -> bytes:
                request.setHeader(b"content-type", b"application/json")
                return body

            upstream.handler = handler
            gate = startGateway(self, upstream)
            gate.gateway.prices = PriceTable.load(EXAMPLE)
            recorded = gate.sink
            gate.gateway.sink = Fanout([Metrics(models=["gpt-4o"]), recorded])
            response, relayed, _ = await call(self, gate.url + "/openai/v1/chat/completions")
            self.assertEqual(relayed, body)
            [record] = await recorded.waitFor(1)
            self.assertEqual((record.usage_source, record.input_tokens, record.output_tokens, record.total_tokens, record.cost_usd),
                             ("invalid", None, None, None, None), repr(value)[:20])
            self.assertEqual(json.loads(record.toLine())["usage_source"], "invalid")
