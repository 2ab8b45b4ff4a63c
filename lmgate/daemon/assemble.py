"""
Assembling the service tree: a gateway process (its writers, allow-list,
upstream pool, metrics, site and listeners, in the order they start and stop),
the supervisor of C{--workers N}, and the in-process stub upstream.

Every part gets the reactor it was handed; nothing here reaches for the
global one (that is L{lmgate.daemon.tap.serviceFor}'s job).
"""

from __future__ import annotations

import signal
from dataclasses import replace
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Site

from lmgate.access.allowlist import AllowList
from lmgate.config import Settings, accessLogPath
from lmgate.daemon.demo import announceDemo
from lmgate.daemon.listen import listenerFor
from lmgate.daemon.reload import Reloader, applySettings, pricesFor
from lmgate.daemon.services import DrainService, FreezeService, OrderedMultiService, ThreadPoolService
from lmgate.daemon.signals import SignalService, StopSignalGuard, reopenTwistdLog
from lmgate.daemon.workers import (
    AdoptedListener,
    Supervisor,
    SupervisorWatch,
    listeningSocket,
    workerStatsPath,
)
from lmgate.errors import ConfigError
from lmgate.gate.gateway import Gateway, GatewayResource, GatewaySite
from lmgate.limits.limiter import Limiter
from lmgate.limits.memory import MemoryStore
from lmgate.limits.service import LimitsService
from lmgate.governance.health import HealthProbes
from lmgate.governance.managed import ProviderCredentials
from lmgate.ops.metrics import AdminSite, Fanout, Metrics
from lmgate.records.audit import AuditTrail
from lmgate.records.jsonl import UsageLog, checkStatsPath
from lmgate.relay.upstream import Upstream, trustRootFor
from lmgate.stub.server import makeStubResource

log = Logger()


def stubService(reactor: Any, settings: Settings) -> Service:
    """The in-process stub upstream (C{stub.listen})."""
    assert settings.stubListen is not None
    stubSite = Site(makeStubResource(reactor), reactor=reactor)
    stubSite.noisy = False
    stubSite.log = lambda request: None  # type: ignore[method-assign]  # the gateway's access log shows each call
    return listenerFor(reactor, settings.stubListen, stubSite, settings, "stub.listen")


class EmbeddedStub(Service):
    """
    The stub upstream that serves C{missing: stub} routes: started on first
    need on a loopback port of its own (independent of C{stub.listen}), in
    this process, and closed at stop.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._port: Any = None

    def url(self) -> str:
        """The stub's base URL, listening from now on."""
        if self._port is None:
            site = Site(makeStubResource(self._reactor), reactor=self._reactor)
            site.noisy = False
            site.log = lambda request: None  # type: ignore[method-assign]  # the gateway's access log shows each call
            self._port = self._reactor.listenTCP(0, site, interface="127.0.0.1")
        return f"http://127.0.0.1:{self._port.getHost().port}"

    def stopService(self) -> Deferred[None] | None:
        Service.stopService(self)
        port, self._port = self._port, None
        return None if port is None else port.stopListening()


def credentialsFor(
    settings: Settings, reactor: Any, stub: EmbeddedStub | None, announce: bool = True, threadPool: ThreadPool | None = None
) -> ProviderCredentials:
    """
    The managed routes' credentials, read now (in the foreground).

    @param stub: serves C{missing: stub} routes (None: only checking, as the
        supervisor of C{--workers} does).
    @param threadPool: where credentials refresh and sign slow parts (SigV4,
        Google OAuth); None when only checking (nothing refreshes then).
    @raise ConfigError: a key is missing on a C{missing: refuse} route, or a
        credential kind cannot be used.
    """
    from lmgate.governance.managed import CredentialParts, ProviderCredentials

    credentials = ProviderCredentials(
        CredentialParts(settings.source, reactor, threadPool),
        stub.url if stub is not None else (lambda: "http://127.0.0.1:9"),
        announce=announce,
    )
    credentials.configure(settings)
    return credentials


