"""
Prometheus metrics on a separate admin listener (C{admin.listen}), served by
prometheus_client from a registry of LMGate's own.

Metrics are fed the same finished records the stats file gets (L{Metrics} is an
L{IUsageSink}), so the two never disagree. Label cardinality is bounded: models
fold into the configured families or C{other}, and per-key labels exist only
when enabled, capped.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from lmgate.interfaces import IUsageSink
from lmgate.records.record import UsageRecord

log = Logger()

#: Model families with their own label when C{metrics.models} is not set.
DEFAULT_MODELS = (
    "gpt-5", "gpt-4.1", "gpt-4o", "o3", "o4-mini", "text-embedding-3",
    "claude-opus", "claude-sonnet", "claude-haiku", "claude-3-5", "claude-3-7", "claude-3",
    "gemini-2.5-pro", "gemini-2.5-flash", "gemini-2.0-flash",
    "anthropic.", "amazon.nova", "amazon.titan", "meta.llama",
)
TOKEN_KINDS = ("input", "output", "cached", "cache_write", "reasoning")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: The states of the usage-limits store's circuit breaker.
CIRCUIT_STATES = ("closed", "open", "half-open")


@implementer(IUsageSink)
class Fanout:
    """Hands each record to several sinks, in order; one failing never stops the others."""

    def __init__(self, sinks: Sequence[IUsageSink]) -> None:
        self._sinks = list(sinks)

    def write(self, record: UsageRecord) -> None:
        for sink in self._sinks:
            try:
                sink.write(record)
            except Exception:
                log.failure("A usage sink failed")


class _Callbacks:
    """Values read from the running gateway at scrape time."""

    def __init__(self, metrics: "Metrics") -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Any]:
        m = self._metrics
        written, pending, dropped = m.writerStats()
        yield CounterMetricFamily("lmgate_records_written", "Usage records written to disk.", value=written)
        yield GaugeMetricFamily("lmgate_records_backlog", "Usage records waiting to be written.", value=pending)
        yield CounterMetricFamily("lmgate_records_dropped", "Usage records dropped (backlog full).", value=dropped)
        yield GaugeMetricFamily("lmgate_calls_in_flight", "Calls relayed and not yet finished.", value=m.inFlight())
        yield GaugeMetricFamily("lmgate_allowlist_keys", "Keys on the allow-list.", value=m.keyCount())
        yield CounterMetricFamily("lmgate_allowlist_reload_errors", "Allow-list reloads that failed.", value=m.reloadErrors())
        healthy, failures = m.upstreamHealth()
        gauge = GaugeMetricFamily(
            "lmgate_upstream_healthy", "Whether a route passes its active health probe (1) or not (0); probed routes only.",
            labels=["provider"],
        )
        for name in sorted(healthy):
            gauge.add_metric([name], 1 if healthy[name] else 0)
        yield gauge
        counter = CounterMetricFamily(
            "lmgate_upstream_probe_failures", "Active health probes that failed, by route.", labels=["provider"]
        )
        for name in sorted(failures):
            counter.add_metric([name], failures[name])
        yield counter
        limits = m.limitsStore
        if limits is not None:
            state = getattr(limits, "circuitState", None)
            if state is not None:
                circuit = GaugeMetricFamily(
                    "lmgate_limits_circuit_state", "The usage-limits store's circuit breaker (1: its current state).", labels=["state"]
                )
                for name in CIRCUIT_STATES:
                    circuit.add_metric([name], 1 if state == name else 0)
                yield circuit
            queued = getattr(limits, "queued", None)
            if queued is not None:
                yield GaugeMetricFamily(
                    "lmgate_limits_settlements_pending", "Settlements waiting for the usage-limits store to answer again.", value=queued
                )


@implementer(IUsageSink)
class Metrics:
    """
    LMGate's metrics. Takes finished records (C{write}) and the time LMGate spent
    on each call before it went upstream (C{observeOverhead}).
    """

    def __init__(
        self,
        models: Sequence[str] = (),
        perKey: bool = False,
        perKeyLimit: int = 100,
        inFlight: Callable[[], int] = lambda: 0,
        writerStats: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0),
        keyCount: Callable[[], int] = lambda: 0,
        reloadErrors: Callable[[], int] = lambda: 0,
        upstreamHealth: Callable[[], tuple[Mapping[str, bool], Mapping[str, int]]] = lambda: ({}, {}),
    ) -> None:
        self.registry = CollectorRegistry()
        self._models = tuple(sorted(models or DEFAULT_MODELS, key=len, reverse=True))
        self._perKey, self._perKeyLimit = perKey, perKeyLimit
        self._keys: set[str] = set()
        self.inFlight, self.writerStats, self.keyCount, self.reloadErrors = inFlight, writerStats, keyCount, reloadErrors
        #: Each probed route's health and each route's failed probes (L{lmgate.governance.health.HealthProbes}).
        self.upstreamHealth = upstreamHealth
        r = self.registry
        self.calls = Counter("lmgate_calls", "Calls that reached routing.", ["provider", "status", "error"], registry=r)
        self.tokens = Counter("lmgate_tokens", "Tokens reported by providers.", ["provider", "model", "kind"], registry=r)
        self.cost = Counter("lmgate_cost_usd", "Cost of calls (US dollars, from the price table).", ["provider", "model"], registry=r)
        self.duration = Histogram("lmgate_call_duration_seconds", "From request arrival to the last byte.", ["provider"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.ttfb = Histogram("lmgate_upstream_ttfb_seconds", "From request arrival to the upstream's response headers.",
                              ["provider"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("lmgate_overhead_seconds", "Time LMGate spent on a call before sending it upstream.",
                                  buckets=OVERHEAD_BUCKETS, registry=r)
        self.clientRefusals = Counter(
            "lmgate_client_refusals", "Requests refused before routing (limits, timeouts, malformed), by reason.",
            ["reason"], registry=r,
        )
        self.keyCalls = Counter("lmgate_key_calls", "Calls by allow-list id (when enabled; capped).", ["lmgate_id"], registry=r) if perKey else None
        self.limitRefusals = Counter(
            "lmgate_limit_refusals", "Calls refused by usage limits, by rule and reason (the record's error).", ["rule", "reason"], registry=r
        )
        self.storeLatency = Histogram(
            "lmgate_limits_store_seconds", "Round trips to the shared usage-limits store (admissions and settlements).",
            buckets=STORE_BUCKETS, registry=r,
        )
        self.storeErrors = Counter(
            "lmgate_limits_store_errors", "Usage-limits store commands that failed, by kind (timeout, connection, circuit_open, reply).",
            ["kind"], registry=r,
        )
        #: The usage-limits store (for its circuit state and pending settlements), or None.
        self.limitsStore: Any = None
        r.register(_Callbacks(self))

    def modelLabel(self, model: str | None) -> str:
        """The model's family (a configured id or prefix), or C{other}; C{unknown} when none."""
        if not model:
            return "unknown"
        for family in self._models:
            if model == family or model.startswith(family):
                return family
        return "other"

    def write(self, record: UsageRecord) -> None:
        provider = record.provider or "none"
        error = record.error or "none"
        if error.startswith("provider_error:"):
            error = "provider_error"
        self.calls.labels(provider, str(record.status), error).inc()
        model = self.modelLabel(record.model)
        for kind in TOKEN_KINDS:
            value = getattr(record, f"{kind}_tokens")
            if value:
                self.tokens.labels(provider, model, kind).inc(value)
        if record.cost_usd:
            self.cost.labels(provider, model).inc(record.cost_usd)
        if record.provider is not None and record.error not in ("forbidden", "not_found", "bad_request"):
            self.duration.labels(provider).observe(record.latency_ms / 1000)
        if record.ttfb_ms is not None:
            self.ttfb.labels(provider).observe(record.ttfb_ms / 1000)
        if self.keyCalls is not None and record.lmgate_id:
            ident = record.lmgate_id
            if ident not in self._keys and len(self._keys) >= self._perKeyLimit:
                ident = "other"
            else:
                self._keys.add(ident)
            self.keyCalls.labels(ident).inc()

    def clientRefused(self, reason: str) -> None:
        """Count a request the client side refused before routing (no record: it never became a call)."""
        self.clientRefusals.labels(reason).inc()

    def observeOverhead(self, seconds: float) -> None:
        self.overhead.observe(max(0.0, seconds))

    def limitRefused(self, rule: str, reason: str) -> None:
        """Count a call refused by a usage-limit rule (C{reason}: the record's C{error})."""
        self.limitRefusals.labels(rule, reason).inc()

    def observeStoreLatency(self, seconds: float) -> None:
        self.storeLatency.observe(max(0.0, seconds))

    def storeError(self, kind: str) -> None:
        self.storeErrors.labels(kind).inc()


