"""
Bedrock's credential on a managed route: an AWS Signature Version 4 computed by
LMGate over the exact bytes it sends, with botocore's credential chain.

The client signs nothing LMGate relays (its own signature, if any, is removed by
the call); LMGate signs each attempt itself with the credentials botocore finds
(environment, shared profile, instance role, ...). The signature covers what goes
on the wire: the C{Host} the relay sends, the path exactly as the client encoded
it (a model id such as C{anthropic.claude-3-5-sonnet-20240620-v1:0} stays C{:} or
C{%3A}, whichever the client sent), the query, and the body (in memory, or a
spooled file hashed in the thread pool).

Why not botocore's C{SigV4Auth.add_auth} as it is: it reads the wall clock (LMGate
signs on the clock it is given), and it canonicalises the query as botocore itself
would have encoded it (it does not re-encode a query a client encoded differently).
The signer below is botocore's C{SigV4Auth} with only the canonical request's
path, query and payload taken from the wire; the headers' canonical form, the
string to sign, the key derivation and the C{Authorization} value stay botocore's.

Credentials are obtained and refreshed in the thread pool (reading files, the
instance metadata service, STS are blocking I/O), ahead of their expiry; signing
uses the last frozen credentials and never waits for I/O, except the first time
(or after an expiry the refresh could not prevent), when L{SigV4Credential.apply}
returns a Deferred that fires once the credentials are there.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import quote_from_bytes, unquote_to_bytes

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials, RefreshableCredentials
from botocore.utils import normalize_url_path
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.http_headers import Headers
from zope.interface import implementer

from lmgate.governance.interfaces import CredentialUnavailable, IUpstreamCredential, OutgoingRequest

log = Logger()

#: The hash of an empty payload.
EMPTY_SHA256: Final = hashlib.sha256(b"").hexdigest()

#: Refresh temporary credentials this long before they expire (botocore's own advisory window).
REFRESH_AHEAD: Final = 15 * 60.0

#: Credentials this close to their expiry are not used to sign: a signature must still be
#: valid when the provider checks it. A call waits for the refresh instead.
EXPIRY_MARGIN: Final = 60.0

#: How often the background loop checks whether a refresh is due.
CHECK_INTERVAL: Final = 60.0

#: After a failed attempt, the next one waits this long (calls meanwhile fail at once
#: when no usable credentials are left, rather than each starting a refresh).
RETRY_AFTER: Final = 10.0

#: Bytes read at a time when hashing a spooled body.
HASH_CHUNK: Final = 1 << 16

#: Headers never signed: hop-by-hop or rewritten on the way (botocore's own list, plus those
#: the relay sets itself or replaces). Everything else the request carries is signed.
UNSIGNED_HEADERS: Final = frozenset(
    {
        "authorization",
        "baggage",
        "connection",
        "content-length",
        "expect",
        "host",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "traceparent",
        "tracestate",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "x-amzn-trace-id",
    }
)

#: Headers LMGate replaces with its own (a client's signature headers never go upstream).
SIGNATURE_HEADERS: Final = (b"authorization", b"x-amz-date", b"x-amz-security-token", b"x-amz-content-sha256")

#: Exceptions whose message is safe and useful to show (they name a variable, file or profile, never a secret).
_SHOWN_ERRORS: Final = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "ProfileNotFound", "ConfigNotFound", "InvalidConfigError"}
)


#: An AWS region name: us-east-1, eu-central-2, us-gov-west-1, ap-southeast-4...
_REGION: Final = re.compile(r"\A[a-z]{2}(-[a-z]+)+-\d+\Z")


@dataclass(frozen=True)
class WireTarget:
    """
    What the signature covers of a URL, exactly as the relay sends it.

    @ivar host: the C{Host} header's value: the URL's host as written (IPv6 in
        brackets), with C{:port} when the port is not the scheme's default.
    @ivar path: the raw path, as the client encoded it (C{/} when empty).
    @ivar query: the raw query, without its C{?}.
    """

    host: bytes
    path: bytes
    query: bytes


def wireTarget(url: bytes) -> WireTarget:
    """
    Split an absolute upstream URL the way the relay does (the authority ends at the
    first C{/}, C{?} or C{#}; the target is then cut at its first C{?}), and compute
    the C{Host} value the relay sends for it.

    @raise ValueError: the URL has no C{scheme://} or a port that is not a number.
    """
    scheme, sep, rest = url.partition(b"://")
    if not sep or not rest:
        raise ValueError("not an absolute URL")
    end = len(rest)
    for mark in (b"/", b"?", b"#"):
        at = rest.find(mark)
        if 0 <= at < end:
            end = at
    authority, target = rest[:end], rest[end:]
    if not target.startswith(b"/"):
        target = b"/" + target
    path, _, query = target.partition(b"?")
    hostPort = authority.rpartition(b"@")[2]
    if hostPort.startswith(b"["):
        close = hostPort.find(b"]")
        host, portText = hostPort[: close + 1], hostPort[close + 1 :].removeprefix(b":")
    else:
        host, _, portText = hostPort.partition(b":")
    default = {b"http": 80, b"https": 443}.get(scheme.lower())
    port = int(portText) if portText else default
    if port is None:
        raise ValueError("no port for this scheme")
    hostHeader = host if port == default else host + b":%d" % (port,)
    return WireTarget(hostHeader, path, query)


def canonicalURI(path: bytes) -> str:
    """
    The canonical URI of a raw path, as AWS computes it from the wire for every
    service but S3: dot segments and repeated slashes removed, then every byte but
    the unreserved ones and C{/} percent-encoded, C{%} included. So a path sent as
    C{/model/a%3A0/invoke} signs as C{/model/a%253A0/invoke} (what boto3 sends and
    signs), and one sent as C{/model/a:0/invoke} signs as C{/model/a%3A0/invoke}.
    """
    normalized = normalize_url_path(path.decode("latin-1")).encode("latin-1")
    return quote_from_bytes(normalized, safe=b"/~")


def canonicalQuery(query: bytes) -> str:
    """
    The canonical query string of a raw query: each name and value decoded, then
    percent-encoded (all but the unreserved characters, C{%20} for a space, upper-case
    hex), pairs sorted by name then value, C{name=} for a name without value. A C{+}
    is a plus sign, not a space (SigV4 clients encode spaces as C{%20}).
    """
    pairs = []
    for pair in query.split(b"&"):
        if not pair:
            continue
        name, _, value = pair.partition(b"=")
        pairs.append((quote_from_bytes(unquote_to_bytes(name), safe=b"-_.~"), quote_from_bytes(unquote_to_bytes(value), safe=b"-_.~")))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def signedHeaders(host: bytes, headers: Headers) -> dict[str, list[str]]:
    """
    The headers a signature covers, by lower-case name: C{host} (the value given, the
    one the relay sends) and every header of C{headers} but the L{UNSIGNED_HEADERS}.
    A header whose value is not ASCII is left unsigned (AWS would canonicalise its
    raw bytes, botocore its UTF-8 text: they could disagree).
    """
    chosen: dict[str, list[str]] = {"host": [host.decode("ascii")]}
    for rawName, rawValues in headers.getAllRawHeaders():
        name = rawName.decode("latin-1").lower()
        if name in UNSIGNED_HEADERS or not all(v.isascii() for v in rawValues):
            continue
        chosen.setdefault(name, []).extend(v.decode("ascii") for v in rawValues)
    return chosen


@dataclass(frozen=True)
class Signature:
    """One request's signature and the steps that led to it (for tests and diagnostics: no secret in it)."""

    canonicalRequest: str
    stringToSign: str
    authorization: str


class _WireSigner(SigV4Auth):  # type: ignore[misc]
    """
    botocore's SigV4 signer whose canonical request takes the method, path, query and
    payload hash from the wire instead of botocore's own serialisation; everything
    else (canonical headers, signed-header list, string to sign, key derivation,
    C{Authorization}) is botocore's.
    """

    def __init__(self, credentials: ReadOnlyCredentials, service: str, region: str, target: WireTarget, payloadHash: str) -> None:
        SigV4Auth.__init__(self, credentials, service, region)
        self._target, self._payloadHash = target, payloadHash

    def canonical_request(self, request: Any) -> str:
        toSign = self.headers_to_sign(request)
        return "\n".join(
            [
                request.method.upper(),
                canonicalURI(self._target.path),
                canonicalQuery(self._target.query),
                self.canonical_headers(toSign) + "\n",
                self.signed_headers(toSign),
                self._payloadHash,
            ]
        )


def sign(
    credentials: ReadOnlyCredentials,
    region: str,
    service: str,
    method: bytes,
    url: bytes,
    headers: Headers,
    payloadHash: str,
    timestamp: str,
) -> Signature:
    """
    Compute the SigV4 signature of one request as it will be sent.

    C{headers} must already hold every header to sign with its final value (C{X-Amz-Date}
    equal to C{timestamp}, C{X-Amz-Security-Token} for temporary credentials); C{Host}
    is taken from C{url}. Pure CPU work: no clock, no I/O.

    @param timestamp: the signing time, C{YYYYMMDDTHHMMSSZ}.
    @param payloadHash: the hex SHA-256 of the body (L{EMPTY_SHA256} for none).
    """
    target = wireTarget(url)
    awsRequest = AWSRequest(method=method.decode("ascii"), url=url.decode("latin-1"))
    for name, values in signedHeaders(target.host, headers).items():
        for value in values:
            awsRequest.headers.add_header(name, value)  # several values: botocore joins them with ','
    awsRequest.context["timestamp"] = timestamp
    signer = _WireSigner(credentials, service, region, target, payloadHash)
    canonical = signer.canonical_request(awsRequest)
    toSign = signer.string_to_sign(awsRequest, canonical)
    signature = signer.signature(toSign, awsRequest)
    authorization = (
        f"AWS4-HMAC-SHA256 Credential={signer.scope(awsRequest)}, "
        f"SignedHeaders={signer.signed_headers(signer.headers_to_sign(awsRequest))}, Signature={signature}"
    )
    return Signature(canonical, toSign, authorization)


def amzDate(seconds: float) -> str:
    """The SigV4 timestamp (C{X-Amz-Date}) of a POSIX time."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(seconds))


def hashFile(bodyFile: Any, size: int) -> str:
    """
    The hex SHA-256 of the first C{size} bytes of C{bodyFile}, read from its start; its
    position is restored. Blocking I/O: run it in a thread pool.

    @raise ValueError: the file holds fewer than C{size} bytes.
    """
    position = bodyFile.tell()
    try:
        bodyFile.seek(0)
        digest, left = hashlib.sha256(), size
        while left > 0:
            chunk = bodyFile.read(min(HASH_CHUNK, left))
            if not chunk:
                raise ValueError(f"the spooled body ended {left} bytes before its size")
            digest.update(chunk)
            left -= len(chunk)
        return digest.hexdigest()
    finally:
        bodyFile.seek(position)


def regionFromHost(host: str) -> str | None:
    """
    The region an AWS endpoint host names (C{bedrock-runtime.us-east-1.amazonaws.com} →
    C{us-east-1}; FIPS and dual-stack (C{.api.aws}) forms too), or None when it names none.
    """
    labels = host.lower().rpartition("@")[2].split(":")[0].split(".")
    if "amazonaws" not in labels and labels[-2:] != ["api", "aws"]:
        return None
    for label in labels[1:]:
        if _REGION.match(label):
            return label
    return None


class _CredentialSource(Protocol):
    """What LMGate uses of a botocore credentials object."""

    def get_frozen_credentials(self) -> ReadOnlyCredentials: ...


def _describe(error: BaseException) -> str:
    """An exception as an operator may see it: botocore's message when it names no secret, else its type."""
    name = type(error).__name__
    if isinstance(error, CredentialUnavailable) or name in _SHOWN_ERRORS:
        return str(error)
    return f"{name} while obtaining AWS credentials"


def _load(session: Any, profile: str | None, source: _CredentialSource | None) -> tuple[_CredentialSource, ReadOnlyCredentials]:
    """
    In the thread pool: find the credentials through botocore's chain (first time),
    then freeze them, refreshing temporary ones when botocore finds them due.
    """
    if source is None:
        if session is None:
            from botocore.session import Session

            session = Session(profile=profile)
        source = session.get_credentials()
        if source is None:
            raise CredentialUnavailable(
                "No AWS credentials found (environment, shared credentials or config file, instance role)"
                + (f" for profile {profile!r}" if profile else "")
            )
    frozen = source.get_frozen_credentials()
    if not frozen.access_key or not frozen.secret_key:
        raise CredentialUnavailable("The AWS credentials found are incomplete")
    return source, frozen


@implementer(IUpstreamCredential)
class SigV4Credential:
    """
    Signs a managed Bedrock route's requests with AWS SigV4 (botocore's credential
    chain and signer), over the exact bytes LMGate sends.

    @ivar region: the signing region.
    @ivar service: the signing service name (C{bedrock}).
    @ivar profile: the shared-config profile, or None for botocore's default chain.
    """

    kind = "managed"

    def __init__(
        self,
        reactor: IReactorTime,
        threadPool: ThreadPool,
        region: str,
        profile: str | None = None,
        service: str = "bedrock",
        session: Any = None,
        *,
        sendContentHash: bool = False,
    ) -> None:
        """
        @param reactor: the clock of signing times and refresh checks; also receives the
            thread pool's results, so it must provide L{IReactorFromThreads}.
        @param threadPool: where credentials are obtained and refreshed and spooled
            bodies hashed (never the reactor thread).
        @param region: the signing region (from the configuration, or L{regionFromHost}).
        @param profile: a shared-config profile name; None: botocore's default chain.
        @param session: a botocore C{Session} to take credentials from (tests; a
            session of C{profile} is made in the pool otherwise).
        @param sendContentHash: also send C{X-Amz-Content-Sha256} (S3 requires it; Bedrock
            does not, and boto3 does not send it to Bedrock). The payload is signed either way.
        """
        self.region, self.service, self.profile = region, service, profile
        self._clock = reactor
        self._threads = IReactorFromThreads(reactor)
        self._pool = threadPool
        self._session = session
        self._sendContentHash = sendContentHash
        self._source: _CredentialSource | None = None
        self._frozen: ReadOnlyCredentials | None = None
        self._refreshing: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []
        self._lastAttempt: float | None = None  # when the last attempt ended
        self._lastError: CredentialUnavailable | None = None  # its error, when it failed
        self._loop = LoopingCall(self._tick)
        self._loop.clock = reactor
        self.refreshes = 0  # attempts completed (tests, diagnostics)

    def __repr__(self) -> str:
        state = "ready" if self._frozen is not None else "pending"
        profile = f" profile={self.profile!r}" if self.profile else ""
        return f"<SigV4Credential service={self.service!r} region={self.region!r}{profile} {state}>"

    # -- IUpstreamCredential ------------------------------------------------------------

    def startRefreshing(self) -> None:
        if not self._loop.running:
            self._loop.start(CHECK_INTERVAL, now=True)

    def stopRefreshing(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def apply(self, request: OutgoingRequest) -> Deferred[None] | None:
        if self._refreshDue():
            self._refresh()
        if self._usable():
            return self._signWith(request)
        if self._refreshing is None and self._inBackoff() and self._lastError is not None:
            return fail(self._lastError)
        self._refresh()
        waiter: Deferred[None] = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(waiter)
        return waiter.addCallback(lambda _: self._signWith(request))

    # -- signing ---------------------------------------------------------------------

    def _signWith(self, request: OutgoingRequest) -> Deferred[None] | None:
        """Sign C{request} with the current frozen credentials: now for a body in memory, after hashing a spooled one in the pool."""
        credentials = self._frozen
        if credentials is None or not self._usable():
            raise CredentialUnavailable("The AWS credentials expired before they could be refreshed")
        if request.body is None and request.bodyFile is not None and request.bodySize > 0:
            hashing = deferToThreadPool(self._threads, self._pool, hashFile, request.bodyFile, request.bodySize)
            return hashing.addCallback(lambda digest: self._signNow(request, credentials, digest))
        digest = hashlib.sha256(request.body).hexdigest() if request.body else EMPTY_SHA256
        self._signNow(request, credentials, digest)
        return None

    def _signNow(self, request: OutgoingRequest, credentials: ReadOnlyCredentials, payloadHash: str) -> None:
        """Set the signature headers on C{request}: C{Host}, C{X-Amz-Date}, the token, C{Authorization}."""
        headers = request.headers
        for name in SIGNATURE_HEADERS:
            headers.removeHeader(name)
        host = wireTarget(request.url).host
        headers.setRawHeaders(b"Host", [host])  # the relay sends this one: the value signed is the value sent
        timestamp = amzDate(self._clock.seconds())
        headers.setRawHeaders(b"X-Amz-Date", [timestamp.encode("ascii")])
        if credentials.token:
            headers.setRawHeaders(b"X-Amz-Security-Token", [credentials.token.encode("ascii")])
        if self._sendContentHash:
            headers.setRawHeaders(b"X-Amz-Content-Sha256", [payloadHash.encode("ascii")])
        signature = sign(credentials, self.region, self.service, request.method, request.url, headers, payloadHash, timestamp)
        headers.setRawHeaders(b"Authorization", [signature.authorization.encode("ascii")])

    # -- credentials -----------------------------------------------------------------

    def _usable(self) -> bool:
        """The frozen credentials can sign now: there are some, and they are not about to expire."""
        if self._frozen is None:
            return False
        source = self._source
        return not (isinstance(source, RefreshableCredentials) and source.refresh_needed(EXPIRY_MARGIN))

    def _refreshDue(self) -> bool:
        """A refresh should start: none yet, or temporary credentials near their expiry, and not just tried."""
        if self._refreshing is not None or self._inBackoff():
            return False
        if self._frozen is None:
            return True
        source = self._source
        return isinstance(source, RefreshableCredentials) and bool(source.refresh_needed(REFRESH_AHEAD))

    def _inBackoff(self) -> bool:
        """The last attempt ended less than L{RETRY_AFTER} ago and did not leave fresh credentials."""
        return (
            self._lastAttempt is not None
            and self._clock.seconds() - self._lastAttempt < RETRY_AFTER
            and (self._lastError is not None or self._source is not None and not self._usable())
        )

    def _tick(self) -> None:
        """The background check: start a refresh when one is due."""
        if self._refreshDue():
            self._refresh()

    def _refresh(self) -> None:
        """Start obtaining fresh credentials in the pool, unless that is already under way."""
        if self._refreshing is not None:
            return
        attempt: Deferred[tuple[_CredentialSource, ReadOnlyCredentials]] = deferToThreadPool(
            self._threads, self._pool, _load, self._session, self.profile, self._source
        )
        self._refreshing = attempt.addCallbacks(self._loaded, self._failed)

    def _loaded(self, result: tuple[_CredentialSource, ReadOnlyCredentials]) -> None:
        self._refreshing = None
        self._source, self._frozen = result
        self._ended(None)

    def _failed(self, reason: Failure) -> None:
        self._refreshing = None
        problem = reason.value
        if isinstance(problem, CredentialUnavailable):
            error = problem
        else:
            error = CredentialUnavailable(_describe(problem) if problem is not None else "AWS credentials could not be obtained")
        log.warn("AWS credentials for {service} in {region}: {problem}", service=self.service, region=self.region, problem=str(error))
        self._ended(error)

    def _ended(self, error: CredentialUnavailable | None) -> None:
        """An attempt ended: remember when and how, and wake the calls waiting for it."""
        self.refreshes += 1
        self._lastAttempt, self._lastError = self._clock.seconds(), error
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if waiter.called:
                continue
            if self._usable():
                waiter.callback(None)
            else:
                waiter.errback(error or CredentialUnavailable("The AWS credentials are expired and could not be refreshed"))