def supervisorService(
    settings: Settings,
    reactor: Any,
    configPath: str | None,
    listen: str | None,
    workers: int,
    owner: tuple[int, int] | None = None,
) -> IService:
    """
    C{--workers N}: check in the foreground what each worker will need, then a
    supervisor that shares one socket among N workers.
    """
    if settings.adminListen is not None:
        raise ConfigError(settings.source, "admin.listen", "not available with --workers yet (each worker would need its own port)")
    if settings.usageLimits.rules and not settings.usageLimits.shared:
        raise ConfigError(
            settings.source,
            "usage_limits.store",
            f"memory counts in one process only; with --workers {workers} use a redis:// store shared by every worker",
        )
    AllowList(FilePath(settings.allowlistPath), settings.allowlistReloadInterval, reactor)
    # What a worker would fail on at start, checked here, in the foreground: a worker that
    # cannot start is restarted for ever while the shared socket accepts and nobody answers.
    pricesFor(settings)
    trustRootFor(settings)
    if settings.telemetry.otlpEndpoint is not None:
        from lmgate.ops.telemetry import checkAvailable

        checkAvailable(settings.source, settings.telemetry.otlpEndpoint)
    credentialsFor(settings, reactor, None, announce=False)  # each worker reads them again, the first says so
    if settings.policy.plugins:
        from lmgate.policy.engine import loadPlugins

        loadPlugins(settings.source, settings.policy)  # each worker makes its own
    accessPath = accessLogPath(settings)
    for index in range(1, workers + 1):
        checkStatsPath(workerStatsPath(settings.statsPath, index), settings.source, owner=owner)
        if accessPath is not None:
            checkStatsPath(workerStatsPath(accessPath, index), settings.source, "access_log", owner)
        if auditWanted(settings):
            checkStatsPath(workerStatsPath(settings.audit.path, index), settings.source, "audit.path", owner, AUDIT_MODE)
    listeningSocket(reactor, settings).close()  # fail now, in the foreground, if it cannot be bound
    top = OrderedMultiService()
    if settings.stubListen is not None:
        stubService(reactor, settings).setServiceParent(top)
    supervisor = Supervisor(reactor, settings, configPath, listen, workers)
    supervisor.setServiceParent(top)
    top.lost = lambda: supervisor.uncleanStops
    StopSignalGuard(reactor).setServiceParent(top)
    announceDemo(settings)
    return top


def writersFor(
    settings: Settings, reactor: Any, workerIndex: int | None, owner: tuple[int, int] | None
) -> tuple[UsageLog, UsageLog | None]:
    """
    The usage records' writer and, when C{access_log} is on, the access log's
    (which shares the records' thread), their directories checked.

    @raise ConfigError: a directory cannot be written (by C{owner}, if given).
    """
    checkStatsPath(settings.statsPath, settings.source, owner=owner)
    usageLog = UsageLog(
        settings.statsPath,
        reactor,
        flushInterval=settings.statsFlushInterval,
        maxBytes=settings.statsMaxBytes,
        backlog=settings.statsBacklog,
    )
    accessPath = accessLogPath(settings)
    if accessPath is None:
        return usageLog, None
    if workerIndex is not None:
        accessPath = workerStatsPath(accessPath, workerIndex)
    checkStatsPath(accessPath, settings.source, "access_log", owner)
    # Same rotation and backlog as the records, in the records' writer thread;
    # no fsync: an access line is a convenience, the record is the account.
    accessLog = UsageLog(
        accessPath,
        reactor,
        flushInterval=settings.statsFlushInterval,
        maxBytes=settings.statsMaxBytes,
        backlog=settings.statsBacklog,
        runInThread=usageLog.runInThread,
        what="access log lines",
        fsync=False,
    )
    return usageLog, accessLog


#: The audit log's permissions: it holds request and response bodies.
AUDIT_MODE = 0o600


def auditWanted(settings: Settings) -> bool:
    """
    Whether this configuration needs an audit log: some policy rule has
    C{audit: true}, or plugins are loaded (a plugin may ask for any call).
    """
    policy = settings.policy
    return bool(policy.plugins) or any(rule.audit for rule in policy.rules)


