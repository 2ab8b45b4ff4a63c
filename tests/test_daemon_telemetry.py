"""
The running daemon (C{twistd -n lmgate}) with C{telemetry.otlp.endpoint}: its
spans reach a fake collector on loopback, the upstream gets a C{traceparent}
naming them; without the SDK it refuses to start with one line; off, the
client's C{traceparent} goes upstream as it came.
"""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.web.server import Site

from tests.daemon import PROJECT, Daemon, readRecords
from tests.helpers import FakeUpstream, call, jsonAnswer
from tests.otlp import listenCollector
from tests.test_daemon import PLAIN_KEY, DaemonTestCase
from tests.test_telemetry import CHAT, CLIENT_PARENT, CLIENT_SPAN, CLIENT_TRACE, KIND_CLIENT, parseTraceparent

AUTH = {b"Authorization": [b"Bearer " + PLAIN_KEY.encode()]}


class DaemonTelemetryTests(DaemonTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.upstream = FakeUpstream()
        self.upstream.handler = jsonAnswer(CHAT)
        port = reactor.listenTCP(0, Site(self.upstream), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.stubURL = f"http://127.0.0.1:{port.getHost().port}"

    async def test_spansExported(self) -> None:
        """
        A call with the client's C{traceparent}: the upstream's C{traceparent} is in
        the client's trace and names the span the collector receives (at the
        latest when the daemon stops: the last spans are flushed), whose parent
        is the client's span and whose attributes come from the call's record.
        """
        collector, base = listenCollector(self)
        config = self.config() + f"telemetry:\n  otlp: {{endpoint: '{base}', service_name: gate-a}}\n"
        daemon = Daemon(self, config, self.directory)
        daemon.start()
        await daemon.waitUntilHealthy(self.port)
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
        headers = dict(AUTH, traceparent=[CLIENT_PARENT])
        response, _, _ = await call(self, self.base + "/openai/v1/chat/completions", body=body, headers=headers)
        self.assertEqual(response.code, 200)
        self.assertEqual(await daemon.stop(), 0)
        [seen] = self.upstream.seen
        [upstreamParent] = seen.headers.getRawHeaders(b"traceparent")
        [span] = await collector.waitFor(1)
        [record] = readRecords(self.statsPath)
        self.assertEqual(parseTraceparent(upstreamParent), (CLIENT_TRACE, span.spanId))
        self.assertEqual((span.traceId, span.parentSpanId, span.kind), (CLIENT_TRACE, CLIENT_SPAN, KIND_CLIENT))
        self.assertEqual(span.name, "chat gpt-4o-mini")
        self.assertEqual(span.resource["service.name"], "gate-a")
        attributes = span.attributes
        self.assertEqual(
            (
                attributes["gen_ai.system"],
                attributes["gen_ai.request.model"],
                attributes["gen_ai.response.model"],
                attributes["gen_ai.usage.input_tokens"],
                attributes["gen_ai.usage.output_tokens"],
                attributes["lmgate.key_id"],
                attributes["lmgate.owner"],
                attributes["lmgate.route"],
                attributes["http.response.status_code"],
                attributes["lmgate.request_id"],
            ),
            ("openai", "gpt-4o-mini", "gpt-4o-mini-2024-07-18", 12, 5, "plain", "team-plain", "openai", 200, record["request_id"]),
        )
        self.assertIn(b"Traces to " + base.encode() + b"/v1/traces", daemon.watch.output)

    async def test_offRelaysTraceparent(self) -> None:
        """Without C{telemetry:}, the client's C{traceparent} reaches the upstream byte for byte."""
        daemon = await self.startDaemon()
        headers = dict(AUTH, traceparent=[CLIENT_PARENT], tracestate=[b"vendor=abc"])
        response, _, _ = await call(self, self.base + "/openai/v1/chat/completions", headers=headers)
        self.assertEqual(response.code, 200)
        self.assertEqual(await daemon.stop(), 0)
        [seen] = self.upstream.seen
        self.assertEqual(seen.headers.getRawHeaders(b"traceparent"), [CLIENT_PARENT])
        self.assertEqual(seen.headers.getRawHeaders(b"tracestate"), [b"vendor=abc"])

    async def test_withoutTheSDK(self) -> None:
        """An endpoint set and the SDK not installed: the daemon does not start, and says what to install."""
        site = os.path.abspath(self.mktemp())
        os.makedirs(site)
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write('import sys\nsys.modules["opentelemetry"] = None  # not installed\n')
        config = self.config() + "telemetry: {otlp: {endpoint: 'http://127.0.0.1:4318'}}\n"
        daemon = Daemon(self, config, self.directory)
        daemon.env["PYTHONPATH"] = site + os.pathsep + PROJECT
        daemon.start()
        self.assertNotEqual(await daemon.watch.ended, 0)
        self.assertIn(
            b"telemetry.otlp.endpoint: traces need the OpenTelemetry SDK (opentelemetry.sdk is missing): pip install 'lmgate[otel]'",
            daemon.watch.output,
        )
