"""
The limiter: which rules a call matches, what it reserves, the store's answer
turned into an admission or a refusal an SDK understands, and the settlement
when the call's record is written.

The admission step (L{lmgate.gate.steps.Limit}) calls L{Limiter.admit}; the
call (L{lmgate.gate.call.ProxiedCall}) calls L{Limiter.settle} once, when it
writes its record. docs/limits.md states the semantics.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from lmgate.gate.admission import Refusal
from lmgate.limits.memory import MemoryStore
from lmgate.limits.settings import NANO, LimitsSettings, RuleSettings
from lmgate.limits.store import (
    ADMITTED,
    ERROR_FOR_KIND,
    Decision,
    Figure,
    FigureState,
    ILimitStore,
    Settlement,
    StoreUnavailable,
)
from lmgate.ops.ratelog import RateLimitedLog

if TYPE_CHECKING:
    from lmgate.gate.admission import CallContext, Verdict

log = Logger()

#: The refusal kind (status and shape) for each record error.
_REFUSAL_KIND = {
    "rate_limited": "rate_limited",
    "concurrency_limited": "rate_limited",
    "quota_exceeded": "quota_exceeded",
    "budget_exceeded": "quota_exceeded",
}
_UNITS = {
    "requests_per_minute": "requests per minute",
    "tokens_per_minute": "tokens per minute",
    "concurrent": "calls at once",
    "tokens_per_day": "tokens per UTC day",
    "tokens_per_month": "tokens per UTC month",
    "usd_per_day": "US dollars per UTC day",
    "usd_per_month": "US dollars per UTC month",
}
#: Operations that produce no output tokens (OpenAI-format embeddings, Gemini's embedContent, Titan embeddings on Bedrock).
_EMBEDDINGS = re.compile(rb"/embeddings$|:(?:batchE|e)mbedContents?$|/model/[^/]*embed[^/]*/invoke$")
#: The output-cap members a request body may carry, top level.
_OUTPUT_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
UNAVAILABLE_MESSAGE = "Usage limits cannot be checked right now (the limits store is unavailable); the request was not relayed."


@dataclass(slots=True)
class Held:
    """
    What an admitted call holds until its record is written (the call's
    C{context.reservation}).

    @ivar store: the store that admitted it (the shared one, or this process's
        while the shared one failed).
    """

    store: ILimitStore
    requestId: str
    tokens: int
    nanoUsd: int


def goDuration(seconds: float) -> str:
    """A duration as OpenAI's C{x-ratelimit-reset-*} headers write it: C{250ms}, C{1s}, C{6m0s}, C{1h2m3s}."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds * 1000) / 1000
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes:
        return f"{int(minutes)}m{text}"
    return text


#: Parses a JSON text from a given offset (the C scanner, without C{json.loads}'
#: encoding detection and trailing-whitespace check).
_rawDecode = json.JSONDecoder().raw_decode


def _parseBody(body: bytes) -> Any:
    """
    A request body that opens a JSON object, parsed (UTF-8, as JSON over HTTP
    is; anything after the object is not looked at); None if it is not one.
    """
    try:
        text = body.decode("utf-8")
        return _rawDecode(text, len(text) - len(text.lstrip()))[0]
    except ValueError:  # not UTF-8 (UnicodeDecodeError is a ValueError), or not JSON
        return None


def outputCap(document: Any, default: int) -> int:
    """
    The most output tokens a request asks for: C{max_tokens},
    C{max_completion_tokens}, C{max_output_tokens} (top level),
    C{generationConfig.maxOutputTokens}, C{inferenceConfig.maxTokens}; else C{default}.
    Only whole numbers count (C{type(...) is int}: not booleans, not floats).
    """
    if type(document) is dict:
        for name in _OUTPUT_CAPS:
            value = document.get(name)
            if type(value) is int and value >= 0:
                return value
        for section, name in (("generationConfig", "maxOutputTokens"), ("inferenceConfig", "maxTokens")):
            inner = document.get(section)
            if type(inner) is dict:
                value = inner.get(name)
                if type(value) is int and value >= 0:
                    return value
    return default


