"""
The HTTP face of the gateway: the shared parts, the root resource that admits
and relays each call, and the site.

At a request's headers, the root resource runs the admission pipeline's first
stage (L{lmgate.gate.steps}: route, authenticate); once its body is in, the
second stage, then relays the call (L{lmgate.gate.call.ProxiedCall}).
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING, Any, Mapping

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer
from twisted.web.http import datetimeToLogString
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from lmgate.access.credentials import removeCredentials, withoutCredentialParameters
from lmgate.gate.admission import CallContext, Refusal, Verdict, runSteps
from lmgate.gate.call import ProxiedCall
from lmgate.gate.channel import GatewayChannel, GatewayRequest, Limits
from lmgate.gate.routing import isHealth
from lmgate.gate.steps import SHUTTING_DOWN, defaultPipeline
from lmgate.config import ProviderSettings
from lmgate.governance.aliases import (
    Alias,
    Cooldown,
    FallbackPolicy,
    FallbackSettings,
    Selector,
    modelsList,
    usableOnUnified,
)
from lmgate.governance.interfaces import CredentialUnavailable, OutgoingRequest
from lmgate.relay.twistedprivate import accessLogEscape
from lmgate.relay.headers import upstreamRequestHeaders
from lmgate.interfaces import IKeyCheck, IUsageSink
from lmgate.gate.providers import Provider
from lmgate.limits.limiter import Limiter
from lmgate.policy.engine import Policy
from lmgate.ops.ratelog import RateLimitedLog
from lmgate.policy.streamusage import identityStream
from lmgate.records.audit import AuditTrail
from lmgate.relay.upstream import BytesProducer, Upstream

if TYPE_CHECKING:
    from lmgate.ops.telemetry import Tracer

log = Logger()

#: Request bodies up to this size are kept in memory for the relay and for
#: reading the model from them; larger ones stream from twisted.web's spool file.
KEEP_BODY_LIMIT = 1024 * 1024

#: The answer (502) when a managed route has no usable provider credential.
CREDENTIALS_UNAVAILABLE_MESSAGE = "LMGate has no usable credential for this provider right now; the request was not relayed."


class Gateway:
    """
    The parts every call shares: routes, key check, admission pipeline, relay,
    record sink, clock, and the limits that shape a call.

    @ivar pipeline: the admission steps (L{lmgate.gate.steps.defaultPipeline}).
    """

    def __init__(
        self,
        providers: Mapping[str, Provider],
        keyCheck: IKeyCheck,
        upstream: Upstream,
        sink: IUsageSink,
        clock: IReactorTime,
        captureLimit: int = 2097152,
        responseTimeout: float = 600.0,
        idleTimeout: float = 300.0,
        cooperator: Cooperator | None = None,
        clientTimeout: float = 60.0,
    ) -> None:
        self.providers = {name.encode("ascii"): p for name, p in providers.items()}
        self.keyCheck, self.upstream, self.sink, self.clock = keyCheck, upstream, sink, clock
        self.captureLimit, self.responseTimeout, self.idleTimeout = captureLimit, responseTimeout, idleTimeout
        #: Sends spooled request bodies upstream; scheduled on C{clock}, never on
        #: Twisted's global cooperator (which runs on the global reactor).
        self.cooperator = cooperator or Cooperator(scheduler=lambda work: clock.callLater(0, work))
        self.clientTimeout = clientTimeout
        #: The price table for C{cost_usd} (None: no costs).
        self.prices: Any = None
        #: Called with the seconds LMGate spent on a call before sending it upstream.
        self.observeOverhead: Any = None
        self.rateLog = RateLimitedLog(log, clock)
        #: Calls started (admitted or being admitted, and relayed) and not yet recorded.
        self.active: set[ProxiedCall] = set()
        #: Requests whose headers stage waits on a step while their body arrives (not calls yet).
        self.admitting: set[CallContext] = set()
        #: Shutting down: calls that arrive now are refused (503, recorded as C{shutdown}).
        self.draining = False
        #: The C{models:} aliases by name (empty: the alias step only tests this).
        self.aliases: Mapping[str, Alias] = {}
        #: Each route's name and format, for the aliases' targets.
        self.formats: Mapping[str, str] = {p.name: p.format for p in providers.values()}
        #: Each probed route's health (L{lmgate.governance.health.HealthProbes}), or None: every route is healthy.
        self.health: Any = None
        #: The order of an alias's targets; its cooldown is shared by every call.
        self.cooldown = Cooldown(clock)
        self.selector = Selector(self.cooldown, self.routeHealthy)
        #: When a call falls back to its alias's next target (C{fallback.on}).
        self.fallbackPolicy = FallbackPolicy()
        #: The unified endpoint C{/v1} (OpenAI format) until the alias step picks the target's route.
        self.unified = Provider(ProviderSettings("v1", "http://unified.invalid", "openai"))
        #: Usage limits (C{usage_limits:}), or None: none configured.
        self.limiter: Limiter | None = None
        #: C{policy.stream_usage}: OpenAI-format streams are asked for their usage chunk, kept from the client.
        self.streamUsage = False
        #: The policy's rules and plugins (C{policy:}), or None: none configured.
        self.policy: Policy | None = None
        #: The audit trail (L{lmgate.records.audit.AuditTrail}) audited calls are written to, or None: no audit log.
        self.audit: AuditTrail | None = None
        #: The traces (C{telemetry.otlp.endpoint}), or None: off, and the client's C{traceparent} relayed as it came.
        self.tracer: Tracer | None = None
        self.pipeline = defaultPipeline(self)

    def setAliases(self, aliases: Mapping[str, Alias], fallback: FallbackSettings) -> None:
        """Put the configured aliases (and the cooldown values) into effect, at start-up and on reload."""
        self.formats = {p.name: p.format for p in self.providers.values()}
        self.cooldown = fallback.cooldown(self.clock)
        self.selector = Selector(self.cooldown, self.routeHealthy)
        self.fallbackPolicy = fallback.policy()
        self.aliases = aliases

    def routeHealthy(self, name: str) -> bool:
        """Whether the route C{name} passes its active health probe (a route without one always does)."""
        return self.health is None or bool(self.health.isHealthy(name))

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Wait for the calls in flight (and those still being admitted) to end, at
        most C{timeout} seconds; then abort the rest (each call still gets its record).
        """
        self.draining = True
        done: Deferred[None] = Deferred()
        deadline = self.clock.seconds() + timeout

        def check() -> None:
            if not self.active and not self.admitting:
                done.callback(None)
            elif self.clock.seconds() >= deadline:
                count = len(self.active) + len(self.admitting)
                log.warn("Drain time is up: aborting {count} calls in flight", count=count)
                for call in list(self.active):
                    call.abort()
                for context in list(self.admitting):
                    verdict = context.verdict
                    if isinstance(verdict, Deferred):
                        verdict.cancel()  # refused as shutting down, if its body ever arrives
                        verdict.addErrback(lambda reason: None)  # no call waits on it to learn why
                self.admitting.clear()
                done.callback(None)
            else:
                self.clock.callLater(min(0.1, max(0.0, deadline - self.clock.seconds())), check)

        if self.active or self.admitting:
            count = len(self.active) + len(self.admitting)
            log.info("Draining {count} calls in flight (at most {timeout}s)", count=count, timeout=timeout)
        check()
        return done


