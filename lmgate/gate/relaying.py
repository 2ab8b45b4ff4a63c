"""
The relay of one upstream response to the client: its status and end-to-end
headers copied, its body teed to the client and the usage reader, and the ways
it can end early (an upstream failure named, a truncated body made visible).

The call (L{lmgate.gate.call.ProxiedCall}) decides what an ending means for the
client and the record; this module knows how a response travels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http import NO_BODY_CODES
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request

from lmgate.policy.streamusage import usageChunkFilter
from lmgate.relay.headers import copyEndToEndHeaders
from lmgate.relay.tee import Tee, UpstreamIdle
from lmgate.relay.upstream import UpstreamHeadInvalid
from lmgate.usage import readerFor

if TYPE_CHECKING:
    from lmgate.gate.gateway import Gateway
    from lmgate.gate.providers import Provider
    from lmgate.interfaces import IUsageReader
    from lmgate.records.audit import BodyCapture

#: The response header carrying LMGate's id for the call (set on every answer).
REQUEST_ID_HEADER = b"x-lmgate-request-id"

_UNREACHABLE = (
    error.ConnectError,  # refused, DNS, no route (ConnectionRefusedError and kin subclass it)
    error.DNSLookupError,
    error.SSLError,
)


def failureKind(reason: Failure) -> str:
    """Name what went wrong before the upstream answered."""
    if reason.check(error.TimeoutError):  # connecting took longer than timeouts.connect
        return "upstream_timeout"
    if reason.check(ResponseNeverReceived, ResponseFailed):
        inner = getattr(reason.value, "reasons", [])
        if any(r.check(UpstreamHeadInvalid) for r in inner):
            return "upstream_malformed"
        if any(r.check(error.SSLError) or _isTLSError(r) for r in inner):
            return "upstream_unreachable"
        return "upstream_reset"
    if reason.check(*_UNREACHABLE) or _isTLSError(reason):
        return "upstream_unreachable"
    return "upstream_unreachable"


def _isTLSError(reason: Failure) -> bool:
    try:
        from OpenSSL.SSL import Error as TLSError
    except ImportError:  # pragma: no cover
        return False
    return reason.check(TLSError) is not None


def abortClient(request: Request) -> None:
    """Cut the client's connection, so an unfinished response never looks complete."""
    channel: Any = request.channel
    if channel is not None and channel.transport is not None:
        channel.transport.abortConnection()


class Relay:
    """
    One upstream response on its way to the client.

    @ivar responseAt: when the response's head arrived (the call's time to first byte).
    @ivar reader: the usage reader fed with the body, once the head arrived.
    @ivar tee: the body's tee, once the head arrived.
    @ivar upstreamRequestId: the provider's own id for the call, if its head had one.
    @ivar capture: keeps the body as the client received it (bounded) for an
        audited call (L{lmgate.records.audit}), fed beside the usage reader; None otherwise.
    """

    __slots__ = (
        "_request", "_gateway", "_provider", "_upstreamPath", "_stripUsage", "responseAt", "reader", "tee", "upstreamRequestId", "capture"
    )

    def __init__(
        self,
        request: Request,
        gateway: "Gateway",
        provider: "Provider",
        upstreamPath: bytes,
        capture: "BodyCapture | None" = None,
        stripUsage: bool = False,
    ) -> None:
        """
        @param stripUsage: LMGate asked for the stream's usage chunk
            (C{policy.stream_usage}): keep it from the client (and from the
            audit, which keeps what the client received).
        """
        self._request, self._gateway, self._provider, self._upstreamPath = request, gateway, provider, upstreamPath
        self.capture = capture
        self._stripUsage = stripUsage
        self.responseAt = gateway.clock.seconds()
        self.reader: IUsageReader | None = None
        self.tee: Tee | None = None
        self.upstreamRequestId: str | None = None

    def relay(self, response: IResponse) -> Deferred[None]:
        """
        Copy the response's status and end-to-end headers to the client and
        start its body through a L{Tee}.

        @return: the tee's C{done}: fires when the body ended cleanly, fails
            with why it did not.
        """
        provider = self._provider
        request = self._request
        request.setResponseCode(response.code, response.phrase)
        copyEndToEndHeaders(response.headers, request.responseHeaders)
        length = response.length
        clientFilter = usageChunkFilter(response) if self._stripUsage else None
        if (
            clientFilter is None
            and length is not UNKNOWN_LENGTH
            and response.code not in NO_BODY_CODES
            and request.method != b"HEAD"
        ):
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % length])
        for name in provider.requestIdHeaders:
            values = response.headers.getRawHeaders(name)
            if values:
                self.upstreamRequestId = values[0].decode("latin-1")
                break
        headers = response.headers

        def header(name: bytes) -> bytes | None:
            values = headers.getRawHeaders(name)
            return values[0] if values else None

        reader = readerFor(provider.format, response.code, header, self._upstreamPath, self._gateway.captureLimit)
        self.reader = reader
        gateway = self._gateway
        observe: Callable[[bytes], None] = reader.feed
        if self.capture is not None:
            if clientFilter is not None:  # the audit keeps what the client received
                clientFilter.copy = self.capture.feed
            else:
                from lmgate.records.audit import teeTo

                observe = teeTo(reader.feed, self.capture.feed)
        tee = Tee(request, observe, gateway.clock, gateway.idleTimeout, gateway.clientTimeout, clientFilter)
        self.tee = tee
        response.deliverBody(tee)
        return tee.done

    @property
    def bytesRelayed(self) -> int:
        """Body bytes relayed to the client so far."""
        return self.tee.bytesRelayed if self.tee is not None else 0

    @property
    def clientStalled(self) -> bool:
        """The client stopped reading for C{clientTimeout} and was cut."""
        return self.tee is not None and self.tee.clientStalled

    def stop(self) -> None:
        """Drop the upstream connection mid-body (the client left, or the call is aborted)."""
        if self.tee is not None:
            self.tee.stop()

    def brokenKind(self, reason: Failure) -> str:
        """Name why the body did not end cleanly."""
        return "upstream_timeout" if reason.check(UpstreamIdle) else "upstream_reset"

    def clearHead(self) -> None:
        """
        Not a body byte has reached the client: forget the relayed head (but
        LMGate's request id), so that the client can get a proper error instead.
        """
        headers = self._request.responseHeaders
        for name, _ in list(headers.getAllRawHeaders()):
            if name.lower() != REQUEST_ID_HEADER:
                headers.removeHeader(name)

    def truncate(self) -> None:
        """
        End a response whose body is incomplete so the client can tell: when the
        response is framed (chunked, or a Content-Length the body falls short of),
        closing after what was relayed shows a truncated body; unframed, only an
        abort tells the client the end is not clean.
        """
        request: Any = self._request
        framed = request.chunked or request.responseHeaders.hasHeader(b"content-length")
        channel: Any = request.channel
        if framed and channel is not None and channel.transport is not None:
            channel.transport.loseConnection()
        else:
            abortClient(request)
