"""
A fake OpenTelemetry collector on loopback: accepts OTLP/HTTP
(C{POST /v1/traces}, protobuf), decodes each C{ExportTraceServiceRequest}
and keeps its spans, their attributes read into plain Python values.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site


@dataclass
class ReceivedSpan:
    """One span as the collector decoded it (ids in lower-case hex, as in a C{traceparent})."""

    name: str
    traceId: str
    spanId: str
    parentSpanId: str
    kind: int
    start: int
    end: int
    statusCode: int
    attributes: dict[str, Any]
    resource: dict[str, Any] = field(default_factory=dict)


def _value(value: Any) -> Any:
    which = value.WhichOneof("value")
    return getattr(value, which) if which else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


class FakeCollector(Resource):
    """The OTLP/HTTP traces endpoint; C{spans} grows as exports arrive, C{headers} keeps each export's headers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.spans: list[ReceivedSpan] = []
        self.paths: list[bytes] = []
        self.headers: list[Any] = []
        self._waiting: list[tuple[int, Deferred[list[ReceivedSpan]]]] = []

    def render_POST(self, request: Request) -> bytes:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.paths.append(request.path)
        self.headers.append(request.requestHeaders.copy())
        body = request.content.read()
        if request.getHeader(b"content-encoding") == b"gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        for resourceSpans in export.resource_spans:
            resource = _attributes(resourceSpans.resource.attributes)
            for scopeSpans in resourceSpans.scope_spans:
                for span in scopeSpans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.kind,
                            span.start_time_unix_nano,
                            span.end_time_unix_nano,
                            span.status.code,
                            _attributes(span.attributes),
                            resource,
                        )
                    )
        for n, d in list(self._waiting):
            if len(self.spans) >= n:
                self._waiting.remove((n, d))
                d.callback(self.spans)
        request.setHeader(b"content-type", b"application/x-protobuf")
        return bytes(ExportTraceServiceResponse().SerializeToString())

    def waitFor(self, n: int) -> Deferred[list[ReceivedSpan]]:
        """Fires once C{n} spans have arrived."""
        d: Deferred[list[ReceivedSpan]] = Deferred()
        self._waiting.append((n, d))
        if len(self.spans) >= n:
            self._waiting.remove((n, d))
            d.callback(self.spans)
        return d


def listenCollector(case: TestCase) -> tuple[FakeCollector, str]:
    """A fake collector on 127.0.0.1 (port 0), stopped at the test's end: it and its base URL."""
    collector = FakeCollector()
    port = reactor.listenTCP(0, Site(collector), interface="127.0.0.1")  # type: ignore[attr-defined]
    case.addCleanup(port.stopListening)
    return collector, f"http://127.0.0.1:{port.getHost().port}"
