"""
One proxied call, from the routed request to its usage record.

Every way a call can end (relayed, refused, upstream unreachable or silent,
truncated, client gone, a bug) reaches L{ProxiedCall._recordOnce}, the one place
that writes a record, so each call yields exactly one.
"""

from __future__ import annotations

import math
import os
import random
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http import NO_BODY_CODES
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import NOT_DONE_YET, Request

from lmgate.relay.headers import copyEndToEndHeaders
from lmgate.records.record import KeyEntry, Usage, UsageRecord
from lmgate.relay.tee import Tee, UpstreamIdle
from lmgate.relay.upstream import UpstreamHeadInvalid

if TYPE_CHECKING:
    from lmgate.gate.gateway import Gateway
    from lmgate.interfaces import IUsageReader
    from lmgate.gate.providers import Provider

log = Logger()

REQUEST_ID_HEADER = b"x-lmgate-request-id"
#: The record's status for a call whose client left before any response (nginx's convention).
CLIENT_CLOSED_STATUS = 499

_UNREACHABLE = (
    error.ConnectError,  # refused, DNS, no route (ConnectionRefusedError and kin subclass it)
    error.DNSLookupError,
    error.SSLError,
)


#: Request ids need to be unique, not secret: a generator seeded from the OS
#: once per process, not a system call per request.
_ids = random.Random(os.urandom(32))