#: What L{GatewayResource.admitHeaders} notes for C{/healthz}.
_HEALTH = object()


class GatewayResource(Resource):
    """
    The root resource: answers C{/healthz}, admits every other request through
    the gateway's pipeline, refuses what a step refuses, and relays the rest.
    """

    isLeaf = True

    def __init__(self, gateway: Gateway) -> None:
        Resource.__init__(self)
        self._gateway = gateway

    def admitHeaders(self, request: Request, method: bytes, uri: bytes) -> bool:
        """
        Called by L{GatewayChannel} when a request's headers are complete, before
        its body is read: run the pipeline's headers stage (route, key, shutdown)
        now, so that a refused request is answered at once and its body never read.

        @return: whether the body should be read (False: refused; True also
            while a step still decides: its answer is awaited once the body is in).
        """
        if uri[:8] == b"/healthz" and isHealth(uri):
            request.gateDecision = _HEALTH  # type: ignore[attr-defined]
            return True
        context = self._admit(method, uri, request.requestHeaders)
        request.gateDecision = context  # type: ignore[attr-defined]
        return not isinstance(context.verdict, Refusal)  # (Deferred is an ABC: slower to test)

    def _admit(self, method: bytes, uri: bytes, headers: Any) -> CallContext:
        """A request's context, its headers stage run (or still running: C{verdict} is a Deferred)."""
        gateway = self._gateway
        context = CallContext(method, uri, headers)
        verdict = context.verdict = runSteps(gateway.pipeline.atHeaders, context)
        if verdict is not None and not isinstance(verdict, Refusal):
            gateway.admitting.add(context)  # a drain waits for it
            verdict.addBoth(self._headersDecided, context)
        return context

    def _headersDecided(self, result: Refusal | None | Failure, context: CallContext) -> Refusal | None | Failure:
        self._gateway.admitting.discard(context)
        # Cancelled (the drain's time ran out, or the call's client left): a body
        # arriving later is refused as at shutdown; the call, if any, learns why.
        context.verdict = SHUTTING_DOWN if isinstance(result, Failure) else result
        return result

    def render(self, request: Request) -> Any:
        context: Any = getattr(request, "gateDecision", None)
        if context is None:  # not through GatewayChannel: admit now
            if isHealth(request.uri):
                return self._health(request)
            context = self._admit(request.method, request.uri, request.requestHeaders)
        elif context is _HEALTH:
            return self._health(request)
        call = ProxiedCall(request, self._gateway, context)
        verdict = context.verdict
        if verdict is not None and not isinstance(verdict, Refusal):  # a headers step still decides: wait, then go on
            return call.wait(verdict.addCallback(self._afterHeaders, request, call, context).addCallback(call.answer))
        return self._afterHeaders(verdict, request, call, context)

    def _afterHeaders(self, verdict: Refusal | None, request: Request, call: ProxiedCall, context: CallContext) -> Any:
        """The headers stage answered and the body is in: refuse, or run the body stage."""
        gateway = self._gateway
        if verdict is None and gateway.draining:  # the shutdown began while the body arrived
            verdict = SHUTTING_DOWN
        if verdict is not None:
            self._receivedBody(request, context)
            return self._refuse(request, call, verdict)
        producer = self._body(request, context)
        kept = context.body
        steps = gateway.pipeline.atBody
        bodyVerdict: Verdict = runSteps(steps, context) if steps else None
        if bodyVerdict is None:
            if context.body is not kept:  # a step rewrote it (an alias's model): send what it is now
                producer = BytesProducer(context.body) if context.body else None
            return self._send(request, call, context, producer)
        if isinstance(bodyVerdict, Refusal):
            return self._refuse(request, call, bodyVerdict)
        return call.wait(bodyVerdict.addCallback(self._afterBody, request, call, context, producer, kept))

    def _afterBody(
        self,
        verdict: Refusal | None,
        request: Request,
        call: ProxiedCall,
        context: CallContext,
        producer: IBodyProducer | None,
        kept: bytes | None,
    ) -> None:
        """A body step that waited has answered: refuse, or relay (the body as the steps left it); finish what that rendered."""
        if verdict is not None:
            return call.answer(self._refuse(request, call, verdict))
        if context.body is not kept:
            producer = BytesProducer(context.body) if context.body else None
        return call.answer(self._send(request, call, context, producer))

    def _send(self, request: Request, call: ProxiedCall, context: CallContext, producer: IBodyProducer | None) -> Any:
        """Relay the admitted call."""
        provider = context.provider
        assert provider is not None
        if context.fallbacks is not None and call.resend is None:
            # The body is in memory (aliases apply to no other): each attempt sends it afresh.
            call.resend = lambda: self._send(request, call, context, BytesProducer(context.body or b""))
        if provider is self._gateway.unified:  # GET /v1/models: the alias step let only that through
            return self._models(call)
        if provider.managed:
            return self._sendManaged(request, call, context, producer, provider)
        headers = upstreamRequestHeaders(request.requestHeaders)
        if context.streamUsage:
            identityStream(headers)
        if self._gateway.tracer is not None:
            call.traceUpstream(headers)
        pending = self._gateway.upstream.send(
            request.method,
            provider.upstreamURL(context.rest, context.query),
            headers,
            producer,
        )
        return call.start(pending)

    def _models(self, call: ProxiedCall) -> bytes:
        """
        C{GET /v1/models}: the aliases the unified endpoint can send somewhere
        (those with an C{openai}-format target), in configuration order, in
        OpenAI's list shape. Every admitted key may use every alias.
        """
        gateway = self._gateway
        names = [name for name, alias in gateway.aliases.items() if usableOnUnified(alias, gateway.formats)]
        return call.serve(200, [(b"content-type", b"application/json")], modelsList(names))

    def _sendManaged(
        self, request: Request, call: ProxiedCall, context: CallContext, producer: IBodyProducer | None, provider: Provider
    ) -> Any:
        """
        Relay a call on a managed route: every credential the client sent is
        removed (headers, and the C{key} query parameter: the rest of the query
        stays byte for byte), then the route's credential is applied to the
        request about to be sent (a stub-served route gets none). A credential
        that waits is waited on like an admission step (a leaving client or
        the drain cancels it); one that cannot be had answers 502
        C{credentials_unavailable}, never relayed.
        """
        headers = upstreamRequestHeaders(request.requestHeaders)
        removeCredentials(headers)
        if context.streamUsage:
            identityStream(headers)
        if self._gateway.tracer is not None:  # before a signer sees the headers
            call.traceUpstream(headers)
        query = context.query
        if query:
            query = withoutCredentialParameters(query)
        url = provider.upstreamURL(context.rest, query)
        credential = provider.credential
        if credential is None:  # served by the stub: nothing to add
            return call.start(self._gateway.upstream.send(request.method, url, headers, producer))
        body = context.body
        bodyFile = request.content if body is None and context.bodySize else None
        outgoing = OutgoingRequest(request.method, url, headers, body, bodyFile, context.bodySize)
        try:
            waiting = credential.apply(outgoing)
        except CredentialUnavailable as e:
            return self._credentialUnavailable(call, provider, e)
        if waiting is None:
            return self._sendOutgoing(call, outgoing, body, producer)
        waiting.addCallback(lambda _: self._sendOutgoing(call, outgoing, body, producer))
        waiting.addErrback(self._credentialFailed, call, provider)
        return call.wait(waiting.addCallback(call.answer))

    def _sendOutgoing(self, call: ProxiedCall, outgoing: OutgoingRequest, body: bytes | None, producer: IBodyProducer | None) -> Any:
        """Send a managed call's request as its credential left it."""
        if outgoing.body is not body:  # replaced in memory: send what it is now
            producer = BytesProducer(outgoing.body) if outgoing.body else None
        elif outgoing.bodyFile is not None:
            outgoing.bodyFile.seek(0)  # type: ignore[attr-defined]  # a signer may have read it
        pending = self._gateway.upstream.send(outgoing.method, outgoing.url, outgoing.headers, producer)
        return call.start(pending)

    def _credentialFailed(self, reason: Failure, call: ProxiedCall, provider: Provider) -> Any:
        """A credential that waited could not be had: 502; anything else (a cancel) goes on to the call."""
        if reason.check(CredentialUnavailable):
            return self._credentialUnavailable(call, provider, reason.value or CredentialUnavailable())
        return reason

    def _credentialUnavailable(self, call: ProxiedCall, provider: Provider, why: BaseException) -> bytes:
        """Answer 502 C{credentials_unavailable} in the provider's shape (the reason is logged, never sent)."""
        self._gateway.rateLog.info(
            "credentials unavailable", "{provider}: no provider credential: {why}", provider=provider.name, why=str(why)
        )
        return call.refuse("credentials_unavailable", CREDENTIALS_UNAVAILABLE_MESSAGE)

    def _refuse(self, request: Request, call: ProxiedCall, refusal: Refusal) -> bytes:
        """Answer a refusal in the provider's shape, with its extra headers; the call records it."""
        if refusal.kind == "shutting_down":
            # A request on a connection opened before the shutdown: its client learns
            # at once (503, Connection: close) and may retry elsewhere; the call is recorded.
            request.setHeader(b"connection", b"close")
            channel: Any = request.channel
            if channel is not None:
                channel.persistent = False  # closed once this answer is written
        for name, value in refusal.headers:
            request.responseHeaders.setRawHeaders(name, [value])
        return call.refuse(refusal.kind, refusal.message, refusal.errorName)

    def _receivedBody(self, request: Request, context: CallContext) -> None:
        """
        Note on a refused call what LMGate received of the body (all of it, or,
        refused at headers-complete, what came with the headers), for its record.
        """
        content = request.content
        if content is None:
            return
        content.seek(0, io.SEEK_END)
        size = content.tell()
        content.seek(0)
        context.body, context.bodySize = (content.read() if size <= KEEP_BODY_LIMIT else None), size

    def _body(self, request: Request, context: CallContext) -> IBodyProducer | None:
        """The request body as a producer, noted on the call's context."""
        content = request.content
        if content is None:
            return None
        if isinstance(content, io.BytesIO):
            data = content.getvalue()
            context.body, context.bodySize = data, len(data)
            return BytesProducer(data) if data else None
        content.seek(0, io.SEEK_END)
        size = content.tell()
        content.seek(0)
        if size <= KEEP_BODY_LIMIT:
            data = content.read()
            context.body, context.bodySize = data, size
            return BytesProducer(data) if data else None
        context.body, context.bodySize = None, size
        return FileBodyProducer(content, cooperator=self._gateway.cooperator)

    def _health(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"application/json")
            return b'{"error": {"type": "method_not_allowed", "message": "Use GET."}}'
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if self._gateway.draining:  # a load balancer's check on an open connection: take us out
            request.setResponseCode(503)
            return b"draining"
        return b"ok"


