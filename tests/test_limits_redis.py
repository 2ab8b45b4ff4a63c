"""
The Redis store for usage limits, against a real C{redis-server} on loopback
(tests/redisserver.py; skipped, saying what to install, when it is missing).
These tests use the real reactor (Redis is a real network service); nothing
sleeps: they wait on Deferreds, or on conditions polled with a bound.
Time is moved with the store's C{timeOffset} (added to Redis's own clock), so
refills, lease expiry and window boundaries need no waiting.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable, Coroutine, Sequence, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.task import Clock
from twisted.internet.interfaces import IReactorTime
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from lmgate.limits.resp import ReplyParser
from lmgate.limits.redis import ADMIT, CLOSED, OPEN, SETTLE, CircuitOpen, RedisSettings, RedisStore, parseRedisUrl
from lmgate.limits.store import NANO, Decision, Figure, ILimitStore, Settlement, StoreUnavailable
from tests.redisserver import RedisServer, skipUnlessRedis, startRedis, waitFor

clock: IReactorTime = reactor

T = TypeVar("T")


def deferred(f: Callable[[Any], Coroutine[Any, Any, None]]) -> Callable[[Any], Deferred[None]]:
    """Run an C{async def} test method as a Deferred (trial waits on it)."""

    @functools.wraps(f)
    def run(self: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(f(self))

    return run


C = "team-a|key=k1"


def rpm(limit: int, counter: str = C) -> Figure:
    return Figure(counter, "team-a", "requests_per_minute", limit)


def tpm(limit: int, counter: str = C) -> Figure:
    return Figure(counter, "team-a", "tokens_per_minute", limit)


def conc(limit: int, counter: str = C) -> Figure:
    return Figure(counter, "team-a", "concurrent", limit)


def tpd(limit: int, counter: str = C) -> Figure:
    return Figure(counter, "team-a", "tokens_per_day", limit)


def usdMonth(limit: int, counter: str = C) -> Figure:
    return Figure(counter, "team-a", "usd_per_month", limit)


class ParseRedisUrlTests(SynchronousTestCase):
    """C{usage_limits.store} URLs become settings, or a ValueError saying what is wrong."""

    def test_forms(self) -> None:
        """Host, port, database, user and password, and TLS with rediss://."""
        self.assertEqual(parseRedisUrl("redis://r1"), RedisSettings("r1", 6379, 0, None, None, False))
        self.assertEqual(parseRedisUrl("redis://10.0.0.5:6380/3"), RedisSettings("10.0.0.5", 6380, 3))
        self.assertEqual(
            parseRedisUrl("rediss://gw:p%40ss@cache.internal:6390/1"),
            RedisSettings("cache.internal", 6390, 1, "gw", "p@ss", True),
        )
        self.assertEqual(parseRedisUrl("redis://:secret@r1/").password, "secret")
        self.assertIsNone(parseRedisUrl("redis://:secret@r1/").username)

    def test_refusals(self) -> None:
        """Each bad URL is refused with a message naming the problem."""
        for url, says in [
            ("http://r1:6379", "redis:// or rediss://"),
            ("memory", "redis:// or rediss://"),
            ("redis://", "names no host"),
            ("redis://r1:99999", "not a Redis URL"),
            ("redis://r1:port", "not a Redis URL"),
            ("redis://r1/zero", "must be a number"),
            ("redis://r1/0?ssl=1", "no ?query"),
            ("redis://r1:0", "1-65535"),
        ]:
            with self.assertRaises(ValueError) as caught:
                parseRedisUrl(url)
            self.assertIn(says, str(caught.exception), url)


class _ScriptedRedis:
    """A Redis client whose answers the test gives: each command waits in C{sent} until answered."""

    def __init__(self) -> None:
        self.sent: list[tuple[tuple[object, ...], Deferred[Any]]] = []

    def execute(self, *args: object) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.sent.append((args, d))
        return d

    def send(self, data: bytes) -> Deferred[Any]:
        (args,) = ReplyParser().feed(data)  # a command is an array of bulk strings
        return self.execute(*args)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def settlements(self) -> list[list[str]]:
        """The request ids of each settle script call sent so far."""
        out = []
        for args, _ in self.sent:
            if args[0] == "EVALSHA" and args[1] == SETTLE.sha:
                out.append([str(a) for a in args[6::4]])
        return out

    def answer(self, index: int, reply: object) -> None:
        self.sent[index][1].callback(reply)