#: Counters whose figures a rule keeps made (cleared past it).
_BUILT_LIMIT = 100_000
#: Plans (L{Limiter._plan}) kept; past it they are cleared and made again.
PLAN_CACHE_SIZE = 4096


class _Plan:
    """
    What the rules make of one kind of call (L{Limiter._plan}).

    @ivar figures: every matching rule's figures, in rule order (empty: no rule matches).
    @ivar closed: whether a matching rule fails closed.
    @ivar price: the model's price (dollar reservations), or None.
    @ivar fewestCalls: the smallest limit among the figures that count calls;
        C{fewestTokens}, C{fewestNanoUsd} the same for tokens and nano-dollars
        (a reservation over one of them can never be admitted).
    """

    __slots__ = ("figures", "closed", "price", "fewestCalls", "fewestTokens", "fewestNanoUsd")

    def __init__(self, figures: tuple[Figure, ...], closed: bool, price: Any) -> None:
        self.figures, self.closed, self.price = figures, closed, price
        self.fewestCalls = min((f.limit for f in figures if f.kind in ("requests_per_minute", "concurrent")), default=math.inf)
        self.fewestTokens = min((f.limit for f in figures if f.kind in _TOKEN_KINDS), default=math.inf)
        self.fewestNanoUsd = min((f.limit for f in figures if f.kind.startswith("usd_")), default=math.inf)


_TOKEN_KINDS = ("tokens_per_minute", "tokens_per_day", "tokens_per_month")


class _Rule:
    """A rule, compiled: its match as tests, its figures' kinds and limits."""

    __slots__ = ("settings", "name", "per", "figures", "closed", "_tests", "_built")

    def __init__(self, settings: RuleSettings, closedByDefault: bool) -> None:
        self.settings, self.name, self.per, self.figures = settings, settings.name, settings.per, settings.figures
        self.closed = (settings.onStoreError or ("closed" if closedByDefault else "open")) == "closed"
        self._built: dict[str, tuple[Figure, ...]] = {}
        match = settings.match
        self._tests: list[tuple[str, tuple[str, ...]]] = [
            (field, values)
            for field, values in (
                ("key", match.key),
                ("owner", match.owner),
                ("provider", match.provider),
                ("model", match.model),
                ("alias", match.alias),
            )
            if values is not None
        ]

    @property
    def needsModel(self) -> bool:
        return any(field == "model" for field, _ in self._tests)

    def matches(self, facts: dict[str, str | None]) -> bool:
        return self.settings.match.matches(facts)  # the one matcher (the report's too)

    def figuresFor(self, keyId: str, owner: str) -> tuple[Figure, ...]:
        """This rule's figures on the counter a call of this key counts against (made once per counter)."""
        counter = self.counter(keyId, owner)
        figures = self._built.get(counter)
        if figures is None:
            if len(self._built) >= _BUILT_LIMIT:
                self._built.clear()  # bounded however many keys come and go
            figures = self._built[counter] = tuple(Figure(counter, self.name, kind, limit) for kind, limit in self.figures)
        return figures

    def counter(self, keyId: str, owner: str) -> str:
        """The identity of the counter a call of this key counts against."""
        return self.settings.counter(keyId, owner)