def auditFor(settings: Settings, reactor: Any, workerIndex: int | None, owner: tuple[int, int] | None) -> UsageLog | None:
    """
    The audit log's writer (C{audit.path}, a worker's own file with
    C{--workers}), its directory checked and the file made C{0600} now; None
    when no rule or plugin can ask for an audit (then no file is created).
    Same rotation and flush interval as the records, fsynced, in a thread of
    its own (its lines are large: they never hold the records back), with its
    own backlog (C{audit.backlog}).

    @raise ConfigError: naming C{audit.path}, when it cannot be written (by C{owner}, if given).
    """
    if not auditWanted(settings):
        return None
    path = settings.audit.path
    if workerIndex is not None:
        path = workerStatsPath(path, workerIndex)
    checkStatsPath(path, settings.source, "audit.path", owner, AUDIT_MODE)
    return UsageLog(
        path,
        reactor,
        flushInterval=settings.statsFlushInterval,
        maxBytes=settings.statsMaxBytes,
        backlog=settings.audit.backlog,
        what="audit lines",
        mode=AUDIT_MODE,
    )


def metricsFor(settings: Settings, usageLog: UsageLog, allowList: AllowList) -> Metrics | None:
    """The admin listener's metrics (None without C{admin.listen})."""
    if settings.adminListen is None:
        return None
    return Metrics(
        models=settings.metricsModels,
        perKey=settings.metricsPerKey,
        perKeyLimit=settings.metricsPerKeyLimit,
        writerStats=lambda: (usageLog.written, usageLog.pending, usageLog.dropped),
        keyCount=lambda: allowList.size,
        reloadErrors=lambda: allowList.reloadErrors,
    )


def limiterFor(settings: Settings, reactor: Any, gateway: Gateway, metrics: Metrics | None) -> LimitsService:
    """
    The usage limits (C{usage_limits:}): their store (this process's memory,
    or Redis) and the service that keeps it; the limiter goes on the gateway.
    Rules may be empty (none yet): a reload can add them.
    """
    limits = settings.usageLimits
    store: Any
    if limits.shared:
        from lmgate.limits.redis import RedisStore

        store = RedisStore.fromSettings(limits, reactor)
    else:
        store = MemoryStore(reactor)
    limiter = gateway.limiter = Limiter(limits, store, reactor, gateway.prices)
    if metrics is not None:
        limiter.observeRefusal = metrics.limitRefused
        metrics.limitsStore = store
        if limits.shared:  # the shared store's round trips and failures
            store.observeLatency = metrics.observeStoreLatency
            store.observeError = metrics.storeError
    return LimitsService(limiter, reactor)


def policyFor(settings: Settings, reactor: Any, gateway: Gateway) -> None:
    """
    The policy's rules and plugins (C{policy:}) on the gateway; the plugins
    are made now.

    @raise ConfigError: a plugin cannot be imported, made, or does not provide
        L{lmgate.policy.interfaces.IPolicy}.
    """
    from lmgate.policy.engine import Policy, loadPlugins

    plugins = loadPlugins(settings.source, settings.policy)
    gateway.policy = Policy(settings.policy, plugins, settings.usageLimits.bytesPerToken, reactor, gateway.rateLog)


def cooperatorFor(reactor: Any) -> Cooperator:
    """
    The cooperator that sends large request bodies upstream, scheduled on
    C{reactor} rather than on Twisted's global one.
    """
    return Cooperator(scheduler=lambda work: reactor.callLater(0, work))


def gatewayFor(
    settings: Settings,
    reactor: Any,
    allowList: AllowList,
    upstream: Upstream,
    usageLog: UsageLog,
    metrics: Metrics | None,
) -> Gateway:
    """The gateway every call shares; its records also reach the metrics, if any."""
    sink: Any = usageLog if metrics is None else Fanout([usageLog, metrics])
    gateway = Gateway({}, allowList, upstream, sink, reactor, cooperator=cooperatorFor(reactor))
    gateway.prices = pricesFor(settings)
    if metrics is not None:
        metrics.inFlight = lambda: len(gateway.active)
        gateway.observeOverhead = metrics.observeOverhead
    return gateway


