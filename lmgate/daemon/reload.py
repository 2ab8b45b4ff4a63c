"""
Live reload (SIGHUP): which settings a running gateway can change, putting
them into effect, and the ones that wait for the next start.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from twisted.logger import Logger

from lmgate.config import Settings, accessLogPath
from lmgate.daemon.demo import DEMO_SOURCE
from lmgate.daemon.options import settingsFor
from lmgate.daemon.services import DrainService
from lmgate.errors import ConfigError

log = Logger()


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
    ("telemetry", "telemetry"),
    ("admin.listen", "adminListen"),
    ("metrics.models", "metricsModels"),
    ("metrics.per_key", "metricsPerKey"),
    ("metrics.per_key_limit", "metricsPerKeyLimit"),
    ("audit", "audit"),  # the audit log's writer is made at start-up
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


def providersFor(settings: Settings, credentials: Any = None) -> dict[bytes, Any]:
    """
    The gateway's routes: one L{lmgate.gate.providers.Provider} per configured
    route, a managed one carrying its credential from C{credentials} (an
    L{lmgate.governance.managed.ProviderCredentials}).
    """
    from lmgate.gate.providers import Provider

    return {
        name.encode("ascii"): Provider(p, credentials.authFor(name) if credentials is not None else None)
        for name, p in settings.providers.items()
    }


def probedRoutes(settings: Settings, providers: Any) -> list[Any]:
    """
    The health probes of C{settings}' routes as C{providers} (the gateway's
    routes) serve them: each route with C{health}, carrying its credential,
    except those served by the embedded stub (never probed).
    """
    from lmgate.governance.health import healthOf

    routes = []
    for name, p in settings.providers.items():
        provider = providers.get(name.encode("ascii"))
        if p.health is None or provider is None or provider.auth == "stub":
            continue
        routes.append(healthOf(name, p.upstream, p.health, provider.credential, settings.responseTimeout))
    return routes


def setProviders(settings: Settings, gateway: Any, credentials: Any = None) -> None:
    """Build the gateway's routes (with their credentials) and restart the health probes with them."""
    gateway.providers = providersFor(settings, credentials)
    if gateway.health is not None:
        gateway.health.configure(probedRoutes(settings, gateway.providers))


def applySettings(settings: Settings, gateway: Any, site: Any, credentials: Any = None) -> None:
    """
    Put the settings a running gateway can change into effect: routes (with
    their credentials and health probes), timeouts, capture limit, client
    limits, C{policy.stream_usage} and the access log. Each is one assignment, so a call sees the old
    settings or the new, never a mix of one kind.
    """
    setProviders(settings, gateway, credentials)
    gateway.setAliases(settings.models, settings.fallback)
    gateway.captureLimit = settings.statsCaptureLimit
    gateway.responseTimeout = settings.responseTimeout
    gateway.idleTimeout = settings.idleTimeout
    gateway.clientTimeout = settings.clientTimeout
    gateway.streamUsage = settings.policy.streamUsage
    site.setLimits(limitsFor(settings))
    limiter = gateway.limiter
    if limiter is not None:
        limiter.prices = gateway.prices
        limiter.setRules(settings.usageLimits)
    site.accessLog = site.accessLogWriter if accessLogPath(settings) is not None else None
    setPolicy(settings, gateway)


def setPolicy(settings: Settings, gateway: Any) -> None:
    """
    The new rules take effect; plugins are made again only when their list
    changed, and if one of them cannot be made the running plugins are kept
    (one log line) while the new rules still apply.
    """
    from lmgate.policy.engine import Policy, loadPlugins

    current = gateway.policy
    if current is None:  # a gateway assembled without a policy (tests): nothing to reload
        return
    plugins = current.plugins
    if settings.policy.plugins != current.settings.plugins:
        try:
            plugins = loadPlugins(settings.source, settings.policy)
        except ConfigError as e:
            log.error("Keeping the running policy plugins: {problem}", problem=str(e))
            settings = replace(settings, policy=replace(settings.policy, plugins=current.settings.plugins))
    gateway.policy = Policy(settings.policy, plugins, settings.usageLimits.bytesPerToken, gateway.clock, gateway.rateLog)


class Reloader:
    """
    SIGHUP: read the configuration file again and apply what can change live,
    read the managed routes' provider credentials again, then reload the
    allow-list. A bad new file keeps the running configuration and logs one
    line; the credentials are read again all the same.
    """

    def __init__(
        self, settings: Settings, gateway: Any, site: Any, allowList: Any, drain: DrainService, credentials: Any = None
    ) -> None:
        self.settings, self._gateway, self._site = settings, gateway, site
        self._allowList, self._drain = allowList, drain
        self._credentials = credentials
        self.configPath: str | None = None if settings.source == DEMO_SOURCE else settings.source
        self.listen: str | None = None
        self.accessLogBase = accessLogPath(settings)  # the file the site's writer appends to (before any -wN)

    def reload(self) -> None:
        applied = False
        if self.configPath is not None:
            try:
                new = settingsFor(self.configPath, self.listen)
            except ConfigError as e:
                log.error("Keeping the running configuration: {problem}", problem=str(e))
            else:
                self._apply(new)
                applied = True
        if not applied and self._credentials is not None:
            # The same routes, their keys read again (a rotated secret file).
            self._credentials.reload(self.settings)
            setProviders(self.settings, self._gateway, self._credentials)
        self._allowList.reload()

    def _apply(self, new: Settings) -> None:
        from dataclasses import replace

        old = self.settings
        pending = [key for key, attr in RESTART_ONLY if getattr(new, attr) != getattr(old, attr)]
        oldLimits, newLimits = old.usageLimits, new.usageLimits
        if (oldLimits.store, oldLimits.redisTimeout, oldLimits.keyPrefix) != (newLimits.store, newLimits.redisTimeout, newLimits.keyPrefix):
            # The store is connected at start-up; the rules and estimates change live.
            pending.append("usage_limits.store")
            new = replace(new, usageLimits=replace(newLimits, store=oldLimits.store, redisTimeout=oldLimits.redisTimeout, keyPrefix=oldLimits.keyPrefix))
        newAccessLog = accessLogPath(new)
        if newAccessLog is not None and newAccessLog != self.accessLogBase:
            # Off and on again live; a new file (or a first one) needs a writer made at start-up.
            pending.append("access_log")
            new = replace(new, accessLog=old.accessLog if self.accessLogBase is not None else False)
        if self._gateway.audit is None and (new.policy.plugins or any(rule.audit for rule in new.policy.rules)):
            # No audit log was opened at start-up: these calls are marked for audit, but not written until a restart.
            pending.append("policy (audit: true needs the audit log, opened at start-up)")
        if pending:
            log.warn("Changed, and applied at the next restart only: {keys}", keys=", ".join(pending))
            new = replace(new, **{attr: getattr(old, attr) for _, attr in RESTART_ONLY})
        try:
            self._gateway.prices = pricesFor(new)
        except ConfigError as e:
            log.error("Keeping the previous price table: {problem}", problem=str(e))
        if self._credentials is not None:
            self._credentials.reload(new)
        applySettings(new, self._gateway, self._site, self._credentials)
        self._drain.timeout = new.drainTimeout
        self.settings = new
        log.info(
            "Reloaded the configuration from {path}: providers {providers}",
            path=self.configPath,
            providers=", ".join(sorted(new.providers)),
        )
