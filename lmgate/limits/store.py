"""
Where usage-limit counters live: the interface both stores provide (in this
process: L{lmgate.limits.memory.MemoryStore}; shared: L{lmgate.limits.redis.RedisStore}),
and the values that cross it.

A store knows nothing of rules, requests or prices: it is handed, per call, the
figures (L{Figure}) of every counter the call counts against and the call's
reservation, and admits the call against all of them or none, atomically, with
its own clock. When the call's record is written the reservation is settled:
replaced by the real usage, kept, or released (L{ILimitStore.settle}), once per
request id however often it is asked.

Semantics (docs/limits.md says them to users):

  - C{requests_per_minute}, C{tokens_per_minute}: token buckets whose capacity
    is the figure, refilled continuously at figure / 60 per second, full when
    first used. A call takes 1 request and its reserved tokens out; at
    settlement the bucket gets back what was reserved and loses what was used
    (it may go below zero: the debt is refilled before anything else is
    admitted). Requests are never given back.
  - C{concurrent}: leases, one per call, held until settlement, expiring on
    their own C{leaseSeconds} after they were taken or last renewed
    (L{ILimitStore.renew}) so a dead instance's calls do not hold them for ever.
  - C{tokens_per_day}, C{tokens_per_month}, C{usd_per_day}, C{usd_per_month}:
    per UTC calendar day / month, C{used} (settled) and C{reserved}
    (outstanding); a call is admitted when used + reserved + its reservation
    fits the figure. Settlement moves the call's reservation out of
    C{reserved} and its real usage into C{used} of the window it was reserved
    in. Dollars are counted in whole nano-dollars (integers: exact sums).

A call whose own reservation exceeds a figure is refused by the caller before
the store is asked (L{Figure.fits}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence, Union

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

#: The kinds of figure a rule may set, in the order the refusals prefer.
RATE_KINDS = ("requests_per_minute", "tokens_per_minute")
WINDOW_KINDS = ("tokens_per_day", "tokens_per_month", "usd_per_day", "usd_per_month")
KINDS = RATE_KINDS + ("concurrent",) + WINDOW_KINDS

#: The record's C{error} for a refusal by a figure of each kind.
ERROR_FOR_KIND = {
    "requests_per_minute": "rate_limited",
    "tokens_per_minute": "rate_limited",
    "concurrent": "concurrency_limited",
    "tokens_per_day": "quota_exceeded",
    "tokens_per_month": "quota_exceeded",
    "usd_per_day": "budget_exceeded",
    "usd_per_month": "budget_exceeded",
}

#: Nano-dollars per dollar: dollars are counted in whole nano-dollars.
NANO = 1_000_000_000


class StoreUnavailable(Exception):
    """The store did not answer (timeout, connection lost, circuit open, an error reply)."""


@dataclass(frozen=True, slots=True)
class Figure:
    """
    One limit on one counter.

    @ivar counter: the counter's identity, C{<rule>|<per>=<value>} (e.g.
        C{team-a|key=k1}, C{team-a|owner=team-a}, C{everyone|rule}); the store
        keeps one state per (counter, kind[, window]).
    @ivar rule: the name of the rule that set it (for refusals and records).
    @ivar kind: one of L{KINDS}.
    @ivar limit: the figure: requests, tokens or leases per its period, or
        nano-dollars for the C{usd_*} kinds.
    """

    counter: str
    rule: str
    kind: str
    limit: int

    def amount(self, tokens: int, nanoUsd: int) -> int:
        """What a call with this reservation takes from this figure."""
        kind = self.kind
        if kind == "requests_per_minute" or kind == "concurrent":
            return 1
        if kind.startswith("usd_"):
            return nanoUsd
        return tokens

    def fits(self, tokens: int, nanoUsd: int) -> bool:
        """Whether a call with this reservation could ever be admitted by this figure."""
        return self.amount(tokens, nanoUsd) <= self.limit


@dataclass(frozen=True, slots=True)
class FigureState:
    """
    A figure's state, for the C{x-ratelimit-*} headers and for C{lmgate limits show}.

    @ivar figure: the figure.
    @ivar used: settled use (windows), tokens or requests taken (buckets:
        limit - level, rounded up), or leases held (concurrent).
    @ivar reserved: outstanding reservations (windows; 0 for the others).
    @ivar remaining: what a call could still take now (never below 0).
    @ivar reset: seconds until the figure is back at its full limit
        (buckets: refilled; windows: the next UTC day or month; concurrent:
        0, or the longest lease's expiry when the limit is reached).
    """

    figure: Figure
    used: int
    reserved: int
    remaining: int
    reset: float


@dataclass(frozen=True, slots=True)
class Decision:
    """
    A store's answer to one admission.

    @ivar admitted: whether the call was admitted (and counted against every figure).
    @ivar refusedBy: the first figure (in the order given) that refused, or None.
    @ivar retryAfter: seconds after which the refusing figure could admit this
        call, if nothing else changes (None when unknown, e.g. concurrency).
    @ivar states: refused: each figure's state as it stood, in the order
        given (for the refusal's C{x-ratelimit-*} headers). Admitted: each
        figure's state after the admission, or empty (the memory store does not
        compute states no one reads).
    """

    admitted: bool
    refusedBy: Figure | None = None
    retryAfter: float | None = None
    states: Sequence[FigureState] = field(default_factory=tuple)


#: The answer of an admission that carries no states (every store's common
#: answer; the limiter tests for this one object before anything else).
ADMITTED = Decision(True)


class Settlement(NamedTuple):
    """
    How one admitted call ended, for L{ILimitStore.settle}. Immutable; a
    named tuple rather than a frozen dataclass, because one is made for every
    call with a reservation (a third of the time to make).

    @ivar requestId: the call's id (the record's C{request_id}).
    @ivar tokens: the record's C{total_tokens}, or None when the call ended with no usage.
    @ivar nanoUsd: the record's C{cost_usd} in nano-dollars, or None.
    @ivar reachedUpstream: whether the upstream answered (a response head
        arrived). With no usage, a call that reached the upstream keeps its
        reservation as its use; one that never did releases it.
    """

    requestId: str
    tokens: int | None
    nanoUsd: int | None
    reachedUpstream: bool


#: What L{ILimitStore.admit} answers.
Admission = Union[Decision, "Deferred[Decision]"]


class ILimitStore(Interface):
    """Counters for usage limits, admitted and settled atomically."""

    shared = Attribute("True when the counters are shared with other processes (the record's C{limits}: shared|local).")

    def admit(requestId: str, figures: Sequence[Figure], tokens: int, nanoUsd: int, leaseSeconds: float) -> Admission:
        """
        Admit a call against every figure or none.

        @param requestId: the call's id; its reservation is kept under it
            until settled (and forgotten after the longest window it touched).
        @param tokens: the call's token reservation.
        @param nanoUsd: its dollar reservation, in nano-dollars.
        @param leaseSeconds: how long a C{concurrent} lease lives unless renewed.
        @return: a L{Decision}, now or with a Deferred; the Deferred fails
            with L{StoreUnavailable} when the store cannot answer.
        """

    def settle(settlement: Settlement) -> None:
        """
        Settle an admitted call: its leases released, its reservation replaced
        by its real usage (or kept, or released; see L{Settlement}). Idempotent
        per request id; never raises and never waits: a shared store that
        cannot apply it now queues it and applies it, in order, when it can.
        """

    def renew(requestIds: Sequence[str], leaseSeconds: float) -> None:
        """Extend the C{concurrent} leases of calls still in flight (called periodically)."""

    def show(counters: Sequence[str] | None = None) -> "Deferred[list[FigureState]]":
        """
        The current state of every figure of the named counters (every
        counter the store holds when None). A store keeps each state's figure
        (rule, kind, limit as last admitted) beside it, so it can say them
        without the configuration.
        """

    def reset(counters: Sequence[str]) -> "Deferred[int]":
        """Forget every state of the named counters (their buckets full, windows empty, leases gone); the number of states removed."""
