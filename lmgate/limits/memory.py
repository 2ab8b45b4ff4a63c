"""
The in-process store: exact for one process (one worker), on the clock it is
given. It is also where a shared store's calls are counted while Redis fails
and C{on_store_error} is C{open} (the record's C{limits: "local"}).

Semantics: L{lmgate.limits.store}. Windows are UTC calendar days and months of
the clock's time.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Sequence

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from lmgate.limits.store import ADMITTED, Decision, Figure, FigureState, ILimitStore, Settlement


def windowOf(kind: str, now: float) -> tuple[str, float]:
    """
    The UTC calendar window a C{*_per_day} or C{*_per_month} figure counts in
    at C{now}: its id (C{2026-12-01}, C{2026-12}) and when it ends (epoch seconds).
    """
    moment = datetime.fromtimestamp(now, timezone.utc)
    if kind.endswith("_day"):
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), start.timestamp() + 86400.0
    year, month = (moment.year + 1, 1) if moment.month == 12 else (moment.year, moment.month + 1)
    end = datetime(year, month, 1, tzinfo=timezone.utc)
    return moment.strftime("%Y-%m"), end.timestamp()


class _Bucket:
    __slots__ = ("figure", "level", "at")

    def __init__(self, figure: Figure, now: float) -> None:
        self.figure, self.level, self.at = figure, float(figure.limit), now

    def refill(self, now: float) -> float:
        limit = self.figure.limit
        if now > self.at:
            self.level = min(float(limit), self.level + (now - self.at) * limit / 60.0)
            self.at = now
        return self.level

    def state(self) -> FigureState:
        limit, level = self.figure.limit, self.level
        missing = max(0.0, limit - level)
        return FigureState(self.figure, math.ceil(missing), 0, max(0, math.floor(level)), missing * 60.0 / limit)


class _Window:
    __slots__ = ("figure", "used", "reserved", "ends")

    def __init__(self, figure: Figure, ends: float) -> None:
        self.figure, self.used, self.reserved, self.ends = figure, 0, 0, ends

    def state(self, now: float) -> FigureState:
        remaining = max(0, self.figure.limit - self.used - self.reserved)
        return FigureState(self.figure, self.used, self.reserved, remaining, max(0.0, self.ends - now))


class _Leases:
    __slots__ = ("figure", "held", "soonest")

    def __init__(self, figure: Figure) -> None:
        self.figure = figure
        self.held: dict[str, float] = {}  # request id -> expiry
        self.soonest = float("inf")  # no lease expires before this

    def take(self, requestId: str, expiry: float) -> None:
        self.held[requestId] = expiry
        if expiry < self.soonest:
            self.soonest = expiry

    def expire(self, now: float) -> int:
        held = self.held
        if now >= self.soonest:  # only then can a lease have lapsed: scan
            for requestId in [r for r, expiry in held.items() if expiry <= now]:
                del held[requestId]
            self.soonest = min(held.values(), default=float("inf"))
        return len(held)

    def state(self, now: float) -> FigureState:
        count, limit = len(self.held), self.figure.limit
        reset = max(0.0, min(self.held.values()) - now) if count >= limit and self.held else 0.0
        return FigureState(self.figure, count, 0, max(0, limit - count), reset)


#: How each kind of figure counts: a bucket, leases, a window of tokens or of nano-dollars.
_BUCKET, _LEASE, _TOKENS, _USD = range(4)
_SHAPES = {
    "requests_per_minute": _BUCKET,
    "tokens_per_minute": _BUCKET,
    "concurrent": _LEASE,
    "tokens_per_day": _TOKENS,
    "tokens_per_month": _TOKENS,
    "usd_per_day": _USD,
    "usd_per_month": _USD,
}
#: What each kind counts: calls, tokens or nano-dollars.
_CALLS, _TOKENS_UNIT, _NANO_USD = range(3)
_UNITS = {
    "requests_per_minute": _CALLS,
    "concurrent": _CALLS,
    "tokens_per_minute": _TOKENS_UNIT,
    "tokens_per_day": _TOKENS_UNIT,
    "tokens_per_month": _TOKENS_UNIT,
    "usd_per_day": _NANO_USD,
    "usd_per_month": _NANO_USD,
}


class _Bound:
    """
    A figure tuple's states, looked up once: every entry (shape, state, unit,
    figure) in the order given, and the same states grouped by shape (leases;
    buckets with whether they count calls; windows with whether they count
    nano-dollars), valid until C{until} (when its first window ends).
    """

    __slots__ = ("figures", "entries", "until", "leases", "buckets", "windows")

    def __init__(self, figures: Sequence[Figure], entries: list[tuple[int, Any, int, Figure]], until: float) -> None:
        self.figures, self.entries, self.until = figures, entries, until
        self.leases = tuple(state for shape, state, _, _ in entries if shape == _LEASE)
        self.buckets = tuple((state, unit == _CALLS) for shape, state, unit, _ in entries if shape == _BUCKET)
        self.windows = tuple((state, unit == _NANO_USD) for shape, state, unit, _ in entries if shape not in (_LEASE, _BUCKET))


@implementer(ILimitStore)
class MemoryStore:
    """
    Counters in this process's memory.

    @param clock: where the time comes from (the reactor; a fake clock in tests).
    """

    shared = False

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, ...], _Bucket] = {}
        self._windows: dict[tuple[str, ...], _Window] = {}
        self._leases: dict[tuple[str, ...], _Leases] = {}
        self._reservations: dict[str, tuple[_Bound, int, int]] = {}
        self._windowCache: dict[str, tuple[float, str, float]] = {}
        #: Each figure tuple's states, looked up once: id -> L{_Bound}.
        #: Forgotten when states are removed (prune, reset), looked up again
        #: when a window turns.
        self._bound: dict[int, _Bound] = {}

    def _now(self) -> float:
        return self._clock.seconds()

    def admit(
        self, requestId: str, figures: Sequence[Figure], tokens: int, nanoUsd: int, leaseSeconds: float
    ) -> Decision:
        """
        Check every figure, then count the call against all of them (or none).
        An admitted call's decision carries no states (only refusals need them:
        computing them for every call would cost more than the admission).

        The states are grouped by shape once per figure tuple (L{_bind}), so a
        call walks each group with no test of its kind: the limiter's own cost
        on a call is mostly this and the settlement, run cold between calls.
        """
        now = self._clock.seconds()
        bound = self._bound.get(id(figures))
        if bound is None or bound.figures is not figures or now >= bound.until:
            bound = self._bind(figures, now)
        for leases in bound.leases:
            if leases.expire(now) >= leases.figure.limit:
                return self._refused(bound, tokens, nanoUsd, now)
        for bucket, calls in bound.buckets:
            limit = bucket.figure.limit
            if now > bucket.at:  # _Bucket.refill, inline
                level = bucket.level + (now - bucket.at) * limit / 60.0
                bucket.level = level if level < limit else float(limit)
                bucket.at = now
            if (1 if calls else tokens) > bucket.level:
                return self._refused(bound, tokens, nanoUsd, now)
        for window, usd in bound.windows:
            if window.used + window.reserved + (nanoUsd if usd else tokens) > window.figure.limit:
                return self._refused(bound, tokens, nanoUsd, now)
        if bound.leases:
            expiry = now + leaseSeconds
            for leases in bound.leases:
                leases.take(requestId, expiry)
        for bucket, calls in bound.buckets:
            bucket.level -= 1 if calls else tokens
        for window, usd in bound.windows:
            window.reserved += nanoUsd if usd else tokens
        self._reservations[requestId] = (bound, tokens, nanoUsd)
        return ADMITTED

    def _refused(self, bound: "_Bound", tokens: int, nanoUsd: int, now: float) -> Decision:
        """The refusal of a call some figure cannot take: the first such figure in the order given, every state as it stands."""
        refused: Figure | None = None
        retryAfter: float | None = None
        for shape, state, unit, figure in bound.entries:  # every one: each state brought up to now
            if shape == _LEASE:
                if state.expire(now) >= figure.limit and refused is None:
                    refused, retryAfter = figure, None
            elif shape == _BUCKET:
                amount = 1 if unit == _CALLS else tokens
                level = state.refill(now)
                if amount > level and refused is None:
                    refused, retryAfter = figure, (amount - level) * 60.0 / figure.limit
            elif state.used + state.reserved + (nanoUsd if unit == _NANO_USD else tokens) > figure.limit and refused is None:
                refused, retryAfter = figure, state.ends - now
        assert refused is not None  # admit found one
        return Decision(False, refused, retryAfter, tuple(self._stateNow(shape, state, now) for shape, state, _, _ in bound.entries))

    def _bind(self, figures: Sequence[Figure], now: float) -> "_Bound":
        """
        Each figure's state (made when missing), grouped by shape: looked up
        once per figure tuple (the limiter passes the same one for every call
        of a kind) until a state is removed or a window turns.
        """
        entries: list[tuple[int, Any, int, Figure]] = []
        until = math.inf
        for figure in figures:
            kind = figure.kind
            shape = _SHAPES[kind]
            state: Any
            if shape == _LEASE:
                key: tuple[str, ...] = (figure.counter, kind)
                state = self._leases.get(key)
                if state is None:
                    state = self._leases[key] = _Leases(figure)
            elif shape == _BUCKET:
                key = (figure.counter, kind)
                state = self._buckets.get(key)
                if state is None:
                    state = self._buckets[key] = _Bucket(figure, now)
            else:
                windowId, ends = self._windowOf(kind, now)
                key = (figure.counter, kind, windowId)
                state = self._windows.get(key)
                if state is None:
                    state = self._windows[key] = _Window(figure, ends)
                until = min(until, ends)
            state.figure = figure  # the figure as last admitted (a reload may change its limit)
            entries.append((shape, state, _UNITS[kind], figure))
        bound = _Bound(figures, entries, until)
        if type(figures) is tuple:  # a list could change under the key: looked up each time
            if len(self._bound) >= 10_000:
                self._bound.clear()  # bounded however many counters come and go
            self._bound[id(figures)] = bound  # holds the tuple: its id is not reused meanwhile
        return bound

    def _windowOf(self, kind: str, now: float) -> tuple[str, float]:
        """L{windowOf}, remembered until the window ends (one datetime per day, not per call)."""
        period = kind[kind.rindex("_") + 1 :]
        cached = self._windowCache.get(period)
        if cached is None or not cached[0] <= now < cached[2]:
            windowId, ends = windowOf(kind, now)
            cached = self._windowCache[period] = (now, windowId, ends)  # valid from now until it ends
        return cached[1], cached[2]

    def _stateNow(self, shape: int, state: Any, now: float) -> FigureState:
        if shape == _LEASE:
            return state.state(now)  # type: ignore[no-any-return]
        if shape == _BUCKET:
            return state.state()  # type: ignore[no-any-return]
        return state.state(now)  # type: ignore[no-any-return]

    def _stateOf(self, key: tuple[str, ...], now: float) -> FigureState:
        if key in self._leases:
            return self._leases[key].state(now)
        if key in self._buckets:
            return self._buckets[key].state()
        return self._windows[key].state(now)

    def settle(self, settlement: Settlement) -> None:
        requestId = settlement.requestId
        held = self._reservations.pop(requestId, None)
        if held is None:
            return  # settled already, or never admitted here
        bound, tokens, nanoUsd = held
        for leases in bound.leases:
            leases.held.pop(requestId, None)  # the lease released
        reached = settlement.reachedUpstream
        real = settlement.tokens
        actual = real if real is not None else tokens if reached else 0
        if actual != tokens:  # requests are never given back; tokens taken from a bucket are, when fewer were used
            now = self._clock.seconds()
            for bucket, calls in bound.buckets:
                if not calls:
                    bucket.refill(now)
                    bucket.level = min(float(bucket.figure.limit), bucket.level + tokens - actual)
        if bound.windows:
            real = settlement.nanoUsd
            actualUsd = real if real is not None else nanoUsd if reached else 0
            for window, usd in bound.windows:
                if usd:
                    window.reserved -= nanoUsd
                    window.used += actualUsd
                else:
                    window.reserved -= tokens
                    window.used += actual

    def renew(self, requestIds: Sequence[str], leaseSeconds: float) -> None:
        expiry = self._now() + leaseSeconds
        for requestId in requestIds:
            held = self._reservations.get(requestId)
            for leases in held[0].leases if held is not None else ():
                if requestId in leases.held:
                    leases.take(requestId, expiry)

    def prune(self) -> int:
        """
        Forget idle states: full buckets, ended windows with nothing reserved,
        lease sets with no live lease (each would be created afresh, the same).
        Called now and then by the owner; the number of states forgotten.
        """
        now = self._now()
        self._bound.clear()  # states are removed: looked up (or made) again
        before = len(self._buckets) + len(self._windows) + len(self._leases)
        self._buckets = {k: b for k, b in self._buckets.items() if b.refill(now) < b.figure.limit}
        self._windows = {k: w for k, w in self._windows.items() if w.ends > now or w.reserved}
        self._leases = {k: leases for k, leases in self._leases.items() if leases.expire(now)}
        return before - len(self._buckets) - len(self._windows) - len(self._leases)

    def _keys(self, counters: Sequence[str] | None) -> list[tuple[str, ...]]:
        keys = [*self._buckets, *self._leases, *self._windows]
        if counters is None:
            return keys
        wanted = set(counters)
        return [key for key in keys if key[0] in wanted]

    def show(self, counters: Sequence[str] | None = None) -> "Deferred[list[FigureState]]":
        now = self._now()
        states = []
        for key in self._keys(counters):
            if key in self._buckets:
                self._buckets[key].refill(now)
            elif key in self._leases:
                self._leases[key].expire(now)
            elif self._windows[key].ends <= now:
                continue  # an ended window: nothing counts against it any more
            states.append(self._stateOf(key, now))
        return succeed(states)

    def reset(self, counters: Sequence[str]) -> "Deferred[int]":
        self._bound.clear()  # states are removed: made afresh by the next admission
        removed = 0
        for key in self._keys(counters):
            found = self._buckets.pop(key, None) or self._windows.pop(key, None) or self._leases.pop(key, None)
            removed += found is not None
        return succeed(removed)
