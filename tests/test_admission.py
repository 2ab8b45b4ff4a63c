"""
The admission pipeline: steps that let a call on or refuse it, synchronously or
with a Deferred, run by the gateway at a request's headers and once its body is
in; every refused call answered (unless its client left) and recorded once.

Driven as TCP does it: a L{GatewayChannel} on a L{StringTransport}, raw bytes in,
the gateway's clock a L{MemoryReactorClock}, the upstream a fake whose answers
each test fires.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lmgate.config import ProviderSettings
from lmgate.gate.admission import CallContext, IAdmissionStep, Pipeline, Refusal, runSteps
from lmgate.gate.gateway import Gateway, GatewayResource, GatewaySite
from lmgate.gate.providers import Provider
from lmgate.gate.steps import Authenticate, Draining, Limit, NoConnect, ResolveAlias, Route, StreamUsage, defaultPipeline
from lmgate.policy.step import PolicyStep
from tests.helpers import ALLOWED_ENTRY, ALLOWED_KEY, RecordingSink, StaticKeys

CHAT = b"/openai/v1/chat/completions"
BODY = b'{"model": "gpt-4o-mini"}'


def _request(target: bytes = CHAT, body: bytes = BODY, key: bytes = ALLOWED_KEY, expect: bool = False) -> bytes:
    head = b"POST %s HTTP/1.1\r\nHost: gate\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n" % (
        target,
        key,
        len(body),
    )
    if expect:
        return head + b"Expect: 100-continue\r\n\r\n"
    return head + b"\r\n" + body


@implementer(IAdmissionStep)
class Allow:
    """Lets every call on at once, noting the contexts it saw."""

    def __init__(self) -> None:
        self.seen: list[CallContext] = []

    def admit(self, context: CallContext) -> Refusal | None:
        self.seen.append(context)
        return None


@implementer(IAdmissionStep)
class Refuse:
    """Refuses every call at once."""

    def __init__(self, refusal: Refusal) -> None:
        self.refusal = refusal

    def admit(self, context: CallContext) -> Refusal | None:
        return self.refusal


@implementer(IAdmissionStep)
class Wait:
    """Answers every call with a Deferred the test fires (C{waiting})."""

    def __init__(self) -> None:
        self.waiting: list[Deferred[Refusal | None]] = []

    def admit(self, context: CallContext) -> Deferred[Refusal | None]:
        d: Deferred[Refusal | None] = Deferred()
        self.waiting.append(d)
        return d


@implementer(IAdmissionStep)
class Explode:
    """A step with a bug."""

    def admit(self, context: CallContext) -> Refusal | None:
        raise ZeroDivisionError("a step's bug")


class FakeUpstream:
    """Keeps every request sent upstream; each test fires their Deferreds."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes, Deferred[IResponse]]] = []

    def send(self, method: bytes, url: bytes, headers: Headers, body: Any) -> Deferred[IResponse]:
        d: Deferred[IResponse] = Deferred()
        self.sent.append((method, url, d))
        return d


