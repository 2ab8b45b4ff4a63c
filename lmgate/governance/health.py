"""
Active health probes of routes (C{providers.<name>.health}).

L{HealthProbes} sends C{GET <upstream><health.path>} to every route that has
C{health}, at start and then every C{health.interval} seconds, carrying the
route's managed credential exactly as a relayed call would (the route's
L{IUpstreamCredential} applied to an L{OutgoingRequest}: a key header, a SigV4
signature over the empty-body GET, a Vertex OAuth token). A response head with
a status below 400 within the timeout is healthy; anything else (401/403: the
provider refused LMGate's key; 5xx; no connection; no answer in time; no
usable credential) is unhealthy. The alias L{lmgate.governance.aliases.Selector}
puts targets on unhealthy routes after the others, never refusing a call for
it. A route without C{health}, or served by the embedded stub, is not probed
and always healthy.

Probes are side calls: they go through treq (a C{treq.client.HTTPClient}), never through
the relay's pool. A probe never raises into its loop, never writes a provider
key into a log line (lines name the route and the URL probed), and is
cancelled when the service stops or the routes are replaced (SIGHUP).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol as TypingProtocol

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from lmgate.governance.interfaces import CredentialUnavailable, IUpstreamCredential, OutgoingRequest

log = Logger()

#: What a probe says it is (the provider's logs show it beside LMGate's relayed calls).
USER_AGENT = b"LMGate-health-probe"


class _RateLog(TypingProtocol):
    def info(self, category: str, format: str, **kwargs: Any) -> None:
        """Log C{format}, at a bounded rate per C{category}."""


@dataclass(frozen=True)
class ProbedRoute:
    """
    One route to probe, as the gateway serves it now.

    @ivar name: the route's name (the metric's C{provider} label).
    @ivar url: C{<upstream><health.path>}, ASCII, as it goes on the wire.
    @ivar interval: seconds between probes.
    @ivar timeout: seconds a probe may wait for the response head.
    @ivar credential: the managed route's credential, or None: a pass-through
        route is probed without any key (LMGate holds none).
    """

    name: str
    url: str
    interval: float
    timeout: float
    credential: IUpstreamCredential | None = None

    def sameProbe(self, other: "ProbedRoute") -> bool:
        """Whether C{other} probes the same thing (its last state still holds for this one)."""
        return (self.url, self.interval, self.timeout) == (other.url, other.interval, other.timeout)


class _Problem(Exception):
    """A probe's answer that makes the route unhealthy; the message is the log line's reason."""

    def __init__(self, reason: str, category: str = "health probe failures") -> None:
        super().__init__(reason)
        self.reason, self.category = reason, category


class _DropBody(Protocol):
    """Takes a probe response's body by closing its connection: only the status counts."""

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            try:
                transport.stopProducing()
            except Exception:  # a body already in (an in-memory response) has nothing to stop
                pass


class _RouteProbe:
    """One route's probe loop and its in-flight probe."""

    def __init__(self, owner: "HealthProbes", route: ProbedRoute) -> None:
        self.route, self._owner = route, owner
        self._loop = LoopingCall(self.probe)
        self._loop.clock = owner.clock
        self._pending: Deferred[None] | None = None

    def start(self) -> None:
        done = self._loop.start(self.route.interval, now=True)
        done.addErrback(lambda reason: log.failure("providers.{name}: the health probe loop ended", reason, name=self.route.name))

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()  # a connection being made or waited on is given up

    def probe(self) -> Deferred[None]:
        """Probe once; the Deferred never fails (a LoopingCall whose call fails never runs again)."""
        route = self.route
        headers = Headers({b"user-agent": [USER_AGENT], b"accept": [b"application/json"]})
        outgoing = OutgoingRequest(b"GET", route.url.encode("ascii"), headers, None, None, 0)
        try:
            waiting = route.credential.apply(outgoing) if route.credential is not None else None
        except Exception as e:
            attempt: Deferred[Any] = Deferred()
            attempt.errback(Failure(e))
        else:
            attempt = succeed(None) if waiting is None else waiting
            attempt.addCallback(lambda _: self._send(outgoing))
        attempt.addCallback(self._status)
        attempt.addTimeout(route.timeout, self._owner.clock)
        done: Deferred[None] = attempt.addCallbacks(self._answered, self._failed)
        self._pending = done
        done.addBoth(self._settled, done)
        return done

    def _send(self, outgoing: OutgoingRequest) -> Deferred[Any]:
        sent: Deferred[Any] = self._owner.client.request(
            outgoing.method.decode("ascii"), outgoing.url.decode("ascii"), headers=outgoing.headers,
            allow_redirects=False, unbuffered=True,
        )
        return sent

    def _status(self, response: Any) -> int:
        response.deliverBody(_DropBody())
        return int(response.code)

    def _answered(self, status: int) -> None:
        if status < 400:
            self._owner._result(self.route, None, status)
            return
        if status in (401, 403):
            whose = "LMGate's credential" if self.route.credential is not None else "the probe (a pass-through route: LMGate holds no key)"
            self._owner._result(
                self.route, _Problem(f"answered {status}: the provider refused {whose}", "health probe credentials")
            )
            return
        self._owner._result(self.route, _Problem(f"answered {status}"))

    def _failed(self, reason: Failure) -> None:
        if reason.check(CancelledError):
            return  # stopped (shutdown, reload): no verdict
        if reason.check(TimeoutError):
            problem = _Problem(f"no response within {self.route.timeout:g} s")
        elif reason.check(CredentialUnavailable):
            problem = _Problem(f"no usable credential ({reason.getErrorMessage()})", "health probe credentials")
        else:
            problem = _Problem(f"failed: {_describe(reason)}")
        self._owner._result(self.route, problem)

    def _settled(self, result: object, done: Deferred[None]) -> None:
        if self._pending is done:
            self._pending = None
        if isinstance(result, Failure):  # a mistake above: logged, the loop goes on
            log.failure("providers.{name}: the health probe failed unexpectedly", result, name=self.route.name)