def tracerFor(settings: Settings, reactor: Any, gateway: Gateway) -> Service | None:
    """
    The traces (C{telemetry.otlp.endpoint}), made the gateway's; None when no
    endpoint is set, and then OpenTelemetry is not even imported.

    @raise ConfigError: an endpoint is set and the SDK is not installed.
    """
    telemetry = settings.telemetry
    if telemetry.otlpEndpoint is None:
        return None
    from lmgate.ops.telemetry import Tracer, checkAvailable

    checkAvailable(settings.source, telemetry.otlpEndpoint)
    tracer = gateway.tracer = Tracer(telemetry, reactor)
    return tracer


def healthFor(settings: Settings, reactor: Any, gateway: Gateway) -> HealthProbes:
    """
    The routes' active health probes (L{lmgate.governance.health.HealthProbes}),
    made the gateway's: a treq client of their own (not the relay's pool), whose
    connections are not kept between probes, verifying upstream certificates as
    the relay does (C{tls.ca_bundle}), connecting within C{timeouts.connect},
    and keeping no cookies.
    """
    from http.cookiejar import DefaultCookiePolicy

    from treq.client import HTTPClient
    from treq.cookies import IndexableCookieJar
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

    from lmgate.relay.upstream import trustRootFor

    pool = HTTPConnectionPool(reactor, persistent=False)
    policy = BrowserLikePolicyForHTTPS(trustRoot=trustRootFor(settings))
    agent = Agent(reactor, contextFactory=policy, connectTimeout=settings.connectTimeout, pool=pool)
    client = HTTPClient(agent, cookiejar=IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[])))
    probes = HealthProbes(reactor, client, gateway.rateLog, pool)
    gateway.health = probes
    return probes


def siteFor(
    settings: Settings,
    reactor: Any,
    gateway: Gateway,
    accessLog: UsageLog | None,
    metrics: Metrics | None,
    credentials: ProviderCredentials | None = None,
) -> GatewaySite:
    """The gateway's site, with the settings a reload can change applied."""
    site = GatewaySite(GatewayResource(gateway), accessLog=accessLog, reactor=reactor)
    if metrics is not None:
        site.observeRefusal = metrics.clientRefused
    applySettings(settings, gateway, site, credentials)
    return site


def gatewayListener(settings: Settings, reactor: Any, site: GatewaySite, workerFd: int | None) -> Service:
    """
    What accepts the gateway's connections: C{listen} (checked in the
    foreground), or in a worker the socket its supervisor shares.
    """
    if workerFd is not None:
        return AdoptedListener(reactor, workerFd, site)
    return listenerFor(reactor, settings.listen, site, settings, "listen")


def adminService(settings: Settings, reactor: Any, metrics: Metrics, limiter: Limiter | None = None) -> Service:
    """The admin listener (C{admin.listen}) serving the metrics (and the usage limits' counters)."""
    assert settings.adminListen is not None
    return listenerFor(reactor, settings.adminListen, AdminSite(metrics, reactor, limiter), settings, "admin.listen")


def drainFor(site: GatewaySite, gateway: Gateway, timeout: float) -> DrainService:
    """The service that, at stop, lets the calls in flight finish (bounded)."""

    def drainCalls(timeout: float) -> Deferred[None]:
        # No further request is read from client connections (idle ones close now), the
        # calls in flight finish (or are aborted at the timeout), and whatever connection
        # is left is cut: no call can start once its record could not be written.
        site.closeIdle()
        drained = gateway.drain(timeout)
        drained.addCallback(lambda _: site.closeAll())
        return drained

    return DrainService(drainCalls, timeout)


def signalsFor(
    reactor: Any, reloader: Reloader, usageLog: UsageLog, accessLog: UsageLog | None, auditLog: UsageLog | None = None
) -> SignalService:
    """SIGHUP reloads; SIGUSR1 reopens the record files (the audit log too) and twistd's log."""

    def reopenFiles() -> None:
        usageLog.reopen()
        if accessLog is not None:
            accessLog.reopen()
        if auditLog is not None:
            auditLog.reopen()
        reopenTwistdLog()

    return SignalService(reactor, {signal.SIGHUP: reloader.reload, signal.SIGUSR1: reopenFiles})


