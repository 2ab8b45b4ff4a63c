"""
Shared test parts: a fake upstream, a gateway listening on loopback in-process,
and small clients that can stream, pause and disconnect.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from lmgate.config import ProviderSettings
from lmgate.gate.gateway import Gateway, GatewayResource, GatewaySite
from lmgate.interfaces import IKeyCheck, IUsageSink
from lmgate.gate.providers import Provider
from lmgate.records.record import KeyEntry, UsageRecord
from lmgate.relay.upstream import BytesProducer, RelayAgent, RelayPool, Upstream

ALLOWED_KEY = b"sk-test-allowed-0123456789abcdef"
ALLOWED_ENTRY = KeyEntry("app1", "team-a", "2026-11-23")
AUTH = {b"Authorization": [b"Bearer " + ALLOWED_KEY]}


@implementer(IKeyCheck)
class StaticKeys:
    """An allow-list held in a dict."""

    def __init__(self, entries: dict[bytes, KeyEntry]) -> None:
        self._entries = entries

    @property
    def size(self) -> int:
        return len(self._entries)

    def lookup(self, key: bytes) -> KeyEntry | None:
        return self._entries.get(key)


@implementer(IUsageSink)
class RecordingSink:
    """Keeps every record, and fires a Deferred per awaited count."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        self._waiting: list[tuple[int, Deferred[list[UsageRecord]]]] = []

    def write(self, record: UsageRecord) -> None:
        self.records.append(record)
        for n, d in list(self._waiting):
            if len(self.records) >= n:
                self._waiting.remove((n, d))
                d.callback(self.records)

    def waitFor(self, n: int) -> Deferred[list[UsageRecord]]:
        if len(self.records) >= n:
            return succeed(self.records)
        d: Deferred[list[UsageRecord]] = Deferred()
        self._waiting.append((n, d))
        return d


@dataclass
class Seen:
    """A request as the fake upstream received it."""

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes
    request: Request


