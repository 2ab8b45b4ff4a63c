"""
The floor for this stack: a bare twisted.web relay over Twisted's C{Agent} and a
persistent C{HTTPConnectionPool}, streaming each body chunk as it arrives, with
no features (no key check, no records, no limits, no timeouts). LMGate with access
control and usage records on is measured against it.

    python bench/bare_agent_relay.py PORT NAME=UPSTREAM_URL [NAME=UPSTREAM_URL ...]

C{/NAME/rest} goes to C{UPSTREAM_URL/rest}, as LMGate routes. Self-contained on
purpose (imports nothing from lmgate): its memory is Twisted's, not LMGate's.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import succeed
from twisted.internet.protocol import Protocol
from twisted.web import _newclient
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"host", b"content-length", b"te", b"upgrade", b"trailer"}


class Body:  # IBodyProducer for a body already in memory: one write, no cooperator
    def __init__(self, data: bytes) -> None:
        self.data, self.length = data, len(data)

    def startProducing(self, consumer: Any) -> Any:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...


class Pipe(Protocol):  # the response body, relayed chunk by chunk (a stream needs that)
    def __init__(self, request: Any) -> None:
        self.request = request

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason: Any) -> None:
        if not self.request._disconnected:
            self.request.finish()


class Relay(Resource):
    isLeaf = True

    def __init__(self, agent: Agent, routes: dict[bytes, bytes]) -> None:
        super().__init__()
        self.agent, self.routes = agent, routes

    def render(self, request: Any) -> Any:
        name, _, rest = request.uri[1:].partition(b"/")
        headers = Headers()
        for key, values in request.requestHeaders.getAllRawHeaders():
            if key.lower() not in HOP:
                headers.setRawHeaders(key, values)
        body = request.content.read()
        d = self.agent.request(request.method, self.routes[name] + b"/" + rest, headers, Body(body) if body else None)

        def relay(response: Any) -> None:
            request.setResponseCode(response.code)
            for key, values in response.headers.getAllRawHeaders():
                if key.lower() not in HOP:
                    request.responseHeaders.setRawHeaders(key, values)
            if response.length is not UNKNOWN_LENGTH:
                request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % response.length])
            response.deliverBody(Pipe(request))

        d.addCallbacks(relay, lambda f: (request.setResponseCode(502), request.finish()))
        return NOT_DONE_YET


class NoDelay(_newclient.HTTP11ClientProtocol):  # Nagle off upstream, as any relay does
    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]


class NoDelayFactory(_HTTP11ClientFactory):
    noisy = False

    def buildProtocol(self, addr: Any) -> NoDelay:
        return NoDelay(self._quiescentCallback)


class NoDelayChannel(HTTPChannel):  # Nagle off towards the client
    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[union-attr]
        super().connectionMade()


class QuietSite(Site):  # no access log
    protocol = NoDelayChannel  # type: ignore[assignment]
    noisy = False

    def log(self, request: Any) -> None: ...


def main() -> None:
    port = int(sys.argv[1])
    routes = {name.encode(): url.encode().rstrip(b"/") for name, _, url in (a.partition("=") for a in sys.argv[2:])}
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = NoDelayFactory
    pool.maxPersistentPerHost = 1024
    pool.cachedConnectionTimeout = 30  # as LMGate's default timeouts.pool_idle
    reactor.listenTCP(port, QuietSite(Relay(Agent(reactor, pool=pool), routes)), backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
