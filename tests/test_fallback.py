"""
Falling back to an alias's next target before the first byte: a gateway on
loopback, fake upstreams that fail the first target (5xx, 429, refused,
reset, silent on a fake clock), the no-fallback-after-first-byte rule, and
the cooldown on a fake clock.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import TestCase
from twisted.web.server import NOT_DONE_YET, Request

from lmgate.config import ProviderSettings
from lmgate.gate.providers import Provider
from lmgate.governance.aliases import FallbackSettings, parseModels
from tests.helpers import Running, call, closedPort, jsonAnswer, startGateway

CHAT = "/openai/v1/chat/completions"
BODY = b'{"messages": [{"role": "user", "content": "hi"}], "model": "chat"}'


def byModel(answers: dict[str, Any]) -> Any:
    """An upstream handler answering each request by the model its body names."""

    def handler(request: Request) -> Any:
        content: Any = request.content
        content.seek(0)
        return answers[json.loads(content.read())["model"]](request)

    return handler


def withAliases(gate: Running, targets: list[dict[str, str]], **fallback: Any) -> None:
    """Give the running gateway the alias C{chat} with C{targets}, and the fallback values."""
    gateway = gate.gateway
    formats = {p.name: p.format for p in gateway.providers.values()}
    gateway.setAliases(parseModels({"chat": {"targets": targets}}, formats), FallbackSettings(**fallback))


def addRoute(gate: Running, name: str, upstream: str) -> None:
    gate.gateway.providers[name.encode()] = Provider(ProviderSettings(name, upstream, "openai"))


OK = jsonAnswer({"id": "chatcmpl-1", "model": "second", "usage": {"prompt_tokens": 2, "completion_tokens": 1}})


class FallbackTests(TestCase):
    async def assertFellBack(self, gate: Running, firstTried: int) -> None:
        response, body, _ = await call(self, gate.url + CHAT, body=BODY)
        self.assertEqual((response.code, json.loads(body)["id"]), (200, "chatcmpl-1"))
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.status, record.error, record.attempts, record.alias), (200, None, 2, "chat"))
        self.assertEqual((record.provider, record.model), ("openai", "second"))
        models = [json.loads(seen.body)["model"] for seen in gate.upstream.seen]
        self.assertEqual(models, ["first"] * firstTried + ["second"])
        for seen in gate.upstream.seen:  # the same body each time, only the model's value changed
            self.assertEqual(seen.body, BODY.replace(b'"chat"', json.dumps(json.loads(seen.body)["model"]).encode()))

    async def test_5xxAnd429FallBack(self) -> None:
        """A target answering 500, 502, 503, 504 or 429 (in C{fallback.on}) is discarded before
        anything reaches the client, and the next target answers; one record, two attempts."""
        for status in (500, 429, 503):
            gate = startGateway(self)
            gate.upstream.handler = byModel({"first": jsonAnswer({"error": "down"}, status), "second": OK})
            withAliases(gate, [{"provider": "openai", "model": "first"}, {"provider": "openai", "model": "second"}])
            await self.assertFellBack(gate, 1)

    async def test_notListedStatusIsRelayed(self) -> None:
        """A status not in C{fallback.on} (400) is the client's answer: no fallback."""
        gate = startGateway(self)
        gate.upstream.handler = byModel({"first": jsonAnswer({"error": "bad"}, 400), "second": OK})
        withAliases(gate, [{"provider": "openai", "model": "first"}, {"provider": "openai", "model": "second"}])
        response, body, _ = await call(self, gate.url + CHAT, body=BODY)
        self.assertEqual((response.code, json.loads(body)), (400, {"error": "bad"}))
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.attempts, record.model), (1, "first"))

    async def test_refusedConnectionFallsBack(self) -> None:
        """A target whose route cannot be reached (connection refused) falls back to the next route."""
        gate = startGateway(self)
        addRoute(gate, "dead", f"http://127.0.0.1:{closedPort(self)}")
        gate.upstream.handler = OK
        withAliases(gate, [{"provider": "dead", "model": "first"}, {"provider": "openai", "model": "second"}])
        response, body, _ = await call(self, gate.url + CHAT, body=BODY)
        self.assertEqual(response.code, 200)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.provider, record.model, record.attempts, record.error), ("openai", "second", 2, None))
        self.assertEqual([json.loads(s.body)["model"] for s in gate.upstream.seen], ["second"])

    async def test_resetFallsBack(self) -> None:
        """A target that closes the connection without answering falls back."""
        gate = startGateway(self)

        def reset(request: Request) -> Any:
            request.channel.transport.abortConnection()  # type: ignore[attr-defined]
            return NOT_DONE_YET

        gate.upstream.handler = byModel({"first": reset, "second": OK})
        withAliases(gate, [{"provider": "openai", "model": "first"}, {"provider": "openai", "model": "second"}])
        await self.assertFellBack(gate, 1)

    async def test_timeoutBeforeHeadersFallsBack(self) -> None:
        """A target silent until C{timeouts.response} (a fake clock) is abandoned for the next one,
        which gets a fresh response timer."""
        clock = Clock()
        gate = startGateway(self, clock=clock, responseTimeout=30.0)
        held: list[Request] = []

        def hold(request: Request) -> Any:
            held.append(request)
            return NOT_DONE_YET

        gate.upstream.handler = byModel({"first": hold, "second": OK})
        withAliases(gate, [{"provider": "openai", "model": "first"}, {"provider": "openai", "model": "second"}])
        arrived = gate.upstream.arrived()
        pending = call(self, gate.url + CHAT, body=BODY)
        from twisted.internet.defer import Deferred

        result = Deferred.fromCoroutine(pending)
        await arrived
        clock.advance(30.1)
        response, body, _ = await result
        self.assertEqual(response.code, 200)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.model, record.attempts, record.error), ("second", 2, None))

    async def test_noFallbackAfterTheFirstByte(self) -> None:
        """Once the response head is relayed, a broken body is not retried elsewhere: the client
        sees the first target's truncated stream, one attempt."""
        gate = startGateway(self)

        def breakMidStream(request: Request) -> Any:
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b"data: {}\n\n")
            reactor.callLater(0.01, request.channel.transport.abortConnection)  # type: ignore[attr-defined]
            return NOT_DONE_YET

        gate.upstream.handler = byModel({"first": breakMidStream, "second": OK})
        withAliases(gate, [{"provider": "openai", "model": "first"}, {"provider": "openai", "model": "second"}])
        response, body, _ = await call(self, gate.url + CHAT, body=BODY)
        self.assertEqual((response.code, body), (200, b"data: {}\n\n"))
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.model, record.attempts, record.error), ("first", 1, "upstream_reset"))
        self.assertEqual(len(gate.upstream.seen), 1)

    async def test_everyTargetFails(self) -> None:
        """When the last target fails too, its answer is relayed; one record, one attempt per target."""
        gate = startGateway(self)
        gate.upstream.handler = jsonAnswer({"error": "down"}, 503)
        withAliases(gate, [{"provider": "openai", "model": "first"}, {"provider": "openai", "model": "second"}])
        response, _, _ = await call(self, gate.url + CHAT, body=BODY)
        self.assertEqual(response.code, 503)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.status, record.attempts, record.model), (503, 2, "second"))

    async def test_cooldownOnAFakeClock(self) -> None:
        """A target that failed C{cooldown.failures} times within the window is tried after the
        others for C{cooldown.seconds}; after that it is first again."""
        clock = Clock()
        gate = startGateway(self, clock=clock)
        gate.upstream.handler = byModel({"first": jsonAnswer({"error": "down"}, 500), "second": OK})
        withAliases(
            gate,
            [{"provider": "openai", "model": "first"}, {"provider": "openai", "model": "second"}],
            failures=2,
            window=10.0,
            seconds=60.0,
        )
        for _ in range(3):
            response, _, _ = await call(self, gate.url + CHAT, body=BODY)
            self.assertEqual(response.code, 200)
        models = [json.loads(s.body)["model"] for s in gate.upstream.seen]
        # two failures put "first" in its cooldown: the third call goes straight to "second"
        self.assertEqual(models, ["first", "second", "first", "second", "second"])
        clock.advance(61)
        await call(self, gate.url + CHAT, body=BODY)
        self.assertEqual([json.loads(s.body)["model"] for s in gate.upstream.seen][5:], ["first", "second"])
        records = await gate.sink.waitFor(4)
        self.assertEqual([r.attempts for r in records], [2, 2, 1, 2])