#: Printable ASCII but for the double quote and the backslash: what twisted.web's
#: access-log escaping (L{accessLogEscape}: a C{repr}, requoted) returns unchanged.
_UNESCAPED = re.compile(rb"[ !#-\[\]-~]*")


def _logEscape(value: bytes | str) -> str:
    """twisted.web's access-log escaping, without its C{repr} for the usual plain values."""
    raw = value if isinstance(value, bytes) else value.encode("ascii")
    if _UNESCAPED.fullmatch(raw):
        return raw.decode("ascii")
    return str(accessLogEscape(raw))


def redactingLogFormatter(timestamp: str | None, request: Request) -> str:
    """
    The combined log format, with the value of every credential query
    parameter masked, however its name is encoded (C{key=}, C{k%65y=},
    C{access_token=} ...): Gemini clients send their API key in the URL, and a
    refused request may carry anything there.
    """
    client = request.getClientAddress()
    return _combinedLine(
        timestamp,
        getattr(client, "host", None) or "-",
        request.method,
        request.uri,
        request.clientproto,
        request.code,
        request.sentLength,
        request.getHeader(b"referer"),
        request.getHeader(b"user-agent"),
    )


def _combinedLine(
    timestamp: str | None,
    ip: str,
    method: bytes,
    uri: bytes,
    proto: bytes,
    code: int,
    length: int,
    referrer: bytes | None,
    agent: bytes | None,
) -> str:
    """One line of the combined log format, credential query values masked (in the request and in the Referer)."""
    uri = _maskedQuery(uri)
    if referrer:
        referrer = _maskedQuery(referrer)
    return '"%s" - - %s "%s %s %s" %d %s "%s" "%s"' % (
        _logEscape(ip),
        timestamp,
        _logEscape(method),
        _logEscape(uri),
        _logEscape(proto),
        code,
        length or "-",
        _logEscape(referrer or b"-"),
        _logEscape(agent or b"-"),
    )


