"""
The client side of the HTTP connection, with the bounds twisted.web leaves open.

twisted.web rejects the classic framing tricks by itself (duplicate
Content-Length, Content-Length with chunking, bad chunk sizes), but it does not
bound how long a client may take to send its headers, answers oversized headers
with a bare 400, reads any announced body, and parses form bodies. L{GatewayChannel}
closes those gaps: each limit is answered with its own status and a JSON body,
before the request ever reaches routing; each such refusal is counted, logged at a
bounded rate and gets an access-log line (L{lmgate.gate.gateway.GatewaySite.clientRefused}).

When a request's headers are complete, the site's resource decides whether the call
may go on (route, key, shutdown) before a byte of its body is read: a refused request
is answered at once, without C{100 Continue}, and its body is never read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from lmgate.relay.eager import heldWrites, makeEager
from lmgate.relay.twistedprivate import InspectableHTTPChannel, decodeChunkedPrefix

log = Logger()


@dataclass(frozen=True)
class Limits:
    """
    What one client request may make LMGate hold (``limits:`` in the config).

    @ivar headerBytes: request line plus header lines, in bytes (431 past it).
    @ivar headerCount: header lines (431 past it).
    @ivar headerTimeout: seconds from a request's first byte to the end of its headers (408).
    @ivar clientTimeout: seconds without progress from the client, while it sends a
        request (408) or while it does not read a response (cut).
    @ivar maxBody: request body bytes (413), with per-route overrides in C{routeMaxBody}.
    """

    headerBytes: int = 65536
    headerCount: int = 100
    headerTimeout: float = 10.0
    clientTimeout: float = 60.0
    maxBody: int = 33554432
    routeMaxBody: Mapping[bytes, int] = field(default_factory=dict)

    def bodyLimitFor(self, target: bytes) -> int:
        """The body limit for a raw request target (by its provider prefix)."""
        if self.routeMaxBody:
            name = target[1:].split(b"/", 1)[0].split(b"?", 1)[0]
            return self.routeMaxBody.get(name, self.maxBody)
        return self.maxBody


#: After answering a request refused at headers-complete: how long the connection
#: stays half-open, discarding what the client still sends, so that closing it does
#: not reset the answer away before the client reads it.
LINGER = 2.0


class GatewayChannel(InspectableHTTPChannel):
    """
    An C{HTTPChannel} that enforces L{Limits} and answers each breach itself,
    with a JSON body, then closes the connection.
    """

    def __init__(self, limits: Limits) -> None:
        super().__init__()
        self._limits = limits
        # twisted.web's own checks stay as a backstop behind ours.
        self.maxHeaders = limits.headerCount + 1
        self.totalHeadersSize = limits.headerBytes + 1
        self.MAX_LENGTH = limits.headerBytes
        self._refused = False
        self._receiving = False  # between a request's first byte and the end of its body
        self._headerBytes = 0
        self._headerLines = 0
        self._hostLines = 0
        self._bodyBytes = 0
        self._bodyLimit = limits.maxBody
        self._headerDeadline: IDelayedCall | None = None
        self._host: Any = None
        self._requestsRead = 0
        self._discarding = False  # a request was refused at headers-complete: its body is never read

    def connectionMade(self) -> None:
        makeEager(self.transport)  # plain TCP: each write is sent at once (lmgate.relay.eager)
        super().connectionMade()
        # The first request's header deadline runs from the connection's opening.
        self._headerDeadline = self.callLater(self._limits.headerTimeout, self._headersTooSlow)
        site = getattr(self, "site", None)
        if site is not None and hasattr(site, "channels"):
            site.channels.add(self)
            if site.closing:
                self.closeWhenIdle()

    def closeWhenIdle(self) -> None:
        """
        Shutting down: read no further request from this connection. Idle, it
        closes now; with a request under way, once that response is complete.
        """
        self.persistent = False
        if self.requests:
            request = self.requests[0]
            if not request.startedWriting:
                request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        elif not self._receiving and self.transport is not None:
            self.loseConnection()

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        site = getattr(self, "site", None)
        if site is not None and getattr(site, "closing", False):
            request.responseHeaders.setRawHeaders(b"connection", [b"close"])
            return False
        return super().checkPersistence(request, version)  # type: ignore[no-any-return]

    def getHost(self) -> Any:
        """
        The local address, asked of the socket once per connection: every
        request asks for it (twisted.web's C{Request.__init__}), and it never
        changes while the connection lasts.
        """
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    # -- headers ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._refused or self._discarding:
            return
        if not self._receiving and not self.handlingRequest and data:
            self._startRequest()  # its first byte: the header deadline runs from here
        super().dataReceived(data)

    def _startRequest(self) -> None:
        self._receiving = True
        if self._headerDeadline is None:
            self._headerDeadline = self.callLater(self._limits.headerTimeout, self._headersTooSlow)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if not line and self._headerLines == 0:
            # A stray empty line before a request line (twisted.web eats one): between
            # requests, the next one's clock starts at its first byte.
            if self._requestsRead:
                self._receiving = False
                self._cancelHeaderDeadline()
            return super().lineReceived(line)  # type: ignore[no-any-return]
        if not self._receiving:  # after a stray empty line, in the same read
            self._startRequest()
        self._headerBytes += len(line) + 2
        if self._headerBytes > self._limits.headerBytes:
            return self.refuse(431, "The request's headers are too large.")
        if line:
            self._headerLines += 1
            if self._headerLines > self._limits.headerCount + 1:  # the request line is not a header
                return self.refuse(431, "The request has too many header lines.")
            if line[:5].lower() == b"host:":
                self._hostLines += 1
                if self._hostLines > 1:
                    return self.refuse(400, "The request has more than one Host header.")
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.refuse(431, "A request header line is too long.")

    def allHeadersReceived(self) -> None:
        """
        The headers are complete: check them, then let the site's resource decide
        (route, key, shutdown) before any of the body is read or C{100 Continue}
        is sent. A refused request is handed on at once with only the body bytes
        already received, answered, and the connection closed after the answer.
        """
        self._cancelHeaderDeadline()
        request = self.requests[-1]
        command, path, version = self.requestLine() or (b"", b"", b"")
        if version == b"HTTP/1.1" and self._hostLines == 0:
            return self.refuse(400, "The request has no Host header.")
        self._bodyLimit = self._limits.bodyLimitFor(path)
        if self.length is not None and self.length > self._bodyLimit:
            return self.refuse(413, f"The request body is larger than {self._bodyLimit} bytes.")
        site = getattr(self, "site", None)
        admit = getattr(getattr(site, "resource", None), "admitHeaders", None)
        if admit is not None:
            try:
                admitted = admit(request, command, path)
            except Exception:  # render decides again, and a mistake there is a 500 with a record
                log.failure("Deciding on a request at its headers failed")
                admitted = True
            if not admitted:
                return self._refuseAtHeaders(request)
        super().allHeadersReceived()
        request.gateBodyLimit = self._bodyLimit

    def _refuseAtHeaders(self, request: Any) -> None:
        """
        Hand a refused request on with the body bytes that arrived with its headers
        (for its record: size and model), read nothing more, close after the answer.
        """
        received = self._bufferedBody()
        self.clearLineBuffer()
        self._discarding = True
        self.persistent = False
        request.responseHeaders.setRawHeaders(b"connection", [b"close"])
        request.gotLength(len(received))
        request.content.write(received)
        request.gateBodyLimit = self._bodyLimit
        self.length = 0  # twisted.web goes on to allContentReceived: the request is rendered now
        self.stopBodyDecoding()

    def _bufferedBody(self) -> bytes:
        """The request body bytes already received after the headers (none waited for)."""
        buffered = self.bufferedBytes()
        if not buffered:
            return b""
        if self.length is not None:
            return buffered[: self.length]
        return decodeChunkedPrefix(buffered)[: self._bodyLimit]

    def _headersTooSlow(self) -> None:
        self._headerDeadline = None
        self.refuse(408, "The request's headers did not arrive in time.", "header_timeout")

    def _cancelHeaderDeadline(self) -> None:
        if self._headerDeadline is not None and self._headerDeadline.active():
            self._headerDeadline.cancel()
        self._headerDeadline = None

    # -- body --------------------------------------------------------------

    def bodyChunk(self, size: int) -> bool:
        """Count request body bytes; refuse past the limit (chunked bodies announce none)."""
        self._bodyBytes += size
        if self._bodyBytes > self._bodyLimit:
            self.refuse(413, f"The request body is larger than {self._bodyLimit} bytes.")
            return False
        return True

    def allContentReceived(self) -> None:
        if self._refused:
            return
        self._receiving = False
        self._requestsRead += 1
        self._headerBytes = self._headerLines = self._hostLines = self._bodyBytes = 0
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        if not self._discarding:
            return super().requestDone(request)  # type: ignore[no-any-return]
        # Answered at headers-complete: send the answer and a FIN, discard what the client
        # still sends for a moment (a close with unread data would reset the answer away).
        del self.requests[0]
        transport: Any = self.transport
        if transport is None:
            return None
        if hasattr(transport, "loseWriteConnection"):
            transport.loseWriteConnection()
            self.scheduleAbort(LINGER)
        else:
            self.loseConnection()
        return None

    def timeoutConnection(self) -> None:
        """
        No progress for C{clientTimeout}: mid-request, answer 408 before closing;
        an idle keep-alive connection is closed quietly (one log line per such
        connection would let idle clients fill the log).
        """
        if self._receiving and not self._refused:
            self.refuse(408, "The request did not arrive in time.", "client_timeout")
            return
        if self.abortTimeout is not None:
            self.scheduleAbort(self.abortTimeout)
        self.loseConnection()

    def forceAbortClient(self) -> None:
        """A connection that did not close in time is cut (quietly: see L{timeoutConnection})."""
        self.abortFired()
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    # -- refusals ------------------------------------------------------------

    def badRequestReceived(self) -> None:
        """twisted.web's own 400s (bad request line, header, framing) answered as ours."""
        self.refuse(400, "The request is malformed.")

    def refuse(self, status: int, message: str, reason: str | None = None) -> None:
        """
        Answer a request LMGate will not read any further, and close the connection.
        The site counts the refusal, logs it at a bounded rate and writes its
        access-log line.

        @param reason: the refusal's name for the counter and the log (by
            default the body's error type).
        """
        if self._refused:
            return
        self._refused = True
        self._cancelHeaderDeadline()
        self.setTimeout(None)
        from lmgate.gate.shapes import channelRefusal

        kind, phrase, body = channelRefusal(status, message)
        site = getattr(self, "site", None)
        if site is not None and hasattr(site, "clientRefused"):
            try:
                site.clientRefused(self, status, reason or kind, message, len(body))
            except Exception:
                log.failure("Accounting for a refused request failed")
        if self.transport is not None:
            self.transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (status, phrase, len(body), body)
            )
            self.loseConnection()
            if self.abortTimeout is not None and not self.abortScheduled():
                self.scheduleAbort(self.abortTimeout)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancelHeaderDeadline()
        site = getattr(self, "site", None)
        if site is not None and hasattr(site, "channels"):
            site.channels.discard(self)
        super().connectionLost(reason)


