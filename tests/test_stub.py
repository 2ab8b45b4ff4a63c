"""The stub upstream answers each provider's endpoints in its own wire format."""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import urllib.request
from typing import Any

from botocore.eventstream import EventStreamBuffer
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from lmgate.stub.server import REPLY, makeStubResource, serve, words
from lmgate.usage import readerFor
from tests.daemon import freePort


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


class StubServeTests(SynchronousTestCase):
    """C{lmgate stub} serves on the reactor C{react} hands it."""

    def test_servesOnTheGivenReactor(self) -> None:
        """The stub's site listens on, and takes its time from, the reactor it is given, until that stops."""
        reactor = MemoryReactorClock()
        serving = serve(reactor, "tcp:0:interface=127.0.0.1")
        [(port, site, backlog, interface)] = reactor.tcpServers
        self.assertEqual((port, interface, site.reactor), (0, "127.0.0.1", reactor))
        self.assertNoResult(serving)

    def test_unusableEndpoint(self) -> None:
        """An endpoint Twisted cannot parse is exit status 2."""
        self.assertEqual(self.assertRaises(SystemExit, serve, MemoryReactorClock(), "nonsense:1").code, 2)


class StubCommandTests(SynchronousTestCase):
    """The C{lmgate stub} command, run as a child process on loopback."""

    def command(self, listen: str) -> list[str]:
        return [sys.executable, "-m", "lmgate.cli", "stub", "--listen", listen]

    def test_cannotListen(self) -> None:
        """A port in use: one line naming the endpoint, and exit status 1."""
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            listen = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
            done = subprocess.run(self.command(listen), capture_output=True, timeout=60)
        self.assertEqual((done.returncode, done.stderr.splitlines()[-1].startswith(f"lmgate stub: cannot listen on {listen}".encode())), (1, True))

    def test_servesUntilInterrupted(self) -> None:
        """The stub answers on its port, and an interrupt ends it with status 0."""
        for attempt in range(3):  # the free port may be taken before the child binds it
            port = freePort()
            child = subprocess.Popen(self.command(f"tcp:{port}:interface=127.0.0.1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.addCleanup(lambda child=child: child.poll() is None and child.kill())
            ready, _, _ = select.select([child.stdout], [], [], 60)
            line = child.stdout.readline() if ready else b""  # type: ignore[union-attr]
            if line.startswith(b"lmgate stub: serving"):
                break
            child.wait(60)
        else:
            self.fail(f"the stub did not start: {line!r}")
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "one"}]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            self.assertEqual(json.loads(response.read())["usage"]["prompt_tokens"] > 0, True)
        child.send_signal(signal.SIGINT)
        self.assertEqual(child.wait(60), 0)
