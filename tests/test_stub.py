"""The stub upstream answers each provider's endpoints in its own wire format."""

from __future__ import annotations

import json
from typing import Any

from botocore.eventstream import EventStreamBuffer
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from lmgate.stub.server import REPLY, makeStubResource, words
from lmgate.usage import readerFor


class StubTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.treq = StubTreq(makeStubResource(self.clock))

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> tuple[Any, bytes]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = self.successResultOf(self.treq.post("http://stub" + path, data, headers=headers or {}))
        content = self.successResultOf(response.content())
        return response, content

    def usage(self, fmt: str, path: str, response: Any, content: bytes) -> Any:
        def header(name: bytes) -> bytes | None:
            values = response.headers.getRawHeaders(name)
            return values[0] if values else None

        reader = readerFor(fmt, response.code, header, path.split("?")[0].encode(), 1 << 20)
        reader.feed(content)
        return reader.finish()

    def test_openaiChat(self) -> None:
        """Chat completions: deterministic usage, non-streamed and streamed with include_usage."""
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one two three"}]}
        response, content = self.post("/v1/chat/completions", body)
        data = json.loads(content)
        self.assertEqual(data["usage"]["prompt_tokens"], 3)
        self.assertEqual(data["usage"]["completion_tokens"], words(REPLY.format(model="gpt-4o-mini")))
        response, content = self.post("/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        events = [json.loads(line[6:]) for line in content.split(b"\n\n") if line.startswith(b"data: {")]
        self.assertTrue(all("usage" in e for e in events))
        self.assertEqual(events[-1]["choices"], [])
        self.assertEqual(events[-1]["usage"]["prompt_tokens"], 3)
        self.assertTrue(content.endswith(b"data: [DONE]\n\n"))
        u = self.usage("openai", "/v1/chat/completions", response, content)
        self.assertEqual((u.input_tokens, u.output_tokens), (3, events[-1]["usage"]["completion_tokens"]))

    def test_everyEndpointIsReadable(self) -> None:
        """Each endpoint's answer yields usage through LMGate's own readers."""
        chat = {"model": "m", "messages": [{"role": "user", "content": "a b"}]}
        cases = [
            ("openai", "/v1/responses", {"model": "m", "input": "a b"}),
            ("openai", "/v1/responses", {"model": "m", "input": "a b", "stream": True}),
            ("openai", "/v1/embeddings", {"model": "e", "input": ["a b"]}),
            ("openai", "/v1/completions", {"model": "m", "prompt": "a b"}),
            ("openai", "/openai/deployments/dep/chat/completions?api-version=2024-10-21", chat),
            ("anthropic", "/v1/messages", {**chat, "max_tokens": 5}),
            ("anthropic", "/v1/messages", {**chat, "max_tokens": 5, "stream": True}),
            ("google", "/v1beta/models/gemini-2.0-flash:generateContent", {"contents": [{"parts": [{"text": "a b"}]}]}),
            ("google", "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", {"contents": [{"parts": [{"text": "a b"}]}]}),
            ("google", "/v1beta/models/gemini-2.0-flash:streamGenerateContent", {"contents": [{"parts": [{"text": "a b"}]}]}),
            ("google", "/v1/projects/p/locations/us-central1/publishers/google/models/gemini-2.0-flash:generateContent", {"contents": [{"parts": [{"text": "a b"}]}]}),
            ("bedrock", "/model/amazon.nova-lite-v1%3A0/converse", {"messages": [{"role": "user", "content": [{"text": "a b"}]}]}),
            ("bedrock", "/model/amazon.nova-lite-v1%3A0/converse-stream", {"messages": [{"role": "user", "content": [{"text": "a b"}]}]}),
            ("bedrock", "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke", {**chat, "max_tokens": 5}),
            ("bedrock", "/model/amazon.titan-text-lite-v1/invoke", {"inputText": "a b"}),
            ("bedrock", "/model/anthropic.claude-3-haiku-20240307-v1%3A0/invoke-with-response-stream", {**chat, "max_tokens": 5}),
        ]
        for fmt, path, body in cases:
            response, content = self.post(path, body)
            self.assertEqual(response.code, 200, path)
            u = self.usage(fmt, path, response, content)
            self.assertEqual(u.input_tokens, 2, path)
            if "embeddings" not in path:
                self.assertGreater(u.output_tokens or 0, 0, path)

    def test_eventStreamFramingIsReal(self) -> None:
        """Bedrock streams use real event-stream framing: botocore's parser checks every CRC."""
        response, content = self.post("/model/m/converse-stream", {"messages": [{"role": "user", "content": [{"text": "hi"}]}]})
        buffer = EventStreamBuffer()
        buffer.add_data(content)
        types = [m.headers[":event-type"] for m in buffer]
        self.assertEqual(types[0], "messageStart")
        self.assertEqual(types[-1], "metadata")

    def test_badJSONInEachShape(self) -> None:
        """A body that is not JSON is a 400 in the provider's own error shape."""
        for path, check in [
            ("/v1/chat/completions", lambda b: b["error"]["type"] == "invalid_request_error"),
            ("/v1/messages", lambda b: b["type"] == "error"),
            ("/v1beta/models/m:generateContent", lambda b: b["error"]["status"] == "INVALID_ARGUMENT"),
            ("/model/m/converse", lambda b: "message" in b),
        ]:
            response, content = self.post(path, b"{nope")
            self.assertEqual(response.code, 400)
            self.assertTrue(check(json.loads(content)), path)

    def test_unknownPath(self) -> None:
        """Unknown paths are a JSON 404."""
        response, content = self.post("/nothing/here", {})
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(content)["error"]["type"], "not_found")

    def test_pacedStream(self) -> None:
        """x-lmgate-stub-delay-ms spaces events on the clock; x-lmgate-stub-events sets their number."""
        d = self.treq.post("http://stub/v1/chat/completions", json.dumps({"model": "m", "messages": [], "stream": True}).encode(),
                           headers={"x-lmgate-stub-delay-ms": "100", "x-lmgate-stub-events": "5"}, unbuffered=True)
        response = self.successResultOf(d)
        chunks: list[bytes] = []
        done = __import__("treq").collect(response, chunks.append)
        self.treq.flush()
        self.assertEqual(len(chunks), 1)
        for _ in range(10):
            self.clock.advance(0.1)
            self.treq.flush()
        self.successResultOf(done)
        deltas = [c for c in chunks if b'"content"' in c and b'"role"' not in c]
        self.assertEqual(len(deltas), 5)