class SettlementBatchingTests(SynchronousTestCase):
    """How settlements are gathered into script calls, on a fake clock and a scripted connection."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.redis = _ScriptedRedis()
        self.store = RedisStore(parseRedisUrl("redis://r1"), self.clock, settleDelay=0.005, connect=lambda: self.redis)
        self.store.startService()
        for i, (args, d) in enumerate(list(self.redis.sent)):
            d.callback("sha")  # SCRIPT LOAD

    def test_admissionArguments(self) -> None:
        """
        An admission sends the prefix, the time offset, the request id, its
        tokens, nano-dollars and lease in milliseconds, then its figures:
        the same arguments whether the request id is ASCII (encoded in one
        format) or not (encoded argument by argument).
        """
        figures = (rpm(5), Figure("r|owner=o", "r", "usd_per_day", 7 * NANO))
        for requestId in ("0123456789abcdef0123456789abcdef", "réq-✓"):
            self.store.admit(requestId, figures, 1050, 1234567, 60.0)
            args, _ = self.redis.sent[-1]
            self.assertEqual(args[:2], ("EVALSHA", ADMIT.sha))
            self.assertEqual(
                list(args[3:]),
                ["lmgate:", "0", requestId, "1050", "1234567", "60000",
                 "2", C, "team-a", "1", "requests_per_minute", "5", "r|owner=o", "r", "1", "usd_per_day", str(7 * NANO)],
            )

    def test_queuedDuringABatchWaitTheDelay(self) -> None:
        """
        Settlements made while a batch is in flight wait the settle delay when it
        is answered, so that steady traffic still shares script calls (sent at
        once, each answer would send the one or two queued meanwhile: a script
        call per settlement).
        """
        self.store.settle(Settlement("a", 1, None, True))
        self.clock.advance(0.005)
        self.assertEqual(self.redis.settlements(), [["a"]])
        self.store.settle(Settlement("b", 1, None, True))
        self.redis.answer(-1, 1)
        self.assertEqual(self.redis.settlements(), [["a"]])  # b waits for others
        self.store.settle(Settlement("c", 1, None, True))
        self.clock.advance(0.005)
        self.assertEqual(self.redis.settlements(), [["a"], ["b", "c"]])
        self.redis.answer(-1, 2)
        self.assertEqual(self.store.queued, 0)

    def test_backlogSentBatchAfterBatch(self) -> None:
        """A backlog of full batches (queued while Redis failed) goes batch after batch without waiting."""
        for i in range(250):
            self.store._enqueue(Settlement(f"r{i}", 1, None, True))
        self.store._flush()
        self.redis.answer(-1, 100)
        self.assertEqual([len(ids) for ids in self.redis.settlements()], [100, 100])
        self.redis.answer(-1, 100)
        self.assertEqual([len(ids) for ids in self.redis.settlements()], [100, 100])  # 50 left: they wait the delay
        self.clock.advance(0.005)
        self.assertEqual([len(ids) for ids in self.redis.settlements()], [100, 100, 50])

    def test_deadlines(self) -> None:
        """
        Each call fails at its own deadline (the store's timeout after it was
        made) if Redis has not answered by then, and not before; answered calls
        are untouched; once the store stops, no timer is left.
        """
        store = RedisStore(parseRedisUrl("redis://r1"), self.clock, timeout=0.1, connect=lambda: self.redis)
        store.startService()
        for _, d in self.redis.sent:
            if not d.called:
                d.callback("sha")
        sent = len(self.redis.sent)
        first = store.admit("a", [rpm(5)], 1, 0, 60)
        self.clock.advance(0.06)
        second = store.admit("b", [rpm(5)], 1, 0, 60)
        third = store.admit("c", [rpm(5)], 1, 0, 60)
        self.redis.answer(sent + 2, "1")  # c answered in time
        self.assertEqual([args[1] for args, _ in self.redis.sent[sent:]], [ADMIT.sha] * 3)
        self.clock.advance(0.039)
        self.assertNoResult(first)
        self.clock.advance(0.001)
        self.failureResultOf(first, StoreUnavailable)
        self.assertNoResult(second)
        self.assertTrue(self.successResultOf(third).admitted)
        self.clock.advance(0.059)
        self.assertNoResult(second)
        self.clock.advance(0.001)
        self.assertIn("did not answer within 0.1 s", self.failureResultOf(second, StoreUnavailable).getErrorMessage())
        self.assertEqual(store.failures, 2)
        stopped = gatherResults([store.stopService(), self.store.stopService()])
        for _, d in self.redis.sent:
            if not d.called:
                d.callback(0)  # the releases of a and b, sent when stopping
        self.successResultOf(stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadlineOfACallMadeWhileOthersExpire(self) -> None:
        """A call made by a timed-out call's callbacks (its release) gets a deadline of its own."""
        store = RedisStore(parseRedisUrl("redis://r1"), self.clock, timeout=0.1, settleDelay=0.005, connect=lambda: self.redis)
        store.startService()
        for _, d in self.redis.sent:
            if not d.called:
                d.callback("sha")
        admitted = store.admit("a", [rpm(5)], 1, 0, 60)
        self.clock.advance(0.1)
        self.failureResultOf(admitted, StoreUnavailable)
        self.assertEqual(store.queued, 1)  # its release waits for the retry
        self.clock.advance(1.0)  # the retry sends it
        self.assertEqual(self.redis.settlements(), [["a"]])
        self.clock.advance(0.1)
        self.assertEqual(store.failures, 2)  # the release timed out too
        self.assertEqual(store.queued, 1)

    def test_stopSendsEverything(self) -> None:
        """Stopping sends every queued settlement, batch after batch, whatever the size of the last."""
        for i in range(150):
            self.store._enqueue(Settlement(f"r{i}", 1, None, True))
        stopped = self.store.stopService()
        self.redis.answer(-1, 100)
        self.assertEqual([len(ids) for ids in self.redis.settlements()], [100, 50])
        self.redis.answer(-1, 50)
        self.assertEqual(self.store.queued, 0)
        self.successResultOf(stopped)


class RedisCase(TestCase):
    """A fresh redis-server per test, and stores on it stopped in cleanup."""

    timeout = 60

    def setUp(self) -> None:
        self.server = startRedis(self)

    def store(self, server: RedisServer | None = None, **kwargs: Any) -> RedisStore:
        store = RedisStore(parseRedisUrl((server or self.server).url), clock, **kwargs)
        store.startService()
        self.addCleanup(store.stopService)
        return store

    def assertNear(self, first: float, second: float, delta: float) -> None:
        """C{first} is within C{delta} of C{second}."""
        self.assertTrue(abs(first - second) <= delta, f"{first} is not within {delta} of {second}")

    async def admitted(self, store: RedisStore, requestId: str, figures: Sequence[Figure], tokens: int = 0, nanoUsd: int = 0, lease: float = 60) -> Decision:
        result = store.admit(requestId, figures, tokens, nanoUsd, lease)
        assert isinstance(result, Deferred)
        return await result

    async def states(self, store: RedisStore, counter: str = C) -> dict[str, tuple[int, int, int]]:
        return {s.figure.kind: (s.used, s.reserved, s.remaining) for s in await store.show([counter])}

    async def settled(self, store: RedisStore, *settlements: Settlement) -> None:
        for s in settlements:
            store.settle(s)
        await waitFor(clock, lambda: store.queued == 0)
        await store.show([C])  # after the settlements on the same connection