class Limiter:
    """
    Usage limits for every call: rules, the store, and this process's store
    for when the shared one fails.

    @param store: where the counters live (the memory store itself, or Redis).
    @param clock: the reactor's clock (renewals, the local store, the log's pace).
    @param prices: the price table (anything with C{priceFor}), or None: no
        dollar reservations (a budget then counts what the records cost).
    """

    def __init__(self, settings: LimitsSettings, store: ILimitStore, clock: IReactorTime, prices: Any = None) -> None:
        self._plans: dict[tuple[str, str, str, str | None, str | None], _Plan] = {}
        self._store, self._clock, self._prices = store, clock, prices
        self._local = store if not store.shared else MemoryStore(clock)
        self.rateLog = RateLimitedLog(log, clock)
        #: Admitted calls not yet settled: their request ids, by the store that holds them (renewed leases).
        self.inflight: dict[str, ILimitStore] = {}
        #: Called with (rule, record error) for each refusal (the metrics).
        self.observeRefusal: Callable[[str, str], None] | None = None
        self.setRules(settings)

    @property
    def store(self) -> ILimitStore:
        return self._store

    @property
    def prices(self) -> Any:
        """The price table dollar reservations are made at (set again on reload)."""
        return self._prices

    @prices.setter
    def prices(self, prices: Any) -> None:
        self._prices = prices
        self._plans.clear()

    def setRules(self, settings: LimitsSettings) -> None:
        """Put the rules (and estimates) of C{settings} into effect: at start-up, and on reload."""
        self.settings = settings
        closed = settings.onStoreError == "closed"
        self._rules = [_Rule(rule, closed) for rule in settings.rules]
        self.leaseSeconds = settings.leaseSeconds
        self._plans.clear()

    @property
    def active(self) -> bool:
        """Whether any rule is configured (without one, the step costs one truth test)."""
        return bool(self._rules)

    # -- admission -------------------------------------------------------------

    def admit(self, context: CallContext) -> Verdict:
        """Admit the call against every rule it matches, or refuse it (429, or 503 when the store fails closed)."""
        entry, provider = context.entry, context.provider
        if entry is None or provider is None:
            return None
        document: Any = None
        body = context.body
        if body and body.lstrip()[:1] == b"{":
            document = _parseBody(body)
        model = context.requestedModel
        if model is None:
            if isinstance(document, dict) and isinstance(document.get("model"), str):
                model = document["model"]
            else:
                from lmgate.usage import requestModel

                model = requestModel(provider.format, context.rest, None)
            context.requestedModel = model
        alias = context.alias
        plans = self._plans
        plan = plans.get((entry.id, entry.owner, provider.name, model, alias))
        if plan is None:
            plan = self._plan(entry.id, entry.owner, provider.name, model, alias)
        figures = plan.figures
        if not figures:
            return None
        settings = self.settings
        bodySize = context.bodySize
        tokens = math.ceil(bodySize / settings.bytesPerToken)
        if bodySize and not _EMBEDDINGS.search(context.rest):
            tokens += outputCap(document, settings.outputTokens)  # no body (a GET), or embeddings: no output
        price = plan.price
        if price is None:
            nanoUsd = 0
        else:
            inputTokens = math.ceil(bodySize / settings.bytesPerToken)
            nanoUsd = math.ceil((inputTokens * price.input + (tokens - inputTokens) * price.output) * NANO / 1_000_000)
        context.reservedTokens = tokens
        if tokens > plan.fewestTokens or nanoUsd > plan.fewestNanoUsd or plan.fewestCalls < 1:
            for figure in figures:  # the first, in rule order, that this call can never fit
                if figure.amount(tokens, nanoUsd) > figure.limit:
                    context.limits = "shared" if self._store.shared else "local"
                    return self._never(context, figure, tokens, nanoUsd)
        closed = plan.closed
        requestId = context.requestId
        try:
            answer = self._store.admit(requestId, figures, tokens, nanoUsd, self.leaseSeconds)
        except StoreUnavailable as e:
            return self._unavailable(str(e), context, figures, tokens, nanoUsd, closed)
        if answer is ADMITTED:  # the common answer: held without going through _decided
            self._hold(context, self._store, tokens, nanoUsd)
            return None
        if isinstance(answer, Decision):
            return self._decided(answer, context, self._store, tokens, nanoUsd)
        # one entry for both outcomes (_decided raises nothing _storeFailed would take)
        return answer.addCallbacks(
            self._decided,
            self._storeFailed,
            callbackArgs=(context, self._store, tokens, nanoUsd),
            errbackArgs=(context, figures, tokens, nanoUsd, closed),
        )

    def _plan(self, keyId: str, owner: str, provider: str, model: str | None, alias: str | None) -> "_Plan":
        """
        What the rules make of calls of this key, owner, route, model and alias
        (the rules they match, those rules' figures on their counters, the
        model's price), worked out once and kept (bounded: cleared past
        L{PLAN_CACHE_SIZE}; cleared when the rules or the prices change).
        The reservation, which depends on each call's body, is not kept.
        """
        facts = {"key": keyId, "owner": owner, "provider": provider, "model": model, "alias": alias}
        rules = [rule for rule in self._rules if rule.matches(facts)]
        figures: list[Figure] = []
        for rule in rules:
            figures.extend(rule.figuresFor(keyId, owner))
        prices = self._prices
        plan = _Plan(tuple(figures), any(rule.closed for rule in rules), prices.priceFor(model) if prices is not None and rules else None)
        if len(self._plans) >= PLAN_CACHE_SIZE:
            self._plans.clear()
        self._plans[(keyId, owner, provider, model, alias)] = plan
        return plan

    def _hold(self, context: CallContext, store: ILimitStore, tokens: int, nanoUsd: int) -> None:
        """The call was admitted: it holds its reservation in C{store} until its record."""
        context.limits = "shared" if store.shared else "local"
        context.reservation = Held(store, context.requestId, tokens, nanoUsd)
        self.inflight[context.requestId] = store

    def _decided(self, decision: Decision, context: CallContext, store: ILimitStore, tokens: int, nanoUsd: int) -> Refusal | None:
        if decision.admitted:
            self._hold(context, store, tokens, nanoUsd)
            return None
        context.limits = "shared" if store.shared else "local"
        figure = decision.refusedBy
        assert figure is not None
        return self._refusal(context, figure, decision.retryAfter, decision.states)

    def _storeFailed(
        self, reason: Failure, context: CallContext, figures: Sequence[Figure], tokens: int, nanoUsd: int, closed: bool
    ) -> Refusal | None | Failure:
        if not reason.check(StoreUnavailable):
            if reason.check(CancelledError):  # the client left (or the drain ended) while the store decided
                self.forget(context)  # release whatever the store may still admit
            return reason  # the pipeline handles it (a bug too)
        return self._unavailable(reason.getErrorMessage(), context, figures, tokens, nanoUsd, closed)

    def _unavailable(
        self, why: str, context: CallContext, figures: Sequence[Figure], tokens: int, nanoUsd: int, closed: bool
    ) -> Refusal | None:
        """The shared store failed: refuse (a C{closed} rule matched: 503), or count in this process."""
        if closed:
            self.rateLog.info("limits store", "Usage limits store unavailable ({why}): refusing calls of closed rules", why=why)
            context.limits = "shared"
            rule = next(f.rule for f in figures)
            context.limitedBy = rule
            self._observe(rule, "limits_unavailable")
            return Refusal("limits_unavailable", UNAVAILABLE_MESSAGE, "limits_unavailable", rule, ((b"retry-after", b"1"),))
        self.rateLog.info("limits store", "Usage limits store unavailable ({why}): counting in this process", why=why)
        decision = self._local.admit(context.requestId, figures, tokens, nanoUsd, self.leaseSeconds)
        assert isinstance(decision, Decision)  # the memory store answers at once
        return self._decided(decision, context, self._local, tokens, nanoUsd)

    def _observe(self, rule: str, error: str) -> None:
        if self.observeRefusal is not None:
            self.observeRefusal(rule, error)

    def _never(self, context: CallContext, figure: Figure, tokens: int, nanoUsd: int) -> Refusal:
        """A call whose own reservation exceeds a figure: refused at once, saying so (no Retry-After: waiting cannot help)."""
        error = ERROR_FOR_KIND[figure.kind]
        amount = figure.amount(tokens, nanoUsd)
        if figure.kind.startswith("usd_"):
            asked, limit = f"${_money(amount)}", f"${_money(figure.limit)}"
        else:
            asked, limit = f"{amount} tokens", str(figure.limit)
        message = (
            f"This request reserves {asked} (its body's bytes / {self.settings.bytesPerToken:g} plus its output cap), "
            f"more than rule `{figure.rule}` allows: {limit} {_UNITS[figure.kind]}. It can never be admitted; "
            "lower max_tokens or shorten the prompt."
        )
        context.limitedBy = figure.rule
        self._observe(figure.rule, error)
        return Refusal(_REFUSAL_KIND[error], message, error, figure.rule, ())

    def _refusal(
        self, context: CallContext, figure: Figure, retryAfter: float | None, states: Sequence[FigureState]
    ) -> Refusal:
        error = ERROR_FOR_KIND[figure.kind]
        state = next((s for s in states if s.figure == figure), None)
        wait = retryAfter if retryAfter is not None else 1.0
        if figure.kind == "concurrent":
            message = f"Too many requests at once: rule `{figure.rule}` allows {figure.limit} {_UNITS['concurrent']}. Retry shortly."
        elif figure.kind.endswith("_minute"):
            message = (
                f"Rate limit reached: rule `{figure.rule}` allows {figure.limit} {_UNITS[figure.kind]}. "
                f"Retry after {goDuration(wait)}."
            )
        else:
            if figure.kind.startswith("usd_"):
                limit = f"${_money(figure.limit)}"
                used = f"${_money(state.used)} used, ${_money(state.reserved)} reserved" if state else ""
            else:
                limit = f"{figure.limit}"
                used = f"{state.used} used, {state.reserved} reserved" if state else ""
            what = "Budget" if error == "budget_exceeded" else "Token quota"
            message = (
                f"{what} reached: rule `{figure.rule}` allows {limit} {_UNITS[figure.kind]} ({used}); "
                f"it resets in {goDuration(wait)}."
            )
        context.limitedBy = figure.rule
        self._observe(figure.rule, error)
        return Refusal(_REFUSAL_KIND[error], message, error, figure.rule, _headers(figure, wait, states))

    # -- settlement -------------------------------------------------------------

    def settle(self, context: CallContext, totalTokens: int | None, costUsd: float | None, reachedUpstream: bool) -> None:
        """Settle a call's reservation with its record's usage (once; a call with none does nothing)."""
        held = context.reservation
        if not isinstance(held, Held):
            return
        context.reservation = None
        self.inflight.pop(held.requestId, None)
        nanoUsd = None if costUsd is None else round(costUsd * NANO)
        try:
            held.store.settle(Settlement(held.requestId, totalTokens, nanoUsd, reachedUpstream))
        except Exception:  # stores promise not to raise; a record is still owed
            log.failure("Settling usage limits failed")

    def forget(self, context: CallContext) -> None:
        """An admission abandoned (the client left while the store decided): release whatever it may hold."""
        self._store.settle(Settlement(context.requestId, None, None, False))

    def renew(self) -> None:
        """Extend the concurrency leases of the calls in flight (called every third of the lease time)."""
        byStore: dict[int, tuple[ILimitStore, list[str]]] = {}
        for requestId, store in self.inflight.items():
            byStore.setdefault(id(store), (store, []))[1].append(requestId)
        for store, ids in byStore.values():
            store.renew(ids, self.leaseSeconds)
        if isinstance(self._local, MemoryStore):
            self._local.prune()


