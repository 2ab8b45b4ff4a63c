"""
Managed routes: which route uses which provider credential, kept current.

L{ProviderCredentials} builds, for every route with C{credentials}, a
L{RouteAuth}: the route's L{IUpstreamCredential} (C{managed}), or the embedded
stub upstream when the key is missing and the route says C{missing: stub}
(C{stub}). The gateway reads a route's L{RouteAuth} once per reload (it is
built into the route's L{lmgate.gate.providers.Provider}), never per call.

Another kind of credential plugs in through L{CREDENTIAL_KINDS}: a factory
from the route's settings to an L{IUpstreamCredential}, raising
L{CredentialUnavailable} when the credential cannot be had now (then
C{missing} decides) or L{ConfigError} when it can never work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from twisted.application.service import Service
from twisted.logger import Logger
from zope.interface import implementer

from lmgate.config import CredentialSettings, ProviderSettings, Settings
from lmgate.errors import ConfigError
from lmgate.governance.interfaces import CredentialUnavailable, IUpstreamCredential
from lmgate.governance.keys import EnvironmentKey, FileKey, StaticKeyCredential

log = Logger()

#: The record's C{auth} for each way a route authenticates upstream.
CLIENT, MANAGED, STUB = "client", "managed", "stub"


@dataclass(frozen=True)
class CredentialParts:
    """
    What a credential factory may need besides the route's settings.

    @ivar source: the configuration file's name, for start-up errors.
    @ivar reactor: the reactor (clock, threads) the credential is given.
    @ivar threadPool: the pool slow credential work runs in, or None.
    @ivar environ: the environment keys are read from (None: C{os.environ}).
    """

    source: str
    reactor: Any = None
    threadPool: Any = None
    environ: Mapping[str, str] | None = None


#: A factory: a route's settings (C{credentials} set) and the shared parts to its credential.
CredentialFactory = Callable[[ProviderSettings, CredentialParts], IUpstreamCredential]


def staticKey(provider: ProviderSettings, parts: CredentialParts) -> IUpstreamCredential:
    """C{credentials: {env: ...}} or C{{file: ...}}: a key in a header, read now."""
    spec = provider.credentials
    assert spec is not None and spec.header is not None
    source = EnvironmentKey(spec.env, parts.environ) if spec.env is not None else FileKey(spec.file or "")
    credential = StaticKeyCredential(source, spec.header, spec.scheme)
    credential.reload()
    return credential


def notInThisBuild(provider: ProviderSettings, parts: CredentialParts) -> IUpstreamCredential:
    """A credential kind whose signer is not part of this build: refused at start-up."""
    spec = provider.credentials
    assert spec is not None
    raise ConfigError(parts.source, f"providers.{provider.name}.credentials.{spec.kind}", "not available in this build yet")


def awsSigV4(provider: ProviderSettings, parts: CredentialParts) -> IUpstreamCredential:
    """
    C{credentials: {aws: {region, profile}}}: Bedrock requests signed with SigV4.

    botocore's credential chain is searched now, in the foreground (environment,
    shared files, container and instance roles; the instance metadata service is
    asked with botocore's own short timeout, one attempt by default), so that
    C{missing} decides at start-up; the credentials are then kept fresh in the
    thread pool by L{lmgate.governance.sigv4.SigV4Credential}.

    @raise CredentialUnavailable: the chain finds no credentials (or a named
        profile does not exist).
    """
    from botocore.exceptions import BotoCoreError
    from botocore.session import Session

    from lmgate.governance.sigv4 import SigV4Credential

    spec = provider.credentials
    assert spec is not None and spec.aws is not None
    aws = spec.aws
    try:
        session = Session(profile=aws.profile)
        found = session.get_credentials()  # cached by the session: the pool's first load reuses it
        frozen = found.get_frozen_credentials() if found is not None else None
    except BotoCoreError as e:  # ProfileNotFound, a config file that does not parse...: botocore names it, no secret
        raise CredentialUnavailable(f"AWS credentials: {e}") from None
    if frozen is None or not frozen.access_key or not frozen.secret_key:
        raise CredentialUnavailable(
            "no AWS credentials found (environment, shared credentials or config file, container or instance role)"
            + (f" for profile {aws.profile!r}" if aws.profile else "")
        )
    return SigV4Credential(parts.reactor, parts.threadPool, aws.region, aws.profile, session=session)


def googleOAuth(provider: ProviderSettings, parts: CredentialParts) -> IUpstreamCredential:
    """
    C{credentials: {google: {service_account_file, scopes}}}: Vertex AI OAuth
    access tokens minted by LMGate (google-auth), refreshed in the thread pool.

    The service account file (or, without one, the application default
    credentials, which may ask the metadata server with google-auth's short
    timeout) is read now, in the foreground; the first token is minted in the
    pool once the daemon runs.

    @raise CredentialUnavailable: the file is missing or unusable (naming it),
        or there are no application default credentials.
    """
    from lmgate.governance.vertex import CLOUD_PLATFORM, GoogleOAuthCredential

    spec = provider.credentials
    assert spec is not None and spec.google is not None
    google = spec.google
    try:
        return GoogleOAuthCredential(parts.reactor, parts.threadPool, google.serviceAccountFile, google.scopes or (CLOUD_PLATFORM,))
    except ConfigError as e:
        path = google.serviceAccountFile
        raise CredentialUnavailable(f"{path}: {e.problem}" if path is not None else e.problem) from None


#: Kinds whose credential refreshes itself (in the thread pool): a reload with the
#: same settings keeps it rather than searching for credentials again on the reactor thread.
SELF_REFRESHING = frozenset({"aws", "google"})

#: How each kind of C{credentials} becomes a credential (L{CredentialSettings.kind}).
CREDENTIAL_KINDS: dict[str, CredentialFactory] = {
    "env": staticKey,
    "file": staticKey,
    "aws": awsSigV4,
    "google": googleOAuth,
}


@dataclass(frozen=True)
class RouteAuth:
    """
    How one managed route authenticates upstream.

    @ivar mode: L{MANAGED} (C{credential} is added) or L{STUB} (served by the
        embedded stub upstream at C{stubURL}, no credential).
    @ivar spec: the C{credentials} settings this was built from.
    """

    mode: str
    spec: CredentialSettings
    credential: IUpstreamCredential | None = None
    stubURL: str | None = None


def _sourceName(spec: CredentialSettings) -> str:
    """The variable or file a key comes from, as an operator names it."""
    return spec.env if spec.env is not None else spec.file if spec.file is not None else f"credentials.{spec.kind}"


class ProviderCredentials(Service):
    """
    The provider credentials of every managed route, read at start-up and
    again on SIGHUP (L{reload}) without dropping calls: each route's
    credential is replaced in one assignment, a call in flight keeps what it
    was sent with.

    @param stubURL: starts (once) and returns the base URL of the embedded
        stub upstream that serves C{missing: stub} routes.
    @param kinds: the credential factories (L{CREDENTIAL_KINDS}).
    """

    def __init__(
        self,
        parts: CredentialParts,
        stubURL: Callable[[], str],
        kinds: Mapping[str, CredentialFactory] | None = None,
        announce: bool = True,
    ) -> None:
        self._parts, self._stubURL = parts, stubURL
        self._kinds = CREDENTIAL_KINDS if kinds is None else kinds
        self._announce = announce
        #: Route name -> its L{RouteAuth}; replaced whole, in one assignment.
        self.routes: Mapping[str, RouteAuth] = {}

    def authFor(self, name: str) -> RouteAuth | None:
        """The route's L{RouteAuth}, or None for a pass-through route."""
        return self.routes.get(name)

    def configure(self, settings: Settings) -> None:
        """
        Read every managed route's credential (start-up).

        @raise ConfigError: a key is missing on a C{missing: refuse} route
            (naming the variable or file), or a credential kind cannot be used.
        """
        routes: dict[str, RouteAuth] = {}
        for name, provider in settings.providers.items():
            spec = provider.credentials
            if spec is None:
                continue
            try:
                routes[name] = RouteAuth(MANAGED, spec, self._kinds[spec.kind](provider, self._parts))
            except CredentialUnavailable as e:
                if spec.missing != "stub":
                    raise ConfigError(settings.source, f"providers.{name}.credentials.{spec.kind}", f"{e} (missing: refuse)") from None
                routes[name] = RouteAuth(STUB, spec, stubURL=self._stubURL())
                if self._announce:
                    log.warn(
                        "providers.{name}: {source} is missing ({why}): the route is served by the embedded stub upstream",
                        name=name,
                        source=_sourceName(spec),
                        why=str(e),
                    )
        self.routes = routes

    def reload(self, settings: Settings) -> None:
        """
        Read the credentials again (SIGHUP), for C{settings}' routes. Never
        raises: a key that cannot be read now keeps the previous one (logged),
        or, on a C{missing: stub} route, turns the route to the stub; a stub
        route whose key has appeared becomes managed.
        """
        routes: dict[str, RouteAuth] = {}
        for name, provider in settings.providers.items():
            spec = provider.credentials
            if spec is None:
                continue
            try:
                routes[name] = self._reloadRoute(name, provider, spec)
            except Exception:
                log.failure("providers.{name}: reading the credential again failed", name=name)
                old = self.routes.get(name)
                if old is not None:
                    routes[name] = old
        before = {id(r.credential): r.credential for r in self.routes.values() if r.credential is not None}
        after = {id(r.credential): r.credential for r in routes.values() if r.credential is not None}
        self.routes = routes
        if self.running:  # a credential built on reload refreshes from now on; a dropped one stops
            for key in after.keys() - before.keys():
                after[key].startRefreshing()
            for key in before.keys() - after.keys():
                before[key].stopRefreshing()

    def _reloadRoute(self, name: str, provider: ProviderSettings, spec: CredentialSettings) -> RouteAuth:
        old = self.routes.get(name)
        reread = getattr(old.credential, "reload", None) if old is not None and old.spec == spec else None
        if old is not None and old.mode == MANAGED and old.spec == spec and spec.kind in SELF_REFRESHING:
            if not isinstance(old.credential, _Unavailable):
                return old  # it keeps itself fresh in the pool; building it again would block the reactor
        try:
            if reread is not None:
                assert old is not None
                reread()
                return old
            credential = self._kinds[spec.kind](provider, self._parts)
        except CredentialUnavailable as e:
            if spec.missing == "stub":
                if old is None or old.mode != STUB:
                    log.warn("providers.{name}: {source} is missing ({why}): now served by the embedded stub upstream", name=name, source=_sourceName(spec), why=str(e))
                return RouteAuth(STUB, spec, stubURL=self._stubURL())
            if old is not None and old.mode == MANAGED and old.spec == spec:
                log.error("providers.{name}: keeping the previous credential: {why}", name=name, why=str(e))
                return old
            log.error("providers.{name}: no credential ({why}): its calls are answered 502 until one can be read", name=name, why=str(e))
            return RouteAuth(MANAGED, spec, _Unavailable(str(e)))
        except ConfigError as e:
            log.error("providers.{name}: {problem}", name=name, problem=e.problem)
            return RouteAuth(MANAGED, spec, _Unavailable(e.problem))
        if old is not None and old.mode == STUB:
            log.info("providers.{name}: {source} is present: the route is managed again", name=name, source=_sourceName(spec))
        return RouteAuth(MANAGED, spec, credential)

    def startService(self) -> None:
        Service.startService(self)
        for route in self.routes.values():
            if route.credential is not None:
                route.credential.startRefreshing()

    def stopService(self) -> None:
        for route in self.routes.values():
            if route.credential is not None:
                route.credential.stopRefreshing()
        Service.stopService(self)


@implementer(IUpstreamCredential)
class _Unavailable:
    """A managed route's credential that could not be read on reload: every call is answered 502."""

    kind = MANAGED

    def __init__(self, why: str) -> None:
        self._why = why

    def __repr__(self) -> str:
        return f"<unavailable credential: {self._why}>"

    def apply(self, request: Any) -> None:
        raise CredentialUnavailable(self._why)

    def startRefreshing(self) -> None:
        pass

    def stopRefreshing(self) -> None:
        pass
