"""
The floor for this stack: a bare twisted.web relay over Twisted's Agent and a
persistent pool, with no features at all. LMGate with access control and usage
records on is measured against it.

    python bench/bare_agent_relay.py PORT UPSTREAM_URL
"""

from __future__ import annotations

import sys

from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from lmgate.upstream import BytesProducer

HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"host", b"content-length", b"te", b"upgrade"}


class Relay(Resource):
    isLeaf = True

    def __init__(self, agent: Agent, base: bytes) -> None:
        super().__init__()
        self.agent, self.base = agent, base

    def render(self, request):  # type: ignore[no-untyped-def]
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in HOP:
                headers.setRawHeaders(name, values)
        body = request.content.read()
        d = self.agent.request(request.method, self.base + request.uri, headers, BytesProducer(body) if body else None)

        def relay(response):  # type: ignore[no-untyped-def]
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                request.responseHeaders.setRawHeaders(name, values)
            from twisted.web.client import readBody

            return readBody(response).addCallback(lambda data: (request.write(data), request.finish()))

        d.addCallback(relay)
        d.addErrback(lambda f: (request.setResponseCode(502), request.finish()))
        return NOT_DONE_YET


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2].encode()
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 256
    site = Site(Relay(Agent(reactor, pool=pool), upstream))
    site.log = lambda request: None  # type: ignore[method-assign]
    reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
