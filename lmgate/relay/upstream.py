"""
The relay hop: one persistent connection pool and an agent over it
(L{RelayAgent}: Twisted's Agent with each upstream's endpoint built once).

Not C{treq.request}: treq decodes gzip, follows redirects and keeps a cookie jar,
and a transparent relay must do none of those. The Agent relays what it is
given; redirects come back to the caller as they are.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHostnameResolver,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
    ITCPTransport,
)
from twisted.internet.threads import deferToThreadPool
from twisted.internet.ssl import platformTrust
from twisted.logger import Logger
from twisted.python.failure import Failure
# Imported once: twisted.web.client is a deprecation proxy, whose every attribute
# lookup (an import in a function included) costs microseconds.
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from lmgate.config import Settings
from lmgate.errors import ConfigError
from lmgate.ops.ratelog import RateLimitedLog
from lmgate.relay.eager import noDelay
from lmgate.relay.twistedprivate import (
    RESPONSE_HEADER,
    RESPONSE_STATUS,
    PlatformTrustAndBundle,
    RelayClientProtocol,
    RelayConnectionPool,
    RelayResponseParser,
    clientRequest,
)

log = Logger()

#: The most an upstream's response head may hold: every byte from the status line
#: to the blank line that ends the head, line ends included. One line may use all of it.
UPSTREAM_HEADER_BYTES = 256 * 1024
#: The most header lines (the status line and the blank line not counted) in a response head.
UPSTREAM_HEADER_LINES = 1000


class UpstreamHeadInvalid(Exception):
    """
    An upstream's response head that LMGate will not relay: over
    L{UPSTREAM_HEADER_BYTES} or L{UPSTREAM_HEADER_LINES}, control bytes,
    a header name that is not a token, a folded line, an unreadable status line.
    """


class UpstreamHeadersTooLarge(UpstreamHeadInvalid):
    """An upstream's response head went past L{UPSTREAM_HEADER_BYTES} or L{UPSTREAM_HEADER_LINES}."""


#: A status line: no control byte (a bare CR would split it into two lines
#: downstream); HTAB is allowed in the reason phrase (RFC 9112 section 4).
_STATUS_LINE = re.compile(rb"\AHTTP/[0-9]\.[0-9] [0-9]{3}(?: [\t\x20-\x7e\x80-\xff]*)?\Z")
#: A header line: a token, a colon, a value of HTAB, SP, visible ASCII and obs-text (RFC 9110 section 5).
_FIELD_LINE = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\Z")


class BoundedHTTPClientParser(RelayResponseParser):
    """
    Twisted's response parser, strict about the response head, which LMGate
    relays to its clients:

      - the head is bounded (L{UPSTREAM_HEADER_BYTES}, L{UPSTREAM_HEADER_LINES}):
        a broken or hostile upstream sending 200,000 headers makes the call fail
        (502) instead of growing memory. One line may take all of the room;
        Twisted's own line limit (C{MAX_LENGTH}, 16 KiB) is replaced by the room left;
      - a status line or header line with a control byte (other than HTAB), a
        header name that is not a token, or a folded line fails the call: Twisted
        would pass a bare CR or a NUL on to the client;
      - the upstream's C{Connection} header stays in the response's headers
        (Twisted keeps it apart), so the relay can drop the headers it names.

    Every such failure is an L{UpstreamHeadInvalid} (inside Twisted's
    C{ResponseFailed}).
    """

    MAX_LENGTH = UPSTREAM_HEADER_BYTES - 1  # the longest line, without its LF; lowered as lines arrive
    _headBytes = 0
    _headLines = 0

    def lineReceived(self, line: bytes) -> None:
        if self.state not in (RESPONSE_STATUS, RESPONSE_HEADER):
            super().lineReceived(line)
            return
        self._headBytes += len(line) + 1  # the LF that LineReceiver took off
        self.MAX_LENGTH = UPSTREAM_HEADER_BYTES - self._headBytes - 1  # the next line gets what is left
        content = line[:-1] if line[-1:] == b"\r" else line
        if self.state == RESPONSE_STATUS:
            if not _STATUS_LINE.match(content):
                raise UpstreamHeadInvalid(f"invalid status line {content[:200]!r}")
        elif content:
            self._headLines += 1
            if self._headLines > UPSTREAM_HEADER_LINES:
                raise UpstreamHeadersTooLarge(f"more than {UPSTREAM_HEADER_LINES} header lines")
            if not _FIELD_LINE.match(content):
                raise UpstreamHeadInvalid(f"invalid header line {content[:200]!r}")
        try:
            super().lineReceived(line)
        except UpstreamHeadInvalid:
            raise
        except Exception as e:  # Twisted's own checks (a bad version, conflicting lengths...): the same answer
            raise UpstreamHeadInvalid(f"{type(e).__name__}: {e}") from e

    def lineLengthExceeded(self, line: bytes) -> None:
        """A line longer than the room left in the head (LineReceiver would only drop the connection)."""
        raise UpstreamHeadersTooLarge(f"over {UPSTREAM_HEADER_BYTES} bytes")

    def headerReceived(self, name: bytes, value: bytes) -> None:
        super().headerReceived(name, value)
        if name.lower() == b"connection":  # Twisted files it with the connection headers only
            self.headers.addRawHeader(name, value)


