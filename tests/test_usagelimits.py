"""
Usage limits in one process: the C{usage_limits:} section, the memory store's
semantics on a fake clock, and the limiter's reservations, refusals and
settlements (docs/limits.md).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from lmgate.config import ProviderSettings, settingsFrom
from lmgate.errors import ConfigError
from lmgate.gate.admission import CallContext, Refusal
from lmgate.gate.providers import Provider
from lmgate.gate.shapes import errorResponse
from lmgate.limits import limiter as limiterModule
from lmgate.limits.limiter import Held, Limiter, goDuration, outputCap
from lmgate.limits.memory import MemoryStore, windowOf
from lmgate.limits.settings import NANO, LimitsSettings, parseUsageLimits
from lmgate.limits.store import Figure, Settlement, StoreUnavailable
from lmgate.ops.prices import Price, PriceTable
from lmgate.records.record import KeyEntry

#: 2026-12-01T23:59:00Z: a minute before a UTC day ends.
BEFORE_MIDNIGHT = datetime(2026, 12, 1, 23, 59, tzinfo=timezone.utc).timestamp()


def rpm(limit: int, counter: str = "r|key=k") -> Figure:
    return Figure(counter, counter.split("|")[0], "requests_per_minute", limit)


class SettingsTests(SynchronousTestCase):
    """The section is checked whole; a wrong key is one line naming the file and the key."""

    def wrong(self, section: Any) -> str:
        with self.assertRaises(ConfigError) as caught:
            settingsFrom({"usage_limits": section}, "etc/lmgate.yaml", {})
        return str(caught.exception)

    def test_defaults(self) -> None:
        settings = parseUsageLimits(None)
        self.assertEqual((settings.store, settings.redisTimeout, settings.onStoreError), ("memory", 0.1, "open"))
        self.assertEqual((settings.bytesPerToken, settings.outputTokens, settings.rules), (4.0, 1024, ()))

    def test_theContract(self) -> None:
        """The issue's example parses: figures in their units (dollars as nano-dollars), match, per."""
        settings = parseUsageLimits(
            {
                "store": "redis://user:secret@10.0.0.5:6379/0",
                "redis": {"timeout": 0.1},
                "on_store_error": "open",
                "estimate": {"bytes_per_token": 4, "output_tokens": 1024},
                "rules": [
                    {
                        "name": "team-a",
                        "match": {"owner": "team-a"},
                        "per": "key",
                        "requests_per_minute": 60,
                        "tokens_per_minute": 200000,
                        "concurrent": 10,
                        "tokens_per_day": 5000000,
                        "tokens_per_month": 100000000,
                        "usd_per_day": 50,
                        "usd_per_month": 1000,
                    }
                ],
            }
        )
        rule = settings.rules[0]
        self.assertEqual(rule.match.owner, ("team-a",))
        self.assertEqual(dict(rule.figures)["usd_per_day"], 50 * NANO)
        self.assertEqual(dict(rule.figures)["concurrent"], 10)
        self.assertTrue(settings.shared)
        self.assertNotIn("secret", repr(settings))

    def test_wrongValues(self) -> None:
        self.assertEqual(
            self.wrong({"rules": [{"name": "a", "per": "team", "concurrent": 1}]}),
            "etc/lmgate.yaml: usage_limits.rules[0].per: must be one of key, owner, rule, got 'team'",
        )
        self.assertIn("usage_limits.rules[0].requests_per_minute: must be a whole number >= 1", self.wrong({"rules": [{"name": "a", "requests_per_minute": 0}]}))
        self.assertIn("usage_limits.rules[0]: rule 'a' sets no figure", self.wrong({"rules": [{"name": "a"}]}))
        self.assertIn("usage_limits.rules[1].name: 'a' names two rules", self.wrong({"rules": [{"name": "a", "concurrent": 1}, {"name": "a", "concurrent": 2}]}))
        self.assertIn("usage_limits.rules[0].match.team: unknown key", self.wrong({"rules": [{"name": "a", "concurrent": 1, "match": {"team": "x"}}]}))
        self.assertIn("usage_limits.store: must be memory or a redis:// or rediss:// URL", self.wrong({"store": "http://x"}))
        self.assertIn("usage_limits.on_store_error: must be open or closed", self.wrong({"on_store_error": "maybe"}))
        self.assertIn("usage_limits.redis.timeout: must be a number > 0", self.wrong({"redis": {"timeout": 0}}))
        self.assertIn("usage_limits.colour: unknown key", self.wrong({"colour": 1}))

    def test_storeErrorsHideThePassword(self) -> None:
        """A wrong Redis URL is named in the start-up line without its password."""
        line = self.wrong({"store": "redis://gw:s3cret@cache:0/0"})
        self.assertIn("usage_limits.store:", line)
        self.assertIn("1-65535", line)
        self.assertNotIn("s3cret", line)

    def test_storeFromTheEnvironment(self) -> None:
        """The store's URL (which may carry a password) can come from LMGATE_USAGE_LIMITS__STORE."""
        settings = settingsFrom({}, "x.yaml", {"LMGATE_USAGE_LIMITS__STORE": "redis://127.0.0.1:6390/2"})
        self.assertEqual(settings.usageLimits.store, "redis://127.0.0.1:6390/2")


