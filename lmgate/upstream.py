"""
The relay hop: one persistent connection pool and an agent over it
(L{RelayAgent}: Twisted's Agent with each upstream's endpoint built once).

Not C{treq.request}: treq decodes gzip, follows redirects and keeps a cookie jar,
and a transparent relay must do none of those. The Agent relays what it is
given; redirects come back to the caller as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IConsumer
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.ssl import platformTrust
from twisted.logger import Logger
from twisted.web import _newclient
from twisted.web.client import BrowserLikePolicyForHTTPS, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from lmgate.config import Settings
from lmgate.errors import ConfigError

log = Logger()

#: The most an upstream's response head (status line and headers) may hold.
UPSTREAM_HEADER_BYTES = 256 * 1024
UPSTREAM_HEADER_LINES = 1000


class UpstreamHeadersTooLarge(Exception):
    """An upstream's response head went past L{UPSTREAM_HEADER_BYTES} or L{UPSTREAM_HEADER_LINES}."""


class _HeldPause:
    """
    Stands in for the connection while the response Deferred runs: pause and
    resume are noted, not done; everything else goes through. See
    L{BoundedHTTPClientParser.allHeadersReceived}.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.last: str | None = None  # "pause" or "resume": the call that counts

    def pauseProducing(self) -> None:
        self.last = "pause"

    def resumeProducing(self) -> None:
        self.last = "resume"

    def stopProducing(self) -> None:
        self._transport.stopProducing()

    def loseConnection(self) -> None:
        self._transport.loseConnection()

    def settle(self) -> None:
        """Do what the last call asked for (a connection's pause and resume are not counted)."""
        if self.last == "pause":
            self._transport.pauseProducing()
        elif self.last == "resume":
            self._transport.resumeProducing()


class BoundedHTTPClientParser(_newclient.HTTPClientParser):
    """
    Twisted's response parser, with a bound on the response head: a broken or
    hostile upstream sending 200,000 headers makes the call fail (502) instead
    of growing memory. (A single line is already bounded by C{MAX_LENGTH}.)
    """

    _headBytes = 0
    _headLines = 0

    def lineReceived(self, line: bytes) -> None:
        if self.state in (_newclient.STATUS, _newclient.HEADER):
            self._headBytes += len(line) + 2
            self._headLines += 1
            if self._headBytes > UPSTREAM_HEADER_BYTES or self._headLines > UPSTREAM_HEADER_LINES:
                raise UpstreamHeadersTooLarge(f"{self._headLines} lines, {self._headBytes} bytes")
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        """
        Twisted pauses the connection here (no body bytes before a protocol is
        given to the response) and the relay, handed the response in the same
        call, resumes it at once: two epoll_ctl system calls per call for
        nothing. The pause and resume made while the response Deferred runs are
        held, and only the last one is done, so a response whose body is asked
        for later is still paused, and one relayed at once never is.
        """
        proxy = self.transport
        real = getattr(proxy, "_producer", None)
        if not isinstance(proxy, _newclient.TransportProxyProducer) or real is None:
            super().allHeadersReceived()
            return
        held = _HeldPause(real)
        proxy._producer = held
        try:
            super().allHeadersReceived()
        finally:
            if proxy._producer is held:
                proxy._producer = real
            held.settle()


class _NoDelayProtocol(_newclient.HTTP11ClientProtocol):
    """An upstream connection with Nagle off: a request's head and body leave at once."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        for _ in range(3):  # through a TLS wrapper to the TCP transport
            if transport is None:
                return
            if hasattr(transport, "setTcpNoDelay"):
                try:
                    transport.setTcpNoDelay(True)
                except Exception:
                    pass
                return
            transport = getattr(transport, "transport", None)


class _RelayConnectionFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" log line per upstream connection

    def buildProtocol(self, addr: Any) -> _NoDelayProtocol:
        return _NoDelayProtocol(self._quiescentCallback)


class RelayPool(HTTPConnectionPool):
    """The relay's persistent pool: connections with Nagle off, opened quietly."""

    _factory = _RelayConnectionFactory


def installBoundedParser() -> None:
    """
    Make every Agent response parser in this process a L{BoundedHTTPClientParser}.

    C{HTTP11ClientProtocol} builds its parser from the module's global name and
    offers no hook; the relay is the only HTTP client in the daemon.
    """
    _newclient.HTTPClientParser = BoundedHTTPClientParser  # type: ignore[misc]


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
    (the relay builds a fresh set per call).
    """

    #: Origins remembered; only configured upstreams are ever asked for, so this is a backstop.
    maxOrigins = 1024

    def __init__(self, reactor: Any, pool: HTTPConnectionPool, policy: Any, connectTimeout: float = 30.0) -> None:
        self._reactor, self._pool, self._policy, self._connectTimeout = reactor, pool, policy, connectTimeout
        self._origins: dict[bytes, _Origin] = {}

    def _origin(self, origin: bytes) -> _Origin:
        from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
        from twisted.web.client import URI

        parsed = URI.fromBytes(origin)
        if parsed.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {parsed.scheme!r}")
        host = parsed.host.decode("ascii")
        endpoint: Any = HostnameEndpoint(self._reactor, host, parsed.port, timeout=self._connectTimeout)
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
        from twisted.internet.defer import fail
        from twisted.web.client import URI

        origin, target = originAndTarget(uri)
        try:
            if not _METHOD.match(method):
                raise ValueError(f"invalid method {method!r}")
            if not _TARGET.match(target):
                raise ValueError(f"invalid request target {target!r}")
            o = self._origins.get(origin) or self._origin(origin)
        except Exception:
            return fail()
        if headers is None:
            headers = Headers()
        if not headers.hasHeader(b"host"):
            headers.addRawHeader(b"host", o.hostHeader)
        path, _, query = target.partition(b"?")
        parsedURI = URI(o.scheme, o.netloc, o.host, o.port, path, b"", query, b"")
        persistent = self._pool.persistent

        def connected(proto: Any) -> Deferred[IResponse]:
            return proto.request(  # type: ignore[no-any-return]
                _newclient.Request._construct(method, target, headers, bodyProducer, persistent=persistent, parsedURI=parsedURI)
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


@implementer(IOpenSSLTrustRoot)
class PlatformTrustAndBundle:
    """
    The platform's CAs plus a private bundle, so an operator's internal CA is
    added to, not swapped for, the usual trust.
    """

    def __init__(self, caBundle: str) -> None:
        self._caBundle = caBundle

    def _addCACertsToContext(self, context: Any) -> None:
        context.set_default_verify_paths()
        context.load_verify_locations(self._caBundle)


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
        installBoundedParser()
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
        have arrived.
        """
        return self._agent.request(method, url, headers, body)

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        if self._pool is not None:
            closed: Deferred[None] = self._pool.closeCachedConnections()
            return closed
        return None