def _money(nano: int) -> str:
    """Nano-dollars as dollars with significant digits (C{0.000277}, C{50}, C{1234.5})."""
    return format(nano / NANO, ".6g")


def _headers(figure: Figure, wait: float, states: Sequence[FigureState]) -> tuple[tuple[bytes, bytes], ...]:
    """
    C{Retry-After} and OpenAI's C{x-ratelimit-*} headers for a refusal: the
    requests figures from the refusing rule's C{requests_per_minute} (else
    any), the tokens figures from its C{tokens_per_minute} (else any, else
    the refusing token window).
    """
    headers = [(b"retry-after", b"%d" % max(1, math.ceil(wait)))]

    def pick(kinds: tuple[str, ...]) -> FigureState | None:
        candidates = [s for s in states if s.figure.kind in kinds]
        own = [s for s in candidates if s.figure.rule == figure.rule]
        chosen = own or candidates
        return chosen[0] if chosen else None

    requests = pick(("requests_per_minute",))
    tokens = pick(("tokens_per_minute",)) or (
        next((s for s in states if s.figure == figure), None) if figure.kind in ("tokens_per_day", "tokens_per_month") else None
    )
    for name, state in ((b"requests", requests), (b"tokens", tokens)):
        if state is None:
            continue
        headers.append((b"x-ratelimit-limit-" + name, b"%d" % state.figure.limit))
        headers.append((b"x-ratelimit-remaining-" + name, b"%d" % state.remaining))
        headers.append((b"x-ratelimit-reset-" + name, goDuration(state.reset).encode()))
    return tuple(headers)