class NoCycleTests(TestCase):
    async def test_finishedAliasCallIsFreedWithoutTheCycleCollector(self) -> None:
        """A finished alias call (which could have fallen back, so kept a way to resend) leaves no
        reference cycle behind: its call object is freed by reference counting as soon as the
        connection lets go of it, not at the next collection, which at load costs CPU per call."""
        import gc
        import weakref

        from lmgate.gate import call as callModule

        calls: list[weakref.ref[Any]] = []
        original = callModule.ProxiedCall.__init__

        def tracking(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            calls.append(weakref.ref(self))

        self.patch(callModule.ProxiedCall, "__init__", tracking)
        gate = startGateway(self)
        gate.upstream.handler = OK
        withAliases(gate, [{"provider": "openai", "model": "first"}, {"provider": "openai", "model": "second"}])
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)
        response, body, _ = await call(self, gate.url + CHAT, body=BODY)
        self.assertEqual(response.code, 200, body)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.alias, record.attempts), ("chat", 1))
        del response, record
        gate.sink.records.clear()
        await deferLater(reactor, 0, lambda: None)  # the server side lets go of the finished request
        self.assertEqual(len(calls), 1)
        self.assertIsNone(calls[0](), gc.get_referrers(calls[0]()) if calls[0]() is not None else None)
