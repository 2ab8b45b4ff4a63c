"""
The shared store for usage limits: counters in Redis, so every worker of every
LMGate instance pointed at the same Redis counts against the same limits.

Each admission, settlement, renewal, show and reset is one Lua script
(L{lmgate.limits.redisscripts}) run atomically by Redis with its own clock:
loaded once at start (C{SCRIPT LOAD}) and called by C{EVALSHA}, with C{EVAL}
when Redis answers C{NOSCRIPT} (it restarted or its script cache was
flushed), so a Redis restart needs no LMGate restart.

Redis must never hold the gateway: every call has a deadline (C{timeout}), a
circuit breaker stops calling a Redis that keeps failing (admissions fail at
once with L{StoreUnavailable} meanwhile; the caller decides open or closed),
and L{RedisStore.settle} never waits: what it cannot apply now waits in a
bounded queue and is applied in order when Redis answers again (settlements
are idempotent per request id, so a retry is always safe).
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import Any, Callable, Sequence

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError as DeferredTimeout, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lmgate.limits import redisscripts
from lmgate.limits.resp import RedisClient, RedisConnectionError, RedisError, encodeArgs
from lmgate.limits.settings import RedisSettings, parseRedisUrl
from lmgate.limits.store import ADMITTED, Decision, Figure, FigureState, ILimitStore, Settlement, StoreUnavailable

log = Logger()


class _Script:
    """One Lua script: its source and the SHA1 that C{EVALSHA} names it by."""

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()


ADMIT = _Script("admit", redisscripts.ADMIT)
SETTLE = _Script("settle", redisscripts.SETTLE)
RENEW = _Script("renew", redisscripts.RENEW)
SHOW = _Script("show", redisscripts.SHOW)
RESET = _Script("reset", redisscripts.RESET)
SCRIPTS = (ADMIT, SETTLE, RENEW, SHOW, RESET)

#: Settlements sent in one script call at most.
SETTLE_BATCH = 100


class CircuitOpen(StoreUnavailable):
    """Not even tried: the circuit is open after Redis kept failing."""


#: Circuit states, for the metrics.
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


def _connect(reactor: Any, settings: RedisSettings, replyTimeout: float, tlsOptions: Any) -> RedisClient:
    """
    A reconnecting connection to the Redis of C{settings} (L{RedisClient}: one
    TCP connection, commands pipelined on it), TLS for C{rediss://}, made
    with C{reactor} (an C{IReactorTCP} and C{IReactorTime}).
    """
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    endpoint: Any = HostnameEndpoint(reactor, settings.host, settings.port, timeout=max(1.0, replyTimeout))
    if settings.tls:
        if tlsOptions is None:
            from twisted.internet.ssl import optionsForClientTLS

            tlsOptions = optionsForClientTLS(settings.host)
        endpoint = wrapClientTLS(tlsOptions, endpoint)
    client = RedisClient(endpoint, reactor, replyTimeout=replyTimeout, username=settings.username,
                         password=settings.password, db=settings.db or 0)
    client.start()
    return client


class _Deadlines:
    """
    The deadline of every call a store makes, on one timer instead of one
    each (C{Deferred.addTimeout} makes and cancels a timer per call): the
    calls have the same timeout and are made in order, so they fall due in
    order. A call still waiting at its deadline is cancelled (the store turns
    that into C{twisted.internet.defer.TimeoutError}); a late reply is dropped
    by the connection (its Deferred was called).
    """

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout
        self._pending: deque[tuple[float, Deferred[Any]]] = deque()
        self._timer: Any = None
        self._expiring = False
        #: The call being cancelled because its deadline passed, while it is.
        self.timedOut: Deferred[Any] | None = None

    def watch(self, d: Deferred[Any], started: float) -> None:
        """Fail C{d} if it is still waiting C{timeout} seconds after C{started} (now, or a moment ago)."""
        self._pending.append((started + self._timeout, d))
        if self._timer is None and not self._expiring:
            self._timer = self._clock.callLater(max(0.0, started + self._timeout - self._clock.seconds()), self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._expiring = True  # a failed call's callbacks may make calls: they are watched below
        try:
            now = self._clock.seconds()
            pending = self._pending
            while pending:
                due, d = pending[0]
                if d.called and not d.paused:  # answered (paused: waiting on a command sent later, as after a reconnection)
                    pending.popleft()
                    continue
                if due > now:
                    break
                pending.popleft()
                # cancelled, as addTimeout does (a command still waiting for
                # the connection is withdrawn); the call turns that into a
                # timeout while timedOut names it
                self.timedOut = d
                try:
                    d.cancel()
                finally:
                    self.timedOut = None
        finally:
            self._expiring = False
        if self._pending:
            self._timer = self._clock.callLater(max(0.0, self._pending[0][0] - self._clock.seconds()), self._expire)

    def stop(self) -> None:
        """Forget every deadline (the store stopped: its connection is gone)."""
        self._pending.clear()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


@implementer(ILimitStore)
class RedisStore(Service):
    """
    Usage-limit counters in Redis, shared by every process that uses the same
    Redis and prefix. A service: C{startService} connects (lazily: Redis need
    not be up) and loads the scripts, C{stopService} tries the queued
    settlements once more and disconnects.

    @ivar circuitState: C{"closed"}, C{"open"} or C{"half-open"}, for the metrics.
    @ivar failures: store calls that failed (timeouts, lost connections, error replies).
    @ivar droppedSettlements: settlements dropped because the queue was full.
    @ivar observeLatency: called with the seconds each answered call took (the owner sets it).
    @ivar observeError: called with C{"timeout"}, C{"connection"} or C{"error"} for each failed call.
    """

    shared = True

    @classmethod
    def fromSettings(cls, limits: Any, clock: IReactorTime) -> "RedisStore":
        """The store a C{usage_limits:} section (L{lmgate.limits.settings.LimitsSettings}) names."""
        return cls(parseRedisUrl(limits.store), clock, timeout=limits.redisTimeout, prefix=limits.keyPrefix)

    def __init__(
        self,
        settings: RedisSettings,
        clock: IReactorTime,
        timeout: float = 0.1,
        prefix: str = "lmgate:",
        failuresToOpen: int = 5,
        coolOff: float = 1.0,
        maxCoolOff: float = 30.0,
        queueLimit: int = 10_000,
        retryInterval: float = 1.0,
        settleDelay: float = 0.005,
        timeOffset: float = 0.0,
        tlsOptions: Any = None,
        connect: Callable[[], Any] | None = None,
    ) -> None:
        """
        @param timeout: seconds each call may take (C{usage_limits.redis.timeout}).
        @param prefix: put before every key, so several gateways can share one Redis database.
        @param failuresToOpen: consecutive failures that open the circuit.
        @param coolOff: seconds the circuit first stays open; doubled after each
            failed probe, up to C{maxCoolOff}.
        @param queueLimit: settlements kept while Redis is failing; the oldest is dropped beyond.
        @param retryInterval: seconds between attempts to apply queued settlements.
        @param settleDelay: seconds a settlement waits for others to share its
            script call (a reservation is then held that much longer: never
            too lenient).
        @param timeOffset: seconds added to Redis's clock (tests only).
        @param tlsOptions: an C{IOpenSSLClientConnectionCreator} for C{rediss://}
            (default: the system's trust roots, checked against the host).
        @param connect: makes the L{RedisClient} (default: from C{settings}).
        """
        self.settings = settings
        self._clock = clock
        self._timeout = timeout
        self._prefix = prefix
        self._offsetMs = str(int(round(timeOffset * 1000)))
        self._failuresToOpen = failuresToOpen
        self._initialCoolOff = coolOff
        self._maxCoolOff = maxCoolOff
        self._coolOff = coolOff
        self._queueLimit = queueLimit
        # The connection's own deadline, far past ours: it drops a connection that
        # stopped answering altogether, so the next call reconnects.
        replyTimeout = max(1.0, 10 * timeout)
        # The clock is the reactor in service (and in the tests against a real
        # Redis): it makes the connection too.
        self._connect = connect or (lambda: _connect(clock, settings, replyTimeout, tlsOptions))
        self._redis: Any = None
        self._loading: list[Deferred[Any]] = []
        self.circuitState = CLOSED
        self._consecutiveFailures = 0
        self._openUntil = 0.0
        self._probing = False
        self.failures = 0
        self.droppedSettlements = 0
        self._lastDropLog: float | None = None
        self._queue: deque[Settlement] = deque()
        self._flushing = False
        #: The end-of-turn send of the settlements queued in this turn, when one is due.
        self._soon: Any = None
        self._retry = LoopingCall(self._flush)
        self._retry.clock = clock
        self._retryInterval = retryInterval
        self._settleDelay = settleDelay
        self._deadlines = _Deadlines(clock, timeout)
        #: Each script's first arguments, encoded once: EVALSHA (and EVAL, for
        #: NOSCRIPT) with the script, no keys, the prefix and the time offset.
        self._heads = {
            script.name: (encodeArgs(("EVALSHA", script.sha, 0, prefix, self._offsetMs)),
                          encodeArgs(("EVAL", script.source, 0, prefix, self._offsetMs)))
            for script in SCRIPTS
        }
        #: Each figure tuple's script arguments, made once (the limiter passes
        #: the same tuple for every call of a kind), by the tuple's id.
        self._flat: dict[int, tuple[Sequence[Figure], tuple[bytes, int]]] = {}
        self.observeLatency: Callable[[float], None] | None = None
        self.observeError: Callable[[str], None] | None = None

    # -- service ---------------------------------------------------------

    def startService(self) -> None:
        """Connect (lazily) and load the scripts; start retrying queued settlements."""
        super().startService()
        self._ensureConnected()
        for script in SCRIPTS:
            self._loadScript(script)
        self._retry.start(self._retryInterval, now=False)

    def stopService(self) -> Deferred[None]:
        """Try the queued settlements once more (within the timeout), then disconnect."""
        super().stopService()
        if self._retry.running:
            self._retry.stop()
        if self._soon is not None:
            self._soon.cancel()  # sent below, with the rest of the queue
            self._soon = None
        for loading in list(self._loading):
            loading.cancel()
        redis, self._redis = self._redis, None
        if redis is None:
            return succeed(None)
        flushed = self._sendQueued(redis, final=True) if self._queue else succeed(None)

        def disconnect(_: object) -> Deferred[None]:
            d: Deferred[None] = redis.stop()
            d.addErrback(lambda f: None)
            d.addBoth(lambda _: self._deadlines.stop())
            return d

        return flushed.addBoth(disconnect)

    def _ensureConnected(self) -> Any:
        if self._redis is None:
            self._redis = self._connect()
        return self._redis

    def _loadScript(self, script: _Script) -> None:
        d = self._redis.execute("SCRIPT", "LOAD", script.source)
        d.addTimeout(max(1.0, 10 * self._timeout), self._clock)
        self._loading.append(d)

        def loaded(result: object) -> object:
            self._loading.remove(d)
            return result

        d.addBoth(loaded)
        d.addErrback(lambda f: log.info("Redis script {name} not loaded now ({why}); it loads on first use", name=script.name, why=f.getErrorMessage()))

    # -- calls -----------------------------------------------------------

    def _available(self) -> bool:
        """Whether a call may go to Redis now (the breaker closed, or this is the half-open probe)."""
        if self.circuitState == CLOSED:
            return True
        if self.circuitState == OPEN and self._clock.seconds() >= self._openUntil:
            self.circuitState = HALF_OPEN
            self._probing = False
        if self.circuitState == HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def _call(self, script: _Script, args: Sequence[object], redis: Any = None, tail: bytes = b"", tailCount: int = 0) -> Deferred[Any]:
        """
        Run C{script} (EVALSHA; EVAL on NOSCRIPT) with a deadline, through the
        breaker, with C{args} after the prefix and the time offset, then
        C{tailCount} more arguments already encoded as C{tail} (L{encodeArgs}).
        Fails with L{StoreUnavailable}.
        """
        if redis is None:
            if self.circuitState != CLOSED and not self._available():
                return fail(CircuitOpen("Redis circuit open: not calling Redis for now"))
            redis = self._redis or self._ensureConnected()
        count = b"*%d\r\n" % (5 + len(args) + tailCount)
        body = encodeArgs(args) + tail if args else tail
        started = self._clock.seconds()
        d: Deferred[Any] = redis.send(count + self._heads[script.name][0] + body)
        self._deadlines.watch(d, started)

        def noScript(f: Failure) -> Any:
            # NOSCRIPT: Redis restarted or flushed its scripts; EVAL loads it
            # again (within the same deadline: d waits on it).
            if f.check(RedisError) and f.getErrorMessage().startswith("NOSCRIPT"):
                again: Deferred[Any] = redis.send(count + self._heads[script.name][1] + body)
                return again.addCallbacks(self._succeeded, self._failed, callbackArgs=(started,), errbackArgs=(script, d))
            return self._failed(f, script, d)

        # one entry for both outcomes (the reply, or NOSCRIPT's retry, or the failure)
        return d.addCallbacks(self._succeeded, noScript, callbackArgs=(started,))

    def _succeeded(self, result: Any, started: float) -> Any:
        if self.circuitState != CLOSED or self._consecutiveFailures:  # else all is as below already
            wasOpen = self.circuitState != CLOSED
            self._consecutiveFailures = 0
            self._coolOff = self._initialCoolOff
            self._probing = False
            if wasOpen:
                self.circuitState = CLOSED
                log.info("Redis answers again: circuit closed")
        if self.observeLatency is not None:
            self.observeLatency(self._clock.seconds() - started)
        if self._queue and not self._flushing and self._soon is None:
            self._flush()  # what waited while Redis failed (a batch due soon goes then)
        return result

    def _failed(self, f: Failure, script: _Script, d: Deferred[Any]) -> Failure:
        if f.check(CancelledError) and self._deadlines.timedOut is not d:
            return f  # the caller gave up (its client left): no word on Redis's health
        if f.check(CancelledError, DeferredTimeout):
            kind, why = "timeout", f"Redis did not answer within {self._timeout} s"
        elif f.check(RedisConnectionError, ConnectionError) or not f.check(RedisError, StoreUnavailable):
            kind, why = "connection", f"Redis connection failed: {f.getErrorMessage()}"
        else:
            kind, why = "error", f"Redis answered {script.name} with an error: {f.getErrorMessage()}"
        self.failures += 1
        if self.observeError is not None:
            self.observeError(kind)
        if self.circuitState == HALF_OPEN:
            self._coolOff = min(self._maxCoolOff, self._coolOff * 2)
            self._open(why)
        elif self.circuitState == CLOSED:
            self._consecutiveFailures += 1
            if self._consecutiveFailures >= self._failuresToOpen:
                self._open(why)
        return Failure(StoreUnavailable(why))

    def _open(self, why: str) -> None:
        self.circuitState = OPEN
        self._probing = False
        self._openUntil = self._clock.seconds() + self._coolOff
        log.warn("Redis failing ({why}): circuit open, not calling it for {seconds} s", why=why, seconds=self._coolOff)

    # -- ILimitStore -----------------------------------------------------

    def admit(self, requestId: str, figures: Sequence[Figure], tokens: int, nanoUsd: int, leaseSeconds: float) -> Deferred[Decision]:
        """Admit against every figure or none, in one script (L{ILimitStore.admit})."""
        known = self._flat.get(id(figures))
        if known is not None and known[0] is figures:
            flat = known[1]
        else:
            flat = _flatFigures(figures)
            if type(figures) is tuple:  # a list could change under the key: made each time
                if len(self._flat) >= 10_000:
                    self._flat.clear()  # bounded: made again, once each
                self._flat[id(figures)] = (figures, flat)  # holds the tuple: its id is not reused meanwhile
        leaseMs = int(round(leaseSeconds * 1000))
        if requestId.isascii():  # always (LMGate's ids are hex): one format instead of encodeArgs' loop
            t, n, m = str(tokens), str(nanoUsd), str(leaseMs)
            own = f"${len(requestId)}\r\n{requestId}\r\n${len(t)}\r\n{t}\r\n${len(n)}\r\n{n}\r\n${len(m)}\r\n{m}\r\n".encode()
        else:
            own = encodeArgs((requestId, tokens, nanoUsd, leaseMs))
        d = self._call(ADMIT, (), None, own + flat[0], 4 + flat[1])

        def decide(answer: str) -> Decision:
            if answer == "1":
                return ADMITTED
            reply = [int(x) for x in answer.split(",")]
            states = tuple(
                FigureState(figure, used=reply[3 + 4 * i], reserved=reply[4 + 4 * i], remaining=reply[5 + 4 * i], reset=reply[6 + 4 * i] / 1000)
                for i, figure in enumerate(figures)
            )
            retry = reply[2]
            return Decision(False, refusedBy=figures[reply[1] - 1], retryAfter=retry / 1000 if retry >= 0 else None, states=states)

        def unanswered(f: Failure) -> Failure:
            # Redis may still run an admission it did not answer in time: a
            # release queued behind it (same connection, so after it) gives
            # its reservation back; a no-op if it never ran.
            if not f.check(CircuitOpen):
                self._enqueue(Settlement(requestId, None, None, False))
            return f

        return d.addCallbacks(decide, unanswered)

    def settle(self, settlement: Settlement) -> None:
        """
        Queue it, and send the queue C{settleDelay} seconds later: the
        settlements of those milliseconds go in one script call, in order
        (never raises, never waits), and a call's own admission does not wait
        in Redis behind the settlement of the call before it. While Redis
        fails they wait in the queue for the retry.
        """
        self._enqueue(settlement)
        if self._soon is None and not self._flushing and self.circuitState == CLOSED and self._redis is not None:
            self._soon = self._clock.callLater(self._settleDelay, self._flushSoon)

    def _flushSoon(self) -> None:
        self._soon = None
        self._flush()

    def renew(self, requestIds: Sequence[str], leaseSeconds: float) -> None:
        """Extend the live leases of these calls, in one script; best effort (a failure is only counted)."""
        if not requestIds or self.circuitState != CLOSED or self._redis is None:
            return
        d = self._call(RENEW, [int(round(leaseSeconds * 1000)), *requestIds])
        d.addErrback(lambda f: None)

    def show(self, counters: Sequence[str] | None = None) -> Deferred[list[FigureState]]:
        """Each figure's state of these counters (all of them, found by SCAN, when None)."""
        d = self.counters() if counters is None else succeed(list(counters))

        def showThese(names: list[str]) -> Deferred[list[FigureState]]:
            if not names:
                return succeed([])
            return self._call(SHOW, names).addCallback(_figureStates)

        return d.addCallback(showThese)

    def reset(self, counters: Sequence[str]) -> Deferred[int]:
        """Forget every state of these counters, in one script; the number of figures removed."""
        if not counters:
            return succeed(0)
        return self._call(RESET, list(counters)).addCallback(int)

    def counters(self) -> Deferred[list[str]]:
        """Every counter this prefix holds (SCAN over the counters' state keys; bounded)."""
        redis = self._ensureConnected()
        marker = self._prefix + "s:"
        pattern = _globEscape(marker) + "*"
        found: set[str] = set()
        result: Deferred[list[str]] = Deferred()

        def step(cursor: int, rounds: int) -> None:
            d = redis.execute("SCAN", cursor, "MATCH", pattern, "COUNT", 1000)
            d.addTimeout(max(1.0, 10 * self._timeout), self._clock)

            def got(reply: Sequence[Any]) -> None:
                found.update(str(k)[len(marker):] for k in reply[1])
                nextCursor = int(reply[0])
                if nextCursor == 0 or rounds >= 100_000:
                    result.callback(sorted(found))
                else:
                    step(nextCursor, rounds + 1)

            d.addCallbacks(got, lambda f: result.errback(StoreUnavailable(f"Redis SCAN failed: {f.getErrorMessage()}")))

        step(0, 0)
        return result

    # -- the settlement queue --------------------------------------------

    @property
    def queued(self) -> int:
        """Settlements waiting for Redis."""
        return len(self._queue)

    def _enqueue(self, settlement: Settlement) -> None:
        if len(self._queue) >= self._queueLimit:
            self._queue.popleft()
            self.droppedSettlements += 1
            now = self._clock.seconds()
            if self._lastDropLog is None or now - self._lastDropLog >= 10:
                self._lastDropLog = now
                log.warn(
                    "Redis settlement queue full ({limit}): dropped the oldest ({dropped} so far); their reservations expire on their own",
                    limit=self._queueLimit,
                    dropped=self.droppedSettlements,
                )
        self._queue.append(settlement)

    def _flush(self) -> None:
        """Apply queued settlements in order, a batch per script, while Redis answers."""
        if self._flushing or not self._queue or self._redis is None:
            return
        if not self._available():
            return
        self._flushing = True
        d = self._sendQueued(self._redis)

        def done(_: object) -> None:
            self._flushing = False

        d.addBoth(done)

    def _sendQueued(self, redis: Any, final: bool = False) -> Deferred[None]:
        """
        Send the queue's head in batches of C{SETTLE_BATCH}, each after the
        previous one answered, while full batches wait (a backlog from while
        Redis failed), or all of it when C{final} (the store stops); stop at a
        failure. Settlements queued while a batch was in flight wait the
        settle delay, as any other: sent at once, each answer would send the
        one or two queued meanwhile, and under steady traffic every settlement
        would get a script call of its own.
        """
        batch = [self._queue[i] for i in range(min(SETTLE_BATCH, len(self._queue)))]
        args: list[object] = [len(batch)]
        for s in batch:
            args += _settlementArgs(s)
        d = self._call(SETTLE, args, redis)

        def applied(_: object) -> Deferred[None] | None:
            for _s in batch:
                if self._queue and self._queue[0] is _s:
                    self._queue.popleft()
            if len(self._queue) >= SETTLE_BATCH or (final and self._queue):
                return self._sendQueued(redis, final)
            if self._queue and self._soon is None and self._redis is not None:
                self._soon = self._clock.callLater(self._settleDelay, self._flushSoon)
            return None

        return d.addCallbacks(applied, lambda f: None)


def _flatFigures(figures: Sequence[Figure]) -> tuple[bytes, int]:
    """
    The admit script's figure arguments, encoded (L{encodeArgs}), and how
    many: the number of counters, then for each run of figures on one counter
    (a rule's): the counter, the rule, the number of figures, and kind and
    limit of each.
    """
    runs: list[list[Figure]] = []
    for f in figures:
        if runs and runs[-1][0].counter == f.counter and runs[-1][0].rule == f.rule:
            runs[-1].append(f)
        else:
            runs.append([f])
    flat: list[object] = [len(runs)]
    for run in runs:
        flat += (run[0].counter, run[0].rule, len(run))
        for f in run:
            flat += (f.kind, f.limit)
    return encodeArgs(flat), len(flat)


def _settlementArgs(s: Settlement) -> list[object]:
    return [s.requestId, "" if s.tokens is None else s.tokens, "" if s.nanoUsd is None else s.nanoUsd, "1" if s.reachedUpstream else "0"]


def _figureStates(reply: Sequence[Any]) -> list[FigureState]:
    states = []
    for i in range(0, len(reply), 8):
        counter, rule, kind, limit, used, reserved, remaining, reset = reply[i : i + 8]
        states.append(FigureState(Figure(str(counter), str(rule), str(kind), int(limit)), int(used), int(reserved), int(remaining), int(reset) / 1000))
    return states


def _globEscape(text: str) -> str:
    """C{text} matched literally by a SCAN pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)