class FakeUpstream(Resource):
    """
    An upstream whose answer each test sets: C{handler(request)} returns the
    body, or C{NOT_DONE_YET} to hold the request open. C{arrived} fires with
    each next request.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []
        self.handler: Callable[[Request], Any] = jsonAnswer({"id": "x", "object": "chat.completion"})
        self._arrivals: list[Deferred[Seen]] = []

    def arrived(self) -> Deferred[Seen]:
        d: Deferred[Seen] = Deferred()
        self._arrivals.append(d)
        return d

    def render(self, request: Request) -> Any:
        seen = Seen(request.method, request.uri, request.requestHeaders.copy(), request.content.read(), request)
        self.seen.append(seen)
        result = self.handler(request)
        if self._arrivals:
            self._arrivals.pop(0).callback(seen)
        return result


class Holder:
    """
    An upstream handler (for L{FakeUpstream.handler}) that holds every request
    open until the test answers it, counting the calls in flight at once.

    @ivar held: the requests held, in arrival order.
    @ivar most: the most calls that were in flight at the same time.
    """

    def __init__(self) -> None:
        self.held: list[Request] = []
        self.now = self.most = 0

    def __call__(self, request: Request) -> Any:
        self.held.append(request)
        self.now += 1
        self.most = max(self.most, self.now)
        request.notifyFinish().addBoth(self._ended)
        return NOT_DONE_YET

    def _ended(self, _: object) -> None:
        self.now -= 1

    def answer(self, respond: Callable[[Request], bytes]) -> None:
        """Answer every request held and not answered yet with C{respond(request)}."""
        for request in self.held:
            if not request.finished:
                request.write(respond(request))
                request.finish()


def jsonAnswer(body: object, status: int = 200, headers: dict[bytes, bytes] | None = None) -> Callable[[Request], bytes]:
    data = json.dumps(body).encode()

    def handler(request: Request) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        for k, v in (headers or {}).items():
            request.setHeader(k, v)
        return data

    return handler


def listenLocal(case: TestCase, site: Site) -> int:
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    case.addCleanup(port.stopListening)
    return int(port.getHost().port)


def closedPort(case: TestCase) -> int:
    """A loopback port that nothing listens on."""
    port = reactor.listenTCP(0, Site(Resource()), interface="127.0.0.1")  # type: ignore[attr-defined]
    number = int(port.getHost().port)
    port.stopListening()
    return number


@dataclass
class Running:
    """A gateway on loopback in front of a fake upstream."""

    url: str
    port: int
    upstream: FakeUpstream
    sink: RecordingSink
    gateway: Gateway
    upstreamPort: int
    providers: dict[str, Provider] = field(default_factory=dict)
    site: Any = None


def startGateway(
    case: TestCase,
    upstream: FakeUpstream | None = None,
    clock: IReactorTime | None = None,
    upstreamURL: str | None = None,
    formats: dict[str, str] | None = None,
    siteLimits: Any = None,
    siteClock: Any = None,
    accessLog: Any = None,
    **limits: Any,
) -> Running:
    """
    A gateway listening on 127.0.0.1 (port 0), its routes (openai, anthropic,
    google, bedrock, and any in C{formats}) all pointing at C{upstream}.
    Timers run on C{clock} (a fake one in timeout tests); I/O on the reactor.
    """
    upstream = upstream or FakeUpstream()
    upstreamSite = Site(upstream)
    upstreamPort = listenLocal(case, upstreamSite)
    base = upstreamURL or f"http://127.0.0.1:{upstreamPort}"
    routes = {"openai": "openai", "anthropic": "anthropic", "gemini": "google", "bedrock": "bedrock"}
    routes.update(formats or {})
    providers = {name: Provider(ProviderSettings(name, base, fmt)) for name, fmt in routes.items()}
    pool = RelayPool(reactor, persistent=True)
    case.addCleanup(pool.closeCachedConnections)
    from twisted.web.client import BrowserLikePolicyForHTTPS

    agent = RelayAgent(reactor, pool, BrowserLikePolicyForHTTPS(), connectTimeout=5)  # the daemon's agent and pool
    sink = RecordingSink()
    gateway = Gateway(
        providers, StaticKeys({ALLOWED_KEY: ALLOWED_ENTRY}), Upstream(agent, pool), sink, clock or reactor, **limits
    )
    site = GatewaySite(
        GatewayResource(gateway), accessLog=accessLog, limits=siteLimits, **({"reactor": siteClock} if siteClock else {})
    )
    port = listenLocal(case, site)
    return Running(f"http://127.0.0.1:{port}", port, upstream, sink, gateway, upstreamPort, providers, site)


def clientAgent(case: TestCase) -> Agent:
    """A plain Agent (no gzip decoding, no redirects, no cookies) on its own pool."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    case.addCleanup(pool.closeCachedConnections)
    return Agent(reactor, pool=pool)


class Collector(Protocol):
    """Collects a response body; C{chunks} as delivered, C{done} fires with how it ended
    (the exception: L{ResponseDone} for a clean end)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done: Deferred[BaseException] = Deferred()
        self._next: Deferred[bytes] | None = None

    def nextChunk(self) -> Deferred[bytes]:
        self._next = Deferred()
        return self._next

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if self._next is not None:
            d, self._next = self._next, None
            d.callback(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self.done.callback(reason.value)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


async def call(
    case: TestCase,
    url: str,
    method: bytes = b"POST",
    body: bytes | None = b"{}",
    headers: dict[bytes, list[bytes]] | None = None,
) -> tuple[IResponse, bytes, BaseException]:
    """One request through a plain Agent: the response, its whole body, and how the body ended."""
    agent = clientAgent(case)
    allHeaders = dict(AUTH if headers is None else headers)
    response = await agent.request(
        method, url.encode(), Headers(allHeaders), BytesProducer(body) if body is not None else None
    )
    collector = Collector()
    response.deliverBody(collector)
    reason = await collector.done
    return response, collector.body, reason
