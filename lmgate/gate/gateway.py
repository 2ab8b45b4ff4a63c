"""
The HTTP face of the gateway: the site, path-prefix routing and the key check.

Routing works on the raw request target, never on twisted.web's decoded
C{postpath}: the bytes after the provider prefix go upstream exactly as the client
sent them, appended to the provider's base URL, so nothing in a request can change
the upstream's scheme, host or port, and dot segments (plain or encoded) that
could climb out of the base path are refused.
"""

from __future__ import annotations

import io
import re
from typing import Any, Mapping
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.web.client import FileBodyProducer
from twisted.web.http import datetimeToLogString
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from lmgate.gate.call import ProxiedCall
from lmgate.gate.channel import GatewayChannel, GatewayRequest, Limits
from lmgate.relay.twistedprivate import accessLogEscape
from lmgate.relay.headers import upstreamRequestHeaders
from lmgate.interfaces import IKeyCheck, IUsageSink
from lmgate.gate.providers import Provider
from lmgate.ops.ratelog import RateLimitedLog
from lmgate.records.record import KeyEntry
from lmgate.relay.upstream import BytesProducer, Upstream

log = Logger()

#: Request bodies up to this size are kept in memory for the relay and for
#: reading the model from them; larger ones stream from twisted.web's spool file.
KEEP_BODY_LIMIT = 1024 * 1024

HEALTH = b"healthz"

_PLAIN = re.compile(rb"^[\x21-\x7e]*$")
_ENCODED_DOT_OR_SLASH = re.compile(rb"%(2e|2f|5c)", re.IGNORECASE)

SIGV4_MESSAGE = (
    "AWS SigV4-signed requests cannot be relayed: the signature covers the host and path, "
    "which are the gateway's, not AWS's. Use a Bedrock API key (AWS_BEARER_TOKEN_BEDROCK), "
    "which LMGate relays untouched."
)
NO_KEY_MESSAGE = "No API key was sent; this gateway admits allow-listed keys only."
UNKNOWN_KEY_MESSAGE = "The API key is not authorised to use this gateway."


class RouteError(Exception):
    """A request target that LMGate will not relay."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


def splitTarget(uri: bytes) -> tuple[bytes, bytes, bytes | None]:
    """
    Split a raw request target into the provider name, the rest of the path and
    the raw query string.

    @return: C{(name, rest, query)}: C{rest} is empty or starts with C{/};
        C{query} is L{None} when the target has no C{?}.
    @raise RouteError: the target is not a plain origin-form path, or its rest
        could climb out of the upstream's base path.
    """
    if not uri.startswith(b"/") or uri.startswith(b"//"):
        raise RouteError("bad_request", "The request target must be an absolute path (origin-form).")
    path, sep, query = uri.partition(b"?")
    if not _PLAIN.match(uri) or b"#" in uri or b"\\" in path:
        raise RouteError("bad_request", "The request target has characters that are not allowed.")
    name, slash, tail = path[1:].partition(b"/")
    rest = slash + tail
    if rest:
        _checkRest(rest)
    return name, rest, (query if sep else None)


def _checkRest(rest: bytes) -> None:
    """Refuse dot segments, plain or percent-encoded, and encoded control bytes."""
    if b"." in rest:
        for segment in rest.split(b"/"):
            if segment == b"." or segment == b"..":
                raise RouteError("bad_request", "The path must not contain '.' or '..' segments.")
    if b"%" in rest:
        decoded = unquote_to_bytes(rest)
        for segment in decoded.replace(b"\\", b"/").split(b"/"):
            if segment == b"." or segment == b"..":
                raise RouteError("bad_request", "The path must not contain encoded '.' or '..' segments.")
        if any(byte < 0x20 or byte == 0x7F for byte in decoded):
            raise RouteError("bad_request", "The path must not contain encoded control characters.")
        if _ENCODED_DOT_OR_SLASH.search(decoded):
            raise RouteError("bad_request", "The path must not contain double-encoded '.', '/' or '\\'.")


class Gateway:
    """
    The parts every call shares: routes, key check, relay, record sink, clock,
    and the limits that shape a call.
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
        self.cooperator = cooperator
        self.clientTimeout = clientTimeout
        #: The price table for C{cost_usd} (None: no costs).
        self.prices: Any = None
        #: Called with the seconds LMGate spent on a call before sending it upstream.
        self.observeOverhead: Any = None
        self.rateLog = RateLimitedLog(log, clock)
        #: Calls relayed and not yet recorded.
        self.active: set[ProxiedCall] = set()
        #: Shutting down: calls that arrive now are refused (503, recorded as C{shutdown}).
        self.draining = False

    def drain(self, timeout: float) -> Deferred[None]:
        """
        Wait for the calls in flight to end, at most C{timeout} seconds; then
        abort the rest (each still gets its record).
        """
        self.draining = True
        done: Deferred[None] = Deferred()
        deadline = self.clock.seconds() + timeout

        def check() -> None:
            if not self.active:
                done.callback(None)
            elif self.clock.seconds() >= deadline:
                count = len(self.active)
                log.warn("Drain time is up: aborting {count} calls in flight", count=count)
                for call in list(self.active):
                    call.abort()
                done.callback(None)
            else:
                self.clock.callLater(min(0.1, max(0.0, deadline - self.clock.seconds())), check)

        if self.active:
            log.info("Draining {count} calls in flight (at most {timeout}s)", count=len(self.active), timeout=timeout)
        check()
        return done


