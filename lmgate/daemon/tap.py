"""
Building the daemon: command-line options, settings, and the service tree.

C{twistd -n lmgate [--config PATH] [--listen ENDPOINT]} comes here through the
plugin; C{twistd -ny lmgate.tac} through L{serviceFor}. Everything that can be
wrong with the configuration, the allow-list or the stats directory is found
here, in the foreground, and becomes one line and a non-zero exit.
"""

from __future__ import annotations

import os
import signal
from importlib import resources
from typing import Any, Callable

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.filepath import FilePath

from lmgate.config import Settings, accessLogPath, loadSettings, settingsFrom
from lmgate.errors import ConfigError
from lmgate.relay.twistedprivate import raiseListenErrorsAtStart, serverEndpointAddress, twistdLogFile

log = Logger()

DEMO_SOURCE = "<embedded demo>"


class Options(usage.Options):
    """C{twistd lmgate} options."""

    synopsis = "[--config PATH] [--listen ENDPOINT]"
    longdesc = (
        "Pass-through gateway for LLM provider APIs: access control and usage records. "
        "Without --config (or LMGATE_CONFIG), runs the embedded demo: every provider "
        "routed to a stub upstream in the same process, key 'lmgate-demo-key'."
    )
    optParameters = [
        ["config", "c", None, "The YAML configuration file (default: $LMGATE_CONFIG, else the embedded demo)."],
        ["listen", "l", None, "A Twisted server endpoint string, overriding the file's `listen`."],
        ["workers", "w", 1, "Worker processes sharing the listening socket (tcp: endpoints).", int],
        ["worker-fd", None, None, "(internal) the shared socket a worker adopts.", int],
        ["worker-index", None, None, "(internal) this worker's number.", int],
    ]

    def postOptions(self) -> None:
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be 1 or more")


def demoSettings(environ: Any = None) -> Settings:
    """The embedded default: stub upstreams in-process and a demo allow-list."""
    demo = resources.files("lmgate") / "demo"
    import yaml

    raw = yaml.safe_load((demo / "lmgate.yaml").read_text())
    raw.setdefault("allowlist", {})["path"] = str(demo / "allowlist.csv")
    # The packaged copy of etc/prices.yaml (kept identical by a test): the demo
    # prices its calls from any working directory.
    raw.setdefault("prices", {})["path"] = str(demo / "prices.yaml")
    return settingsFrom(raw, DEMO_SOURCE, environ)


def settingsFor(configPath: str | None, listen: str | None = None) -> Settings:
    """
    The settings for a config path (L{None}: the embedded demo), with a
    command-line C{--listen} on top.

    @raise ConfigError: for anything wrong.
    """
    settings = demoSettings() if configPath is None else loadSettings(configPath)
    if listen is not None:
        from dataclasses import replace

        settings = replace(settings, listen=listen)
    return settings


class OrderedMultiService(MultiService):
    """
    Stops its children one after another, last added first, each after the
    previous one's stop has finished: the listener closes, then calls in flight
    drain, and only then are the records flushed.
    """

    def __init__(self, reactor: Any = None) -> None:
        MultiService.__init__(self)
        self._reactor = reactor
        #: After stopping: how many usage records were lost (with workers: how many
        #: workers did not stop cleanly). Non-zero makes the process exit non-zero.
        self.lost: Callable[[], int] = lambda: 0

    @inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        for service in reversed(list(self)):
            try:
                yield maybeDeferred(service.stopService)
            except Exception:
                log.failure("Stopping {service} failed", service=service)


class FreezeService(Service):
    """
    Started last: moves every object alive after start-up (modules, the
    configuration, the allow-list) out of the garbage collector's reach
    (C{gc.freeze}). A full collection then walks only what calls create, so
    it pauses the reactor for a few milliseconds instead of tens, which
    would otherwise show up in every relayed event's delay.
    """

    def startService(self) -> None:
        import gc

        super().startService()
        gc.collect()
        gc.freeze()


class DrainService(Service):
    """
    Stops after the listener: keep-alive connections take no new request,
    calls in flight finish (bounded), then the rest are aborted and every
    client connection left is cut.
    """

    def __init__(self, drain: Callable[[float], Deferred[None]], timeout: float) -> None:
        self._drain, self.timeout = drain, timeout

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._drain(self.timeout)