class _NoDelayProtocol(RelayClientProtocol):
    """
    An upstream connection with Nagle off (a request's head and body leave at
    once), whose responses are read by L{BoundedHTTPClientParser}.
    """

    parserClass = BoundedHTTPClientParser

    def connectionMade(self) -> None:
        super().connectionMade()  # Twisted's own: Nagle off on a TCP transport
        if not ITCPTransport.providedBy(self.transport):
            noDelay(self.transport)  # through a wrapper that does not say it is TCP, to the TCP transport


class RelayPool(RelayConnectionPool):
    """
    The relay's persistent pool: connections with Nagle off, opened quietly,
    reading responses with L{BoundedHTTPClientParser}.
    """

    protocolClass = _NoDelayProtocol


#: RFC 9110 token (a method) and a request target of visible ASCII only, as Agent checks them.
_METHOD = re.compile(rb"\A[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_TARGET = re.compile(rb"\A[\x21-\x7e]+\Z")


def originAndTarget(uri: bytes) -> tuple[bytes, bytes]:
    """
    An absolute URL split into its origin (C{scheme://host[:port]}) and its
    request target.

    The authority ends at the first C{/}, C{?} or C{#} after C{//} (RFC 3986
    section 3.2), so in C{http://h?/x} the C{/x} belongs to the query, never to
    the path; an empty path is C{/}.
    """
    start = uri.find(b"//") + 2
    slash = uri.find(b"/", start)
    end = len(uri) if slash < 0 else slash
    for mark in (b"?", b"#"):
        at = uri.find(mark, start, end)
        if at >= 0:
            end = at
    if end == slash:
        return uri[:slash], uri[slash:]
    return uri[:end], b"/" + uri[end:]


@dataclass(frozen=True)
class _Origin:
    """What a request to one upstream origin needs, built once: pool key, endpoint, Host value."""

    scheme: bytes
    netloc: bytes
    host: bytes
    port: int
    key: tuple[bytes, bytes, int]
    endpoint: Any
    hostHeader: bytes


@implementer(IHostResolution)
class _Resolution:
    """One name being resolved (nothing to cancel: getaddrinfo cannot be stopped)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class ReportingResolver:
    """
    Name resolution for the relay's endpoints in which every failure is an
    answer: C{getaddrinfo} in the reactor's thread pool, as Twisted's own
    resolver does it, but where Twisted's resolver turns only C{socket.gaierror}
    into "no address" and lets any other exception escape (a host name the
    C{idna} codec refuses, or cannot be loaded for, raises C{UnicodeError} or
    C{LookupError}: "Unhandled error in Deferred", and the endpoint waits for
    ever), here any failure ends the resolution with no address, so the
    endpoint fails at once (C{DNSLookupError}) and the call is answered 502.

    @param resolve: runs C{getaddrinfo(host, port, family, type)} and returns a
        Deferred of its result (by default in the reactor's thread pool;
        tests pass a synchronous one).
    """

    def __init__(self, reactor: Any, resolve: Callable[..., Deferred[Any]] | None = None) -> None:
        if resolve is None:

            def resolve(*args: Any) -> Deferred[Any]:
                return deferToThreadPool(reactor, reactor.getThreadPool(), socket.getaddrinfo, *args)

        self._resolve = resolve
        self._log = RateLimitedLog(log, reactor)

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        types = set(addressTypes or (IPv4Address, IPv6Address))
        family = socket.AF_UNSPEC if len(types) != 1 else socket.AF_INET6 if IPv6Address in types else socket.AF_INET
        kind = socket.SOCK_DGRAM if transportSemantics == "UDP" else socket.SOCK_STREAM
        try:
            pending = self._resolve(hostName, portNumber, family, kind)
        except Exception:
            pending = fail()

        def deliver(results: Any) -> None:
            try:
                for af, _, _, _, address in results:
                    if af == socket.AF_INET:
                        resolutionReceiver.addressResolved(IPv4Address(transportSemantics, *address))  # type: ignore[arg-type]
                    elif af == socket.AF_INET6:
                        resolutionReceiver.addressResolved(IPv6Address(transportSemantics, *address))  # type: ignore[arg-type]
            finally:
                resolutionReceiver.resolutionComplete()

        def failed(reason: Failure) -> None:
            self._log.info("name resolution", "Resolving {host!r} failed: {why}", host=hostName, why=reason.getErrorMessage())
            resolutionReceiver.resolutionComplete()

        pending.addCallbacks(deliver, failed)
        pending.addErrback(lambda reason: log.failure("Delivering the addresses of {host!r} failed", reason, host=hostName))
        return resolution


@implementer(IReactorPluggableNameResolver)
class _ResolvingWith:
    """
    The reactor as the relay's endpoints see it: the same, but for its name
    resolver. C{HostnameEndpoint} takes its resolver from the reactor it is
    given and has no parameter for one.
    """

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        previous, self.nameResolver = self.nameResolver, resolver
        return previous

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(IStreamClientEndpoint)
class _ConnectWithin:
    """
    An endpoint whose whole C{connect}, name resolution included, fails with
    C{twisted.internet.error.TimeoutError} (504 C{upstream_timeout}) past
    C{timeout} seconds: C{HostnameEndpoint}'s own timeout bounds each
    connection attempt but not the resolution before them, so a resolver that
    hangs held calls until C{timeouts.response}.
    """

    def __init__(self, endpoint: IStreamClientEndpoint, clock: Any, timeout: float) -> None:
        self._endpoint, self._clock, self._timeout = endpoint, clock, timeout

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        connecting = self._endpoint.connect(protocolFactory)
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            connecting.cancel()

        deadline = self._clock.callLater(self._timeout, expire)

        def done(result: Any) -> Any:
            if deadline.active():
                deadline.cancel()
            if expired and isinstance(result, Failure):
                return Failure(error.TimeoutError(string=f"connecting took longer than {self._timeout:g} s"))
            return result

        return connecting.addBoth(done)


@implementer(IAgent)
class RelayAgent:
    """
    Twisted's C{Agent} for a relay that sends every call to one of a few
    configured upstreams. Agent parses each URL, builds a new endpoint (and, for
    https, a TLS connection creator) and copies the headers to add C{Host}, for
    every request, although a pooled connection needs none of it. Here each
    upstream origin's pool key, endpoint and C{Host} value are built the first
    time it is seen and reused; the request then goes to the same pool
    (C{getConnection}, with its retry of idempotent requests) and the same
    C{HTTP11ClientProtocol.request} as Agent's.

    The headers given are sent as they are, with C{Host} added when missing
    (the relay builds a fresh set per call). Whatever goes wrong on the way to
    the upstream (a bad URL, an endpoint, resolver or pool that raises) fails
    the returned Deferred; nothing raises to the caller.

    @param resolver: names to addresses for the endpoints (by default a
        L{ReportingResolver}).
    """

    #: Origins remembered; only configured upstreams are ever asked for, so this is a backstop.
    maxOrigins = 1024

    def __init__(
        self,
        reactor: Any,
        pool: HTTPConnectionPool,
        policy: Any,
        connectTimeout: float = 30.0,
        resolver: IHostnameResolver | None = None,
    ) -> None:
        self._pool, self._policy, self._connectTimeout = pool, policy, connectTimeout
        self._reactor = _ResolvingWith(reactor, resolver or ReportingResolver(reactor))
        self._origins: dict[bytes, _Origin] = {}

    def _origin(self, origin: bytes) -> _Origin:
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

        parsed = URI.fromBytes(origin)
        if parsed.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {parsed.scheme!r}")
        host = parsed.host.decode("ascii")
        endpoint: Any = _ConnectWithin(
            HostnameEndpoint(self._reactor, host, parsed.port, timeout=self._connectTimeout), self._reactor, self._connectTimeout
        )
        if parsed.scheme == b"https":
            endpoint = wrapClientTLS(self._policy.creatorForNetloc(parsed.host, parsed.port), endpoint)
        hostHeader = b"[" + parsed.host + b"]" if b":" in parsed.host else parsed.host
        if (parsed.scheme, parsed.port) not in ((b"http", 80), (b"https", 443)):
            hostHeader += b":%d" % parsed.port
        built = _Origin(
            parsed.scheme, parsed.netloc, parsed.host, parsed.port, (parsed.scheme, parsed.host, parsed.port), endpoint, hostHeader
        )
        if len(self._origins) >= self.maxOrigins:
            self._origins.clear()
        self._origins[origin] = built
        return built

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None, bodyProducer: IBodyProducer | None = None
    ) -> Deferred[IResponse]:
        try:
            origin, target = originAndTarget(uri)
            if not _METHOD.match(method):
                raise ValueError(f"invalid method {method!r}")
            if not _TARGET.match(target):
                raise ValueError(f"invalid request target {target!r}")
            o = self._origins.get(origin) or self._origin(origin)
            return self._send(o, method, target, headers, bodyProducer)
        except Exception:  # a bad URL, or an endpoint, resolver or pool raising: the call still gets its answer
            return fail()

    def _send(
        self, o: _Origin, method: bytes, target: bytes, headers: Headers | None, bodyProducer: IBodyProducer | None
    ) -> Deferred[IResponse]:
        if headers is None:
            headers = Headers()
        if not headers.hasHeader(b"host"):
            headers.addRawHeader(b"host", o.hostHeader)
        path, _, query = target.partition(b"?")
        parsedURI = URI(o.scheme, o.netloc, o.host, o.port, path, b"", query, b"")
        persistent = self._pool.persistent

        def connected(proto: Any) -> Deferred[IResponse]:
            return proto.request(  # type: ignore[no-any-return]
                clientRequest(method, target, headers, bodyProducer, persistent=persistent, parsedURI=parsedURI)
            )

        return self._pool.getConnection(o.key, o.endpoint).addCallback(connected)


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body already in memory, written in one go.

    Cheaper than L{FileBodyProducer} for the usual small JSON body: no
    cooperator task, no extra reactor turn before the body goes out.
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def trustRootFor(settings: Settings) -> Any:
    """
    The trust root for upstream certificates.

    @raise ConfigError: C{tls.ca_bundle} cannot be read or holds no certificate.
    """
    if settings.tlsCABundle is None:
        return platformTrust()
    try:
        from OpenSSL import SSL

        context = SSL.Context(SSL.TLS_METHOD)
        context.load_verify_locations(settings.tlsCABundle)
    except Exception as e:
        raise ConfigError(settings.source, "tls.ca_bundle", f"cannot load {settings.tlsCABundle!r}: {e}") from None
    return PlatformTrustAndBundle(settings.tlsCABundle)


class Upstream(Service):
    """
    Sends relayed requests upstream; owns the connection pool's lifetime.

    @param agent: the relay's L{IAgent} (tests pass an in-memory one).
    @param pool: the pool behind C{agent}, closed when the service stops.
    """

    def __init__(self, agent: IAgent, pool: HTTPConnectionPool | None = None) -> None:
        self._agent = agent
        self._pool = pool

    @classmethod
    def fromSettings(cls, reactor: Any, settings: Settings) -> "Upstream":
        """The production relay: a persistent pool and a TLS-verifying Agent."""
        pool = RelayPool(reactor, persistent=True)
        pool.maxPersistentPerHost = settings.poolMaxPerHost
        pool.cachedConnectionTimeout = settings.poolIdleTimeout  # type: ignore[assignment]
        pool.retryAutomatically = True  # Twisted retries only idempotent, body-less requests
        policy = BrowserLikePolicyForHTTPS(trustRoot=trustRootFor(settings))
        return cls(RelayAgent(reactor, pool, policy, connectTimeout=settings.connectTimeout), pool)

    def send(
        self, method: bytes, url: bytes, headers: Headers, body: IBodyProducer | None
    ) -> Deferred[IResponse]:
        """
        Relay one request; the Deferred fires with the response once its headers
        have arrived, or fails with whatever went wrong (never raises: the
        call's answer hangs on this Deferred).
        """
        try:
            return self._agent.request(method, url, headers, body)
        except Exception:
            return fail()

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        if self._pool is not None:
            closed: Deferred[None] = self._pool.closeCachedConnections()
            return closed
        return None
