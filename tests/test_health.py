"""
Active health probes (L{lmgate.governance.health}): on a fake clock with a fake
HTTP client, then through treq's StubTreq and, for SigV4, over loopback to an
upstream that checks the signature; the alias order they change; the metrics.
"""

from __future__ import annotations

from random import Random
from typing import Any

from prometheus_client import generate_latest
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from lmgate.config import HealthSettings, settingsFrom
from lmgate.daemon.reload import probedRoutes, providersFor
from lmgate.governance.aliases import Alias, Cooldown, Selector, Target
from lmgate.governance.health import USER_AGENT, HealthProbes, ProbedRoute, healthOf
from lmgate.governance.interfaces import CredentialUnavailable, OutgoingRequest
from lmgate.governance.keys import EnvironmentKey, StaticKeyCredential
from lmgate.governance.managed import CredentialParts, ProviderCredentials
from lmgate.ops.metrics import Metrics
from lmgate.ops.ratelog import RateLimitedLog

PROVIDER_KEY = "sk-provider-health-0000000000000Zz"
URL = "http://up.example/v1/models"


class FakeResponse:
    """A response head: its status; its body is taken by the protocol given."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.transport = StringTransport()

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(self.transport)


class FakeClient:
    """Records each request; the test answers it (C{answer}) or leaves it waiting."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Any, dict[str, Any], Deferred[Any]]] = []
        self.cancelled = 0

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            self.cancelled += 1

        d: Deferred[Any] = Deferred(cancel)
        self.sent.append((method, url, kwargs.pop("headers", None), kwargs, d))
        return d

    def answer(self, code: int) -> FakeResponse:
        response = FakeResponse(code)
        self.sent[-1][4].callback(response)
        return response