def newRequestId() -> str:
    """A fresh id for a call: 128 random bits, 32 hex digits."""
    return "%032x" % _ids.getrandbits(128)


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def isoTimestamp(seconds: float) -> str:
    """ISO 8601 UTC with milliseconds (truncated), e.g. C{2026-11-23T02:49:14.123Z}."""
    whole = math.floor(seconds)
    micros = round((seconds - whole) * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    if _second[0] != whole:
        _second[:] = [whole, datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")]
    return "%s.%03dZ" % (_second[1], micros // 1000)


def _failureKind(reason: Failure) -> str:
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


class ProxiedCall:
    """
    Carries one request through refusal or relay, and records it once.

    @param request: the client's request.
    @param gateway: the shared parts: key check, upstream, sink, clock, limits.
    @param provider: the route, or L{None} when routing failed.
    @param endpoint: the raw path as received, without the query string.
    @param upstreamPath: the raw path after the prefix (what the provider sees).
    """

    def __init__(
        self,
        request: Request,
        gateway: "Gateway",
        provider: "Provider | None",
        endpoint: bytes,
        upstreamPath: bytes = b"",
    ) -> None:
        self._request, self._gateway, self._provider = request, gateway, provider
        self._endpoint, self._upstreamPath = endpoint, upstreamPath
        self._clock = gateway.clock
        self._startedAt = self._clock.seconds()
        self.requestId = newRequestId()
        self._clientGone = False
        self._recorded = False
        self._pending: Deferred[IResponse] | None = None
        self._tee: Tee | None = None
        self._reader: IUsageReader | None = None
        self._responseAt: float | None = None
        self._status = 0
        self._upstreamRequestId: str | None = None
        self._entry: KeyEntry | None = None
        self._maskedKey: str | None = None
        self._body: bytes | None = None
        self._responseTimer: IDelayedCall | None = None
        self._sentAt: float | None = None
        self._timedOut = False
        self._requestBytes = 0
        self._answerBytes: int | None = None  # the body of LMGate's own answer (refusals, 502, 504)
        request.notifyFinish().addErrback(self._lostClient)  # first: called late, it never fires
        request.responseHeaders.setRawHeaders(REQUEST_ID_HEADER, [self.requestId.encode()])

    # -- who is calling ------------------------------------------------------

    def identify(self, maskedKey: str | None, entry: KeyEntry | None) -> None:
        """Note the caller's masked key and allow-list entry for the record."""
        self._maskedKey, self._entry = maskedKey, entry

    def requestBody(self, body: bytes | None, size: int) -> None:
        """Note the request body (when small enough to keep) and its size."""
        self._body, self._requestBytes = body, size

    # -- answers of LMGate's own ---------------------------------------------

    def refuse(self, kind: str, message: str, errorName: str | None = None) -> bytes:
        """
        Answer with an error in the provider's shape (or the generic one), and record it.

        @param kind: C{forbidden}, C{bad_request}, C{not_found}, ...: the answer's status.
        @param errorName: the record's C{error}, when more precise than C{kind}.
        @return: the body, for C{render} to return.
        """
        from lmgate.gate.providers import STATUS, genericErrorBody

        if self._provider is not None:
            status, headers, body = self._provider.errorResponse(kind, message)
        else:
            status, headers, body = STATUS[kind], [(b"content-type", b"application/json")], genericErrorBody(
                kind, message
            )
        self._request.setResponseCode(status)
        for name, value in headers:
            self._request.responseHeaders.setRawHeaders(name, [value])
        self._request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        self._status = status
        self._answerBytes = 0 if self._request.method == b"HEAD" else len(body)
        self._recordOnce(errorName or kind, None)
        return body

    # -- the relay -------------------------------------------------------------

    def start(self, pending: Deferred[IResponse]) -> Any:
        """Relay the upstream's response when it comes."""
        self._pending = pending
        self._sentAt = self._clock.seconds()
        self._gateway.active.add(self)
        self._responseTimer = self._clock.callLater(self._gateway.responseTimeout, self._responseTimedOut)
        pending.addCallbacks(self._relay, self._noResponse)
        pending.addErrback(self._bug)  # a mistake above still logs and still records
        return NOT_DONE_YET

    def abort(self) -> None:
        """
        End the call now (the gateway is shutting down and the drain time is up):
        recorded as C{shutdown}, the upstream dropped, the client's connection cut.
        """
        self._recordOnce("shutdown", None)
        self._stopResponseTimer()
        if self._pending is not None:
            self._pending.cancel()
        elif self._tee is not None:
            self._tee.stop()
        self._abortClient()

    def _truncateClient(self) -> None:
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
            self._abortClient()

    def _abortClient(self) -> None:
        """Cut the client's connection, so an unfinished response never looks complete."""
        channel: Any = self._request.channel
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()

    def _responseTimedOut(self) -> None:
        self._responseTimer = None
        self._timedOut = True
        if self._pending is not None:
            self._pending.cancel()  # abandons the upstream request; _noResponse answers 504

    def _stopResponseTimer(self) -> None:
        if self._responseTimer is not None:
            self._responseTimer.cancel()
            self._responseTimer = None

    def _lostClient(self, reason: Failure) -> None:
        self._clientGone = True
        if self._pending is not None:
            self._pending.cancel()  # before the response arrives: abandons the upstream request
        elif self._tee is not None:
            self._tee.stop()  # mid-body: drop the upstream connection now

    def _noResponse(self, reason: Failure) -> None:
        self._pending = None
        self._stopResponseTimer()
        if self._clientGone:
            self._status = CLIENT_CLOSED_STATUS
            self._recordOnce("client_disconnected", None)
            return
        if self._recorded:  # aborted at shutdown
            return
        kind = "upstream_timeout" if self._timedOut else _failureKind(reason)
        self._gateway.rateLog.info(
            "upstream failures",
            "{provider}: no response from upstream ({kind}): {why}",
            provider=self._provider.name if self._provider else "-",
            kind=kind,
            why=reason.getErrorMessage(),
        )
        if kind == "upstream_timeout":
            body = self.refuse(kind, "The upstream did not answer in time.")
        elif kind == "upstream_reset":
            body = self.refuse("upstream_unreachable", "The upstream closed the connection without answering.", kind)
        elif kind == "upstream_malformed":
            body = self.refuse("upstream_unreachable", "The upstream's response head was malformed.", kind)
        else:
            body = self.refuse(kind, "The upstream could not be reached.")
        self._request.write(body)
        self._request.finish()

    def _relay(self, response: IResponse) -> Deferred[None] | None:
        self._pending = None  # cancelling now would cancel the tee; a leaving client stops it instead
        self._stopResponseTimer()
        self._responseAt = self._clock.seconds()
        self._status = response.code
        provider = self._provider
        assert provider is not None
        request = self._request
        request.setResponseCode(response.code, response.phrase)
        copyEndToEndHeaders(response.headers, request.responseHeaders)
        length = response.length
        if (
            length is not UNKNOWN_LENGTH
            and response.code not in NO_BODY_CODES
            and request.method != b"HEAD"
        ):
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % length])
        for name in provider.requestIdHeaders:
            values = response.headers.getRawHeaders(name)
            if values:
                self._upstreamRequestId = values[0].decode("latin-1")
                break
        from lmgate.usage import readerFor

        headers = response.headers

        def header(name: bytes) -> bytes | None:
            values = headers.getRawHeaders(name)
            return values[0] if values else None

        reader = readerFor(provider.format, response.code, header, self._upstreamPath, self._gateway.captureLimit)
        self._reader = reader
        tee = Tee(request, reader.feed, self._clock, self._gateway.idleTimeout, self._gateway.clientTimeout)
        self._tee = tee
        response.deliverBody(tee)
        return tee.done.addBoth(self._bodyEnded)

    def _bodyEnded(self, result: Failure | None) -> None:
        if self._recorded:  # aborted at shutdown: recorded, and the client is already cut
            return
        if self._tee is not None and self._tee.clientStalled:
            self._recordOnce("client_timeout", result)
        elif self._clientGone:
            self._recordOnce("client_disconnected", result)
        elif result is None:
            self._request.finish()
            self._recordOnce(None, None)
        else:
            kind = "upstream_timeout" if result.check(UpstreamIdle) else "upstream_reset"
            self._gateway.rateLog.info(
                "upstream failures",
                "{provider}: upstream body ended early ({kind}): {why}",
                provider=self._provider.name if self._provider else "-",
                kind=kind,
                why=result.getErrorMessage(),
            )
            if not self._request.startedWriting:
                # Not a byte has reached the client: it can still get a proper error.
                headers = self._request.responseHeaders
                for name, _ in list(headers.getAllRawHeaders()):
                    if name.lower() != REQUEST_ID_HEADER:
                        headers.removeHeader(name)
                if kind == "upstream_timeout":
                    body = self.refuse(kind, "The upstream stopped sending its response.")
                else:
                    body = self.refuse("upstream_unreachable", "The upstream's response was broken.", kind)
                self._request.write(body)
                self._request.finish()
                return
            self._recordOnce(kind, result)
            self._truncateClient()

    def _bug(self, reason: Failure) -> None:
        log.failure("Relaying {endpoint!r} failed", reason, endpoint=self._endpoint)
        if not self._recorded:
            self._status = self._status or 500
            self._recordOnce("internal_error", reason)
        if not self._clientGone:
            self._abortClient()

    # -- the record ------------------------------------------------------------

    def _recordOnce(self, errorKind: str | None, failure: Failure | None) -> None:
        if self._recorded:
            return
        self._recorded = True
        self._gateway.active.discard(self)
        now = self._clock.seconds()
        usage = Usage()
        if self._reader is not None:
            try:
                usage = self._reader.finish()
            except Exception:  # readers promise not to raise; a record is still owed
                log.failure("Usage reader failed")
        provider = self._provider
        model = usage.model
        if model is None and provider is not None and self._upstreamPath:
            from lmgate.usage import requestModel

            try:
                model = requestModel(provider.format, self._upstreamPath, self._body)
            except Exception:
                log.failure("Reading the request's model failed")
        prices = self._gateway.prices
        cost = None
        if prices is not None:
            cost = prices.cost(model, usage.input_tokens, usage.output_tokens, usage.cached_tokens, usage.cache_write_tokens)
        if self._sentAt is not None and self._gateway.observeOverhead is not None:
            self._gateway.observeOverhead(self._sentAt - self._startedAt)
        if errorKind is None and usage.providerError is not None:
            errorKind = f"provider_error:{usage.providerError}"
        entry = self._entry
        client = self._request.getClientAddress()
        record = UsageRecord(
            timestamp=isoTimestamp(self._startedAt),
            request_id=self.requestId,
            lmgate_id=entry.id if entry else None,
            owner=entry.owner if entry else None,
            key=self._maskedKey,
            provider=provider.name if provider else None,
            method=self._request.method.decode("latin-1"),
            endpoint=self._endpoint.decode("latin-1"),
            model=model,
            status=self._status,
            streaming=usage.streaming,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_tokens=usage.cached_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            total_tokens=usage.total_tokens,
            usage_source=usage.usage_source,
            latency_ms=round((now - self._startedAt) * 1000, 3),
            ttfb_ms=None if self._responseAt is None else round((self._responseAt - self._startedAt) * 1000, 3),
            request_bytes=self._requestBytes,
            response_bytes=(
                self._answerBytes if self._answerBytes is not None else self._tee.bytesRelayed if self._tee else 0
            ),
            upstream_request_id=self._upstreamRequestId,
            client=getattr(client, "host", None),
            error=errorKind,
            cost_usd=cost,
        )
        self._gateway.sink.write(record)
