"""
Vertex AI credentials: an OAuth access token that LMGate mints with google-auth and keeps fresh.

google-auth refreshes with blocking HTTP, so every refresh runs in the thread pool handed to the
constructor, never on the reactor thread. The token's lifetime is measured once, in that thread,
right after the refresh; from then on it is kept on the injected clock, which schedules the next
refresh ahead of expiry (and lets tests drive the schedule with a fake clock).
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import google.auth
import google.auth.credentials
import google.auth.exceptions
import google.auth.transport
import google.auth.transport.requests
from google.oauth2 import service_account
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from lmgate.errors import ConfigError
from lmgate.governance.interfaces import CredentialUnavailable, IUpstreamCredential, OutgoingRequest

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"

REFRESH_MARGIN = 300.0
"""Refresh this many seconds before the token expires (or at half its life, whichever is later)."""

USABLE_MARGIN = 30.0
"""A token this close to its expiry is not sent: the request could reach the provider after it."""

UNKNOWN_LIFETIME = 1800.0
"""How often to refresh a token whose response named no expiry."""

FIRST_RETRY, LAST_RETRY = 1.0, 60.0
"""A failed refresh is retried after 1 s, then 2, 4, ... at most 60 s apart."""

log = Logger()


def describeError(error: BaseException) -> str:
    """
    Say what went wrong with a refresh without anything secret: the error's type and its first
    argument (google-auth's own description, e.g. C{invalid_grant: Invalid JWT Signature.}),
    never the token endpoint's response data, cut to 200 characters.
    """
    first = str(error.args[0]) if error.args else ""
    text = f"{type(error).__name__}: {first}" if first else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _loadServiceAccount(path: str, scopes: Sequence[str]) -> google.auth.credentials.Credentials:
    """
    Read a service account key file at start-up.

    @raise ConfigError: naming the file and the problem (missing, unreadable, not a key file).
    """
    try:
        credentials: google.auth.credentials.Credentials = service_account.Credentials.from_service_account_file(
            path, scopes=list(scopes)
        )
    except OSError as e:  # the text names the file, never its content
        raise ConfigError(path, None, f"cannot read the service account file: {e.strerror or e}") from None
    except ValueError as e:  # bad JSON, missing fields, a key that does not parse (no key bytes in the text)
        raise ConfigError(path, None, f"not a usable service account key file: {describeError(e)}") from None
    return credentials


def _applicationDefault(scopes: Sequence[str]) -> google.auth.credentials.Credentials:
    """
    Find the application default credentials at start-up (GOOGLE_APPLICATION_CREDENTIALS, gcloud's
    file, or the metadata server on Google Cloud).

    @raise ConfigError: when there are none.
    """
    try:
        credentials, _ = google.auth.default(scopes=list(scopes))
    except google.auth.exceptions.DefaultCredentialsError as e:
        raise ConfigError(
            "credentials.google", None, f"no application default credentials ({describeError(e)}); name a service_account_file"
        ) from None
    return credentials


@implementer(IUpstreamCredential)
class GoogleOAuthCredential:
    """
    A Google OAuth access token for Vertex AI routes, sent as C{Authorization: Bearer}.

    The token is minted from a service account file, or from the application default
    credentials when no file is named, and refreshed in C{threadPool} ahead of expiry once
    L{startRefreshing} has been called. L{apply} is synchronous while a usable token is held;
    otherwise it waits for a refresh (starting one if none is running) and fails with
    L{CredentialUnavailable} when that refresh fails and no usable token is left. A failed
    background refresh keeps the current token while it lasts and is retried with backoff.

    @ivar kind: what the record's C{auth} says: C{managed}.
    @ivar account: who the token is for (the service account's address, or the credentials'
        type): for logs and reprs, never secret.
    @ivar projectId: the Google Cloud project the credentials name, when they name one.
    """

    kind = "managed"

    def __init__(
        self,
        reactor: IReactorFromThreads,
        threadPool: ThreadPool,
        serviceAccountFile: str | None = None,
        scopes: Sequence[str] = (CLOUD_PLATFORM,),
        credentials: google.auth.credentials.Credentials | None = None,
        *,
        clock: IReactorTime | None = None,
        transport: google.auth.transport.Request | None = None,
    ) -> None:
        """
        @param reactor: hands each refresh's result back to the reactor thread; also the clock
            unless C{clock} is given.
        @param threadPool: where google-auth's blocking refresh runs.
        @param serviceAccountFile: a service account key file (JSON); read here, at start-up.
        @param scopes: the OAuth scopes to ask for.
        @param credentials: ready google-auth credentials to use instead of a file or the
            application default ones.
        @param clock: schedules refreshes and judges the token's age (default: C{reactor}).
        @param transport: the google-auth HTTP transport refreshes go through (default: a
            L{google.auth.transport.requests.Request}).
        @raise ConfigError: the file cannot be used, or (no file, no credentials) there are no
            application default credentials.
        """
        if credentials is None:
            credentials = (
                _loadServiceAccount(serviceAccountFile, scopes)
                if serviceAccountFile is not None
                else _applicationDefault(scopes)
            )
        else:
            credentials = google.auth.credentials.with_scopes_if_required(credentials, list(scopes))
        self._reactor, self._threadPool = reactor, threadPool
        self._clock: IReactorTime = clock if clock is not None else IReactorTime(reactor)
        self._credentials = credentials
        self._transport = transport if transport is not None else google.auth.transport.requests.Request()
        self.account: str = getattr(credentials, "service_account_email", None) or type(credentials).__name__
        self.projectId: str | None = getattr(credentials, "project_id", None)
        quotaProject = getattr(credentials, "quota_project_id", None)
        self._quotaProject = quotaProject.encode("ascii") if isinstance(quotaProject, str) and quotaProject else None
        self._authorization: bytes | None = None  # b"Bearer <token>": the only place the token is kept
        self._expiresAt: float | None = None  # on self._clock; None: the response named no expiry
        self._refreshing = False
        self._running = False
        self._next: IDelayedCall | None = None
        self._retryDelay = FIRST_RETRY
        self._lastError: str | None = None
        self._waiters: list[Deferred[bytes | None]] = []

    def __repr__(self) -> str:
        held = "<redacted>" if self._authorization is not None else "none"
        return f"<GoogleOAuthCredential account={self.account!r} token={held}>"

    @property
    def refreshing(self) -> bool:
        """Whether a refresh is running in the thread pool now."""
        return self._refreshing

    def apply(self, request: OutgoingRequest) -> Deferred[None] | None:
        """
        Set C{Authorization: Bearer <token>} (and C{x-goog-user-project} when the credentials
        name a quota project) on C{request}: at once when a usable token is held, else after a
        refresh.

        @return: None when done synchronously, else a Deferred that fires when the header is set,
            or fails with L{CredentialUnavailable}. Cancelling it stops only the waiting.
        """
        if self._usable():
            assert self._authorization is not None
            self._setHeaders(request, self._authorization)
            return None
        waiting = self._waitForRefresh()

        def applyAfterRefresh(authorization: bytes | None) -> None:
            if authorization is None:
                raise CredentialUnavailable(f"No Google access token for {self.account}: {self._lastError or 'refresh failed'}")
            self._setHeaders(request, authorization)

        return waiting.addCallback(applyAfterRefresh)

    def startRefreshing(self) -> None:
        """Mint the first token now and keep it fresh from then on (idempotent)."""
        if self._running:
            return
        self._running = True
        if not self._refreshing:
            self._startRefresh()

    def stopRefreshing(self) -> None:
        """Stop the background refreshes; a refresh already running finishes but schedules nothing."""
        self._running = False
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None

    def refresh(self) -> Deferred[None]:
        """
        Refresh now, or join the refresh already running.

        @return: a Deferred that fires with None when that refresh has ended, whether it
            succeeded or not (a failure is logged, and retried when refreshing in the background).
        """
        return self._waitForRefresh().addCallback(lambda _: None)

    def _usable(self) -> bool:
        """Whether the held token may be sent now: held, and not within L{USABLE_MARGIN} of expiry."""
        if self._authorization is None:
            return False
        return self._expiresAt is None or self._clock.seconds() < self._expiresAt - USABLE_MARGIN

    def _setHeaders(self, request: OutgoingRequest, authorization: bytes) -> None:
        request.headers.setRawHeaders(b"authorization", [authorization])
        if self._quotaProject is not None:
            request.headers.setRawHeaders(b"x-goog-user-project", [self._quotaProject])

    def _waitForRefresh(self) -> Deferred[bytes | None]:
        """
        A Deferred firing, when the next refresh ends, with the authorization value to send (None
        when the refresh failed and no usable token is left); starts a refresh if none is running.
        """
        waiter: Deferred[bytes | None] = Deferred(canceller=self._forget)
        self._waiters.append(waiter)
        if not self._refreshing:
            self._startRefresh()
        return waiter

    def _forget(self, waiter: Deferred[bytes | None]) -> None:
        """A waiter was cancelled (its call went away): it is not fired later."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def _startRefresh(self) -> None:
        """Run one refresh in the thread pool; its result comes back on the reactor thread."""
        if self._next is not None and self._next.active():
            self._next.cancel()
        self._next = None
        self._refreshing = True
        d = deferToThreadPool(self._reactor, self._threadPool, self._mint)
        d.addCallbacks(self._minted, self._failed)
        d.addErrback(self._bug)

    def _mint(self) -> tuple[bytes, float | None]:
        """
        In the thread pool: refresh through google-auth (blocking HTTP) and measure the new token's
        remaining lifetime now, against the wall clock google-auth's expiry is in.
        """
        credentials = self._credentials
        credentials.refresh(self._transport)
        token = credentials.token
        if isinstance(token, bytes):
            token = token.decode("ascii")
        if not isinstance(token, str) or not token:
            raise google.auth.exceptions.RefreshError("the token response carried no access token")
        authorization = b"Bearer " + token.encode("ascii")
        expiry = credentials.expiry
        if expiry is None:
            return authorization, None
        now = datetime.datetime.now(datetime.timezone.utc)
        if expiry.tzinfo is None:  # google-auth keeps naive UTC datetimes
            now = now.replace(tzinfo=None)
        return authorization, (expiry - now).total_seconds()

    def _minted(self, result: tuple[bytes, float | None]) -> None:
        """Keep the new token, schedule the next refresh ahead of its expiry, wake the waiters."""
        authorization, lifetime = result
        recovered = self._lastError is not None
        self._authorization, self._lastError = authorization, None
        self._retryDelay = FIRST_RETRY
        if lifetime is None:
            self._expiresAt, delay = None, UNKNOWN_LIFETIME
        else:
            lifetime = max(lifetime, 0.0)
            self._expiresAt = self._clock.seconds() + lifetime
            delay = max(lifetime - REFRESH_MARGIN, lifetime / 2, FIRST_RETRY)
        (log.info if recovered else log.debug)(
            "Google access token for {account} refreshed, valid for {lifetime} s",
            account=self.account,
            lifetime="unknown" if lifetime is None else f"{lifetime:.0f}",
        )
        self._ended(delay, authorization)

    def _failed(self, reason: Failure) -> None:
        """Log the failure (no secret in it), keep a still-usable token, retry later with backoff."""
        self._lastError = describeError(reason.value) if reason.value is not None else "unknown error"
        delay = self._retryDelay
        self._retryDelay = min(self._retryDelay * 2, LAST_RETRY)
        usable = self._usable()
        log.warn(
            "Google access token refresh for {account} failed ({error}); {state}",
            account=self.account,
            error=self._lastError,
            state=(
                ("keeping the current token" if usable else "no usable token")
                + (f", retrying in {delay:.0f} s" if self._running else "")
            ),
        )
        self._ended(delay, self._authorization if usable else None)

    def _ended(self, delay: float, authorization: bytes | None) -> None:
        """A refresh ended: schedule the next one (while running) and fire the waiters."""
        self._refreshing = False
        if self._running:
            self._next = self._clock.callLater(delay, self._scheduled)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(authorization)

    def _scheduled(self) -> None:
        self._next = None
        if self._running and not self._refreshing:
            self._startRefresh()

    def _bug(self, reason: Failure) -> None:
        """A mistake in the bookkeeping above: logged, and nobody is left waiting forever."""
        self._refreshing = False
        log.failure("Google access token bookkeeping failed for {account}", reason, account=self.account)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