class Lines:
    """Every log line emitted while a test runs, formatted."""

    def __init__(self, case: SynchronousTestCase) -> None:
        self.lines: list[str] = []
        observer = lambda event: self.lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        case.addCleanup(globalLogPublisher.removeObserver, observer)

    def matching(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


def keyCredential() -> StaticKeyCredential:
    credential = StaticKeyCredential(EnvironmentKey("K", {"K": PROVIDER_KEY}), "Authorization", "Bearer")
    credential.reload()
    return credential


class _Unavailable:
    kind = "managed"

    def __init__(self, waits: bool) -> None:
        self.waits = waits

    def apply(self, request: OutgoingRequest) -> Deferred[None] | None:
        if self.waits:
            return fail(CredentialUnavailable("the token refresh failed"))
        raise CredentialUnavailable("OPENAI_API_KEY is not set")


class ProbeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.client = FakeClient()
        self.lines = Lines(self)
        self.probes = HealthProbes(self.clock, self.client, RateLimitedLog(Logger(), self.clock))
        self.route = ProbedRoute("a", URL, 10.0, 4.0, keyCredential())

    def start(self, *routes: ProbedRoute) -> None:
        self.probes.configure(routes or (self.route,))
        self.probes.startService()
        self.addCleanup(lambda: self.probes.stopService() if self.probes.running else None)

    def test_probesAtStartThenEveryInterval(self) -> None:
        """The first probe goes out at start, the next C{interval} seconds after; each is a GET
        of the route's URL with the managed key in the provider's header, no redirects followed,
        and its body is not read (the connection is closed)."""
        self.start()
        self.assertEqual(len(self.client.sent), 1)
        method, url, headers, kwargs, _ = self.client.sent[0]
        self.assertEqual((method, url), ("GET", URL))
        self.assertEqual(headers.getRawHeaders(b"authorization"), [b"Bearer " + PROVIDER_KEY.encode()])
        self.assertEqual(headers.getRawHeaders(b"user-agent"), [USER_AGENT])
        self.assertEqual((kwargs["allow_redirects"], kwargs["unbuffered"]), (False, True))
        response = self.client.answer(200)
        self.assertEqual(response.transport.producerState, "stopped")
        self.assertTrue(self.probes.isHealthy("a"))
        self.clock.advance(9.9)
        self.assertEqual(len(self.client.sent), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.client.sent), 2)

    def test_failingStatusIsUnhealthyAndChangesAreLoggedOnce(self) -> None:
        """A status of 400 or more makes the route unhealthy: said once when it turns, each failed
        probe counted (and logged at a bounded rate); a status below 400 (a redirect too) makes it
        healthy again, said once."""
        self.start()
        self.client.answer(503)
        self.assertFalse(self.probes.isHealthy("a"))
        self.assertTrue(self.probes.isHealthy("not-probed"))
        self.clock.advance(10)
        self.client.answer(500)
        self.assertEqual(len(self.lines.matching("providers.a: unhealthy (GET http://up.example/v1/models answered 503)")), 1)
        self.assertEqual(len(self.lines.matching("unhealthy")), 1)
        self.assertEqual(len(self.lines.matching("health probe GET http://up.example/v1/models answered 500")), 1)
        self.assertEqual(self.probes.failures, {"a": 2})
        self.assertEqual(self.probes.states()["a"].problem, "answered 500")
        self.clock.advance(10)
        self.client.answer(302)
        self.clock.advance(10)
        self.client.answer(200)
        self.assertTrue(self.probes.isHealthy("a"))
        self.assertEqual(len(self.lines.matching("providers.a: healthy again")), 1)
        self.assertEqual(self.probes.failures, {"a": 2})

    def test_refusedKeyIsSaidAndNeverShown(self) -> None:
        """401 and 403 make the route unhealthy with a line saying the provider refused LMGate's
        credential; no log line ever holds the key."""
        self.start()
        self.client.answer(401)
        self.clock.advance(10)
        self.client.answer(403)
        self.assertFalse(self.probes.isHealthy("a"))
        refused = self.lines.matching("the provider refused LMGate's credential")
        self.assertEqual(len(refused), 3)  # each probe (rate-limited), and the turn to unhealthy
        self.assertEqual([line for line in self.lines.lines if PROVIDER_KEY in line], [])

    def test_timeout(self) -> None:
        """A probe with no response head within its timeout is abandoned (the request cancelled)
        and the route is unhealthy; the loop goes on."""
        self.start()
        self.clock.advance(3.9)
        self.assertTrue(self.probes.isHealthy("a"))
        self.clock.advance(0.1)
        self.assertEqual(self.client.cancelled, 1)
        self.assertFalse(self.probes.isHealthy("a"))
        self.assertEqual(self.probes.states()["a"].problem, "no response within 4 s")
        self.clock.advance(6)
        self.assertEqual(len(self.client.sent), 2)
        self.client.answer(200)
        self.assertTrue(self.probes.isHealthy("a"))

    def test_connectionFailure(self) -> None:
        """A probe that cannot connect makes the route unhealthy, naming why."""
        self.start()
        self.client.sent[-1][4].errback(ConnectionRefusedError("Connection refused"))
        self.assertFalse(self.probes.isHealthy("a"))
        self.assertEqual(self.probes.states()["a"].problem, "failed: ConnectionRefusedError: Connection refused")

    def test_unavailableCredentialIsUnhealthyNeverACrash(self) -> None:
        """A credential that cannot be had (raised, or a Deferred that fails) makes the probe fail
        without sending anything; the loops go on probing."""
        self.start(
            ProbedRoute("a", URL, 10.0, 4.0, _Unavailable(waits=False)),  # type: ignore[arg-type]
            ProbedRoute("b", URL, 10.0, 4.0, _Unavailable(waits=True)),  # type: ignore[arg-type]
        )
        self.assertEqual(self.client.sent, [])
        self.assertEqual((self.probes.isHealthy("a"), self.probes.isHealthy("b")), (False, False))
        self.assertEqual(self.probes.states()["a"].problem, "no usable credential (OPENAI_API_KEY is not set)")
        self.clock.advance(10)
        self.assertEqual(self.probes.failures, {"a": 2, "b": 2})

    def test_credentialThatWaits(self) -> None:
        """A credential that must wait (a token being minted) holds the probe back until it has
        set its header; the probe then carries it."""

        class Minting:
            kind = "managed"
            waiting: list[tuple[OutgoingRequest, Deferred[None]]] = []

            def apply(self, request: OutgoingRequest) -> Deferred[None]:
                d: Deferred[None] = Deferred()
                self.waiting.append((request, d))
                return d

        minting = Minting()
        self.start(ProbedRoute("vertex", URL, 10.0, 4.0, minting))  # type: ignore[arg-type]
        self.assertEqual(self.client.sent, [])
        request, d = minting.waiting.pop()
        self.assertEqual((request.method, request.url, request.body, request.bodySize), (b"GET", URL.encode(), None, 0))
        request.headers.setRawHeaders(b"authorization", [b"Bearer ya29.token"])
        d.callback(None)
        self.assertEqual(self.client.sent[0][2].getRawHeaders(b"authorization"), [b"Bearer ya29.token"])
        self.client.answer(200)
        self.assertTrue(self.probes.isHealthy("vertex"))

    def test_passThroughRouteIsProbedWithoutAKey(self) -> None:
        """A route without credentials is probed with no credential header at all."""
        self.start(ProbedRoute("a", URL, 10.0, 4.0, None))
        headers = self.client.sent[0][2]
        self.assertFalse(headers.hasHeader(b"authorization"))
        self.client.answer(401)
        self.assertIn("LMGate holds no key", self.probes.states()["a"].problem or "")

    def test_stopCancelsAndLeavesNothingScheduled(self) -> None:
        """Stopping cancels the probe in flight and leaves no delayed call; no verdict follows."""
        self.start()
        self.probes.stopService()
        self.assertEqual(self.client.cancelled, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.probes.isHealthy("a"))
        self.assertEqual(self.probes.failures, {})

    def test_configureRestartsKeepingUnchangedState(self) -> None:
        """New routes (a reload) replace the probes at once: each probed now; a route whose probe is
        unchanged keeps its state, a changed one starts healthy, a removed one is no longer probed."""
        other = ProbedRoute("b", "http://b.example/health", 5.0, 1.0, None)
        self.start(self.route, other)
        self.client.sent[0][4].callback(FakeResponse(503))
        self.client.sent[1][4].callback(FakeResponse(503))
        self.probes.configure([self.route, ProbedRoute("b", "http://b.example/other", 5.0, 1.0, None)])
        self.assertEqual(len(self.client.sent), 4)
        self.assertEqual((self.probes.isHealthy("a"), self.probes.isHealthy("b")), (False, True))
        self.probes.configure([])
        self.assertEqual(self.client.cancelled, 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(self.probes.isHealthy("a"))
        self.assertEqual(self.probes.states(), {})


class HealthOfTests(SynchronousTestCase):
    def test_urlAndTimeout(self) -> None:
        """The path is appended to the upstream as given (an openai_path is not added: the path
        says it); the timeout is C{health.timeout}, else the smaller of interval and response timeout."""
        route = healthOf("g", "https://generativelanguage.googleapis.com", HealthSettings("/v1beta/openai/models", 10.0), None, 600.0)
        self.assertEqual(route.url, "https://generativelanguage.googleapis.com/v1beta/openai/models")
        self.assertEqual(route.timeout, 10.0)
        self.assertEqual(healthOf("g", "http://h/base", HealthSettings("/m?x=1", 10.0), None, 3.0).timeout, 3.0)
        self.assertEqual(healthOf("g", "http://h/base", HealthSettings("/m?x=1", 10.0), None, 3.0).url, "http://h/base/m?x=1")
        self.assertEqual(healthOf("g", "http://h", HealthSettings("/m", 10.0, 20.0), None, 3.0).timeout, 20.0)

    def test_probedRoutes(self) -> None:
        """Routes with C{health} are probed with their credential; a route without C{health}, or
        served by the embedded stub (its key missing), is not."""
        settings = settingsFrom(
            {
                "providers": {
                    "managed": {"upstream": "http://m", "format": "openai", "credentials": {"env": "K"}, "health": {"path": "/v1/models"}},
                    "plain": {"upstream": "http://p", "format": "openai", "health": {"path": "/v1/models", "interval": 3}},
                    "stubbed": {"upstream": "http://s", "format": "openai", "credentials": {"env": "GONE", "missing": "stub"},
                                "health": {"path": "/v1/models"}},
                    "quiet": {"upstream": "http://q", "format": "openai"},
                }
            },
            "lmgate.yaml",
            {},
        )
        credentials = ProviderCredentials(
            CredentialParts("lmgate.yaml", environ={"K": PROVIDER_KEY}), lambda: "http://127.0.0.1:9", announce=False
        )
        credentials.configure(settings)
        providers = providersFor(settings, credentials)
        routes = {r.name: r for r in probedRoutes(settings, providers)}
        self.assertEqual(sorted(routes), ["managed", "plain"])
        self.assertIs(routes["managed"].credential, providers[b"managed"].credential)
        self.assertIsNone(routes["plain"].credential)
        self.assertEqual((routes["plain"].url, routes["plain"].interval, routes["plain"].timeout), ("http://p/v1/models", 3.0, 3.0))


class SelectorHealthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.down: set[str] = set()
        self.alias = Alias("chat", (Target("a", "m1"), Target("b", "m2"), Target("c", "m3")))

    def order(self, alias: Alias, cooldown: Cooldown | None = None) -> list[str]:
        return [t.provider for t in Selector(cooldown, lambda name: name not in self.down).order(alias, Random(1))]

    def test_unhealthyGoLast(self) -> None:
        """Targets on unhealthy routes go after the healthy ones, like cooling ones; all unhealthy:
        the strategy's own order, so the first is still tried."""
        self.assertEqual(self.order(self.alias), ["a", "b", "c"])
        self.down = {"a"}
        self.assertEqual(self.order(self.alias), ["b", "c", "a"])
        self.down = {"a", "b", "c"}
        self.assertEqual(self.order(self.alias), ["a", "b", "c"])

    def test_withCooldownAndWeights(self) -> None:
        """Cooling and unhealthy targets share the back of the line; a weighted pick is made among
        the healthy ones."""
        clock = Clock()
        cooldown = Cooldown(clock, failures=1)
        cooldown.failed(Target("b", "m2"))
        self.down = {"a"}
        self.assertEqual(self.order(self.alias, cooldown), ["c", "a", "b"])
        weighted = Alias("w", (Target("a", "m1", 100.0), Target("b", "m2", 1.0), Target("c", "m3", 1.0)), "weighted")
        self.down = {"a"}
        for seed in range(20):
            first = Selector(None, lambda name: name not in self.down).order(weighted, Random(seed))[0]
            self.assertIn(first.provider, ("b", "c"))


class MetricsTests(SynchronousTestCase):
    def test_upstreamHealthy(self) -> None:
        """The admin metrics show each probed route's health (1/0) and its failed probes."""
        metrics = Metrics(upstreamHealth=lambda: ({"a": True, "b": False}, {"b": 3}))
        page = generate_latest(metrics.registry).decode()
        self.assertIn('lmgate_upstream_healthy{provider="a"} 1.0', page)
        self.assertIn('lmgate_upstream_healthy{provider="b"} 0.0', page)
        self.assertIn('lmgate_upstream_probe_failures_total{provider="b"} 3.0', page)


class Counting(Resource):
    isLeaf = True

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status
        self.seen: list[Request] = []

    def render(self, request: Request) -> bytes:
        self.seen.append(request)
        request.setResponseCode(self.status)
        return b'{"data": []}'


class StubTreqTests(SynchronousTestCase):
    def test_throughTreq(self) -> None:
        """Through treq (StubTreq): the upstream gets the GET with the key and answers; the verdict follows."""
        upstream = Counting(503)
        clock = Clock()
        probes = HealthProbes(clock, StubTreq(upstream), RateLimitedLog(Logger(), clock))
        Lines(self)
        probes.configure([ProbedRoute("a", URL, 10.0, 4.0, keyCredential())])
        probes.startService()
        self.assertFalse(probes.isHealthy("a"))
        [seen] = upstream.seen
        self.assertEqual((seen.method, seen.uri), (b"GET", b"/v1/models"))
        self.assertEqual(seen.requestHeaders.getRawHeaders(b"authorization"), [b"Bearer " + PROVIDER_KEY.encode()])
        upstream.status = 200
        clock.advance(10)
        self.assertTrue(probes.isHealthy("a"))
        probes.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class SigV4ProbeTests(TestCase):
    async def test_signedProbe(self) -> None:
        """A Bedrock route's probe is signed by its SigV4 credential over the very GET sent (by treq
        over loopback): the upstream, recomputing the signature from the wire, accepts it."""
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool

        from lmgate.governance.sigv4 import SigV4Credential
        from tests.test_sigv4 import FakeBedrock, StaticSession

        upstream = FakeBedrock()
        port = reactor.listenTCP(0, Site(upstream), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        pool = ThreadPool(minthreads=1, maxthreads=1, name="health-test")
        pool.start()
        self.addCleanup(pool.stop)
        credential = SigV4Credential(reactor, pool, "us-east-1", session=StaticSession())
        client = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
        probes = HealthProbes(reactor, client, RateLimitedLog(Logger(), reactor))
        url = f"http://127.0.0.1:{port.getHost().port}/foundation-models"
        probes.configure([ProbedRoute("bedrock", url, 60.0, 10.0, credential)])
        probes.startService()
        self.addCleanup(probes.stopService)
        probe = probes._probes["bedrock"]
        for _ in range(200):  # bounded: until the probe has had its answer
            if probes.failures or (upstream.seen and probe._pending is None):
                break
            d: Deferred[None] = Deferred()
            reactor.callLater(0.05, d.callback, None)  # type: ignore[attr-defined]
            await d
        [seen] = upstream.seen
        self.assertEqual((seen["uri"], seen["problem"]), (b"/foundation-models", None))
        self.assertTrue(probes.isHealthy("bedrock"))
