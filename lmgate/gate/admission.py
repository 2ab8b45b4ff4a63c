"""
The admission pipeline: the ordered steps a call passes before it is relayed.

Each step (L{IAdmissionStep}) reads and fills the call's L{CallContext}, and
either lets the call on (None) or refuses it (a L{Refusal}), synchronously or
with a L{Deferred}. A L{Pipeline} has two stages: the steps run when a
request's headers are complete (route, authenticate: a refused request's body
is never read), and the steps run once its body is in (the governance steps:
they may need the body's model). The steps of both stages are listed in one
place, L{lmgate.gate.steps.defaultPipeline}.

A stage whose steps all answer synchronously answers synchronously: no
Deferred, no reactor turn, for the common call. A step that raises, or whose
Deferred fails, refuses the call as C{internal_error} (500 in the provider's
shape, logged with its traceback): the call is still answered and recorded.
Who answers and records a refusal is the call (L{lmgate.gate.gateway}); a step
never writes to the request itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence, Union

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import Interface

from lmgate.gate.shapes import STATUS

if TYPE_CHECKING:
    from lmgate.access.credentials import Credential
    from lmgate.gate.providers import Provider
    from lmgate.records.record import KeyEntry

log = Logger()


class Refusal:
    """
    A step's refusal of a call.

    @ivar kind: a key of L{lmgate.gate.shapes.STATUS}: the answer's status and
        the error type in the provider's shape.
    @ivar message: the answer's message, read by the caller.
    @ivar errorName: the record's C{error} when more precise than C{kind}
        (C{shutdown} for C{shutting_down}), else None.
    @ivar rule: the name of the rule that refused, if a rule did (for the
        governance steps' records), else None.
    @ivar headers: extra response headers for the answer (e.g. C{Retry-After}).
    """

    __slots__ = ("kind", "message", "errorName", "rule", "headers")

    def __init__(
        self,
        kind: str,
        message: str,
        errorName: str | None = None,
        rule: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        if kind not in STATUS:
            raise ValueError(f"Unknown refusal kind {kind!r}")
        self.kind, self.message, self.errorName, self.rule, self.headers = kind, message, errorName, rule, headers

    @property
    def status(self) -> int:
        """The answer's HTTP status, from C{kind}."""
        return STATUS[self.kind]

    @property
    def recordError(self) -> str:
        """The record's C{error}."""
        return self.errorName or self.kind

    def __repr__(self) -> str:
        return f"<Refusal {self.status} {self.recordError}: {self.message}>"


#: What a step, or a stage of the pipeline, answers.
Verdict = Union[Refusal, None, "Deferred[Refusal | None]"]


class CallContext:
    """
    What one call carries through admission: the request's head (read-only for
    steps), and what steps learn or decide, read by the later steps, the relay
    and the record. Attributes no step has filled keep their class defaults.

    @ivar method: the request method (read-only).
    @ivar uri: the raw request target (read-only).
    @ivar headers: the request headers (read-only).
    @ivar provider: the route, once found.
    @ivar endpoint: the raw path as received, without the query string.
    @ivar rest: the raw path after the provider prefix (what the provider sees).
    @ivar query: the raw query string, or None when the target had no C{?}.
    @ivar credential: the credential the caller sent.
    @ivar maskedKey: the credential's key, masked for the record.
    @ivar entry: the caller's allow-list entry.
    @ivar body: the request body when kept in memory (up to
        L{lmgate.gate.gateway.KEEP_BODY_LIMIT} bytes; None for larger ones),
        filled before the body stage.
    @ivar bodySize: the request body's size in bytes.
    @ivar requestedModel: the model the request names, filled by a step that
        needs it (reading it parses the body; the record reads it itself when
        no step did).
    @ivar alias: the model alias the request used (model aliases).
    @ivar target: where the call goes instead of the route's upstream (model targets).
    @ivar fallbacks: the targets still to try when the current one fails
        before any byte reached the client (model aliases).
    @ivar attempts: upstream attempts made so far.
    @ivar requestId: the call's id (its record's C{request_id}), once it is a call.
    @ivar reservation: what a usage limit holds for the call until it ends.
    @ivar reservedTokens: the tokens the call reserves under usage limits (the record's C{reserved_tokens}).
    @ivar limits: where the call's usage limits were counted: C{shared}, C{local}, or None (no rule matched).
    @ivar tags: labels steps attach to the call.
    @ivar limitedBy: the name of the rule that refused the call, if one did (the record's C{limited_by}).
    @ivar policy: the policy that applied.
    @ivar streamUsage: LMGate added C{stream_options.include_usage} to the
        body (C{policy.stream_usage}): the usage chunk is kept from the client.
    @ivar verdict: the headers stage's answer (the pipeline's bookkeeping, not
        for steps): a L{Refusal}, None, or the L{Deferred} still deciding.
    """

    provider: Provider | None = None
    endpoint: bytes = b""
    rest: bytes = b""
    query: bytes | None = None
    credential: Credential | None = None
    maskedKey: str | None = None
    entry: KeyEntry | None = None
    body: bytes | None = None
    bodySize: int = 0
    requestedModel: str | None = None
    alias: str | None = None
    target: Any = None
    fallbacks: Any = None
    attempts: int = 0
    requestId: str = ""
    reservation: Any = None
    reservedTokens: int | None = None
    limits: str | None = None
    limitedBy: str | None = None
    tags: tuple[str, ...] = ()
    policy: tuple[str, ...] = ()
    audit: bool = False
    streamUsage: bool = False
    verdict: Verdict = None

    def __init__(self, method: bytes, uri: bytes, headers: Headers) -> None:
        self.method, self.uri, self.headers = method, uri, headers


class IAdmissionStep(Interface):
    """One check or decision a call passes before it is relayed."""

    def admit(context: CallContext) -> Verdict:
        """
        Let the call on (None), or refuse it (a L{Refusal}), now or with a
        L{Deferred}. Read and fill C{context}; never write to the request.

        A Deferred may be cancelled (the client left, or the shutdown's drain
        time ran out): release whatever it holds then. An exception, or a
        failed Deferred, refuses the call as C{internal_error}.
        """


#: The refusal of a call whose step failed.
STEP_FAILED_MESSAGE = "LMGate could not admit this request (an internal error); it was not relayed."


def _stepFailed(reason: Failure, step: object) -> Refusal:
    log.failure("Admission step {step!r} failed", reason, step=step)
    return Refusal("internal_error", STEP_FAILED_MESSAGE)


def runSteps(steps: Sequence[IAdmissionStep], context: CallContext, start: int = 0) -> Verdict:
    """
    Run C{steps[start:]} in order until one refuses or waits.

    @return: the first refusal, None when all let the call on, or a
        L{Deferred} of either when a step waits. The Deferred fails only with
        L{CancelledError} (cancelled by whoever waits on it).
    """
    for index in range(start, len(steps)):
        step = steps[index]
        try:
            verdict = step.admit(context)
        except Exception:
            return _stepFailed(Failure(), step)
        if verdict is None:
            continue
        if isinstance(verdict, Refusal):  # a plain class: cheaper to test than Deferred (an ABC)
            return verdict
        # one entry for both outcomes (runSteps never raises: _afterWait's
        # failures need no errback after it)
        return verdict.addCallbacks(_afterWait, _waitFailed, callbackArgs=(steps, context, index + 1), errbackArgs=(step,))
    return None


def _afterWait(verdict: Refusal | None, steps: Sequence[IAdmissionStep], context: CallContext, following: int) -> Verdict:
    if verdict is not None:
        return verdict
    return runSteps(steps, context, following)


def _waitFailed(reason: Failure, step: object) -> Refusal | Failure:
    if reason.check(CancelledError):
        return reason  # the waiter gave up: it knows why
    return _stepFailed(reason, step)


class Pipeline:
    """
    The admission steps, in two ordered stages.

    @ivar atHeaders: run when a request's headers are complete, before its body
        is read: a refusal here is answered at once and the body never read
        (when a step waits, the body is read meanwhile).
    @ivar atBody: run once the body is in (L{CallContext.body} and
        C{bodySize} filled).
    """

    def __init__(self, atHeaders: Sequence[IAdmissionStep] = (), atBody: Sequence[IAdmissionStep] = ()) -> None:
        self.atHeaders, self.atBody = tuple(atHeaders), tuple(atBody)

    def admitHeaders(self, context: CallContext) -> Verdict:
        """Run the headers stage."""
        return runSteps(self.atHeaders, context)

    def admitBody(self, context: CallContext) -> Verdict:
        """Run the body stage."""
        return runSteps(self.atBody, context)