#: Settings a running daemon cannot change: they take effect at the next start.
RESTART_ONLY = (
    ("listen", "listen"),
    ("allowlist.path", "allowlistPath"),
    ("allowlist.reload_interval", "allowlistReloadInterval"),
    ("stats.path", "statsPath"),
    ("stats.flush_interval", "statsFlushInterval"),
    ("stats.max_bytes", "statsMaxBytes"),
    ("stats.backlog", "statsBacklog"),
    ("timeouts.connect", "connectTimeout"),
    ("timeouts.pool_idle", "poolIdleTimeout"),
    ("pool.max_per_host", "poolMaxPerHost"),
    ("tls.ca_bundle", "tlsCABundle"),
    ("stub.listen", "stubListen"),
    ("admin.listen", "adminListen"),
    ("metrics.models", "metricsModels"),
    ("metrics.per_key", "metricsPerKey"),
    ("metrics.per_key_limit", "metricsPerKeyLimit"),
)


def limitsFor(settings: Settings) -> Any:
    """The client limits a site enforces, from settings."""
    from lmgate.gate.channel import Limits

    return Limits(
        headerBytes=settings.headerBytes,
        headerCount=settings.headerCount,
        headerTimeout=settings.headerTimeout,
        clientTimeout=settings.clientTimeout,
        maxBody=settings.maxBody,
        routeMaxBody={
            name.encode("ascii"): p.maxBody for name, p in settings.providers.items() if p.maxBody is not None
        },
    )


def pricesFor(settings: Settings) -> Any:
    """
    The price table for C{cost_usd}: None when C{prices.path} is null, or when the
    default C{etc/prices.yaml} is absent (logged); a named file must load.

    @raise ConfigError: the file is unreadable or wrong.
    """
    from lmgate.ops.prices import PriceTable

    path = settings.pricesPath
    if path is None:
        return None
    if path == Settings.pricesPath and not os.path.exists(path):
        log.warn("No price table at {path}: cost_usd stays null", path=path)
        return None
    return PriceTable.load(path)


def applySettings(settings: Settings, gateway: Any, site: Any) -> None:
    """
    Put the settings a running gateway can change into effect: routes, timeouts,
    capture limit, client limits and the access log. Each is one assignment,
    so a call sees the old settings or the new, never a mix of one kind.
    """
    from lmgate.gate.providers import Provider

    gateway.providers = {name.encode("ascii"): Provider(p) for name, p in settings.providers.items()}
    gateway.captureLimit = settings.statsCaptureLimit
    gateway.responseTimeout = settings.responseTimeout
    gateway.idleTimeout = settings.idleTimeout
    gateway.clientTimeout = settings.clientTimeout
    site.setLimits(limitsFor(settings))
    site.accessLog = site.accessLogWriter if accessLogPath(settings) is not None else None


class Reloader:
    """
    SIGHUP: read the configuration file again and apply what can change live,
    then reload the allow-list. A bad new file keeps the running configuration
    and logs one line.
    """

    def __init__(self, settings: Settings, gateway: Any, site: Any, allowList: Any, drain: DrainService) -> None:
        self.settings, self._gateway, self._site = settings, gateway, site
        self._allowList, self._drain = allowList, drain
        self.configPath: str | None = None if settings.source == DEMO_SOURCE else settings.source
        self.listen: str | None = None
        self.accessLogBase = accessLogPath(settings)  # the file the site's writer appends to (before any -wN)

    def reload(self) -> None:
        if self.configPath is not None:
            try:
                new = settingsFor(self.configPath, self.listen)
            except ConfigError as e:
                log.error("Keeping the running configuration: {problem}", problem=str(e))
            else:
                self._apply(new)
        self._allowList.reload()

    def _apply(self, new: Settings) -> None:
        from dataclasses import replace

        old = self.settings
        pending = [key for key, attr in RESTART_ONLY if getattr(new, attr) != getattr(old, attr)]
        newAccessLog = accessLogPath(new)
        if newAccessLog is not None and newAccessLog != self.accessLogBase:
            # Off and on again live; a new file (or a first one) needs a writer made at start-up.
            pending.append("access_log")
            new = replace(new, accessLog=old.accessLog if self.accessLogBase is not None else False)
        if pending:
            log.warn("Changed, and applied at the next restart only: {keys}", keys=", ".join(pending))
            new = replace(new, **{attr: getattr(old, attr) for _, attr in RESTART_ONLY})
        try:
            self._gateway.prices = pricesFor(new)
        except ConfigError as e:
            log.error("Keeping the previous price table: {problem}", problem=str(e))
        applySettings(new, self._gateway, self._site)
        self._drain.timeout = new.drainTimeout
        self.settings = new
        log.info(
            "Reloaded the configuration from {path}: providers {providers}",
            path=self.configPath,
            providers=", ".join(sorted(new.providers)),
        )