def _describe(reason: Failure) -> str:
    """A short reason for a failed probe: the exception's type and message (Twisted's ResponseFailed: the first cause)."""
    value: Any = reason.value
    inner = getattr(value, "reasons", None)
    if inner:
        value = inner[0].value
    text = str(value).strip()
    return f"{type(value).__name__}: {text}" if text else type(value).__name__


@dataclass
class RouteHealth:
    """
    What the probes know of one route.

    @ivar healthy: the last verdict (True until the first probe answers).
    @ivar problem: why the last probe failed, or None.
    """

    healthy: bool = True
    problem: str | None = None


class HealthProbes(Service):
    """
    The active health probes of the routes that have C{health}: a loop per
    route on C{clock}, started with the service and replaced whole by
    L{configure} (start-up and every reload). The state of a route whose
    probe is unchanged (same URL, interval, timeout) is kept across a reload;
    a new or changed probe starts healthy until it answers.

    @param client: sends the probes: a treq C{HTTPClient} (C{StubTreq} in tests).
    @param rateLog: where failed probes are logged, at a bounded rate (the
        gateway's L{lmgate.ops.ratelog.RateLimitedLog}).
    @param pool: the client's connection pool, closed when the service stops.
    """

    def __init__(self, clock: IReactorTime, client: Any, rateLog: _RateLog, pool: Any = None) -> None:
        self.clock, self.client, self._rateLog, self._pool = clock, client, rateLog, pool
        self._probes: dict[str, _RouteProbe] = {}
        self._states: dict[str, RouteHealth] = {}
        #: Failed probes per route since start (a counter: never reset, not even by a reload).
        self.failures: dict[str, int] = {}

    def configure(self, routes: Iterable[ProbedRoute]) -> None:
        """Probe C{routes} from now on (the previous probes are stopped; running: the new ones start at once)."""
        new = {route.name: route for route in routes}
        old, self._probes = self._probes, {}
        for probe in old.values():
            probe.stop()
        states: dict[str, RouteHealth] = {}
        for name, route in new.items():
            before = old.get(name)
            if before is not None and before.route.sameProbe(route) and name in self._states:
                states[name] = self._states[name]
            else:
                states[name] = RouteHealth()
                log.info(
                    "providers.{name}: health probe GET {url} every {interval:g} s (timeout {timeout:g} s)",
                    name=name, url=route.url, interval=route.interval, timeout=route.timeout,
                )
            self._probes[name] = _RouteProbe(self, route)
        self._states = states
        if self.running:
            for probe in self._probes.values():
                probe.start()

    def isHealthy(self, name: str) -> bool:
        """Whether the route C{name} is healthy: a route not probed always is."""
        state = self._states.get(name)
        return state is None or state.healthy

    def states(self) -> Mapping[str, RouteHealth]:
        """Each probed route's state, by name."""
        return dict(self._states)

    def _result(self, route: ProbedRoute, problem: _Problem | None, status: int | None = None) -> None:
        """A probe of C{route} answered: healthy (C{problem} None) or not; state changes are logged once each."""
        state = self._states.get(route.name)
        probe = self._probes.get(route.name)
        if state is None or probe is None or probe.route is not route:
            return  # a probe of routes replaced meanwhile
        if problem is None:
            if not state.healthy:
                log.info("providers.{name}: healthy again (GET {url} answered {status})", name=route.name, url=route.url, status=status)
            state.healthy, state.problem = True, None
            return
        self.failures[route.name] = self.failures.get(route.name, 0) + 1
        self._rateLog.info(
            problem.category, "providers.{name}: health probe GET {url} {problem}", name=route.name, url=route.url, problem=problem.reason
        )
        if state.healthy:
            log.warn(
                "providers.{name}: unhealthy (GET {url} {problem}): aliases try their other targets first",
                name=route.name, url=route.url, problem=problem.reason,
            )
        state.healthy, state.problem = False, problem.reason

    def startService(self) -> None:
        Service.startService(self)
        for probe in self._probes.values():
            probe.start()

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        for probe in self._probes.values():
            probe.stop()
        if self._pool is not None:
            closed: Deferred[None] = self._pool.closeCachedConnections()
            return closed
        return None


def healthOf(
    name: str, baseURL: str, health: Any, credential: IUpstreamCredential | None, responseTimeout: float
) -> ProbedRoute:
    """
    The probe of one route: C{health.path} appended to the route's upstream as
    given (for an openai-format route with C{openai_path}, the path includes
    it: C{/v1beta/openai/models}), normalised as treq sends it (so a SigV4
    signature covers the very URL sent); the timeout C{health.timeout}, or
    C{min(health.interval, timeouts.response)}.

    @param health: the route's L{lmgate.config.HealthSettings}.
    """
    from hyperlink import EncodedURL

    url = EncodedURL.from_text(baseURL.rstrip("/") + health.path).to_uri().to_text()
    timeout = health.timeout if health.timeout is not None else min(health.interval, responseTimeout)
    return ProbedRoute(name, url, health.interval, timeout, credential)
