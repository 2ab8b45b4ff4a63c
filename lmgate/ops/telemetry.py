"""
OpenTelemetry traces (C{telemetry.otlp.endpoint}): one span per call, sent
over OTLP/HTTP by the OpenTelemetry SDK, batched in the SDK's own thread.

The optional extra C{lmgate[otel]} brings the SDK. Nothing here imports it
at the top: the daemon imports this module only when an endpoint is
configured (L{checkAvailable} at start-up, L{Tracer} once running), so a
gateway without telemetry never loads OpenTelemetry, starts no thread and
leaves the client's C{traceparent} to be relayed as it came.

A call's span follows the GenAI semantic conventions: named
C{"{gen_ai.operation.name} {gen_ai.request.model}"} (C{chat gpt-4o-mini}),
kind C{CLIENT} (it stands for the call to the model, as the conventions ask
of an inference span), started when the call started and ended when it was
recorded, its attributes read from the record. Its context exists before
the request goes upstream (L{Tracer.startSpan}): the upstream request names
it as parent in its C{traceparent}; the client's own C{traceparent}, when
valid, makes it a child of the client's span.
"""

from __future__ import annotations

import re
import threading
from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from lmgate.errors import ConfigError

if TYPE_CHECKING:
    from twisted.web.http_headers import Headers

    from lmgate.gate.admission import CallContext
    from lmgate.policy.settings import TelemetrySettings
    from lmgate.records.record import UsageRecord

log = Logger()

__all__ = ["Tracer", "checkAvailable", "genAISystem", "operationName", "INSTALL_HINT"]

#: What to run when the endpoint is set and the SDK is missing.
INSTALL_HINT = "pip install 'lmgate[otel]'"

#: The modules the extra brings (checked without importing them).
_REQUIRED = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http")

#: The W3C trace-context headers.
TRACEPARENT, TRACESTATE = b"traceparent", b"tracestate"

#: Seconds each export request may take (the SDK retries within it).
EXPORT_TIMEOUT = 5.0

#: Route names that are a C{gen_ai.system} of their own (an OpenAI-format route
#: named C{groq} is Groq, not OpenAI); other routes are named by their format.
_SYSTEM_BY_NAME = {
    "azure": "azure.ai.openai",
    "vertex": "gcp.vertex_ai",
    "google": "gcp.vertex_ai",  # the built-in route to Vertex AI
    "gemini": "gcp.gemini",
    "deepseek": "deepseek",
    "groq": "groq",
    "mistral": "mistral_ai",
    "perplexity": "perplexity",
    "xai": "xai",
    "cohere": "cohere",
}
_SYSTEM_BY_FORMAT = {"openai": "openai", "anthropic": "anthropic", "google": "gcp.gemini", "bedrock": "aws.bedrock"}

#: C{gen_ai.operation.name} by the path's last part, first match wins.
_OPERATIONS = (
    (re.compile(r"/chat/completions$"), "chat"),
    (re.compile(r"/completions$"), "text_completion"),
    (re.compile(r"/embeddings$|:(?:batchEmbedContents|embedContent)$"), "embeddings"),
    (re.compile(r"/responses$|/messages$|/converse(?:-stream)?$|/invoke(?:-with-response-stream)?$"), "chat"),
    (re.compile(r":(?:stream)?[gG]enerateContent$"), "generate_content"),
)


def checkAvailable(source: str, endpoint: str | None) -> None:
    """
    At start-up, with an endpoint configured: the OpenTelemetry SDK and its
    OTLP/HTTP exporter must be installed (looked up, not imported).

    @raise ConfigError: naming C{telemetry.otlp.endpoint} and how to install them.
    """
    if endpoint is None:
        return
    for name in _REQUIRED:
        try:
            found = find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise ConfigError(source, "telemetry.otlp.endpoint", f"traces need the OpenTelemetry SDK ({name} is missing): {INSTALL_HINT}")