class GatewayRequest(Request):
    """
    A request that adds nothing of twisted.web's own to a relayed response (no
    default C{Content-Type: text/html}, no C{Server} or C{Date}), does not parse
    query strings or form bodies, and does not percent-decode the path.
    """

    defaultContentType = None
    gateBodyLimit: int | None = None
    #: What the site's resource decided when the headers were complete (its render uses it).
    gateDecision: Any = None

    def write(self, data: bytes) -> None:
        """The first write sends the head and the first body bytes as one piece."""
        if self.startedWriting or self.channel is None:
            return super().write(data)  # type: ignore[no-any-return]
        with heldWrites(self.channel.transport):
            super().write(data)

    def handleContentChunk(self, data: bytes) -> None:
        channel: Any = self.channel
        if channel is not None and hasattr(channel, "bodyChunk") and not channel.bodyChunk(len(data)):
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        content: Any = self.content
        content.seek(0, 0)
        self.args = {}
        self.method, self.uri, self.clientproto = command, path, version
        self.path = path.split(b"?", 1)[0]
        self.process()

    def process(self) -> None:
        channel: Any = self.channel
        self.site = channel.site
        self.prepath = []
        self.postpath = []
        try:
            self.render(self.site.resource)
        except BaseException:
            self.processingFailed(Failure())