class Decision:
    """
    What routing and the key check made of a request's head: the route, the
    caller, and a refusal (C{kind}, message, record error) or None to relay.
    Made once per request, when its headers are complete (L{GatewayResource.admitHeaders}),
    and used by C{render} once the body is in.
    """

    __slots__ = ("provider", "endpoint", "rest", "query", "maskedKey", "entry", "refusal")

    def __init__(
        self,
        provider: Provider | None,
        endpoint: bytes,
        rest: bytes = b"",
        query: bytes | None = None,
        refusal: tuple[str, str, str | None] | None = None,
        maskedKey: str | None = None,
        entry: KeyEntry | None = None,
    ) -> None:
        self.provider, self.endpoint, self.rest, self.query = provider, endpoint, rest, query
        self.refusal, self.maskedKey, self.entry = refusal, maskedKey, entry


_SHUTTING_DOWN = ("shutting_down", "The gateway is shutting down; retry on a new connection.", "shutdown")

#: The decision for C{/healthz}.
_HEALTH = Decision(None, b"/" + HEALTH)


class GatewayResource(Resource):
    """
    The root resource: answers C{/healthz}, routes C{/<provider>/...}, refuses
    what it must, and relays the rest.
    """

    isLeaf = True

    def __init__(self, gateway: Gateway) -> None:
        Resource.__init__(self)
        self._gateway = gateway

    def admitHeaders(self, request: Request, method: bytes, uri: bytes) -> bool:
        """
        Called by L{GatewayChannel} when a request's headers are complete, before
        its body is read: decide route, key and shutdown now, so that a refused
        request is answered at once and its body never read.

        @return: whether the body should be read (False: refused).
        """
        decision = self.decide(method, uri, request.requestHeaders)
        request.gateDecision = decision  # type: ignore[attr-defined]
        return decision.refusal is None

    def decide(self, method: bytes, uri: bytes, headers: Any) -> Decision:
        """Route a request target and check its credential: the L{Decision}."""
        gateway = self._gateway
        try:
            name, rest, query = splitTarget(uri)
        except RouteError as e:
            return Decision(None, uri.partition(b"?")[0], refusal=(e.kind, e.message, None))
        if name == HEALTH and not rest:
            return _HEALTH
        endpoint = uri.partition(b"?")[0]
        provider = gateway.providers.get(name)
        if provider is None:
            return Decision(None, endpoint, refusal=("not_found", "No provider is configured for this path.", None))
        if gateway.draining:
            return Decision(provider, endpoint, rest, query, _SHUTTING_DOWN)
        from lmgate.access.credentials import CredentialError, extractCredential, maskKey

        try:
            credential = extractCredential(headers, query or b"")
        except CredentialError as e:
            return Decision(provider, endpoint, rest, query, ("forbidden", str(e), None))
        if credential is None:
            return Decision(provider, endpoint, rest, query, ("forbidden", NO_KEY_MESSAGE, None))
        entry: KeyEntry | None = gateway.keyCheck.lookup(credential.key)
        masked = maskKey(credential.key)
        if credential.kind == "sigv4":
            return Decision(provider, endpoint, rest, query, ("forbidden", SIGV4_MESSAGE, None), masked, entry)
        if entry is None:
            return Decision(provider, endpoint, rest, query, ("forbidden", UNKNOWN_KEY_MESSAGE, None), masked, entry)
        if method == b"CONNECT":
            return Decision(provider, endpoint, rest, query, ("bad_request", "CONNECT is not relayed.", None), masked, entry)
        return Decision(provider, endpoint, rest, query, None, masked, entry)

    def render(self, request: Request) -> Any:
        gateway = self._gateway
        decision: Decision | None = getattr(request, "gateDecision", None)
        if decision is None:  # not through GatewayChannel: decide now
            decision = self.decide(request.method, request.uri, request.requestHeaders)
        if decision is _HEALTH:
            return self._health(request)
        provider = decision.provider
        call = ProxiedCall(request, gateway, provider, decision.endpoint, decision.rest)
        call.identify(decision.maskedKey, decision.entry)
        refusal = decision.refusal
        if refusal is None and gateway.draining:  # the shutdown began while the body arrived
            refusal = _SHUTTING_DOWN
        if refusal is not None:
            kind, message, errorName = refusal
            if refusal is _SHUTTING_DOWN:
                # A request on a connection opened before the shutdown: its client learns
                # at once (503, Connection: close) and may retry elsewhere; the call is recorded.
                request.setHeader(b"connection", b"close")
                channel: Any = request.channel
                if channel is not None:
                    channel.persistent = False  # closed once this answer is written
            self._receivedBody(request, call)
            return call.refuse(kind, message, errorName)
        assert provider is not None
        producer = self._body(request, call)
        pending = gateway.upstream.send(
            request.method,
            provider.upstreamURL(decision.rest, decision.query),
            upstreamRequestHeaders(request.requestHeaders),
            producer,
        )
        return call.start(pending)

    def _receivedBody(self, request: Request, call: ProxiedCall) -> None:
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
        call.requestBody(content.read() if size <= KEEP_BODY_LIMIT else None, size)

    def _body(self, request: Request, call: ProxiedCall) -> IBodyProducer | None:
        """The request body as a producer, noted on the call for its record."""
        content = request.content
        if content is None:
            return None
        if isinstance(content, io.BytesIO):
            data = content.getvalue()
            call.requestBody(data, len(data))
            return BytesProducer(data) if data else None
        content.seek(0, io.SEEK_END)
        size = content.tell()
        content.seek(0)
        if size <= KEEP_BODY_LIMIT:
            data = content.read()
            call.requestBody(data, size)
            return BytesProducer(data) if data else None
        call.requestBody(None, size)
        if self._gateway.cooperator is not None:
            return FileBodyProducer(content, cooperator=self._gateway.cooperator)
        return FileBodyProducer(content)

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
    """One line of the combined log format, credential query values masked."""
    from lmgate.access.credentials import mayHoldCredential, redactQuery

    path, sep, query = uri.partition(b"?")
    if sep and mayHoldCredential(query):
        uri = path + b"?" + redactQuery(query)
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