class AdminResource(Resource):
    """
    The admin listener's only resource: exactly C{/metrics} (and exactly
    C{/healthz}, a probe for the admin port itself) answer C{GET} and C{HEAD};
    with usage limits, C{GET /limits} shows their counters and C{POST
    /limits/reset} forgets some (C{?counter=...}, repeated; none: every
    counter, for showing only). Any other path is a 404 and any other method
    a 405. Being a leaf, no sub-path (C{/metrics/x}) ever reaches a page.
    """

    isLeaf = True

    def __init__(self, metrics: Metrics, limits: Any = None) -> None:
        Resource.__init__(self)
        self._metrics = metrics
        self._limits = limits

    def render(self, request: Request) -> Any:
        pages = {b"/metrics": self._metricsPage, b"/healthz": self._health}
        if self._limits is not None:
            pages[b"/limits"] = self._showLimits
            if request.path == b"/limits/reset":
                if request.method != b"POST":
                    return self._plain(request, 405, b"Use POST.\n", (b"allow", b"POST"))
                return self._resetLimits(request)
        page = pages.get(request.path)
        if page is None:
            where = b"/metrics, /healthz, /limits and /limits/reset" if self._limits is not None else b"/metrics and /healthz"
            return self._plain(request, 404, b"Not found: this port serves " + where + b".\n")
        if request.method not in (b"GET", b"HEAD"):
            return self._plain(request, 405, b"Use GET.\n", (b"allow", b"GET, HEAD"))
        return page(request)

    def _plain(self, request: Request, status: int, body: bytes, header: tuple[bytes, bytes] | None = None) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        if header is not None:
            request.setHeader(*header)
        return body

    def _metricsPage(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._metrics.registry)

    def _health(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"ok"

    def _counters(self, request: Request) -> list[str] | None:
        args: Any = request.args or {}
        named = args.get(b"counter")
        return [c.decode("utf-8", "replace") for c in named] if named else None

    def _showLimits(self, request: Request) -> Any:
        from lmgate.limits.views import stateDict

        return self._answer(request, self._limits.store.show(self._counters(request)), lambda states: {"states": [stateDict(s) for s in states]})

    def _resetLimits(self, request: Request) -> Any:
        counters = self._counters(request)
        if not counters:
            return self._plain(request, 400, b"Name the counters to reset: ?counter=RULE|key=ID (repeated).\n")
        return self._answer(request, self._limits.store.reset(counters), lambda removed: {"removed": removed})

    def _answer(self, request: Request, pending: Any, shape: Callable[[Any], object]) -> Any:
        """Answer with the store's result as JSON (503 if it fails), unless the client left meanwhile."""
        import json

        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def done(result: Any) -> None:
            if not gone:
                request.setHeader(b"content-type", b"application/json")
                request.write(json.dumps(shape(result)).encode())
                request.finish()

        def failed(reason: Any) -> None:
            log.failure("The usage-limits store could not answer the admin port", reason)
            if not gone:
                request.setResponseCode(503)
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                request.write(b"The usage-limits store did not answer.\n")
                request.finish()

        pending.addCallbacks(done, failed)
        return NOT_DONE_YET


def adminResource(metrics: Metrics, limits: Any = None) -> Resource:
    """The admin listener's root: exactly C{/metrics} and C{/healthz} (and C{/limits} with usage limits)."""
    return AdminResource(metrics, limits)


_BODY_REFUSED = b"The admin port takes no request body.\n"


class AdminChannel(HTTPChannel):
    """
    The admin port's connection: a request announcing a body (a
    C{Content-Length} above zero, or chunked) is answered 413 as soon as its
    headers are in, before any of the body is read (no C{100 Continue}, nothing
    spooled), and the connection is closed.
    """

    _refused = False

    def allHeadersReceived(self) -> None:
        if self.length != 0:  # None: chunked
            self._refused = True
            transport: Any = self.transport
            transport.write(
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_BODY_REFUSED), _BODY_REFUSED)
            )
            transport.loseConnection()
            return
        super().allHeadersReceived()

    def lineReceived(self, line: bytes) -> None:
        if not self._refused:
            super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)


class AdminRequest(Request):
    """A request whose answer carries no C{Server: TwistedWeb/<version>} banner."""

    def render(self, resrc: Resource) -> None:
        self.responseHeaders.removeHeader(b"server")  # set by Request.process just before
        super().render(resrc)


class AdminSite(Site):
    """The admin listener's site: L{AdminResource}, L{AdminChannel}s, no access log."""

    protocol = AdminChannel  # type: ignore[assignment]
    requestFactory = AdminRequest
    noisy = False

    def __init__(self, metrics: Metrics, reactor: Any, limits: Any = None) -> None:
        Site.__init__(self, AdminResource(metrics, limits), reactor=reactor)

    def log(self, request: Any) -> None:
        """Scrapes are not logged."""