class MemoryStoreTests(SynchronousTestCase):
    """The store's semantics (lmgate/limits/store.py) on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(BEFORE_MIDNIGHT)
        self.store = MemoryStore(self.clock)
        self.ids = iter(range(10**6))

    def admit(self, figures: list[Figure], tokens: int = 0, usd: int = 0, lease: float = 60.0) -> Any:
        return self.store.admit(f"r{next(self.ids)}", figures, tokens, usd, lease)

    def test_burstThenRefill(self) -> None:
        """A fresh bucket admits exactly its figure at once, then one more each 60/figure seconds."""
        figure = rpm(6)
        self.assertEqual([self.admit([figure]).admitted for _ in range(9)], [True] * 6 + [False] * 3)
        refused = self.admit([figure])
        self.assertAlmostEqual(refused.retryAfter, 10.0)
        self.assertEqual(refused.refusedBy, figure)
        self.clock.advance(9.9)
        self.assertFalse(self.admit([figure]).admitted)
        self.clock.advance(0.1)
        self.assertTrue(self.admit([figure]).admitted)
        self.assertFalse(self.admit([figure]).admitted)

    def test_tokenBucketSettlesToRealUsage(self) -> None:
        """Tokens reserved come back at settlement and the real use is taken; the bucket may go into debt."""
        figure = Figure("t|key=k", "t", "tokens_per_minute", 1000)
        first = self.store.admit("a", [figure], 600, 0, 60)
        self.assertTrue(first.admitted)
        self.assertEqual(self.successResultOf(self.store.show())[0].remaining, 400)
        self.assertFalse(self.store.admit("b", [figure], 600, 0, 60).admitted)
        self.store.settle(Settlement("a", 100, None, True))
        self.assertTrue(self.store.admit("b", [figure], 600, 0, 60).admitted)  # 900 left
        self.store.settle(Settlement("b", 1500, None, True))  # used far more than reserved: 300 - 900 = -600
        refused = self.store.admit("c", [figure], 1, 0, 60)
        self.assertFalse(refused.admitted)
        self.assertAlmostEqual(refused.retryAfter, 601 * 60 / 1000)

    def test_windowsCountReservedAndUsed(self) -> None:
        """used + reserved + this reservation must fit; settlement replaces the reservation by the use."""
        figure = Figure("q|owner=o", "q", "tokens_per_day", 1000)
        self.assertTrue(self.store.admit("a", [figure], 600, 0, 60).admitted)
        self.assertFalse(self.store.admit("b", [figure], 500, 0, 60).admitted)
        self.store.settle(Settlement("a", 200, None, True))
        decision = self.store.admit("b", [figure], 500, 0, 60)
        self.assertTrue(decision.admitted)
        state = self.successResultOf(self.store.show())[0]
        self.assertEqual((state.used, state.reserved, state.remaining), (200, 500, 300))

    def test_noUsageKeepsOrReleases(self) -> None:
        """Ended with no usage: kept as use if the upstream answered, released if it never did."""
        figure = Figure("q|key=k", "q", "tokens_per_day", 1000)
        self.store.admit("a", [figure], 400, 0, 60)
        self.store.admit("b", [figure], 400, 0, 60)
        self.store.settle(Settlement("a", None, None, True))
        self.store.settle(Settlement("b", None, None, False))
        state = self.successResultOf(self.store.show(["q|key=k"]))[0]
        self.assertEqual((state.used, state.reserved), (400, 0))

    def test_settlementIsIdempotent(self) -> None:
        figure = Figure("q|key=k", "q", "tokens_per_day", 1000)
        self.store.admit("a", [figure], 400, 0, 60)
        for _ in range(3):
            self.store.settle(Settlement("a", 300, None, True))
        state = self.successResultOf(self.store.show())[0]
        self.assertEqual((state.used, state.reserved), (300, 0))

    def test_allOrNothing(self) -> None:
        """A refusal by one figure leaves every other untouched."""
        roomy, tight = rpm(100, "a|key=k"), Figure("b|key=k", "b", "tokens_per_day", 10)
        self.assertFalse(self.admit([roomy, tight], tokens=11).admitted)
        self.assertEqual(self.successResultOf(self.store.show(["a|key=k"]))[0].remaining, 100)
        self.assertTrue(self.admit([roomy, tight], tokens=10).admitted)
        self.assertEqual(self.successResultOf(self.store.show(["a|key=k"]))[0].remaining, 99)

    def test_concurrencyLeases(self) -> None:
        """At most the figure at once; released at settlement; expiring on their own unless renewed."""
        figure = Figure("c|rule", "c", "concurrent", 2)
        self.assertTrue(self.store.admit("a", [figure], 0, 0, 30).admitted)
        self.assertTrue(self.store.admit("b", [figure], 0, 0, 30).admitted)
        self.assertFalse(self.store.admit("c", [figure], 0, 0, 30).admitted)
        self.store.settle(Settlement("a", 5, None, True))
        self.assertTrue(self.store.admit("c", [figure], 0, 0, 30).admitted)
        self.clock.advance(20)
        self.store.renew(["b"], 30)  # b lives on; c (not renewed) expires at 30
        self.clock.advance(10)
        self.assertTrue(self.store.admit("d", [figure], 0, 0, 30).admitted)
        self.assertFalse(self.store.admit("e", [figure], 0, 0, 30).admitted)

    def test_dayWindowTurns(self) -> None:
        """A call reserved before midnight settles into that day; the new day starts empty."""
        figure = Figure("q|key=k", "q", "tokens_per_day", 1000)
        self.assertTrue(self.store.admit("a", [figure], 1000, 0, 60).admitted)
        refused = self.store.admit("b", [figure], 1, 0, 60)
        self.assertAlmostEqual(refused.retryAfter, 60.0)
        self.clock.advance(61)
        self.store.settle(Settlement("a", 900, None, True))  # into yesterday's window, which no longer shows
        self.assertEqual(self.successResultOf(self.store.show()), [])
        self.assertTrue(self.store.admit("b", [figure], 1000, 0, 60).admitted)
        self.assertEqual(self.store.prune(), 1)  # yesterday's, settled: forgotten

    def test_windows(self) -> None:
        self.assertEqual(windowOf("tokens_per_day", BEFORE_MIDNIGHT), ("2026-12-01", BEFORE_MIDNIGHT + 60))
        self.assertEqual(windowOf("usd_per_month", BEFORE_MIDNIGHT)[0], "2026-12")
        self.assertEqual(windowOf("usd_per_month", BEFORE_MIDNIGHT)[1], datetime(2027, 1, 1, tzinfo=timezone.utc).timestamp())

    def test_resetAndPrune(self) -> None:
        figure = rpm(2)
        self.admit([figure])
        self.admit([figure])
        self.assertFalse(self.admit([figure]).admitted)
        self.assertEqual(self.successResultOf(self.store.reset(["r|key=k"])), 1)
        self.assertTrue(self.admit([figure]).admitted)
        self.clock.advance(60)
        self.assertEqual(self.store.prune(), 1)  # full again: forgotten

    def test_figureTuplesLookedUpOnce(self) -> None:
        """
        The limiter passes the same tuple for every call of a kind: its states
        are looked up once, and again when one is removed (reset, prune) or a
        window turns, so no admission counts on a state that show and reset
        no longer see.
        """
        clock = Clock()
        clock.advance(BEFORE_MIDNIGHT + 60 + 12 * 3600)  # noon
        store = MemoryStore(clock)
        figures = (rpm(2), Figure("q|key=k", "q", "tokens_per_day", 1000))

        def shown() -> dict[str, tuple[int, int]]:
            return {s.figure.kind: (s.used, s.reserved) for s in self.successResultOf(store.show())}

        self.assertTrue(store.admit("a", figures, 100, 0, 60).admitted)
        self.assertEqual(self.successResultOf(store.reset(["r|key=k"])), 1)
        self.assertTrue(store.admit("b", figures, 100, 0, 60).admitted)  # on a bucket made afresh
        self.assertTrue(store.admit("c", figures, 100, 0, 60).admitted)
        self.assertFalse(store.admit("d", figures, 100, 0, 60).admitted)
        clock.advance(60)  # the bucket full again
        self.assertEqual(store.prune(), 1)  # the bucket (the window holds reservations)
        self.assertTrue(store.admit("e", figures, 100, 0, 60).admitted)  # on a bucket made afresh
        self.assertEqual(shown(), {"requests_per_minute": (1, 0), "tokens_per_day": (0, 400)})
        clock.advance(12 * 3600)  # a new day
        self.assertTrue(store.admit("f", figures, 100, 0, 60).admitted)  # in the new day's window
        self.assertEqual(shown()["tokens_per_day"], (0, 100))
        store.settle(Settlement("e", 40, None, True))  # into yesterday's window, as reserved
        store.settle(Settlement("f", 30, None, True))
        self.assertEqual(shown()["tokens_per_day"], (30, 0))


def context(body: bytes, owner: str = "team-a", keyId: str = "k1", provider: str = "openai", fmt: str = "openai") -> CallContext:
    ctx = CallContext(b"POST", b"/openai/v1/chat/completions", Headers())
    ctx.entry = KeyEntry(keyId, owner, "2026-01-01")
    ctx.provider = Provider(ProviderSettings(provider, "http://127.0.0.1:9", fmt))
    ctx.rest = b"/v1/chat/completions"
    ctx.body, ctx.bodySize = body, len(body)
    ctx.requestId = "req-%d" % id(ctx)
    return ctx


def limiterWith(rules: list[dict[str, Any]], store: Any = None, clock: Clock | None = None, **section: Any) -> Limiter:
    clock = clock or Clock()
    settings = parseUsageLimits(dict(section, rules=rules))
    prices = PriceTable({"gpt-4o-mini": Price(0.15, 0.60, 0.075, 0.0)})
    return Limiter(settings, store or MemoryStore(clock), clock, prices)


class FailingStore:
    """A shared store that cannot answer."""

    shared = True

    def admit(self, *args: Any) -> Deferred[Any]:
        return fail(StoreUnavailable("connection refused"))

    def settle(self, settlement: Settlement) -> None:
        pass

    def renew(self, requestIds: Any, leaseSeconds: float) -> None:
        pass


class LimiterTests(SynchronousTestCase):
    """Rules, reservations and refusals, with the memory store."""

    def test_reservation(self) -> None:
        """⌈body bytes ÷ bytes_per_token⌉ + the output cap, priced at the model's prices."""
        body = json.dumps({"model": "gpt-4o-mini", "messages": [], "max_tokens": 100}).encode()
        limiter = limiterWith([{"name": "all", "match": {}, "tokens_per_day": 10**6, "usd_per_day": 10}])
        ctx = context(body)
        self.assertIsNone(limiter.admit(ctx))
        expected = -(-len(body) // 4) + 100
        self.assertEqual(ctx.reservedTokens, expected)
        held = ctx.reservation
        assert isinstance(held, Held)
        inputTokens = -(-len(body) // 4)
        self.assertEqual(held.nanoUsd, -(-(inputTokens * 150 + 100 * 600) // 1))
        self.assertEqual(ctx.limits, "local")

    def test_outputCaps(self) -> None:
        self.assertEqual(outputCap({"max_completion_tokens": 7}, 1024), 7)
        self.assertEqual(outputCap({"max_output_tokens": 8}, 1024), 8)
        self.assertEqual(outputCap({"generationConfig": {"maxOutputTokens": 9}}, 1024), 9)
        self.assertEqual(outputCap({"inferenceConfig": {"maxTokens": 10}}, 1024), 10)
        self.assertEqual(outputCap({"messages": []}, 1024), 1024)
        self.assertEqual(outputCap(None, 5), 5)

    def test_matching(self) -> None:
        """Every given field must match; model is a case-sensitive glob; no match, no counting."""
        limiter = limiterWith([{"name": "minis", "match": {"owner": "team-a", "model": "gpt-4o-*"}, "requests_per_minute": 1}])
        self.assertIsNone(limiter.admit(context(b'{"model":"GPT-4o-mini"}')))  # case differs: no match
        self.assertIsNone(limiter.admit(context(b'{"model":"gpt-4o-mini"}', owner="team-b")))
        ctx = context(b'{"model":"gpt-4o-mini"}')
        self.assertIsNone(limiter.admit(ctx))
        self.assertEqual(ctx.limits, "local")
        refused = limiter.admit(context(b'{"model":"gpt-4o-mini"}'))
        assert isinstance(refused, Refusal)
        self.assertEqual((refused.status, refused.recordError, refused.rule), (429, "rate_limited", "minis"))

    def test_perOwnerAndPerRule(self) -> None:
        """per: owner shares a counter among an owner's keys; per: rule, among every matching call."""
        limiter = limiterWith(
            [{"name": "o", "per": "owner", "requests_per_minute": 2}, {"name": "everyone", "per": "rule", "requests_per_minute": 3}]
        )
        body = b'{"model":"m"}'
        self.assertIsNone(limiter.admit(context(body, keyId="k1")))
        self.assertIsNone(limiter.admit(context(body, keyId="k2")))
        refused = limiter.admit(context(body, keyId="k3"))
        assert isinstance(refused, Refusal)
        self.assertEqual(refused.rule, "o")
        self.assertIsNone(limiter.admit(context(body, owner="team-b")))
        refused = limiter.admit(context(body, owner="team-c"))
        assert isinstance(refused, Refusal)
        self.assertEqual(refused.rule, "everyone")

    def test_headersOnARateRefusal(self) -> None:
        limiter = limiterWith([{"name": "r", "requests_per_minute": 2, "tokens_per_minute": 10000}])
        body = b'{"model":"m","max_tokens":10}'
        limiter.admit(context(body))
        limiter.admit(context(body))
        refused = limiter.admit(context(body))
        assert isinstance(refused, Refusal)
        headers = dict(refused.headers)
        self.assertEqual(headers[b"retry-after"], b"30")
        self.assertEqual(headers[b"x-ratelimit-limit-requests"], b"2")
        self.assertEqual(headers[b"x-ratelimit-remaining-requests"], b"0")
        self.assertEqual(headers[b"x-ratelimit-reset-requests"], b"1m0s")
        self.assertEqual(headers[b"x-ratelimit-limit-tokens"], b"10000")
        self.assertIn(b"x-ratelimit-remaining-tokens", headers)
        self.assertIn("Rate limit reached: rule `r` allows 2 requests per minute", refused.message)

    def test_quotaAndBudgetShapes(self) -> None:
        """Quotas and budgets: 429 insufficient_quota in OpenAI's shape, rate_limit_error in Anthropic's, RESOURCE_EXHAUSTED in Google's."""
        limiter = limiterWith([{"name": "q", "tokens_per_day": 1000}, {"name": "b", "usd_per_day": 0.0001, "match": {"owner": "team-b"}}])
        body = b'{"model":"gpt-4o-mini","max_tokens":500}'
        self.assertIsNone(limiter.admit(context(body)))
        refused = limiter.admit(context(body))
        assert isinstance(refused, Refusal)
        self.assertEqual((refused.kind, refused.recordError), ("quota_exceeded", "quota_exceeded"))
        status, _, answer = errorResponse("openai", refused.kind, refused.message)
        self.assertEqual((status, json.loads(answer)["error"]["code"]), (429, "insufficient_quota"))
        self.assertEqual(json.loads(errorResponse("anthropic", refused.kind, "x")[2])["error"]["type"], "rate_limit_error")
        self.assertEqual(json.loads(errorResponse("google", refused.kind, "x")[2])["error"]["status"], "RESOURCE_EXHAUSTED")
        self.assertIn((b"x-amzn-errortype", b"ThrottlingException"), errorResponse("bedrock", refused.kind, "x")[1])
        spender = context(b'{"model":"gpt-4o-mini","max_tokens":50}', owner="team-b")
        self.assertIsNone(limiter.admit(spender))  # 50 output tokens: $0.00003 + input, under $0.0001
        limiter.settle(spender, 200, 0.00009, True)
        refused = limiter.admit(context(b'{"model":"gpt-4o-mini","max_tokens":50}', owner="team-b"))
        assert isinstance(refused, Refusal)
        self.assertEqual(refused.recordError, "budget_exceeded")
        self.assertIn("$9e-05 used", refused.message)

    def test_neverFits(self) -> None:
        """A request whose own reservation exceeds a figure is refused at once, saying so, with no Retry-After."""
        limiter = limiterWith([{"name": "small", "tokens_per_minute": 100}])
        ctx = context(b'{"model":"m","max_tokens":4096}')
        refused = limiter.admit(ctx)
        assert isinstance(refused, Refusal)
        self.assertEqual((refused.status, refused.recordError, ctx.limitedBy), (429, "rate_limited", "small"))
        self.assertIn("can never be admitted", refused.message)
        self.assertEqual(refused.headers, ())

    def test_neverFitsNamesTheFirstRuleInOrder(self) -> None:
        """
        With several figures a reservation can never fit, the refusal names the
        first in rule order (kept plans compare against each kind's smallest
        limit first, then look for it in order), and a call that fits them all
        is admitted with the same plan.
        """
        limiter = limiterWith([
            {"name": "roomy", "tokens_per_day": 10**6, "usd_per_day": 100},
            {"name": "tight", "tokens_per_minute": 1000, "usd_per_day": 0.000001},
            {"name": "tighter", "tokens_per_minute": 50},
        ])
        refused = limiter.admit(context(b'{"model":"gpt-4o-mini","max_tokens":100}'))
        assert isinstance(refused, Refusal)
        self.assertEqual((refused.rule, refused.recordError), ("tight", "budget_exceeded"))
        refused = limiter.admit(context(b'{"model":"unpriced","max_tokens":100}'))  # no dollars reserved
        assert isinstance(refused, Refusal)
        self.assertEqual((refused.rule, refused.recordError), ("tighter", "rate_limited"))
        self.assertIsNone(limiter.admit(context(b'{"model":"unpriced","max_tokens":1}')))

    def test_plansFollowTheCallAndTheSettings(self) -> None:
        """
        What the rules make of a caller, route, model and alias is kept, but a
        call with another key, owner, model or alias is judged afresh, and new
        rules or new prices (a reload) take effect on the next call.
        """
        limiter = limiterWith([{"name": "minis", "match": {"model": "gpt-4o-*"}, "per": "key", "requests_per_minute": 1}])
        self.assertIsNone(limiter.admit(context(b'{"model":"gpt-4o-mini"}')))
        self.assertIsInstance(limiter.admit(context(b'{"model":"gpt-4o-mini"}')), Refusal)
        self.assertIsNone(limiter.admit(context(b'{"model":"other"}')))  # another model: no rule
        self.assertIsNone(limiter.admit(context(b'{"model":"gpt-4o-mini"}', keyId="k2")))  # its own counter
        aliased = context(b'{"model":"gpt-4o-mini"}', keyId="k3")
        aliased.alias = "fast"
        self.assertIsNone(limiter.admit(aliased))
        self.assertIsInstance(limiter.admit(context(b'{"model":"gpt-4o-mini"}', keyId="k3")), Refusal)
        limiter.setRules(parseUsageLimits({"rules": [{"name": "minis", "match": {"model": "other"}, "requests_per_minute": 1}]}))
        self.assertIsNone(limiter.admit(context(b'{"model":"gpt-4o-mini"}')))  # the new rules: no match
        budget = limiterWith([{"name": "b", "usd_per_day": 1}])
        ctx = context(b'{"model":"gpt-4o-mini","max_tokens":10}')
        budget.admit(ctx)
        assert isinstance(ctx.reservation, Held)
        self.assertGreater(ctx.reservation.nanoUsd, 0)
        budget.prices = PriceTable({})
        ctx = context(b'{"model":"gpt-4o-mini","max_tokens":10}')
        budget.admit(ctx)
        assert isinstance(ctx.reservation, Held)
        self.assertEqual(ctx.reservation.nanoUsd, 0)  # the new table has no price for it

    def test_planCacheIsBounded(self) -> None:
        """Past PLAN_CACHE_SIZE kinds of call the kept plans are cleared, and calls are still judged right."""
        self.patch(limiterModule, "PLAN_CACHE_SIZE", 3)
        limiter = limiterWith([{"name": "r", "per": "key", "requests_per_minute": 1}])
        for i in range(10):
            self.assertIsNone(limiter.admit(context(b"{}", keyId=f"k{i}")))
            self.assertLessEqual(len(limiter._plans), 3)
        for i in range(10):
            self.assertIsInstance(limiter.admit(context(b"{}", keyId=f"k{i}")), Refusal)

    def test_settlementAtTheRecord(self) -> None:
        """The record's total replaces the reservation; a second settle does nothing."""
        clock = Clock()
        store = MemoryStore(clock)
        limiter = limiterWith([{"name": "q", "tokens_per_day": 10000}], store, clock)
        ctx = context(b'{"model":"m","max_tokens":1000}')
        limiter.admit(ctx)
        self.assertEqual(limiter.inflight, {ctx.requestId: store})
        limiter.settle(ctx, 42, None, True)
        limiter.settle(ctx, 42, None, True)
        self.assertEqual(limiter.inflight, {})
        state = self.successResultOf(store.show())[0]
        self.assertEqual((state.used, state.reserved), (42, 0))

    def test_storeUnavailableOpen(self) -> None:
        """open: the call is admitted and counted in this process (limits: local)."""
        limiter = limiterWith([{"name": "r", "requests_per_minute": 1}], FailingStore())
        first = context(b"{}")
        self.assertIsNone(self.successResultOf(limiter.admit(first)))
        self.assertEqual(first.limits, "local")
        second = self.successResultOf(limiter.admit(context(b"{}")))
        assert isinstance(second, Refusal)
        self.assertEqual(second.recordError, "rate_limited")

    def test_storeUnavailableClosed(self) -> None:
        """closed (per rule or for the section): 503 limits_unavailable."""
        limiter = limiterWith([{"name": "r", "requests_per_minute": 1, "on_store_error": "closed"}], FailingStore())
        ctx = context(b"{}")
        refused = self.successResultOf(limiter.admit(ctx))
        assert isinstance(refused, Refusal)
        self.assertEqual((refused.status, refused.recordError, ctx.limitedBy), (503, "limits_unavailable", "r"))
        limiter = limiterWith([{"name": "r", "requests_per_minute": 1}], FailingStore(), on_store_error="closed")
        refused = self.successResultOf(limiter.admit(context(b"{}")))
        assert isinstance(refused, Refusal)
        self.assertEqual(refused.status, 503)

    def test_cancelledWhileTheStoreDecides(self) -> None:
        """
        A client that leaves while the shared store decides cancels the
        admission: the limiter asks the store to release whatever it may
        still admit (a release settlement: no usage, never reached the
        upstream), and the cancellation reaches whoever waited.
        """
        settled: list[Settlement] = []
        pending: Deferred[Any] = Deferred()

        class SlowStore(FailingStore):
            def admit(self, *args: Any) -> Deferred[Any]:
                return pending

            def settle(self, settlement: Settlement) -> None:
                settled.append(settlement)

        limiter = limiterWith([{"name": "r", "requests_per_minute": 5}], SlowStore())
        ctx = context(b"{}")
        waiting = limiter.admit(ctx)
        assert isinstance(waiting, Deferred)
        self.assertEqual(settled, [])
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(settled, [Settlement(ctx.requestId, None, None, False)])
        self.assertIsNone(ctx.reservation)

    def test_durations(self) -> None:
        self.assertEqual([goDuration(s) for s in (0.25, 1, 59.5, 60, 360, 3723)], ["250ms", "1s", "59.5s", "1m0s", "6m0s", "1h2m3s"])

    def test_noRulesCostsNothing(self) -> None:
        limiter = Limiter(LimitsSettings(), MemoryStore(Clock()), Clock())
        self.assertFalse(limiter.active)


class CountersForTests(SynchronousTestCase):
    """`lmgate limits --key/--owner/--rule` name counters by each rule's per."""

    def test_selections(self) -> None:
        from lmgate.limits.cli import countersFor

        limits = parseUsageLimits(
            {
                "rules": [
                    {"name": "k", "per": "key", "requests_per_minute": 1},
                    {"name": "o", "per": "owner", "requests_per_minute": 1},
                    {"name": "all", "per": "rule", "requests_per_minute": 1, "match": {"owner": "team-b"}},
                ]
            }
        )
        owners = {"a1": "team-a", "a2": "team-a", "b1": "team-b"}
        self.assertIsNone(countersFor(limits, owners, None, None, None))
        self.assertEqual(countersFor(limits, owners, "a1", None, None), ["k|key=a1", "o|owner=team-a"])
        self.assertEqual(countersFor(limits, owners, "b1", None, None), ["k|key=b1", "o|owner=team-b", "all|rule"])
        self.assertEqual(countersFor(limits, owners, None, "team-a", None), ["k|key=a1", "k|key=a2", "o|owner=team-a"])
        self.assertEqual(countersFor(limits, owners, None, None, "o"), ["o|owner=team-a", "o|owner=team-b"])


class ReservationShapeTests(SynchronousTestCase):
    """Requests with no body, and embeddings, reserve no output."""

    def test_noBodyNoOutput(self) -> None:
        limiter = limiterWith([{"name": "all", "tokens_per_day": 10**6}])
        ctx = context(b"")
        ctx.rest = b"/v1/models"
        self.assertIsNone(limiter.admit(ctx))
        self.assertEqual(ctx.reservedTokens, 0)

    def test_embeddings(self) -> None:
        limiter = limiterWith([{"name": "all", "tokens_per_day": 10**6}])
        for rest in (b"/v1/embeddings", b"/v1beta/models/text-embedding-004:embedContent", b"/v1beta/models/m:batchEmbedContents",
                     b"/model/amazon.titan-embed-text-v2:0/invoke"):
            ctx = context(b'{"input": "hello world!"}')
            ctx.rest = rest
            self.assertIsNone(limiter.admit(ctx))
            self.assertEqual(ctx.reservedTokens, 7, rest)  # 25 bytes / 4, no output

    def test_bodiesReadOrNot(self) -> None:
        """
        A body is read for its model and output cap when it is a JSON object
        in UTF-8, whitespace before it allowed; anything else reserves the
        default output and names no model (the URL may).
        """
        limiter = limiterWith([{"name": "all", "tokens_per_day": 10**6}], estimate={"output_tokens": 1000})
        for body, output, model in (
            (b' \r\n {"model": "gpt-4o-mini", "max_tokens": 10}', 10, "gpt-4o-mini"),
            (b'{"model": "gpt-4o-mini", "max_tokens": 10, "note": "caf\xe9"}', 1000, None),  # Latin-1, not UTF-8
            (b'{"model": "gpt-4o-mini", "max_tokens": true}', 1000, "gpt-4o-mini"),
            (b'["gpt-4o-mini"]', 1000, None),
        ):
            ctx = context(body)
            self.assertIsNone(limiter.admit(ctx))
            self.assertEqual((ctx.reservedTokens, ctx.requestedModel), (-(-len(body) // 4) + output, model), body)