@skipUnlessRedis
class SemanticsTests(RedisCase):
    """Every semantic of lmgate/limits/store.py, on a real Redis."""

    def test_interface(self) -> None:
        """RedisStore provides ILimitStore and says its counters are shared."""
        store = self.store()
        self.assertTrue(verifyObject(ILimitStore, store))
        self.assertTrue(store.shared)

    @deferred
    async def test_burstAdmitsExactlyTheLimit(self) -> None:
        """3N concurrent admissions on a fresh counter with requests_per_minute N: exactly N admitted."""
        store = self.store()
        n = 7
        decisions = await gatherResults([store.admit(f"q{i}", [rpm(n)], 10, 0, 60) for i in range(3 * n)])
        self.assertEqual(sum(d.admitted for d in decisions), n)
        refused = [d for d in decisions if not d.admitted]
        self.assertEqual({d.refusedBy for d in refused}, {rpm(n)})
        for d in refused:
            assert d.retryAfter is not None
            self.assertTrue(0 < d.retryAfter <= 60 / n + 0.001, d.retryAfter)  # whole milliseconds, rounded up

    @deferred
    async def test_refill(self) -> None:
        """The bucket refills at limit / 60 per second: 12 s later one more request of 5/min fits, not two."""
        now, later = self.store(), self.store(timeOffset=12.5)
        for i in range(5):
            self.assertTrue((await self.admitted(now, f"a{i}", [rpm(5)])).admitted)
        self.assertFalse((await self.admitted(now, "a5", [rpm(5)])).admitted)
        self.assertTrue((await self.admitted(later, "b0", [rpm(5)])).admitted)
        self.assertFalse((await self.admitted(later, "b1", [rpm(5)])).admitted)

    @deferred
    async def test_windowQuota(self) -> None:
        """A window admits while used + reserved + the reservation fits; a refusal says to retry at the window's end."""
        store = self.store()
        self.assertTrue((await self.admitted(store, "a", [tpd(1000)], tokens=600)).admitted)
        refused = await self.admitted(store, "b", [tpd(1000)], tokens=401)
        self.assertFalse(refused.admitted)
        assert refused.retryAfter is not None
        secondsToMidnight = 86400 - time.time() % 86400
        self.assertNear(refused.retryAfter, secondsToMidnight, delta=5)
        self.assertEqual(refused.states[0].reset, refused.retryAfter)
        self.assertEqual((refused.states[0].used, refused.states[0].reserved, refused.states[0].remaining), (0, 600, 400))
        self.assertTrue((await self.admitted(store, "c", [tpd(1000)], tokens=400)).admitted)

    @deferred
    async def test_concurrencyLeases(self) -> None:
        """concurrent: K admits K calls in flight; a settlement frees a lease; a lease expires on its own unless renewed."""
        store = self.store()
        for rid in ("a", "b"):
            self.assertTrue((await self.admitted(store, rid, [conc(2)], lease=5)).admitted)
        third = await self.admitted(store, "c", [conc(2)], lease=5)
        self.assertEqual((third.admitted, third.refusedBy, third.retryAfter), (False, conc(2), None))
        self.assertNear(third.states[0].reset, 5, delta=1)
        await self.settled(store, Settlement("a", 10, None, True))
        self.assertTrue((await self.admitted(store, "c", [conc(2)], lease=5)).admitted)
        # 6 s later the leases of b and c have expired, unless renewed: renew c only.
        store.renew(["c"], 30)
        await store.show([C])
        later = self.store(timeOffset=6)
        self.assertEqual((await self.states(later))["concurrent"], (1, 0, 1))
        self.assertTrue((await self.admitted(later, "d", [conc(2)], lease=5)).admitted)
        self.assertFalse((await self.admitted(later, "e", [conc(2)], lease=5)).admitted)

    @deferred
    async def test_lapsedLeasesPrunedOffThePath(self) -> None:
        """
        Admissions read the lease set's size as last counted (never less than
        its live leases) and count the live leases only when a call would not
        fit by it; the lapsed leases of calls nobody will settle (an instance
        died) are removed then, and by every settlement and renewal on the
        counter, so the lease set does not grow with them.
        """
        store = self.store()
        later = self.store(timeOffset=6)  # past the leases of 5 s that store makes

        def size() -> bytes:
            return self.server.command("ZCARD", f"lmgate:c:{C}")

        for rid in ("dead1", "dead2"):
            await self.admitted(store, rid, [conc(3)], lease=5)
        self.assertTrue((await self.admitted(later, "a", [conc(3)], lease=5)).admitted)
        self.assertEqual(size(), b":3\r\n")  # it fit by the count: nothing counted again
        self.assertTrue((await self.admitted(later, "b", [conc(3)], lease=5)).admitted)
        self.assertEqual(size(), b":2\r\n")  # it did not fit by the count: the lapsed leases removed, a and b
        await self.admitted(store, "dead3", [conc(3)], lease=5)
        await self.settled(later, Settlement("a", 1, None, True))
        self.assertEqual(size(), b":1\r\n")  # a's given back, dead3's removed: b's
        await self.admitted(store, "dead4", [conc(3)], lease=5)
        later.renew(["b"], 5)
        await later.show([C])  # after the renewal, on the same connection
        self.assertEqual(size(), b":1\r\n")
        for rid in ("c", "d"):
            self.assertTrue((await self.admitted(later, rid, [conc(3)], lease=5)).admitted)
        refused = await self.admitted(later, "e", [conc(3)], lease=5)
        self.assertEqual((refused.admitted, refused.states[0].used), (False, 3))  # b, c, d
        self.assertEqual(size(), b":3\r\n")

    @deferred
    async def test_leaseSetAlwaysExpires(self) -> None:
        """
        The lease set keeps an expiry however it comes and goes: made, emptied
        by the settlements (Redis deletes an empty set) and made again, and
        after a lapsed lease's renewal found the set gone.
        """
        store = self.store()
        key = f"lmgate:c:{C}"

        def ttl() -> int:
            return int(self.server.command("PTTL", key).strip(b":\r\n"))

        await self.admitted(store, "a", [conc(3)], lease=30)
        self.assertTrue(60_000 < ttl() <= 61_000)
        await self.settled(store, Settlement("a", 1, None, True))
        self.assertEqual(ttl(), -2)  # gone with its last lease
        await self.admitted(store, "b", [conc(3)], lease=30)
        self.assertTrue(60_000 < ttl() <= 61_000)
        later = self.store(timeOffset=40)
        later.renew(["b"], 30)  # b's lease lapsed: removed, and the set with it
        await later.show([C])
        self.assertEqual(ttl(), -2)
        await self.admitted(later, "c", [conc(3)], lease=30)
        self.assertTrue(60_000 < ttl() <= 61_000)

    @deferred
    async def test_settlementsInOneBatch(self) -> None:
        """
        Settlements sent together (one script, each counter read and written
        once) leave every figure as one by one would, in order; a request id
        twice in a batch is applied once.
        """
        figures = [tpm(10_000), conc(5), tpd(50_000), usdMonth(NANO)]
        ones, batched = self.store(), self.store(prefix="batched:")
        settlements = [Settlement("a", 30, NANO // 100, True), Settlement("b", None, None, True),
                       Settlement("c", 5000, None, True), Settlement("a", 999, None, True), Settlement("d", None, None, False)]
        for store in (ones, batched):
            for rid in "abcd":
                self.assertTrue((await self.admitted(store, rid, figures, tokens=400, nanoUsd=NANO // 10)).admitted)
        for s in settlements:
            await self.settled(ones, s)
        for s in settlements:
            batched.settle(s)
        self.assertEqual(batched.queued, 5)
        await waitFor(clock, lambda: batched.queued == 0)
        one, other = await self.states(ones), await self.states(batched)
        # the buckets refill meanwhile (10,000 a minute: a few tokens in the moments between)
        self.assertNear(other.pop("tokens_per_minute")[0], one["tokens_per_minute"][0], delta=100)
        self.assertEqual(other, {k: v for k, v in one.items() if k != "tokens_per_minute"})
        self.assertEqual(one["tokens_per_day"], (30 + 400 + 5000, 0, 50_000 - 5430))
        spent = NANO // 100 + 2 * (NANO // 10)  # b and c answered without a cost: they keep what they reserved
        self.assertEqual(one["usd_per_month"], (spent, 0, NANO - spent))
        self.assertEqual(one["concurrent"], (0, 0, 5))
        self.assertNear(one["tokens_per_minute"][0], 5430, delta=100)

    @deferred
    async def test_earlierLayoutReservationsIgnored(self) -> None:
        """A reservation of the earlier key layout (a hash) is not this layout's: its settlement applies nothing, and fails nothing."""
        store = self.store()
        self.server.command("HSET", "lmgate:r:old", C, "tokens_per_day|100|1000|2026-01-01")
        await self.settled(store, Settlement("old", 10, None, True))
        self.assertEqual(store.failures, 0)
        self.assertEqual(self.server.command("TYPE", "lmgate:r:old"), b"+hash\r\n")

    @deferred
    async def test_stateExpiryKeptInTheState(self) -> None:
        """
        A counter's state records when it expires (x) and is extended only
        when a figure needs it to last longer: a bucket taken from an hour
        later pushes it out; an admission within its span does not.
        """
        store, later = self.store(), self.store(timeOffset=3600)

        def expires() -> int:
            reply = self.server.command("HGET", f"lmgate:s:{C}", "x")
            return int(reply.split(b"\r\n")[1])

        await self.admitted(store, "a", [rpm(60)])
        first = expires()
        await self.admitted(store, "b", [rpm(60)])
        self.assertEqual(expires(), first)  # still far enough
        await self.admitted(later, "c", [rpm(60)])
        self.assertGreaterEqual(expires(), first + 3600_000)
        self.assertTrue(60_000 < int(self.server.command("PTTL", f"lmgate:s:{C}").strip(b":\r\n")) <= 63_000)

    @deferred
    async def test_allOrNothing(self) -> None:
        """A refusal by one figure leaves every other figure untouched, and names the first that refused."""
        store = self.store()
        other = "team-b|owner=b"
        figures = [rpm(10), tpm(1000, other), tpd(100), conc(3, other)]
        refused = await self.admitted(store, "a", figures, tokens=101)
        self.assertEqual((refused.admitted, refused.refusedBy), (False, tpd(100)))
        self.assertEqual(await store.show([C, other]), [])  # nothing was counted, not even the figures
        ok = await self.admitted(store, "b", figures, tokens=100)
        self.assertTrue(ok.admitted)
        self.assertEqual(await self.states(store), {"requests_per_minute": (1, 0, 9), "tokens_per_day": (0, 100, 0)})
        self.assertEqual(await self.states(store, other), {"tokens_per_minute": (100, 0, 900), "concurrent": (1, 0, 2)})
        refused = await self.admitted(store, "c", figures, tokens=1)
        self.assertEqual(refused.refusedBy, tpd(100))
        self.assertEqual(await self.states(store), {"requests_per_minute": (1, 0, 9), "tokens_per_day": (0, 100, 0)})
        self.assertEqual((await self.states(store, other))["concurrent"], (1, 0, 2))

    @deferred
    async def test_settlementWithUsage(self) -> None:
        """Real tokens and dollars replace the reservation: in the windows and in the token bucket."""
        store = self.store()
        figures = [rpm(10), tpm(1000), tpd(5000), usdMonth(NANO)]
        await self.admitted(store, "a", figures, tokens=800, nanoUsd=NANO // 2)
        await self.settled(store, Settlement("a", 300, NANO // 10, True))
        s = await self.states(store)
        self.assertEqual(s["tokens_per_day"], (300, 0, 4700))
        self.assertEqual(s["usd_per_month"], (NANO // 10, 0, NANO - NANO // 10))
        self.assertEqual(s["tokens_per_minute"][0], 300)
        self.assertEqual(s["requests_per_minute"][0], 1)  # requests are never given back

    @deferred
    async def test_settlementOverReservation(self) -> None:
        """More used than reserved: the windows count it all, the bucket goes below zero and refuses until refilled."""
        store = self.store()
        await self.admitted(store, "a", [tpm(600), tpd(5000)], tokens=100)
        await self.settled(store, Settlement("a", 1200, None, True))
        s = await self.states(store)
        self.assertEqual(s["tokens_per_day"], (1200, 0, 3800))
        self.assertEqual(s["tokens_per_minute"][0], 1200)
        refused = await self.admitted(store, "b", [tpm(600)], tokens=1)
        assert refused.retryAfter is not None
        self.assertNear(refused.retryAfter, 60, delta=1)  # 600 tokens of debt at 10/s, then 1 token

    @deferred
    async def test_settlementNoUsageReachedUpstream(self) -> None:
        """No usage but the upstream answered: the reservation is kept as the use."""
        store = self.store()
        await self.admitted(store, "a", [tpm(1000), tpd(5000), conc(2)], tokens=700)
        await self.settled(store, Settlement("a", None, None, True))
        s = await self.states(store)
        self.assertEqual((s["tokens_per_day"], s["tokens_per_minute"][0], s["concurrent"]), ((700, 0, 4300), 700, (0, 0, 2)))

    @deferred
    async def test_settlementNeverReachedUpstream(self) -> None:
        """No usage and the upstream never answered: released (bucket tokens back; the request stays counted)."""
        store = self.store()
        await self.admitted(store, "a", [rpm(5), tpm(1000), tpd(5000), usdMonth(NANO)], tokens=700, nanoUsd=5000)
        await self.settled(store, Settlement("a", None, None, False))
        s = await self.states(store)
        self.assertEqual(s["tokens_per_day"], (0, 0, 5000))
        self.assertEqual(s["usd_per_month"], (0, 0, NANO))
        self.assertEqual(s["tokens_per_minute"][0], 0)
        self.assertEqual(s["requests_per_minute"][0], 1)

    @deferred
    async def test_settlementOfAZeroReservation(self) -> None:
        """A window figure reserved with 0 (a budget when the model has no price) settles: the script's
        HINCRBY never gets Lua's "-0", which Redis refuses as no integer (the whole settlement failed)."""
        store = self.store()
        await self.admitted(store, "a", [tpd(5000), usdMonth(NANO)], tokens=100, nanoUsd=0)
        await self.settled(store, Settlement("a", 60, None, True))
        self.assertEqual(await self.states(store), {"tokens_per_day": (60, 0, 4940), "usd_per_month": (0, 0, NANO)})
        self.assertEqual(store.failures, 0)

    @deferred
    async def test_settleIsIdempotent(self) -> None:
        """A second settlement of the same request id changes nothing; an unknown id is a no-op."""
        store = self.store()
        await self.admitted(store, "a", [tpd(5000), conc(1)], tokens=100)
        await self.settled(store, Settlement("a", 40, None, True), Settlement("a", 4000, None, True), Settlement("nobody", 9, 9, True))
        self.assertEqual(await self.states(store), {"tokens_per_day": (40, 0, 4960), "concurrent": (0, 0, 1)})

    @deferred
    async def test_settlementStraddlingMidnight(self) -> None:
        """A call reserved before midnight settles into that day's window, not the next one's."""
        today, tomorrow = self.store(), self.store(timeOffset=86400)
        await self.admitted(today, "a", [tpd(1000)], tokens=500)
        await self.settled(tomorrow, Settlement("a", 200, None, True))
        self.assertEqual(await self.states(today), {"tokens_per_day": (200, 0, 800)})
        self.assertEqual(await self.states(tomorrow), {"tokens_per_day": (0, 0, 1000)})

    @deferred
    async def test_settlementAfterTheNextDayBegan(self) -> None:
        """
        Once the next day has begun counting, a call reserved the day before
        settles nowhere: the new day's window neither gains its usage nor loses
        its reservation (the old day is no longer counted against anything).
        """
        today, tomorrow = self.store(), self.store(timeOffset=86400)
        await self.admitted(today, "a", [tpd(1000)], tokens=500)
        await self.admitted(tomorrow, "b", [tpd(1000)], tokens=300)
        await self.settled(tomorrow, Settlement("a", 200, None, True))
        self.assertEqual(await self.states(tomorrow), {"tokens_per_day": (0, 300, 700)})
        await self.settled(tomorrow, Settlement("b", 100, None, True))
        self.assertEqual(await self.states(tomorrow), {"tokens_per_day": (100, 0, 900)})

    @deferred
    async def test_calendarWindows(self) -> None:
        """Windows are UTC calendar days and months (a leap day; its month ends on 1 March)."""
        leapNoon = 1709208000  # 2024-02-29T12:00:00Z
        store = self.store(timeOffset=leapNoon - time.time())
        self.assertTrue((await self.admitted(store, "a", [tpd(10), usdMonth(10)], tokens=1, nanoUsd=1)).admitted)
        resets = {s.figure.kind: s.reset for s in await store.show([C])}
        self.assertNear(resets["tokens_per_day"], 12 * 3600, delta=5)
        self.assertNear(resets["usd_per_month"], 12 * 3600, delta=5)
        self.assertEqual(self.server.command("HGET", f"lmgate:s:{C}", "tokens_per_day.w"), b"$10\r\n2024-02-29\r\n")
        self.assertEqual(self.server.command("HGET", f"lmgate:s:{C}", "usd_per_month.w"), b"$7\r\n2024-02\r\n")
        newYear = 1735646400  # 2024-12-31T12:00:00Z
        store = self.store(timeOffset=newYear - time.time())
        self.assertTrue((await self.admitted(store, "b", [usdMonth(10)], nanoUsd=1)).admitted)
        resets = {s.figure.kind: s.reset for s in await store.show([C])}
        self.assertNear(resets["usd_per_month"], 12 * 3600, delta=5)
        self.assertEqual(self.server.command("HGET", f"lmgate:s:{C}", "usd_per_month.w"), b"$7\r\n2024-12\r\n")

    @deferred
    async def test_showAndResetWithoutConfig(self) -> None:
        """show() finds every counter (SCAN) with its figures as last admitted; reset() forgets them."""
        store = self.store()
        await self.admitted(store, "a", [rpm(5), tpd(100, "x|rule")], tokens=10)
        await self.admitted(store, "b", [rpm(6)], tokens=10)
        shown = await self.store().show(None)
        self.assertEqual(
            sorted((s.figure.counter, s.figure.kind, s.figure.limit, s.used, s.reserved) for s in shown),
            [(C, "requests_per_minute", 6, 2, 0), ("x|rule", "tokens_per_day", 100, 0, 10)],
        )
        self.assertEqual(await store.reset([C, "nothing"]), 1)
        self.assertEqual([s.figure.counter for s in await store.show(None)], ["x|rule"])
        self.assertTrue((await self.admitted(store, "c", [rpm(1)])).admitted)  # a fresh, full bucket

    @deferred
    async def test_figuresWrittenAgainWhenGone(self) -> None:
        """
        A counter's figures (what show and reset read) are written by the first
        admission, then again at once where they are gone (after a reset, or a
        field removed) or changed (the rule's limit changed).
        """
        store = self.store()
        await self.admitted(store, "a", [rpm(5)])
        await self.admitted(store, "b", [rpm(5)])  # figures as written: not written again
        self.assertEqual([(s.figure.limit, s.used) for s in await store.show([C])], [(5, 2)])
        await store.reset([C])
        self.assertEqual(await store.show([C]), [])
        await self.admitted(store, "c", [rpm(5)])
        self.assertEqual([(s.figure.limit, s.used) for s in await store.show([C])], [(5, 1)])
        self.server.command("HDEL", f"lmgate:s:{C}", "requests_per_minute.f")  # gone (an operator's hand)
        await self.admitted(store, "d", [rpm(5)])
        self.assertEqual([(s.figure.limit, s.used) for s in await store.show([C])], [(5, 2)])
        await self.admitted(store, "e", [rpm(9)])  # the rule changed on reload
        self.assertEqual([(s.figure.limit, s.used) for s in await store.show([C])], [(9, 3)])

    @deferred
    async def test_settlementsShareOneScriptCall(self) -> None:
        """
        Settlements made within the settle delay go to Redis in one script call,
        in order, even when an admission is answered meanwhile (its answer does
        not send the batch early).
        """
        store = self.store(settleDelay=0.5)
        for rid in "abc":
            await self.admitted(store, rid, [tpd(1000)], tokens=100)
        self.server.command("CONFIG", "RESETSTAT")
        store.settle(Settlement("a", 10, None, True))
        await self.admitted(store, "d", [tpd(1000)], tokens=100)
        store.settle(Settlement("b", 20, None, True))
        store.settle(Settlement("c", 30, None, True))
        await waitFor(clock, lambda: store.queued == 0)
        stats = self.server.command("INFO", "commandstats")
        calls = int(stats.split(b"cmdstat_evalsha:calls=")[1].split(b",")[0])
        self.assertEqual(calls, 2)  # the admission of d, and one settlement call
        self.assertEqual(await self.states(store), {"tokens_per_day": (60, 100, 840)})

    @deferred
    async def test_prefixesAreSeparate(self) -> None:
        """Two gateways with different prefixes on one Redis database never see each other's counters."""
        one, two = self.store(), self.store(prefix="other:")
        await self.admitted(one, "a", [rpm(1)])
        self.assertTrue((await self.admitted(two, "a", [rpm(1)])).admitted)
        self.assertEqual(len(await two.show(None)), 1)

    @deferred
    async def test_keysExpireWhenIdle(self) -> None:
        """Every key the store writes has an expiry fitting its kind."""
        store = self.store()
        await self.admitted(store, "a", [rpm(60), conc(2), tpd(100)], tokens=1, lease=30)
        await self.admitted(store, "b", [rpm(60, "bucket-only")])
        await self.admitted(store, "c", [conc(2, "leases-only")], lease=30)

        def ttl(key: str) -> int:
            return int(self.server.command("PTTL", key).strip(b":\r\n"))

        # a counter's state lives as long as its longest-lived figure (the day window
        # here), with a minute to spare, so that it is extended about once a minute
        self.assertTrue(3600_000 < ttl(f"lmgate:s:{C}") <= 86400_000 + 3600_000 + 60_000)
        self.assertTrue(60_000 < ttl("lmgate:s:bucket-only") <= 62_000)  # one request of 60/min refills in 1 s
        self.assertTrue(90_000 < ttl("lmgate:s:leases-only") <= 91_000)
        self.assertTrue(60_000 < ttl(f"lmgate:c:{C}") <= 61_000)  # two leases of 30 s
        self.assertTrue(86400_000 < ttl("lmgate:r:a") <= 2 * 86400_000)
        keys = {k for k in self.server.command("KEYS", "lmgate:*").split(b"\r\n")[2::2] if k}
        self.assertEqual(keys, {f"lmgate:s:{C}".encode(), f"lmgate:c:{C}".encode(), b"lmgate:r:a", b"lmgate:s:bucket-only",
                                b"lmgate:s:leases-only", b"lmgate:c:leases-only", b"lmgate:r:c"})

    @deferred
    async def test_twoStoresNeverOverAdmit(self) -> None:
        """Two stores (two connections, as two gateways) admitting at once: 3N tries, exactly N admitted."""
        one, two = self.store(), self.store()
        n = 20
        tries = [(one if i % 2 else two).admit(f"q{i}", [rpm(n), conc(n)], 1, 0, 60) for i in range(3 * n)]
        decisions = await gatherResults(tries)
        self.assertEqual(sum(d.admitted for d in decisions), n)


@skipUnlessRedis
class FaultTests(RedisCase):
    """Scripts reload, deadlines hold, the breaker opens and closes, settlements wait and are applied in order."""

    @deferred
    async def test_noScriptAfterFlush(self) -> None:
        """After SCRIPT FLUSH the next call runs the script by EVAL, and it is cached again."""
        store = self.store()
        await self.admitted(store, "a", [rpm(5)])
        self.server.command("SCRIPT", "FLUSH")
        self.assertTrue((await self.admitted(store, "b", [rpm(5)])).admitted)
        self.assertEqual(self.server.command("SCRIPT", "EXISTS", "x"), b"*1\r\n:0\r\n")
        self.assertEqual((await self.states(store))["requests_per_minute"][0], 2)

    @deferred
    async def test_redisRestarted(self) -> None:
        """Redis restarted (empty, no scripts): the store reconnects and runs its scripts again, no restart of its own."""
        store = self.store(timeout=1.0)
        await self.admitted(store, "a", [rpm(5)])
        self.server.restart()

        async def answers() -> Decision:
            last: Exception | None = None
            for _ in range(100):  # bounded: reconnecting takes at most ~1 s
                try:
                    return await self.admitted(store, "b", [rpm(5)])
                except StoreUnavailable as e:
                    last = e
                    await waitFor(clock, lambda: False, 0.05).addErrback(lambda f: None)
            raise AssertionError(f"no answer after restart: {last}")

        self.assertTrue((await answers()).admitted)
        self.assertEqual((await self.states(store))["requests_per_minute"][0], 1)

    @deferred
    async def test_hungRedisTimesOut(self) -> None:
        """A hung Redis (SIGSTOP): an admission fails with StoreUnavailable within the timeout, plus a margin."""
        store = self.store(timeout=0.2)
        await self.admitted(store, "a", [rpm(5)])
        self.server.hang()
        self.addCleanup(lambda: self.server.resume() if self.server.stopped else None)
        errors: list[str] = []
        store.observeError = errors.append
        started = clock.seconds()
        with self.assertRaises(StoreUnavailable) as caught:
            await self.admitted(store, "b", [rpm(5)])
        self.assertLess(clock.seconds() - started, 0.2 + 0.5)
        self.assertIn("did not answer within 0.2 s", str(caught.exception))
        self.assertEqual(errors, ["timeout"])

    @deferred
    async def test_redisGone(self) -> None:
        """Redis killed: an admission fails with StoreUnavailable within the timeout; a settlement waits in the queue."""
        store = self.store(timeout=0.2)
        await self.admitted(store, "a", [rpm(5)])
        self.server.kill()
        started = clock.seconds()
        with self.assertRaises(StoreUnavailable):
            await self.admitted(store, "b", [rpm(5)])
        self.assertLess(clock.seconds() - started, 0.2 + 0.5)
        store.settle(Settlement("a", 1, None, True))
        await waitFor(clock, lambda: store.queued == 2)  # the settlement, and the release of the unanswered admission

    @deferred
    async def test_breakerOpensAndCloses(self) -> None:
        """After 5 failures in a row the store stops calling Redis (at once: circuit open); a probe after the cool-off closes it."""
        store = self.store(timeout=0.1, coolOff=0.5)
        latencies: list[float] = []
        store.observeLatency = latencies.append
        await self.admitted(store, "a", [rpm(100)])
        self.assertEqual((store.circuitState, len(latencies)), (CLOSED, 1))
        self.server.hang()
        self.addCleanup(lambda: self.server.resume() if self.server.stopped else None)
        for i in range(5):
            with self.assertRaises(StoreUnavailable):
                await self.admitted(store, f"f{i}", [rpm(100)])
        self.assertEqual((store.circuitState, store.failures), (OPEN, 5))
        started = clock.seconds()
        with self.assertRaises(StoreUnavailable) as caught:
            await self.admitted(store, "x", [rpm(100)])
        self.assertIsInstance(caught.exception, CircuitOpen)
        self.assertLess(clock.seconds() - started, 0.05)
        self.assertEqual(store.failures, 5)  # not even tried
        # still hung after the cool-off: the probe fails and the circuit opens for longer
        await waitFor(clock, lambda: clock.seconds() >= started + 0.5)
        with self.assertRaises(StoreUnavailable):
            await self.admitted(store, "p1", [rpm(100)])
        self.assertEqual((store.circuitState, store.failures), (OPEN, 6))
        self.server.resume()
        await waitFor(clock, lambda: clock.seconds() >= store._openUntil, timeout=5)  # 1 s: doubled
        self.assertTrue((await self.admitted(store, "p2", [rpm(100)])).admitted)
        self.assertEqual(store.circuitState, CLOSED)

    @deferred
    async def test_queuedSettlementsAppliedInOrder(self) -> None:
        """Settlements made while Redis hangs wait in the queue and are applied, in order, once it answers."""
        store = self.store(timeout=0.1, coolOff=0.2, retryInterval=0.1)
        await self.admitted(store, "a", [tpd(5000), conc(3)], tokens=100)
        await self.admitted(store, "b", [tpd(5000), conc(3)], tokens=100)
        self.server.hang()
        self.addCleanup(lambda: self.server.resume() if self.server.stopped else None)
        store.settle(Settlement("a", 10, None, True))
        await waitFor(clock, lambda: store.queued == 1)  # failed (timeout), then queued
        store.settle(Settlement("a", 999, None, True))  # behind it: a no-op once the first is applied
        store.settle(Settlement("b", 20, None, True))
        self.assertEqual(store.queued, 3)
        self.server.resume()
        await waitFor(clock, lambda: store.queued == 0)
        self.assertEqual(await self.states(store), {"tokens_per_day": (30, 0, 4970), "concurrent": (0, 0, 3)})

    @deferred
    async def test_stopAppliesTheQueue(self) -> None:
        """Stopping the store applies what is still queued (Redis answering again), so stopping LMGate loses no settlement."""
        store = RedisStore(parseRedisUrl(self.server.url), clock, timeout=0.1, retryInterval=100)
        store.startService()
        await self.admitted(store, "a", [tpd(5000)], tokens=100)
        self.server.hang()
        store.settle(Settlement("a", 10, None, True))
        await waitFor(clock, lambda: store.queued == 1)
        self.server.resume()
        await store.stopService()
        self.assertEqual(await self.states(self.store()), {"tokens_per_day": (10, 0, 4990)})

    def test_queueIsBounded(self) -> None:
        """Beyond its limit the queue drops the oldest settlement and counts it."""
        store = RedisStore(RedisSettings("127.0.0.1"), clock, queueLimit=2)
        for rid in "abc":
            store.settle(Settlement(rid, 1, None, True))  # not started: queued
        self.assertEqual(([s.requestId for s in store._queue], store.droppedSettlements), (["b", "c"], 1))

    @deferred
    async def test_cancelledAdmissionsLeaveTheConnection(self) -> None:
        """Admissions cancelled while Redis works on them (clients that left) are no Redis failures: they
        used to count as such, so a load generator stopping opened the circuit and calls went local."""
        store = self.store()
        await self.admitted(store, "warm", [rpm(1000)])
        pending = [store.admit(f"c{i}", [rpm(1000)], 0, 0, 60) for i in range(20)]
        survivors = [store.admit(f"s{i}", [rpm(1000)], 0, 0, 60) for i in range(5)]
        for d in pending:
            d.addErrback(lambda f: None)
            d.cancel()
        decisions = await gatherResults(survivors)
        self.assertTrue(all(d.admitted for d in decisions))
        self.assertEqual(store.failures, 0)
        self.assertEqual(store.circuitState, "closed")

    @deferred
    async def test_unansweredAdmissionReleased(self) -> None:
        """An admission that timed out but ran later is released: its lease and reservation do not linger."""
        store = self.store(timeout=0.1, retryInterval=0.1)
        self.server.hang()
        with self.assertRaises(StoreUnavailable):
            await self.admitted(store, "a", [tpd(5000), conc(1)], tokens=100)
        self.assertEqual(store.queued, 1)
        self.server.resume()
        await waitFor(clock, lambda: store.queued == 0)
        self.assertEqual(await self.states(store), {"tokens_per_day": (0, 0, 5000), "concurrent": (0, 0, 1)})


@skipUnlessRedis
class TLSTests(TestCase):
    """rediss:// speaks TLS and checks the server's certificate."""

    timeout = 60

    @deferred
    async def test_rediss(self) -> None:
        """Admissions work over TLS with the server's certificate trusted; an untrusted one is refused."""
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        from tests.test_daemon import makeCertificate

        directory = os.path.abspath(self.mktemp())  # redis-server changes directory before reading them
        os.makedirs(directory)
        keyPath, certPath = makeCertificate(directory)
        server = startRedis(self, tls=(keyPath, certPath))
        self.assertTrue(server.url.startswith("rediss://"))
        with open(certPath, "rb") as f:
            trusted = optionsForClientTLS("127.0.0.1", trustRoot=Certificate.loadPEM(f.read()))
        store = RedisStore(parseRedisUrl(server.url), clock, timeout=2.0, tlsOptions=trusted)
        store.startService()
        self.addCleanup(store.stopService)
        result = store.admit("a", [rpm(1)], 0, 0, 60)
        assert isinstance(result, Deferred)
        self.assertTrue((await result).admitted)
        untrusting = RedisStore(parseRedisUrl(server.url), clock, timeout=0.5)  # the system's roots
        self.addCleanup(untrusting.stopService)
        untrusting.startService()
        refused = untrusting.admit("b", [rpm(1)], 0, 0, 60)
        assert isinstance(refused, Deferred)
        with self.assertRaises(StoreUnavailable):
            await refused


@skipUnlessRedis
class CommandLineTests(RedisCase):
    """`lmgate limits show|reset` read and reset a Redis store's counters directly."""

    @deferred
    async def test_showAndReset(self) -> None:
        import json as jsonlib
        import os
        import subprocess
        import sys

        from tests.daemon import inThread

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "allowlist.csv"), "w") as f:
            f.write("id,api_key,owner,added\nk1,lmgate-cli-key-0000000000000000Aa,team-a,2026-12-01\n")
        config = os.path.join(directory, "lmgate.yaml")
        with open(config, "w") as f:
            f.write(
                f"allowlist: {{path: {directory}/allowlist.csv}}\n"
                f"usage_limits:\n  store: {self.server.url}\n"
                "  rules:\n    - {name: r, per: key, requests_per_minute: 5, tokens_per_day: 1000}\n"
            )
        store = self.store()
        figures = [Figure("r|key=k1", "r", "requests_per_minute", 5), Figure("r|key=k1", "r", "tokens_per_day", 1000)]
        await self.admitted(store, "a", figures, tokens=100)

        def lmgate(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "lmgate.cli", "limits", *args, "--config", config],
                                  capture_output=True, text=True, timeout=60)

        shown = await inThread(lmgate, "show", "--key", "k1", "--json")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        states = {s["kind"]: s for s in jsonlib.loads(shown.stdout)}
        self.assertEqual((states["tokens_per_day"]["reserved"], states["tokens_per_day"]["remaining"]), (100, 900))
        self.assertEqual(states["requests_per_minute"]["remaining"], 4)
        reset = await inThread(lmgate, "reset", "--all")
        self.assertEqual(reset.returncode, 0, reset.stderr)
        self.assertIn("Reset", reset.stdout)
        again = await inThread(lmgate, "show", "--json")
        self.assertEqual(jsonlib.loads(again.stdout), [])
