"""
One proxied call's lifecycle, from the admitted request to its usage record.

The call starts when a routed request's body is in, may wait on admission
steps, is relayed (L{lmgate.gate.relaying}) under a response timer, may lose its
client or be aborted at shutdown, and ends. Every way a call can end (relayed,
refused, upstream unreachable or silent, truncated, client gone, a bug) reaches
L{ProxiedCall._recordOnce}, the one place that writes a record, so each call
yields exactly one (assembled by L{lmgate.records.assemble.recordFor}).
"""

from __future__ import annotations

import os
import random
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse
from twisted.web.server import NOT_DONE_YET, Request

from lmgate.gate.relaying import REQUEST_ID_HEADER, Relay, abortClient, failureKind
from lmgate.gate.shapes import errorResponse, reasonPhrase
from lmgate.records.assemble import CallFacts, recordFor
from lmgate.records.record import Usage

if TYPE_CHECKING:
    from lmgate.gate.admission import CallContext
    from lmgate.gate.gateway import Gateway

log = Logger()

__all__ = ["REQUEST_ID_HEADER", "CLIENT_CLOSED_STATUS", "ProxiedCall", "newRequestId"]

#: The record's status for a call whose client left before any response (nginx's convention).
CLIENT_CLOSED_STATUS = 499


#: Request ids need to be unique, not secret: a generator seeded from the OS
#: once per process, not a system call per request.
_ids = random.Random(os.urandom(32))


def newRequestId() -> str:
    """A fresh id for a call: 128 random bits, 32 hex digits."""
    return "%032x" % _ids.getrandbits(128)


def _authOf(context: "CallContext") -> str | None:
    """
    The record's C{auth}: how the route authenticates upstream (C{client},
    C{managed}, C{stub}); None for a call refused before it was routed and its
    caller known.
    """
    provider, credential = context.provider, context.credential
    if provider is None or context.entry is None or credential is None or credential.kind == "sigv4":
        return None
    return provider.auth


class _Discard(Protocol):
    """Takes a response LMGate falls back from: its connection is dropped at once, nothing is read."""

    def makeConnection(self, transport: Any) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass


class ProxiedCall:
    """
    Carries one request through admission, refusal or relay, and records it once.

    @param request: the client's request.
    @param gateway: the shared parts: upstream, sink, clock, limits.
    @param context: what admission learnt of the call: its route (None when
        routing failed), caller, body; read again when the call is recorded.
    """

    def __init__(self, request: Request, gateway: "Gateway", context: "CallContext") -> None:
        self._request, self._gateway, self._context = request, gateway, context
        self._clock = gateway.clock
        self._startedAt = self._clock.seconds()
        self.requestId = context.requestId = newRequestId()
        self._clientGone = False
        self._recorded = False
        self._admitting: Deferred[Any] | None = None
        self._pending: Deferred[IResponse] | None = None
        self._relaying: Relay | None = None
        self._status = 0
        self._responseTimer: IDelayedCall | None = None
        self._sentAt: float | None = None
        self._timedOut = False
        self._answerBytes: int | None = None  # the body of LMGate's own answer (refusals, 502, 504)
        self._answerBody: bytes | None = None  # that body itself, kept for an audited call only
        self._auditedBody: bytes | None = None  # the request body as sent, kept for an audited call only
        #: Sends the call again to the target now in its context (set by the gateway for an alias with targets left).
        self.resend: Callable[[], Any] | None = None
        self._span: Any = None  # the call's trace span, once opened (telemetry on)
        request.notifyFinish().addErrback(self._lostClient)  # first: called late, it never fires
        request.responseHeaders.setRawHeaders(REQUEST_ID_HEADER, [self.requestId.encode()])

    # -- traces ----------------------------------------------------------------

    def traceUpstream(self, headers: Any) -> None:
        """
        Telemetry on: open the call's span (once: an alias's next target is the
        same call) and name it as parent in the C{traceparent} of the request
        about to go upstream (C{headers}).
        """
        tracer = self._gateway.tracer
        assert tracer is not None
        if self._span is None:
            self._span = tracer.startSpan(self._request.requestHeaders, self._startedAt)
        tracer.inject(self._span, headers)

    # -- answers of LMGate's own ---------------------------------------------

    def refuse(self, kind: str, message: str, errorName: str | None = None) -> bytes:
        """
        Answer with an error in the provider's shape (or the generic one), and record it.

        @param kind: C{forbidden}, C{bad_request}, C{not_found}, ...: the answer's status.
        @param errorName: the record's C{error}, when more precise than C{kind}.
        @return: the body, for C{render} to return.
        """
        provider = self._context.provider
        status, headers, body = errorResponse(provider.format if provider is not None else None, kind, message)
        self._answerOwn(status, headers, body, errorName or kind)
        return body

    def serve(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
        """
        Answer with a response of LMGate's own that is no error (C{GET /v1/models}), and record it.

        @return: the body, for C{render} to return.
        """
        self._answerOwn(status, headers, body, None)
        return b"" if self._request.method == b"HEAD" else body

    def _answerOwn(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, error: str | None) -> None:
        """Set the head of an answer of LMGate's own (its body's length included), and record the call."""
        request = self._request
        request.setResponseCode(status, reasonPhrase(status))
        for name, value in headers:
            request.responseHeaders.setRawHeaders(name, [value])
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
        self._status = status
        self._answerBytes = 0 if request.method == b"HEAD" else len(body)
        if self._context.audit:
            self._answerBody = body
        self._recordOnce(error, None)

    def answer(self, body: Any) -> None:
        """
        Finish what the call's continuation rendered after a wait (a refusal's
        body; nothing for a relayed call, which finishes itself), unless the
        client left meanwhile.
        """
        if body is NOT_DONE_YET or self._clientGone:
            return
        self._request.write(body)
        self._request.finish()

    # -- admission -------------------------------------------------------------

    def wait(self, admitting: Deferred[Any]) -> Any:
        """
        Wait for admission steps that answered with a Deferred, whose callbacks
        go on with the call. Meanwhile the call is in flight (a drain waits for
        it); if the client leaves, or the drain time runs out, the wait is
        cancelled and the call recorded as such.

        A Deferred that had already fired (a step that answered at once, e.g. a
        Redis store whose circuit is open) has run its callbacks: the call was
        relayed, refused or recorded in this turn and waits on nothing here.
        """
        if not (admitting.called and not admitting.paused):
            self._admitting = admitting
            self._gateway.active.add(self)
        admitting.addCallbacks(self._waited, self._notAdmitted, callbackArgs=(admitting,), errbackArgs=(admitting,))
        return NOT_DONE_YET

    def _waited(self, result: object, admitting: Deferred[Any]) -> None:
        if self._admitting is admitting:  # not yet waiting on a further stage
            self._admitting = None

    def _notAdmitted(self, reason: Failure, admitting: Deferred[Any]) -> None:
        if self._clientGone:  # the wait was cancelled: the client left
            self._status = CLIENT_CLOSED_STATUS
            self._recordOnce("client_disconnected", None)
        elif not self._recorded:  # not aborted at shutdown (recorded already): a mistake
            self._bug(reason)
        self._waited(None, admitting)

    # -- the relay -------------------------------------------------------------

    def start(self, pending: Deferred[IResponse]) -> Any:
        """Relay the upstream's response when it comes."""
        self._admitting = None  # admitted: a leaving client now cancels the upstream request
        self._context.attempts += 1
        if self._context.audit and self._gateway.audit is not None:  # read now: the request's file closes when it finishes
            self._auditedBody = self._gateway.audit.requestBody(self._context, self._request)
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
        if self._admitting is not None:
            self._admitting.cancel()
        elif self._pending is not None:
            self._pending.cancel()
        elif self._relaying is not None:
            self._relaying.stop()
        abortClient(self._request)

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
        if self._admitting is not None:
            self._admitting.cancel()  # still admitting: the steps stop waiting, nothing is answered
        elif self._pending is not None:
            self._pending.cancel()  # before the response arrives: abandons the upstream request
        elif self._relaying is not None:
            self._relaying.stop()  # mid-body: drop the upstream connection now

    def _noResponse(self, reason: Failure) -> None:
        self._pending = None
        self._stopResponseTimer()
        if self._clientGone:
            self._status = CLIENT_CLOSED_STATUS
            self._recordOnce("client_disconnected", None)
            return
        if self._recorded:  # aborted at shutdown
            return
        kind = "upstream_timeout" if self._timedOut else failureKind(reason)
        self._logUpstreamFailure("no response from upstream", kind, reason)
        if self._failedBeforeAnyByte(None, kind):
            self._tryNextTarget()
            return
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

    # -- falling back to an alias's next target ------------------------------

    def _failedBeforeAnyByte(self, status: int | None, kind: str | None) -> bool:
        """
        Whether the current target failed in a way C{fallback.on} lists (counted
        against it in the cooldown) and another target is now in the context.
        Nothing has been written to the client at these points (no response
        head relayed yet), so falling back is still possible.
        """
        context = self._context
        target, gateway = context.target, self._gateway
        if target is None or not gateway.fallbackPolicy.shouldFallBack(status, kind, 0):
            return False
        gateway.cooldown.failed(target)
        if self.resend is None or context.fallbacks is None:
            return False
        failed = target
        if not context.fallbacks.advance(context):
            return False
        gateway.rateLog.info(
            "fallbacks",
            "{provider}: {model} failed ({why}); trying {next}",
            provider=failed.provider,
            model=failed.model,
            why=kind or status,
            next=f"{context.target.provider}/{context.target.model}",
        )
        return True

    def _tryNextTarget(self) -> None:
        """Send the call to the target now in its context: the same body, its model rewritten, fresh credentials."""
        self._timedOut = False
        resend = self.resend
        assert resend is not None
        try:
            result = resend()
        except Exception:
            self._bug(Failure())
            return
        self.answer(result)

    def _logUpstreamFailure(self, what: str, kind: str, reason: Failure) -> None:
        """One rate-limited log line for an upstream that failed this call."""
        provider = self._context.provider
        self._gateway.rateLog.info(
            "upstream failures",
            "{provider}: {what} ({kind}): {why}",
            provider=provider.name if provider else "-",
            what=what,
            kind=kind,
            why=reason.getErrorMessage(),
        )

    def _relay(self, response: IResponse) -> Deferred[None] | None:
        self._pending = None  # cancelling now would cancel the tee; a leaving client stops it instead
        self._stopResponseTimer()
        if self._context.target is not None and not self._clientGone and not self._recorded:
            if self._failedBeforeAnyByte(response.code, None):
                response.deliverBody(_Discard())  # not a byte of it reaches the client
                self._tryNextTarget()
                return None
            if response.code < 400:
                self._gateway.cooldown.succeeded(self._context.target)
        provider = self._context.provider
        assert provider is not None
        audit = self._gateway.audit if self._context.audit else None
        relaying = self._relaying = Relay(
            self._request,
            self._gateway,
            provider,
            self._context.rest,
            audit.capture() if audit is not None else None,
            self._context.streamUsage,
        )
        self._status = response.code
        return relaying.relay(response).addBoth(self._bodyEnded)

    def _bodyEnded(self, result: Failure | None) -> None:
        if self._recorded:  # aborted at shutdown: recorded, and the client is already cut
            return
        relaying = self._relaying
        assert relaying is not None
        if relaying.clientStalled:
            self._recordOnce("client_timeout", result)
        elif self._clientGone:
            self._recordOnce("client_disconnected", result)
        elif result is None:
            self._request.finish()
            self._recordOnce(None, None)
        else:
            kind = relaying.brokenKind(result)
            self._logUpstreamFailure("upstream body ended early", kind, result)
            if not self._request.startedWriting:
                # Not a byte has reached the client: it can still get a proper error.
                relaying.clearHead()
                if kind == "upstream_timeout":
                    body = self.refuse(kind, "The upstream stopped sending its response.")
                else:
                    body = self.refuse("upstream_unreachable", "The upstream's response was broken.", kind)
                self._request.write(body)
                self._request.finish()
                return
            self._recordOnce(kind, result)
            relaying.truncate()

    def _bug(self, reason: Failure) -> None:
        log.failure("Relaying {endpoint!r} failed", reason, endpoint=self._context.endpoint)
        if not self._recorded:
            self._status = self._status or 500
            self._recordOnce("internal_error", reason)
        if not self._clientGone:
            abortClient(self._request)

    # -- the ending ------------------------------------------------------------

    def _audit(self, record: Any) -> bool:
        """
        Hand the audited call's line to the audit trail, beside its record.

        @return: the record's C{audited}: whether the line was handed to the writer.
        """
        audit = self._gateway.audit
        if audit is None:  # no audit writer (no rule asked for one at start-up)
            return False
        relaying = self._relaying
        capture = relaying.capture if relaying is not None else None
        return audit.write(record, self._context, self._request, capture, self._answerBody, self._auditedBody)

    def _recordOnce(self, errorKind: str | None, failure: Failure | None) -> None:
        if self._recorded:
            return
        self._recorded = True
        self._gateway.active.discard(self)
        # Recorded: no target is tried any more. The resend closure refers to this call (a
        # reference cycle): dropped, the call is freed at once, not by the cycle collector.
        self.resend = None
        now = self._clock.seconds()
        usage = Usage()
        relaying = self._relaying
        reader = relaying.reader if relaying is not None else None
        if reader is not None:
            try:
                usage = reader.finish()
            except Exception:  # readers promise not to raise; a record is still owed
                log.failure("Usage reader failed")
        gateway = self._gateway
        if self._sentAt is not None and gateway.observeOverhead is not None:
            gateway.observeOverhead(self._sentAt - self._startedAt)
        context = self._context
        provider = context.provider
        client = self._request.getClientAddress()
        record = recordFor(
            CallFacts(
                requestId=self.requestId,
                startedAt=self._startedAt,
                endedAt=now,
                responseAt=relaying.responseAt if relaying is not None else None,
                method=self._request.method,
                endpoint=context.endpoint,
                provider=provider.name if provider else None,
                format=provider.format if provider else None,
                upstreamPath=context.rest,
                entry=context.entry,
                maskedKey=context.maskedKey,
                body=context.body,
                requestedModel=context.requestedModel,
                status=self._status,
                usage=usage,
                requestBytes=context.bodySize,
                responseBytes=(
                    self._answerBytes if self._answerBytes is not None else relaying.bytesRelayed if relaying else 0
                ),
                upstreamRequestId=relaying.upstreamRequestId if relaying is not None else None,
                client=getattr(client, "host", None),
                error=errorKind,
                prices=gateway.prices,
                auth=_authOf(context),
                alias=context.alias,
                attempts=context.attempts,
                limitedBy=context.limitedBy,
                reservedTokens=context.reservedTokens,
                limits=context.limits,
                policy=context.policy,
                tags=context.tags,
            )
        )
        if context.audit:
            record.audited = self._audit(record)
        gateway.sink.write(record)
        if gateway.policy is not None and gateway.policy.plugins:
            gateway.policy.observe(record)
        if gateway.tracer is not None:
            try:
                gateway.tracer.callEnded(self._span, record, context, usage.model, self._request.requestHeaders, self._startedAt, now)
            except Exception:  # a span is never worth a record or a settlement
                log.failure("Ending the call's span failed")
        if context.reservation is not None and gateway.limiter is not None:
            gateway.limiter.settle(context, record.total_tokens, record.cost_usd, relaying is not None)