def buildService(
    settings: Settings,
    reactor: Any,
    listen: str | None = None,
    workerFd: int | None = None,
    workerIndex: int | None = None,
    owner: tuple[int, int] | None = None,
) -> IService:
    """
    The daemon's service tree for checked settings.

    @param listen: the command line's C{--listen}, kept across reloads.
    @param workerFd: in a worker process, the supervisor's socket to accept on.
    @param workerIndex: in a worker process, its number (names its stats file).
    @param owner: C{(uid, gid)} twistd switches to after start-up (started as
        root with C{--uid}): the record files are created for that user.

    @raise ConfigError: the allow-list, the stats directory, the TLS bundle or
        an endpoint cannot be used.
    """
    configured = settings  # as the file says: what a reload compares with
    if workerIndex is not None:
        settings = replace(settings, statsPath=workerStatsPath(settings.statsPath, workerIndex), stubListen=None)
    allowList = AllowList(FilePath(settings.allowlistPath), settings.allowlistReloadInterval, reactor)
    embeddedStub = EmbeddedStub(reactor)
    credentialThreads = ThreadPoolService("lmgate-credentials", maxThreads=4)
    credentials = credentialsFor(settings, reactor, embeddedStub, workerIndex in (None, 1), credentialThreads.pool)
    usageLog, accessLog = writersFor(settings, reactor, workerIndex, owner)
    auditLog = auditFor(settings, reactor, workerIndex, owner)
    upstream = Upstream.fromSettings(reactor, settings)
    metrics = metricsFor(settings, usageLog, allowList)
    gateway = gatewayFor(settings, reactor, allowList, upstream, usageLog, metrics)
    if auditLog is not None:
        gateway.audit = AuditTrail(auditLog, settings.audit.maxBody)
    limits = limiterFor(settings, reactor, gateway, metrics)
    policyFor(settings, reactor, gateway)
    tracer = tracerFor(settings, reactor, gateway)
    health = healthFor(settings, reactor, gateway)
    if metrics is not None:
        metrics.upstreamHealth = lambda: ({name: state.healthy for name, state in health.states().items()}, health.failures)
    site = siteFor(settings, reactor, gateway, accessLog, metrics, credentials)
    listener = gatewayListener(settings, reactor, site, workerFd)

    top = OrderedMultiService()
    top.lost = lambda: usageLog.lost
    # Started in this order, stopped in reverse, one after another.
    usageLog.setServiceParent(top)
    if accessLog is not None:
        accessLog.setServiceParent(top)  # after the records' writer: it borrows its thread
    if auditLog is not None:
        auditLog.setServiceParent(top)  # stopped after the calls drained, like the records' writer
    if tracer is not None:
        tracer.setServiceParent(top)  # stopped (its last spans flushed) after the calls drained
    allowList.setServiceParent(top)
    credentialThreads.setServiceParent(top)  # before the credentials start refreshing in it, stopped after
    credentials.setServiceParent(top)
    upstream.setServiceParent(top)
    limits.setServiceParent(top)  # stopped after the calls drained: their settlements go out first
    if settings.stubListen is not None:
        stubService(reactor, settings).setServiceParent(top)
    embeddedStub.setServiceParent(top)  # stopped before the upstream pool, after the calls drained
    health.setServiceParent(top)  # after the credentials it applies start refreshing; stopped before them
    if metrics is not None:
        adminService(settings, reactor, metrics, gateway.limiter).setServiceParent(top)
    drain = drainFor(site, gateway, settings.drainTimeout)
    drain.setServiceParent(top)
    reloader = Reloader(configured, gateway, site, allowList, drain, credentials)
    reloader.listen = listen  # a --listen override holds across reloads
    signalsFor(reactor, reloader, usageLog, accessLog, auditLog).setServiceParent(top)
    StopSignalGuard(reactor).setServiceParent(top)
    if workerFd is not None:
        SupervisorWatch(reactor).setServiceParent(top)
    listener.setServiceParent(top)
    FreezeService().setServiceParent(top)
    if workerIndex is None:
        announceDemo(settings)  # a worker's stub is its supervisor's
    log.info(
        "LMGate on {listen}: providers {providers}; records to {stats}",
        listen=settings.listen,
        providers=", ".join(sorted(settings.providers)),
        stats=settings.statsPath,
    )
    return top
