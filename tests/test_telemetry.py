"""
OpenTelemetry traces (L{lmgate.ops.telemetry}): one span per call received by
a fake OTLP/HTTP collector on loopback, the client's C{traceparent} continued
and passed upstream naming LMGate's span, and nothing at all when off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lmgate.errors import ConfigError
from lmgate.ops import telemetry
from lmgate.ops.telemetry import Tracer, checkAvailable, genAISystem, operationName
from lmgate.policy.settings import TelemetrySettings
from tests.helpers import AUTH, Running, call, jsonAnswer, startGateway
from tests.otlp import FakeCollector, listenCollector

#: A client's span, as its SDK would send it.
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01".encode()

CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [],
    "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17},
}

#: SpanKind.CLIENT and Status.ERROR in OTLP's numbering.
KIND_CLIENT, STATUS_ERROR, STATUS_UNSET = 3, 2, 0


def parseTraceparent(value: bytes) -> tuple[str, str]:
    """The trace id and parent span id of a W3C C{traceparent}."""
    version, traceId, spanId, flags = value.decode().split("-")
    return traceId, spanId


class NamesTests(SynchronousTestCase):
    """The GenAI semantic conventions' names for routes and paths."""

    def test_system(self) -> None:
        """Routes are named by the conventions' provider values: by route name where it says more than the format."""
        self.assertEqual(
            [
                genAISystem("openai", "openai"),
                genAISystem("azure", "openai"),
                genAISystem("anthropic", "anthropic"),
                genAISystem("gemini", "google"),
                genAISystem("vertex", "google"),
                genAISystem("google", "google"),
                genAISystem("ai-studio", "google"),
                genAISystem("bedrock", "bedrock"),
                genAISystem("mylocal", "openai"),
                genAISystem(None, None),
            ],
            ["openai", "azure.ai.openai", "anthropic", "gcp.gemini", "gcp.vertex_ai", "gcp.vertex_ai", "gcp.gemini", "aws.bedrock", "openai", None],
        )

    def test_operation(self) -> None:
        """Each provider format's model calls get their operation; other paths none."""
        self.assertEqual(
            [
                operationName("/openai/v1/chat/completions"),
                operationName("/openai/v1/completions"),
                operationName("/openai/v1/embeddings"),
                operationName("/openai/v1/responses"),
                operationName("/anthropic/v1/messages"),
                operationName("/gemini/v1beta/models/gemini-2.0-flash:generateContent?key=x"),
                operationName("/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent"),
                operationName("/gemini/v1beta/models/text-embedding-004:embedContent"),
                operationName("/bedrock/model/anthropic.claude-3-haiku/converse-stream"),
                operationName("/openai/v1/models"),
            ],
            ["chat", "text_completion", "embeddings", "chat", "chat", "generate_content", "generate_content", "embeddings", "chat", None],
        )

    def test_missingSDK(self) -> None:
        """An endpoint without the SDK installed: one line naming the key and the extra to install."""
        self.patch(telemetry, "find_spec", lambda name: None)
        with self.assertRaises(ConfigError) as caught:
            checkAvailable("etc/lmgate.yaml", "http://127.0.0.1:4318")
        self.assertEqual(
            str(caught.exception),
            "etc/lmgate.yaml: telemetry.otlp.endpoint: traces need the OpenTelemetry SDK "
            "(opentelemetry.sdk is missing): pip install 'lmgate[otel]'",
        )
        checkAvailable("etc/lmgate.yaml", None)  # off: nothing is looked up