class SignalService(Service):
    """
    Installs LMGate's signal handlers while running: SIGHUP reloads the
    allow-list (stock twistd would die on it), SIGUSR1 reopens the stats file
    for external rotation tools.
    """

    def __init__(self, reactor: Any, handlers: dict[int, Callable[[], object]]) -> None:
        self._reactor, self._handlers = reactor, handlers
        self._previous: dict[int, Any] = {}

    def startService(self) -> None:
        super().startService()
        logFile = twistdLogFile()
        if logFile is not None and logFile not in _logFiles:
            _logFiles.append(logFile)
        for signum, handler in self._handlers.items():
            self._previous[signum] = signal.signal(signum, self._handlerFor(handler))

    def _handlerFor(self, handler: Callable[[], object]) -> Callable[[int, Any], None]:
        def onSignal(signum: int, frame: Any) -> None:
            self._reactor.callFromThread(self._run, signum, handler)

        return onSignal

    def _run(self, signum: int, handler: Callable[[], object]) -> None:
        log.info("Received {signal}", signal=signal.Signals(signum).name)
        try:
            handler()
        except Exception:
            log.failure("Handling {signal} failed", signal=signal.Signals(signum).name)

    def stopService(self) -> None:
        super().stopService()
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


class StopSignalGuard(Service):
    """
    SIGTERM and SIGINT stop the reactor once. Twisted's own handlers call
    C{reactor.stop} on every one, so a second signal while draining (Ctrl-C in
    a terminal reaches the supervisor and its workers, and the supervisor then
    signals the workers too; or a worker already stopping because its
    supervisor died) raised C{ReactorNotRunning} with a traceback. Installed
    once the reactor runs (Twisted installs its handlers while starting up),
    these stop the reactor if it still runs and otherwise only log.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._trigger: Any = None

    def startService(self) -> None:
        super().startService()
        self._trigger = self._reactor.addSystemEventTrigger("after", "startup", self._install)

    def _install(self) -> None:
        self._trigger = None
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._onSignal)

    def _onSignal(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self._stop, signal.Signals(signum).name)

    def _stop(self, name: str) -> None:
        from twisted.internet.error import ReactorNotRunning

        try:
            self._reactor.stop()
        except ReactorNotRunning:
            log.info("Received {signal} again: already shutting down", signal=name)
        else:
            log.info("Received {signal}, shutting down.", signal=name)

    def stopService(self) -> None:
        # The handlers stay until the reactor has stopped (Twisted then restores
        # the ones it found): a signal during the drain must still only log.
        super().stopService()
        if self._trigger is not None:
            try:
                self._reactor.removeSystemEventTrigger(self._trigger)
            except ValueError:
                pass
            self._trigger = None


_logFiles: list[Any] = []


def reopenTwistdLog() -> None:
    """Reopen twistd's log file by its path (after an external tool renamed it)."""
    for logFile in _logFiles:
        logFile.reopen()


def _endpoint(reactor: Any, description: str, settings: Settings, key: str) -> Any:
    try:
        return serverFromString(reactor, description)
    except Exception as e:
        raise ConfigError(settings.source, key, f"not a usable endpoint ({e}): {description!r}") from None


def cannotListen(description: str, error: BaseException) -> str:
    """
    C{cannot listen on tcp:8080:interface=127.0.0.1: address already in use}:
    the endpoint as configured and the system's reason.
    """
    from twisted.internet.error import CannotListenError

    if isinstance(error, CannotListenError) and error.socketError is not None:
        error = error.socketError
    reason = getattr(error, "strerror", None) or str(error)
    return f"cannot listen on {description}: {reason[:1].lower()}{reason[1:]}"