def genAISystem(route: str | None, format: str | None) -> str | None:
    """The call's C{gen_ai.system}: the semantic conventions' name for the provider behind C{route}."""
    if route is not None and route in _SYSTEM_BY_NAME:
        return _SYSTEM_BY_NAME[route]
    return _SYSTEM_BY_FORMAT.get(format or "")


def operationName(endpoint: str) -> str | None:
    """The call's C{gen_ai.operation.name}, read from its path (None: not a model call, e.g. a model list)."""
    path = endpoint.partition("?")[0]
    for pattern, name in _OPERATIONS:
        if pattern.search(path):
            return name
    return None


def _nanoseconds(seconds: float) -> int:
    return int(seconds * 1e9)


class Tracer(Service):
    """
    Owns the SDK's C{TracerProvider} (a C{BatchSpanProcessor} exporting with
    C{OTLPSpanExporter} in its own thread), built when the service starts (after
    twistd has daemonized: the processor's thread would not survive the fork)
    and shut down, flushing, when it stops, within C{shutdownTimeout} seconds.

    @param settings: the C{telemetry:} section, its endpoint set.
    @param reactor: where the shutdown's ending is reported.
    """

    def __init__(self, settings: "TelemetrySettings", reactor: Any, shutdownTimeout: float = 10.0) -> None:
        assert settings.otlpEndpoint is not None
        self._settings, self._reactor, self.shutdownTimeout = settings, reactor, shutdownTimeout
        self._provider: Any = None
        self._tracer: Any = None
        self._propagator: Any = None

    @property
    def tracesURL(self) -> str:
        """Where spans are posted: C{<endpoint>/v1/traces}."""
        endpoint = self._settings.otlpEndpoint
        assert endpoint is not None
        return endpoint.rstrip("/") + "/v1/traces"

    def startService(self) -> None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        import lmgate

        super().startService()
        settings = self._settings
        # Not the global provider: the gateway's spans are its own, whatever else the process loads.
        provider = TracerProvider(resource=Resource.create({"service.name": settings.serviceName}))
        exporter = OTLPSpanExporter(endpoint=self.tracesURL, headers=dict(settings.otlpHeaders), timeout=EXPORT_TIMEOUT)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        self._provider = provider
        self._tracer = provider.get_tracer("lmgate", lmgate.__version__)
        self._propagator = TraceContextTextMapPropagator()
        log.info("Traces to {url}", url=self.tracesURL)

    def stopService(self) -> Deferred[None]:
        """
        Flush the spans still queued and stop the exporter's thread, in a thread
        of its own (the export is a blocking HTTP request); the stop goes on
        after C{shutdownTimeout} seconds even if the collector does not answer.
        """
        super().stopService()
        provider, self._provider, self._tracer = self._provider, None, None
        done: Deferred[None] = Deferred()
        if provider is None:
            done.callback(None)
            return done
        timer = self._reactor.callLater(self.shutdownTimeout, self._shutdownLate, done)

        def shutDown() -> None:
            try:
                provider.force_flush(int(self.shutdownTimeout * 1000))
                provider.shutdown()
            except Exception:
                log.failure("Stopping the traces' exporter failed")
            self._reactor.callFromThread(ended)

        def ended() -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        threading.Thread(target=shutDown, name="lmgate-traces-shutdown", daemon=True).start()
        return done

    def _shutdownLate(self, done: Deferred[None]) -> None:
        log.warn("The traces' collector did not take the last spans within {seconds}s", seconds=self.shutdownTimeout)
        if not done.called:
            done.callback(None)

    # -- one call's span -------------------------------------------------------

    def _parent(self, clientHeaders: "Headers") -> Any:
        """The client's trace context (its C{traceparent} and C{tracestate}), or None: a new trace."""
        parent = clientHeaders.getRawHeaders(TRACEPARENT)
        if not parent:
            return None
        carrier = {"traceparent": parent[0].decode("latin-1")}
        state = clientHeaders.getRawHeaders(TRACESTATE)
        if state:
            carrier["tracestate"] = ",".join(value.decode("latin-1") for value in state)
        return self._propagator.extract(carrier)  # an invalid header: an empty context, a new trace

    def startSpan(self, clientHeaders: "Headers", startedAt: float) -> Any:
        """
        Open a call's span (a child of the client's span if it sent a valid
        C{traceparent}), started when the call started. None once stopped.
        """
        tracer = self._tracer
        if tracer is None:
            return None
        from opentelemetry.trace import SpanKind

        return tracer.start_span(
            "lmgate", context=self._parent(clientHeaders), kind=SpanKind.CLIENT, start_time=_nanoseconds(startedAt)
        )

    def inject(self, span: Any, headers: "Headers") -> None:
        """
        Name C{span} as the parent in the request going upstream: its
        C{traceparent} (and C{tracestate}, carried on from the client) replace the
        client's.
        """
        headers.removeHeader(TRACEPARENT)
        headers.removeHeader(TRACESTATE)
        if span is None:
            return
        from opentelemetry.trace import set_span_in_context

        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=set_span_in_context(span))
        for name, value in carrier.items():
            headers.setRawHeaders(name.encode("ascii"), [value.encode("ascii")])

    def callEnded(
        self,
        span: Any,
        record: "UsageRecord",
        context: "CallContext",
        responseModel: str | None,
        clientHeaders: "Headers",
        startedAt: float,
        endedAt: float,
    ) -> None:
        """
        End a call's span with what its record says (one opened now for a call
        never sent upstream: refused, or answered by LMGate itself).
        """
        if span is None:
            span = self.startSpan(clientHeaders, startedAt)
            if span is None:
                return
        if not span.is_recording():  # sampled out (OTEL_TRACES_SAMPLER): nothing to fill in
            span.end(end_time=_nanoseconds(endedAt))
            return
        from opentelemetry.trace import Status, StatusCode

        requestModel = context.requestedModel
        if requestModel is None:
            requestModel = record.model if responseModel is None else self._requestModel(context)
        operation = operationName(record.endpoint)
        if operation is not None:
            span.update_name(f"{operation} {requestModel}" if requestModel else operation)
        else:
            span.update_name(f"{record.method} {record.provider or 'lmgate'}")
        provider = context.provider
        system = genAISystem(record.provider, provider.format if provider is not None else None)
        errorType = record.error or (str(record.status) if record.status >= 400 else None)
        attributes = {
            "gen_ai.system": system,
            "gen_ai.provider.name": system,
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": requestModel,
            "gen_ai.response.model": responseModel,
            "gen_ai.usage.input_tokens": record.input_tokens,
            "gen_ai.usage.output_tokens": record.output_tokens,
            "http.request.method": record.method,
            "http.response.status_code": record.status,
            "error.type": errorType,
            "lmgate.request_id": record.request_id,
            "lmgate.key_id": record.lmgate_id,
            "lmgate.owner": record.owner,
            "lmgate.route": record.provider,
            "lmgate.endpoint": record.endpoint,
            "lmgate.alias": record.alias,
            "lmgate.attempts": record.attempts,
            "lmgate.cost_usd": record.cost_usd,
            "lmgate.streaming": record.streaming,
            "lmgate.usage_source": record.usage_source,
        }
        span.set_attributes({name: value for name, value in attributes.items() if value is not None})
        if errorType is not None:
            span.set_status(Status(StatusCode.ERROR, errorType))
        span.end(end_time=_nanoseconds(endedAt))

    @staticmethod
    def _requestModel(context: "CallContext") -> str | None:
        """The model the request names, when no admission step read it (the record kept the response's)."""
        provider = context.provider
        if provider is None or not context.rest:
            return None
        from lmgate.usage import requestModel

        try:
            return requestModel(provider.format, context.rest, context.body)
        except Exception:
            return None