class GatewayTracesTests(TestCase):
    """Spans of calls through an in-process gateway, exported to a fake collector."""

    def setUp(self) -> None:
        self.collector, base = listenCollector(self)
        self.running: Running = startGateway(self)
        self.running.upstream.handler = jsonAnswer(CHAT)
        settings = TelemetrySettings(base + "/", {"x-collector-key": "secret"}, "lmgate-test")
        self.tracer = Tracer(settings, reactor)
        self.tracer.startService()
        self.running.gateway.tracer = self.tracer

    async def flushed(self, n: int) -> list:  # type: ignore[type-arg]
        """Stop the tracer (which flushes) and the C{n} spans the collector received."""
        await self.tracer.stopService()
        return list(await self.collector.waitFor(n))

    async def test_continuesTheClientsTrace(self) -> None:
        """
        A call with the client's C{traceparent}: one span in the client's trace,
        its parent the client's span, named C{chat <model>}, kind CLIENT, with the
        GenAI and LMGate attributes; the upstream got a C{traceparent} in the same
        trace naming that span as parent (the client's header replaced), and the
        client's C{tracestate} carried on.
        """
        body = json.dumps({"model": "gpt-4o-mini", "messages": []}).encode()
        headers = dict(AUTH, traceparent=[CLIENT_PARENT], tracestate=[b"vendor=abc"])
        response, _, _ = await call(self, self.running.url + "/openai/v1/chat/completions", body=body, headers=headers)
        self.assertEqual(response.code, 200)
        [seen] = self.running.upstream.seen
        [upstreamParent] = seen.headers.getRawHeaders(b"traceparent")
        self.assertEqual(seen.headers.getRawHeaders(b"tracestate"), [b"vendor=abc"])
        [record] = self.running.sink.records
        [span] = await self.flushed(1)
        self.assertEqual(self.collector.paths, [b"/v1/traces"])
        self.assertEqual(self.collector.headers[0].getRawHeaders(b"x-collector-key"), [b"secret"])
        self.assertEqual((span.traceId, span.parentSpanId), (CLIENT_TRACE, CLIENT_SPAN))
        self.assertEqual(parseTraceparent(upstreamParent), (CLIENT_TRACE, span.spanId))
        self.assertEqual((span.name, span.kind, span.statusCode), ("chat gpt-4o-mini", KIND_CLIENT, STATUS_UNSET))
        self.assertEqual(span.resource["service.name"], "lmgate-test")
        self.assertEqual(
            span.attributes,
            {
                "gen_ai.system": "openai",
                "gen_ai.provider.name": "openai",
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": "gpt-4o-mini",
                "gen_ai.response.model": "gpt-4o-mini-2024-07-18",
                "gen_ai.usage.input_tokens": 12,
                "gen_ai.usage.output_tokens": 5,
                "http.request.method": "POST",
                "http.response.status_code": 200,
                "lmgate.request_id": record.request_id,
                "lmgate.key_id": "app1",
                "lmgate.owner": "team-a",
                "lmgate.route": "openai",
                "lmgate.endpoint": "/openai/v1/chat/completions",
                "lmgate.attempts": 1,
                "lmgate.streaming": False,
                "lmgate.usage_source": "response",
            },
        )
        self.assertGreaterEqual(span.end, span.start)

    async def test_newTrace(self) -> None:
        """Without a client C{traceparent} (or with an invalid one): a new trace, its root the call's span, still passed upstream."""
        for parent in (None, b"00-nonsense-01"):
            headers = dict(AUTH, traceparent=[parent]) if parent else dict(AUTH)
            await call(self, self.running.url + "/anthropic/v1/messages", body=b'{"model": "claude-3-5-haiku"}', headers=headers)
        spans = await self.flushed(2)
        self.assertEqual(len(spans), 2)
        for seen, span in zip(self.running.upstream.seen, spans):
            [upstreamParent] = seen.headers.getRawHeaders(b"traceparent")
            self.assertEqual(parseTraceparent(upstreamParent), (span.traceId, span.spanId))
            self.assertEqual(span.parentSpanId, "")
            self.assertNotEqual(span.traceId, CLIENT_TRACE)
            self.assertEqual((span.name, span.attributes["gen_ai.system"]), ("chat claude-3-5-haiku", "anthropic"))
        self.assertNotEqual(spans[0].traceId, spans[1].traceId)

    async def test_clientSampledOut(self) -> None:
        """
        A client whose C{traceparent} says not sampled (flags C{00}): no span is
        exported (the SDK's default sampler follows the parent), yet the upstream
        still gets a C{traceparent} in the client's trace, not sampled either.
        """
        headers = dict(AUTH, traceparent=[f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00".encode()])
        response, _, _ = await call(self, self.running.url + "/openai/v1/chat/completions", headers=headers)
        self.assertEqual(response.code, 200)
        [seen] = self.running.upstream.seen
        [upstreamParent] = seen.headers.getRawHeaders(b"traceparent")
        version, traceId, spanId, flags = upstreamParent.decode().split("-")
        self.assertEqual((traceId, flags), (CLIENT_TRACE, "00"))
        self.assertNotEqual(spanId, CLIENT_SPAN)
        await self.tracer.stopService()
        self.assertEqual(self.collector.spans, [])
        self.assertEqual(len(self.running.sink.records), 1)

    async def test_refusedAndFailedCalls(self) -> None:
        """
        A call refused before it is sent still gets its span (in the client's
        trace), status ERROR with the record's error; an upstream's 500 is an
        ERROR named by its status.
        """
        headers = {b"traceparent": [CLIENT_PARENT]}  # no key
        response, _, _ = await call(self, self.running.url + "/openai/v1/chat/completions", headers=headers)
        self.assertEqual(response.code, 403)
        self.running.upstream.handler = jsonAnswer({"error": {"message": "boom"}}, status=500)
        response, _, _ = await call(self, self.running.url + "/openai/v1/embeddings", body=b'{"model": "text-embedding-3-small"}')
        self.assertEqual(response.code, 500)
        refused, failed = sorted(await self.flushed(2), key=lambda span: span.attributes["http.response.status_code"])
        self.assertEqual(len(self.running.upstream.seen), 1)
        self.assertEqual((refused.traceId, refused.parentSpanId, refused.statusCode), (CLIENT_TRACE, CLIENT_SPAN, STATUS_ERROR))
        self.assertEqual(refused.attributes["error.type"], self.running.sink.records[0].error)
        self.assertNotIn("lmgate.key_id", refused.attributes)
        self.assertEqual((failed.name, failed.statusCode, failed.attributes["error.type"]), ("embeddings text-embedding-3-small", STATUS_ERROR, "500"))


class OffTests(TestCase):
    """Telemetry off (the default): the relay as before, OpenTelemetry never loaded."""

    async def test_traceparentUntouched(self) -> None:
        """The client's C{traceparent} and C{tracestate} reach the upstream byte for byte; none is added when it sent none."""
        running = startGateway(self)
        self.assertIsNone(running.gateway.tracer)
        headers = dict(AUTH, traceparent=[CLIENT_PARENT], tracestate=[b"vendor=abc"])
        await call(self, running.url + "/openai/v1/chat/completions", headers=headers)
        await call(self, running.url + "/openai/v1/chat/completions")
        first, second = running.upstream.seen
        self.assertEqual(first.headers.getRawHeaders(b"traceparent"), [CLIENT_PARENT])
        self.assertEqual(first.headers.getRawHeaders(b"tracestate"), [b"vendor=abc"])
        self.assertIsNone(second.headers.getRawHeaders(b"traceparent"))

    def test_notImported(self) -> None:
        """
        The daemon's service tree built from a config without C{telemetry:}
        imports no OpenTelemetry module and starts no exporter thread; with an
        endpoint, both (the check that the test sees them).
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "allowlist.csv"), "w") as f:
            f.write("id,api_key,owner,added\napp,sk-test-0123456789abcdef,team-a,2026-12-01\n")
        script = textwrap.dedent(
            """
            import os, sys, threading
            from twisted.internet import reactor
            from lmgate.config import loadSettings
            from lmgate.daemon.assemble import buildService
            service = buildService(loadSettings(sys.argv[1]), reactor)
            service.startService()
            loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
            threads = [t.name for t in threading.enumerate() if t.name.startswith("Otel")]
            print(len(loaded), threads, flush=True)
            os._exit(0)  # the services' threads are not stopped: this only looks
            """
        )
        outputs = []
        for extra in ("", "telemetry: {otlp: {endpoint: 'http://127.0.0.1:9'}}\n"):
            path = os.path.join(directory, "lmgate.yaml")
            with open(path, "w") as f:
                f.write(
                    f"listen: 'tcp:0:interface=127.0.0.1'\nallowlist: {{path: {directory}/allowlist.csv}}\n"
                    f"stats: {{path: {directory}/stats.jsonl}}\nproviders: {{openai: {{upstream: 'http://127.0.0.1:9'}}}}\n"
                    + extra
                )
            done = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, timeout=60, cwd=directory)
            self.assertEqual(done.returncode, 0, done.stderr)
            outputs.append(done.stdout.strip().splitlines()[-1])
        self.assertEqual(outputs[0], "0 []")
        count, threads = outputs[1].split(" ", 1)
        self.assertGreater(int(count), 0)
        self.assertEqual(threads, "['OtelBatchSpanRecordProcessor']")