def checkCanListen(endpoint: Any, description: str, settings: Settings, key: str) -> None:
    """
    Bind a TCP endpoint's address once, in the foreground, before twistd forks:
    a port in use (or one this user may not bind) becomes one line and a
    non-zero exit, where the real bind after forking could only report a
    traceback or a truncated message. Other kinds of endpoint are bound by
    L{Listener} only.

    @raise ConfigError: the address cannot be bound.
    """
    import socket

    from twisted.internet.abstract import isIPv6Address
    from twisted.internet.endpoints import SSL4ServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint

    if not isinstance(endpoint, (TCP4ServerEndpoint, SSL4ServerEndpoint)):
        return
    port, interface, _ = serverEndpointAddress(endpoint)
    if not port:
        return
    family = socket.AF_INET6 if isinstance(endpoint, TCP6ServerEndpoint) or isIPv6Address(interface) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted binds
        try:
            probe.bind((interface, port))
            probe.listen(1)
        except OSError as e:
            raise ConfigError(settings.source, key, cannotListen(description, e)) from None


class Listener(StreamServerEndpointService):
    """
    A listening endpoint whose failure to listen (after the foreground check,
    or for an endpoint it cannot check) stops the start with one line naming
    the endpoint, instead of twistd's traceback.
    """

    def __init__(self, endpoint: Any, factory: Any, description: str) -> None:
        StreamServerEndpointService.__init__(self, endpoint, factory)
        self.description = description
        raiseListenErrorsAtStart(self)

    def privilegedStartService(self) -> None:
        from twisted.internet.error import CannotListenError

        try:
            StreamServerEndpointService.privilegedStartService(self)
        except CannotListenError as e:
            raise SystemExit(f"lmgate: {cannotListen(self.description, e)}") from None


def listenerFor(reactor: Any, description: str, factory: Any, settings: Settings, key: str) -> Listener:
    """The service listening on C{description} (the setting C{key}), checked in the foreground."""
    endpoint = _endpoint(reactor, description, settings, key)
    checkCanListen(endpoint, description, settings, key)
    return Listener(endpoint, factory, description)


def stubService(reactor: Any, settings: Settings) -> Service:
    """The in-process stub upstream (C{stub.listen})."""
    from twisted.web.server import Site

    from lmgate.stub.server import makeStubResource

    assert settings.stubListen is not None
    stubSite = Site(makeStubResource(reactor), reactor=reactor)
    stubSite.noisy = False
    stubSite.log = lambda request: None  # type: ignore[method-assign]  # the gateway's access log shows each call
    return listenerFor(reactor, settings.stubListen, stubSite, settings, "stub.listen")


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
    from lmgate.access.allowlist import AllowList
    from lmgate.records.jsonl import checkStatsPath
    from lmgate.daemon.workers import Supervisor, listeningSocket, workerStatsPath

    if settings.adminListen is not None:
        raise ConfigError(settings.source, "admin.listen", "not available with --workers yet (each worker would need its own port)")
    AllowList(FilePath(settings.allowlistPath), settings.allowlistReloadInterval, reactor)
    accessPath = accessLogPath(settings)
    for index in range(1, workers + 1):
        checkStatsPath(workerStatsPath(settings.statsPath, index), settings.source, owner=owner)
        if accessPath is not None:
            checkStatsPath(workerStatsPath(accessPath, index), settings.source, "access_log", owner)
    listeningSocket(reactor, settings).close()  # fail now, in the foreground, if it cannot be bound
    top = OrderedMultiService(reactor)
    if settings.stubListen is not None:
        stubService(reactor, settings).setServiceParent(top)
    supervisor = Supervisor(reactor, settings, configPath, listen, workers)
    supervisor.setServiceParent(top)
    top.lost = lambda: supervisor.uncleanStops
    StopSignalGuard(reactor).setServiceParent(top)
    _announceDemo(settings)
    return top