class PipelineTests(SynchronousTestCase):
    """L{runSteps}: the order, the first refusal, waits, failures."""

    def context(self) -> CallContext:
        return CallContext(b"POST", CHAT, Headers())

    def test_defaultStepsProvideTheInterface(self) -> None:
        """Every default step provides L{IAdmissionStep}, in the order route, draining, authenticate, CONNECT;
        then, once the body is in, stream usage (before the alias step, so every target gets its body), the alias step, the policy, and the usage limits last."""
        gateway = Gateway({}, StaticKeys({}), FakeUpstream(), RecordingSink(), MemoryReactorClock())  # type: ignore[arg-type]
        pipeline = defaultPipeline(gateway)
        self.assertEqual([type(s) for s in pipeline.atHeaders], [Route, Draining, Authenticate, NoConnect])
        self.assertEqual([type(s) for s in pipeline.atBody], [StreamUsage, ResolveAlias, PolicyStep, Limit])
        for step in pipeline.atHeaders + pipeline.atBody:
            self.assertTrue(verifyObject(IAdmissionStep, step))

    def test_synchronousStepsAnswerSynchronously(self) -> None:
        """Steps that all answer at once give an answer at once: no Deferred."""
        first, second = Allow(), Allow()
        context = self.context()
        self.assertIsNone(runSteps([first, second], context))
        self.assertEqual((first.seen, second.seen), ([context], [context]))

    def test_firstRefusalStops(self) -> None:
        """The first refusal is the answer; later steps do not run."""
        refusal = Refusal("forbidden", "no")
        later = Allow()
        self.assertIs(runSteps([Allow(), Refuse(refusal), later], self.context()), refusal)
        self.assertEqual(later.seen, [])

    def test_waitThenGoOn(self) -> None:
        """After a step's Deferred lets the call on, the following steps run."""
        wait, later = Wait(), Allow()
        verdict = runSteps([wait, later], self.context())
        assert isinstance(verdict, Deferred)
        self.assertEqual(later.seen, [])
        wait.waiting[0].callback(None)
        self.assertIsNone(self.successResultOf(verdict))
        self.assertEqual(len(later.seen), 1)

    def test_waitThenRefuse(self) -> None:
        """A Deferred's refusal is the answer; later steps do not run."""
        wait, later = Wait(), Allow()
        verdict = runSteps([wait, later], self.context())
        refusal = Refusal("forbidden", "no")
        assert isinstance(verdict, Deferred)
        wait.waiting[0].callback(refusal)
        self.assertIs(self.successResultOf(verdict), refusal)
        self.assertEqual(later.seen, [])

    def test_raisingStepIsAnInternalError(self) -> None:
        """A step that raises refuses the call as internal_error (500), logged."""
        verdict = runSteps([Explode(), Allow()], self.context())
        assert isinstance(verdict, Refusal)
        self.assertEqual((verdict.kind, verdict.status, verdict.recordError), ("internal_error", 500, "internal_error"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_failedDeferredIsAnInternalError(self) -> None:
        """A step whose Deferred fails refuses the call as internal_error."""
        wait = Wait()
        verdict = runSteps([wait], self.context())
        assert isinstance(verdict, Deferred)
        wait.waiting[0].errback(ZeroDivisionError("later"))
        refusal = self.successResultOf(verdict)
        assert refusal is not None
        self.assertEqual(refusal.status, 500)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_cancelledWaitStaysCancelled(self) -> None:
        """Cancelling the wait fails it with CancelledError (its waiter knows why), not as a step failure."""
        wait = Wait()
        verdict = runSteps([wait], self.context())
        assert isinstance(verdict, Deferred)
        verdict.cancel()
        self.failureResultOf(verdict, CancelledError)
        wait.waiting[0].callback(Refusal("forbidden", "late"))  # a step that answers late: ignored

    def test_refusalStatusFromKind(self) -> None:
        """A refusal's HTTP status comes from its kind; an unknown kind is a mistake."""
        self.assertEqual(Refusal("shutting_down", "m", "shutdown").status, 503)
        self.assertEqual(Refusal("shutting_down", "m", "shutdown").recordError, "shutdown")
        self.assertRaises(ValueError, Refusal, "teapot", "m")


class GatewayAdmissionTests(SynchronousTestCase):
    """The gateway runs the pipeline's stages, answers and records what they refuse."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.upstream = FakeUpstream()
        self.sink = RecordingSink()
        providers = {"openai": Provider(ProviderSettings("openai", "http://upstream.invalid", "openai"))}
        self.gateway = Gateway(providers, StaticKeys({ALLOWED_KEY: ALLOWED_ENTRY}), self.upstream, self.sink, self.clock)  # type: ignore[arg-type]
        self.site = GatewaySite(GatewayResource(self.gateway), reactor=self.clock)

    def connect(self) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def addStep(self, step: Any, atBody: bool = True) -> None:
        pipeline = self.gateway.pipeline
        if atBody:
            self.gateway.pipeline = Pipeline(pipeline.atHeaders, [*pipeline.atBody, step])
        else:
            self.gateway.pipeline = Pipeline([*pipeline.atHeaders, step], pipeline.atBody)

    def status(self, transport: StringTransport) -> int:
        return int(transport.value().split(b" ", 2)[1])

    def body(self, transport: StringTransport) -> Any:
        return json.loads(transport.value().split(b"\r\n\r\n", 1)[1])

    def failUpstream(self) -> None:
        """The upstream request fails: the call ends (502), recorded."""
        self.upstream.sent[-1][2].errback(Failure(error.ConnectionRefusedError()))

    def test_synchronousAllowRelaysAtOnce(self) -> None:
        """A body step that answers at once: the call goes upstream in the same turn, its context filled."""
        step = Allow()
        self.addStep(step)
        channel, transport = self.connect()
        channel.dataReceived(_request())
        self.assertEqual([(m, u) for m, u, _ in self.upstream.sent], [(b"POST", b"http://upstream.invalid/v1/chat/completions")])
        [context] = step.seen
        self.assertEqual((context.body, context.bodySize), (BODY, len(BODY)))
        self.assertEqual((context.entry, context.provider and context.provider.name), (ALLOWED_ENTRY, "openai"))
        self.assertEqual((context.endpoint, context.rest, context.query), (CHAT, b"/v1/chat/completions", None))
        self.failUpstream()
        self.assertEqual([(r.status, r.error) for r in self.sink.records], [(502, "upstream_unreachable")])

    def test_synchronousRefusal(self) -> None:
        """A body step's refusal: answered in the provider's shape with its headers, recorded once, never relayed."""
        self.addStep(Refuse(Refusal("forbidden", "Not this model.", "model_not_allowed", "r1", [(b"retry-after", b"7")])))
        channel, transport = self.connect()
        channel.dataReceived(_request())
        self.assertEqual(self.status(transport), 403)
        self.assertIn(b"\r\nRetry-After: 7\r\n", transport.value())
        self.assertEqual(self.body(transport)["error"]["message"], "Not this model.")
        self.assertEqual(self.upstream.sent, [])
        [record] = self.sink.records
        self.assertEqual((record.status, record.error, record.model, record.owner), (403, "model_not_allowed", "gpt-4o-mini", "team-a"))
        self.assertEqual(record.request_bytes, len(BODY))

    def test_headersStageRefusalReadsNoBody(self) -> None:
        """A headers step's refusal is answered before the body is read: no 100 Continue."""
        step = Allow()
        self.addStep(Refuse(Refusal("forbidden", "Not you.")), atBody=False)
        self.addStep(step)
        channel, transport = self.connect()
        channel.dataReceived(_request(expect=True))
        self.assertNotIn(b"100 Continue", transport.value())
        self.assertEqual(self.status(transport), 403)
        self.assertEqual(step.seen, [])
        self.assertEqual([(r.status, r.error) for r in self.sink.records], [(403, "forbidden")])

    def test_deferredAllow(self) -> None:
        """A body step that waits: nothing goes upstream until it lets the call on; meanwhile the call is active."""
        step = Wait()
        self.addStep(step)
        channel, transport = self.connect()
        channel.dataReceived(_request())
        self.assertEqual((self.upstream.sent, transport.value()), ([], b""))
        self.assertEqual(len(self.gateway.active), 1)
        step.waiting[0].callback(None)
        self.assertEqual(len(self.upstream.sent), 1)
        self.failUpstream()
        self.assertEqual(self.status(transport), 502)
        self.assertEqual([r.error for r in self.sink.records], ["upstream_unreachable"])
        self.assertEqual(self.gateway.active, set())

    def test_deferredRefusalAnswersTheClient(self) -> None:
        """A refusal after a wait still answers a client that is there, and is recorded once."""
        step = Wait()
        self.addStep(step)
        channel, transport = self.connect()
        channel.dataReceived(_request())
        step.waiting[0].callback(Refusal("forbidden", "Over the limit.", "limit_exceeded", headers=[(b"retry-after", b"30")]))
        self.assertEqual(self.status(transport), 403)
        self.assertIn(b"\r\nRetry-After: 30\r\n", transport.value())
        self.assertEqual(self.body(transport)["error"]["message"], "Over the limit.")
        self.assertEqual([(r.status, r.error) for r in self.sink.records], [(403, "limit_exceeded")])
        self.assertEqual((self.upstream.sent, self.gateway.active), ([], set()))

    def test_deferredRefusalAfterTheClientLeft(self) -> None:
        """
        The client leaves while a step waits: the wait is cancelled, the call is
        recorded as client_disconnected (499) at once, and the step's late refusal
        writes nothing and records nothing more.
        """
        step = Wait()
        self.addStep(step)
        channel, transport = self.connect()
        channel.dataReceived(_request())
        channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual([(r.status, r.error) for r in self.sink.records], [(499, "client_disconnected")])
        step.waiting[0].callback(Refusal("forbidden", "too late"))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(self.sink.records), 1)
        self.assertEqual((self.upstream.sent, self.gateway.active), ([], set()))

    def test_raisingStepAnswers500(self) -> None:
        """A step that raises: a 500 in the provider's shape, recorded as internal_error, never relayed."""
        self.addStep(Explode())
        channel, transport = self.connect()
        channel.dataReceived(_request())
        self.assertEqual(self.status(transport), 500)
        self.assertEqual(self.body(transport)["error"]["type"], "api_error")
        self.assertEqual([(r.status, r.error) for r in self.sink.records], [(500, "internal_error")])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual(self.upstream.sent, [])

    def test_failedWaitAnswers500(self) -> None:
        """A step whose Deferred fails after a wait: the client still gets its 500, recorded once."""
        step = Wait()
        self.addStep(step)
        channel, transport = self.connect()
        channel.dataReceived(_request())
        step.waiting[0].errback(ZeroDivisionError("later"))
        self.assertEqual(self.status(transport), 500)
        self.assertEqual([(r.status, r.error) for r in self.sink.records], [(500, "internal_error")])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_headersStepWaitsWhileTheBodyArrives(self) -> None:
        """A headers step that waits lets the body be read; its refusal is answered once the body is in."""
        step = Wait()
        self.addStep(step, atBody=False)
        channel, transport = self.connect()
        channel.dataReceived(_request())
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(self.gateway.active), 1)
        step.waiting[0].callback(Refusal("forbidden", "Not now."))
        self.assertEqual(self.status(transport), 403)
        self.assertEqual([(r.status, r.error, r.request_bytes) for r in self.sink.records], [(403, "forbidden", len(BODY))])
        self.assertEqual((self.gateway.active, self.gateway.admitting), (set(), set()))

    def test_headersStepDecidedBeforeTheBody(self) -> None:
        """A headers step that waits and lets the call on before the body is in: relayed once the body is in."""
        step = Wait()
        self.addStep(step, atBody=False)
        channel, transport = self.connect()
        request = _request()
        channel.dataReceived(request[:-len(BODY)])
        self.assertEqual(len(self.gateway.admitting), 1)
        step.waiting[0].callback(None)
        self.assertEqual(self.gateway.admitting, set())
        channel.dataReceived(BODY)
        self.assertEqual(len(self.upstream.sent), 1)

    def test_drainWaitsForAWaitingStep(self) -> None:
        """A drain waits for a call whose step still waits, and for the call it becomes."""
        step = Wait()
        self.addStep(step)
        channel, transport = self.connect()
        channel.dataReceived(_request())
        drained = self.gateway.drain(30.0)
        self.clock.advance(1)
        self.assertNoResult(drained)
        step.waiting[0].callback(None)
        self.clock.advance(1)
        self.assertNoResult(drained)
        self.failUpstream()
        self.clock.advance(1)
        self.successResultOf(drained)
        self.assertEqual([r.error for r in self.sink.records], ["upstream_unreachable"])

    def test_drainWaitsForAHeadersStep(self) -> None:
        """A drain waits for a request whose headers step still waits, its body not yet in."""
        step = Wait()
        self.addStep(step, atBody=False)
        channel, transport = self.connect()
        channel.dataReceived(_request()[:-len(BODY)])
        drained = self.gateway.drain(30.0)
        self.clock.advance(1)
        self.assertNoResult(drained)
        step.waiting[0].callback(None)
        self.clock.advance(1)
        self.successResultOf(drained)

    def test_drainTimeCancelsAHeadersStep(self) -> None:
        """
        The drain's time runs out while a headers step waits and the body is not
        in: the wait is cancelled; a body arriving later is refused as at shutdown
        (503), recorded once.
        """
        step = Wait()
        self.addStep(step, atBody=False)
        channel, transport = self.connect()
        channel.dataReceived(_request()[: -len(BODY)])
        drained = self.gateway.drain(5.0)
        self.clock.advance(6)
        self.successResultOf(drained)
        self.assertEqual(self.gateway.admitting, set())
        channel.dataReceived(BODY)
        self.assertEqual(self.status(transport), 503)
        self.assertEqual([(r.status, r.error) for r in self.sink.records], [(503, "shutdown")])
        self.assertEqual(self.upstream.sent, [])

    def test_drainTimeAbortsAWaitingStep(self) -> None:
        """The drain's time runs out while a step waits: the wait is cancelled, the call recorded as shutdown, once."""
        step = Wait()
        self.addStep(step)
        channel, transport = self.connect()
        channel.dataReceived(_request())
        drained = self.gateway.drain(5.0)
        self.clock.advance(6)
        self.successResultOf(drained)
        self.assertTrue(transport.disconnecting or getattr(transport, "aborted", False))
        self.assertTrue(step.waiting[0].called)  # cancelled
        step.waiting[0].callback(None)  # a step that answers late: ignored
        self.assertEqual([(r.error) for r in self.sink.records], ["shutdown"])
        self.assertEqual(self.upstream.sent, [])

    def test_oneRecordPerRefusalAcrossStages(self) -> None:
        """Refused at headers, a call is recorded once; its body steps never run."""
        late = Allow()
        self.addStep(late)
        channel, transport = self.connect()
        channel.dataReceived(_request(key=b"sk-unknown-000000000000000000"))
        self.assertEqual([(r.status, r.error) for r in self.sink.records], [(403, "forbidden")])
        self.assertEqual(late.seen, [])

    def test_alreadyFiredDeferredIsSynchronous(self) -> None:
        """A step answering with an already-fired Deferred goes on in the same turn."""

        @implementer(IAdmissionStep)
        class Fired:
            def admit(self, context: CallContext) -> Deferred[Refusal | None]:
                return succeed(None)

        self.addStep(Fired())
        channel, transport = self.connect()
        channel.dataReceived(_request())
        self.assertEqual(len(self.upstream.sent), 1)

    def test_alreadyFiredDeferredLeavesNoCallBehind(self) -> None:
        """A call whose step answered with an already-fired Deferred (a Redis store whose circuit is open
        fails at once) is not left among the active calls once recorded (a drain waited on it for ever and
        every such call leaked), and a client that leaves later still cancels its upstream request."""

        @implementer(IAdmissionStep)
        class Fired:
            def __init__(self, verdict: Refusal | None) -> None:
                self.verdict = verdict

            def admit(self, context: CallContext) -> Deferred[Refusal | None]:
                return succeed(self.verdict)

        self.addStep(Fired(Refusal("forbidden", "No.")))
        channel, transport = self.connect()
        channel.dataReceived(_request())
        self.assertEqual(self.status(transport), 403)
        self.assertEqual(len(self.sink.records), 1)
        self.assertEqual(self.gateway.active, set())

        self.gateway.pipeline = Pipeline(self.gateway.pipeline.atHeaders, [Fired(None)])
        channel, transport = self.connect()
        channel.dataReceived(_request())
        [call] = self.gateway.active
        pending = self.upstream.sent[-1][2]
        channel.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(pending.called)  # cancelled: the upstream request is dropped at once
        self.assertEqual(self.gateway.active, set())
        self.assertEqual([r.error for r in self.sink.records], ["forbidden", "client_disconnected"])


class ImportRuleTests(SynchronousTestCase):
    """The record's assembly stays apart from the gate."""

    def test_recordsNeverImportTheGate(self) -> None:
        """No module of lmgate.records imports lmgate.gate (at module level or inside a function)."""
        import lmgate.records

        folder = Path(lmgate.records.__file__).parent
        offenders = []
        for path in sorted(folder.glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                offenders += [(path.name, n) for n in names if n == "lmgate.gate" or n.startswith("lmgate.gate.")]
        self.assertEqual(offenders, [])