def _maskedQuery(url: bytes) -> bytes:
    """C{url} with the value of every credential parameter of its query masked."""
    from lmgate.access.credentials import mayHoldCredential, redactQuery

    path, sep, query = url.partition(b"?")
    if sep and mayHoldCredential(query):
        return path + b"?" + redactQuery(query)
    return url


class GatewaySite(Site):
    """
    The gateway's site: L{GatewayChannel}s enforcing L{Limits}, L{GatewayRequest}s,
    and an access log that hides keys.

    @ivar accessLog: where access lines go (anything with C{writeLine(bytes)},
        the daemon's is a L{lmgate.records.jsonl.UsageLog} writing off the reactor
        thread), or None for no access log. A line is formatted and queued;
        nothing is written to disk in the call's path.
    @ivar accessLogWriter: the writer built at start-up (None if the access log
        was off then); a reload turns the access log off or back on by setting
        C{accessLog} to None or to this.
    """

    requestFactory = GatewayRequest

    def __init__(self, resource: GatewayResource, accessLog: Any = None, limits: Limits | None = None, **kwargs: Any) -> None:
        self.limits = limits or Limits()
        Site.__init__(self, resource, logFormatter=redactingLogFormatter, timeout=self.limits.clientTimeout, **kwargs)
        self.accessLog = accessLog or None
        self.accessLogWriter = self.accessLog
        #: Open client connections (for shutdown), and whether the site is closing them.
        self.channels: set[GatewayChannel] = set()
        self.closing = False
        #: Called with the reason of each request the channel refuses (the metrics' counter).
        self.observeRefusal: Any = None
        self._refusalLog = RateLimitedLog(log, self.reactor)

    def closeIdle(self) -> None:
        """
        Shutting down: close every client connection with no request under way,
        and let each busy one close once its response is complete (no further
        request is read from it).
        """
        self.closing = True
        for channel in list(self.channels):
            channel.closeWhenIdle()

    def closeAll(self) -> None:
        """The calls are drained: cut whatever client connection is left."""
        for channel in list(self.channels):
            transport: Any = channel.transport
            if transport is not None:
                transport.abortConnection()

    def setLimits(self, limits: Limits) -> None:
        """Limits for the connections made from now on."""
        self.limits = limits
        self.timeOut = limits.clientTimeout

    def protocol(self) -> GatewayChannel:  # type: ignore[override]
        return GatewayChannel(self.limits)

    _logSecond = -1
    _logStamp = ""

    def _stamp(self) -> str:
        # The time of the line itself (twisted.web's cached one can be a second old),
        # formatted once per second.
        second = int(self.reactor.seconds())
        if second != self._logSecond:
            self._logSecond, self._logStamp = second, datetimeToLogString(second)
        return self._logStamp

    def log(self, request: Any) -> None:
        writer = self.accessLog
        if writer is not None:
            line = redactingLogFormatter(self._stamp(), request) + "\n"
            writer.writeLine(line.encode("utf-8", "replace"))

    def clientRefused(self, channel: GatewayChannel, status: int, reason: str, message: str, length: int) -> None:
        """
        A request the channel refused before routing (400, 408, 413, 431): counted
        by reason, logged at a bounded rate, and given an access-log line (method
        and target as far as they arrived, C{-} otherwise). It gets no usage record:
        it never became a call (see docs/records.md).
        """
        peer: Any = channel.transport.getPeer() if channel.transport is not None else None
        ip = getattr(peer, "host", None) or "-"
        if self.observeRefusal is not None:
            self.observeRefusal(reason)
        self._refusalLog.info(
            "client refusals", "Refused a request from {peer}: {status} {message}", peer=ip, status=status, message=message
        )
        writer = self.accessLog
        if writer is not None:
            requestLine = channel.requestLine()
            method, uri, proto = requestLine or (b"-", b"-", b"-")
            referrer = agent = None
            if requestLine is not None and channel.requests:
                headers = channel.requests[-1].requestHeaders
                referrer = (headers.getRawHeaders(b"referer") or [None])[0]
                agent = (headers.getRawHeaders(b"user-agent") or [None])[0]
            line = _combinedLine(self._stamp(), ip, method, uri, proto, status, length, referrer, agent) + "\n"
            writer.writeLine(line.encode("utf-8", "replace"))