def _announceDemo(settings: Settings) -> None:
    if settings.source == DEMO_SOURCE:
        log.warn(
            "No --config given: running the embedded demo. Providers are routed to the stub "
            "upstream on {stub}; use the API key 'lmgate-demo-key'.",
            stub=settings.stubListen,
        )


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
    from lmgate.access.allowlist import AllowList
    from lmgate.gate.gateway import Gateway, GatewayResource, GatewaySite
    from lmgate.records.jsonl import UsageLog, checkStatsPath
    from lmgate.relay.upstream import Upstream

    from lmgate.daemon.workers import workerStatsPath

    configured = settings  # as the file says: what a reload compares with
    if workerIndex is not None:
        from dataclasses import replace

        settings = replace(settings, statsPath=workerStatsPath(settings.statsPath, workerIndex), stubListen=None)
    allowList = AllowList(FilePath(settings.allowlistPath), settings.allowlistReloadInterval, reactor)
    checkStatsPath(settings.statsPath, settings.source, owner=owner)
    usageLog = UsageLog(
        settings.statsPath,
        reactor,
        flushInterval=settings.statsFlushInterval,
        maxBytes=settings.statsMaxBytes,
        backlog=settings.statsBacklog,
    )
    accessLog = None
    accessPath = accessLogPath(settings)
    if accessPath is not None:
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
    upstream = Upstream.fromSettings(reactor, settings)
    metrics = None
    sink: Any = usageLog
    if settings.adminListen is not None:
        from lmgate.ops.metrics import Fanout, Metrics

        metrics = Metrics(
            models=settings.metricsModels,
            perKey=settings.metricsPerKey,
            perKeyLimit=settings.metricsPerKeyLimit,
            writerStats=lambda: (usageLog.written, usageLog.pending, usageLog.dropped),
            keyCount=lambda: allowList.size,
            reloadErrors=lambda: allowList.reloadErrors,
        )
        sink = Fanout([usageLog, metrics])
    from twisted.internet.task import Cooperator

    # Large request bodies are sent by a cooperator on the injected reactor, not Twisted's global one.
    cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
    gateway = Gateway({}, allowList, upstream, sink, reactor, cooperator=cooperator)
    gateway.prices = pricesFor(settings)
    if metrics is not None:
        metrics.inFlight = lambda: len(gateway.active)
        gateway.observeOverhead = metrics.observeOverhead
    site = GatewaySite(GatewayResource(gateway), accessLog=accessLog, reactor=reactor)
    if metrics is not None:
        site.observeRefusal = metrics.clientRefused
    applySettings(settings, gateway, site)
    listener: Service
    if workerFd is not None:
        from lmgate.daemon.workers import AdoptedListener

        listener = AdoptedListener(reactor, workerFd, site)
    else:
        listener = listenerFor(reactor, settings.listen, site, settings, "listen")

    top = OrderedMultiService(reactor)
    top.lost = lambda: usageLog.lost
    # Started in this order, stopped in reverse, one after another.
    usageLog.setServiceParent(top)
    if accessLog is not None:
        accessLog.setServiceParent(top)  # after the records' writer: it borrows its thread
    allowList.setServiceParent(top)
    upstream.setServiceParent(top)
    if settings.stubListen is not None:
        stubService(reactor, settings).setServiceParent(top)
    if metrics is not None:
        from lmgate.ops.metrics import AdminSite

        adminSite = AdminSite(metrics, reactor)
        assert settings.adminListen is not None
        admin = listenerFor(reactor, settings.adminListen, adminSite, settings, "admin.listen")
        admin.setServiceParent(top)
    def drainCalls(timeout: float) -> Deferred[None]:
        # No further request is read from client connections (idle ones close now), the
        # calls in flight finish (or are aborted at the timeout), and whatever connection
        # is left is cut: no call can start once its record could not be written.
        site.closeIdle()
        drained = gateway.drain(timeout)
        drained.addCallback(lambda _: site.closeAll())
        return drained

    drain = DrainService(drainCalls, settings.drainTimeout)
    drain.setServiceParent(top)
    reloader = Reloader(configured, gateway, site, allowList, drain)
    reloader.listen = listen  # a --listen override holds across reloads
    def reopenFiles() -> None:
        usageLog.reopen()
        if accessLog is not None:
            accessLog.reopen()
        reopenTwistdLog()

    SignalService(reactor, {signal.SIGHUP: reloader.reload, signal.SIGUSR1: reopenFiles}).setServiceParent(top)
    StopSignalGuard(reactor).setServiceParent(top)
    if workerFd is not None:
        from lmgate.daemon.workers import SupervisorWatch

        SupervisorWatch(reactor).setServiceParent(top)
    listener.setServiceParent(top)
    FreezeService().setServiceParent(top)
    if workerIndex is None:
        _announceDemo(settings)  # a worker's stub is its supervisor's
    log.info(
        "LMGate on {listen}: providers {providers}; records to {stats}",
        listen=settings.listen,
        providers=", ".join(sorted(settings.providers)),
        stats=settings.statsPath,
    )
    return top


def _warnIgnoredEnvironment() -> None:
    """One line naming the C{LMGATE_*} variables that are no configuration key."""
    from lmgate.config import ignoredEnvironment

    ignored = ignoredEnvironment(os.environ)
    if ignored:
        log.warn(
            "Ignoring environment variables that name no configuration key: {names}",
            names=", ".join(ignored),
        )


def serviceFor(
    configPath: str | None,
    listen: str | None = None,
    reactor: Any = None,
    workers: int = 1,
    workerFd: int | None = None,
    workerIndex: int | None = None,
    owner: tuple[int, int] | None = None,
) -> IService:
    """
    Settings and service tree in one step, with start-up errors as C{SystemExit}
    carrying one line (twistd prints it and exits non-zero).
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    try:
        settings = settingsFor(configPath, listen)
        if workerFd is None:  # once: a worker has its supervisor's environment
            _warnIgnoredEnvironment()
        if workers > 1 and workerFd is None:
            return supervisorService(settings, reactor, configPath, listen, workers, owner)
        return buildService(settings, reactor, listen, workerFd, workerIndex, owner)
    except ConfigError as e:
        raise SystemExit(f"lmgate: {e}") from None


def ownerFor(options: usage.Options) -> tuple[int, int] | None:
    """
    The C{(uid, gid)} twistd will switch to once the service is built, when it
    runs as root with C{--uid} (an init script's C{USER}); None otherwise.
    """
    import pwd

    parent: Any = getattr(options, "parent", None)
    if parent is None or os.geteuid() != 0 or parent.get("uid") is None:
        return None
    uid = int(parent["uid"])
    gid = parent.get("gid")
    if gid is None:
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = os.getegid()
    return uid, int(gid)


#: The exit status of a daemon that stopped with usage records it could not write.
EXIT_RECORDS_LOST = 1


def exitNonZeroOnLoss(service: IService) -> None:
    """
    Make the process exit with L{EXIT_RECORDS_LOST} when records were lost at
    stop (the service's C{lost()}): twistd itself exits 0 whenever its reactor
    stopped, so a supervisor (systemd, a worker's supervisor) would not learn of
    it. Runs at interpreter exit, after twistd has removed its pid file.
    """
    import atexit
    import sys

    def atExit() -> None:
        lost = getattr(service, "lost", None)
        if lost is not None and lost():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_RECORDS_LOST)

    atexit.register(atExit)


#: Modules of the command-line tools, which the daemon never imports.
_NOT_PRELOADED = frozenset({"lmgate.cli", "lmgate.access.keys", "lmgate.ops.report", "lmgate.ops.report_html"})


def preloadModules() -> None:
    """
    Import, while still root, every module a call may load later: LMGate's own
    and the codecs the relay loads on first use (C{encodings.idna} for upstream
    host names). Once twistd has dropped privileges, the service user may be
    unable to read the Python installation (one under C{/root}, say): an import
    failing in the middle of a call would leave the call unanswered.
    """
    import importlib
    import pkgutil

    import lmgate

    for module in pkgutil.walk_packages(lmgate.__path__, "lmgate."):
        if module.name not in _NOT_PRELOADED:
            importlib.import_module(module.name)
    for name in ("encodings.idna", "stringprep", "gzip", "zlib"):
        importlib.import_module(name)


def makeService(options: usage.Options) -> IService:
    """The plugin's entry point."""
    configPath = options["config"] or os.environ.get("LMGATE_CONFIG") or None
    owner = ownerFor(options)
    if owner is not None:
        preloadModules()
    service = serviceFor(
        configPath,
        options["listen"],
        workers=options["workers"],
        workerFd=options["worker-fd"],
        workerIndex=options["worker-index"],
        owner=owner,
    )
    exitNonZeroOnLoss(service)
    return service
