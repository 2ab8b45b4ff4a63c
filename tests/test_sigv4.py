"""
Bedrock SigV4 signing by LMGate (L{lmgate.governance.sigv4}): AWS's published test
vectors, a fake Bedrock upstream on loopback that recomputes each signature from the
bytes it received, and credential refresh on a fake clock and a fake thread pool.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

import boto3
from botocore.config import Config
from botocore.credentials import Credentials, ReadOnlyCredentials, RefreshableCredentials
from dateutil.tz import tzutc
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lmgate.governance.interfaces import CredentialUnavailable, IUpstreamCredential, OutgoingRequest
from lmgate.governance.sigv4 import (
    CHECK_INTERVAL,
    EMPTY_SHA256,
    REFRESH_AHEAD,
    SigV4Credential,
    canonicalQuery,
    canonicalURI,
    regionFromHost,
    sign,
    wireTarget,
)
from tests.secretscan import providerSecret
from tests.sigv4check import checkSignature

VECTORS = Path(__file__).parent / "fixtures" / "sigv4"
VECTOR_CREDENTIALS = ReadOnlyCredentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None)

ACCESS_KEY = "AKIDLMGATETEST000001"
SECRET_KEY = providerSecret("aws/0123456789abcdefghijKLMN")
TOKEN = providerSecret("aws-session-token")
MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
T0 = 1_780_000_000.0  # 2026-05-28


def sessionToken(n: int) -> str:
    """The session token of the C{n}th temporary credentials the fake chain hands out."""
    return providerSecret(f"aws-session-token-{n}")


def parseVector(name: str) -> tuple[bytes, bytes, Headers, bytes]:
    """A test-suite C{.req}: method, URL (https://<Host header><target>), headers, body."""
    raw = (VECTORS / f"{name}.req").read_bytes()
    head, _, body = raw.partition(b"\n\n")
    requestLine, *lines = head.split(b"\n")
    method, _, rest = requestLine.partition(b" ")
    target = rest.rpartition(b" ")[0]
    headers, host = Headers(), b""
    for line in lines:
        name_, _, value = line.partition(b":")
        if name_.lower() == b"host":
            host = value.strip()
        headers.addRawHeader(name_, value)
    return method, b"https://" + host + target, headers, body


def vectorTest(name: str) -> Callable[[SynchronousTestCase], None]:
    def test(self: SynchronousTestCase) -> None:
        method, url, headers, body = parseVector(name)
        signature = sign(
            VECTOR_CREDENTIALS, "us-east-1", "host", method, url, headers, hashlib.sha256(body).hexdigest(), "20110909T233600Z"
        )
        self.assertEqual(signature.canonicalRequest, (VECTORS / f"{name}.creq").read_text())
        self.assertEqual(signature.stringToSign, (VECTORS / f"{name}.sts").read_text())
        self.assertEqual(signature.authorization, (VECTORS / f"{name}.authz").read_text())

    test.__doc__ = f"AWS's published vector {name!r}: same canonical request, string to sign and Authorization."
    return test


class PublishedVectorTests(SynchronousTestCase):
    """The signer agrees with AWS's published SigV4 test suite."""

    def test_allVectorsPresent(self) -> None:
        """Every vector has its four files (a lost file would silently skip a check)."""
        names = sorted(p.stem for p in VECTORS.glob("*.req"))
        self.assertEqual(len(names), 8)
        for name in names:
            for suffix in ("creq", "sts", "authz"):
                self.assertTrue((VECTORS / f"{name}.{suffix}").exists(), f"{name}.{suffix}")


for _name in sorted(p.stem for p in VECTORS.glob("*.req")):
    setattr(PublishedVectorTests, "test_" + re.sub(r"\W", "_", _name), vectorTest(_name))


class WireFormTests(SynchronousTestCase):
    """The parts of the canonical request taken from the wire."""

    def test_modelIdColonRaw(self) -> None:
        """A model id sent with a raw C{:} signs as C{%3A} (AWS encodes the wire path once more)."""
        self.assertEqual(canonicalURI(b"/model/a.b-v1:0/invoke"), "/model/a.b-v1%3A0/invoke")

    def test_modelIdColonEncoded(self) -> None:
        """A model id sent as C{%3A} (boto3's form) signs as C{%253A}, never decoded first."""
        self.assertEqual(canonicalURI(b"/model/a.b-v1%3A0/invoke"), "/model/a.b-v1%253A0/invoke")

    def test_emptyPath(self) -> None:
        """An empty path signs as C{/}."""
        self.assertEqual(canonicalURI(b""), "/")

    def test_query(self) -> None:
        """Query pairs are decoded, re-encoded strictly and sorted; a bare name gets C{=}."""
        self.assertEqual(canonicalQuery(b"b=2&a=x%3ay&c&a=%7E+"), "a=x%3Ay&a=~%2B&b=2&c=")
        self.assertEqual(canonicalQuery(b""), "")

    def test_hostFromURL(self) -> None:
        """Host as the relay sends it: the default port dropped, another kept, IPv6 in brackets, case kept."""
        self.assertEqual(wireTarget(b"https://Bedrock-Runtime.us-east-1.amazonaws.com:443/x").host, b"Bedrock-Runtime.us-east-1.amazonaws.com")
        self.assertEqual(wireTarget(b"http://127.0.0.1:8080/x?y").host, b"127.0.0.1:8080")
        self.assertEqual(wireTarget(b"https://[::1]:8443/x").host, b"[::1]:8443")
        self.assertEqual(wireTarget(b"http://h?a=1"), wireTarget(b"http://h/?a=1"))

    def test_regionFromHost(self) -> None:
        """The region an AWS endpoint names, or None."""
        self.assertEqual(regionFromHost("bedrock-runtime.us-east-1.amazonaws.com"), "us-east-1")
        self.assertEqual(regionFromHost("bedrock-runtime-fips.us-gov-west-1.amazonaws.com"), "us-gov-west-1")
        self.assertEqual(regionFromHost("bedrock-runtime.eu-central-2.api.aws"), "eu-central-2")
        self.assertEqual(regionFromHost("example.com"), None)
        self.assertEqual(regionFromHost("127.0.0.1"), None)

    def test_unsignedHeaders(self) -> None:
        """Hop-by-hop headers, Content-Length and User-Agent are sent unsigned; others are signed."""
        headers = Headers(
            {b"Content-Type": [b"application/json"], b"Connection": [b"close"], b"User-Agent": [b"x"], b"Content-Length": [b"2"]}
        )
        headers.addRawHeader(b"X-Amz-Date", b"20260101T000000Z")
        signature = sign(VECTOR_CREDENTIALS, "us-east-1", "bedrock", b"POST", b"https://h/x", headers, EMPTY_SHA256, "20260101T000000Z")
        self.assertIn("SignedHeaders=content-type;host;x-amz-date,", signature.authorization)


# -- a fake Bedrock upstream that checks signatures the way AWS does ------------------------


class FakeBedrock(Resource):
    """
    Answers every request: 403 in Bedrock's shape when the signature does not match
    the wire bytes, else 200 with what it checked (a streamed body on the stream paths).
    """

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.seen: list[dict[str, Any]] = []

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        body = request.content.read()
        problem = checkSignature(request, body, {ACCESS_KEY: SECRET_KEY})
        self.seen.append({"uri": request.uri, "body": body, "problem": problem, "headers": request.requestHeaders})
        if problem is not None:
            request.setResponseCode(403)
            request.setHeader(b"x-amzn-errortype", b"InvalidSignatureException")
            return json.dumps({"message": problem}).encode()
        if request.uri.endswith((b"/converse-stream", b"/invoke-with-response-stream")):
            request.setHeader(b"content-type", b"application/vnd.amazon.eventstream")
            request.write(b"chunk-1")
            request.write(b"chunk-2")
            request.finish()
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"ok": True, "uri": request.uri.decode("latin-1")}).encode()


class StaticSession:
    """A botocore session stand-in whose credential chain finds the test keys."""

    def __init__(self, token: str | None = TOKEN) -> None:
        self.token = token
        self.calls = 0

    def get_credentials(self) -> Credentials:
        self.calls += 1
        return Credentials(ACCESS_KEY, SECRET_KEY, self.token)


class WireTests(TestCase):
    """
    Requests signed by L{SigV4Credential} and sent by Twisted's Agent reach a fake Bedrock
    upstream that recomputes the signature from the bytes it received.
    """

    def setUp(self) -> None:
        self.upstream = FakeBedrock()
        self.port = reactor.listenTCP(0, Site(self.upstream), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.base = b"http://127.0.0.1:%d" % (self.port.getHost().port,)
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="sigv4-test")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.agent = Agent(reactor)

    def credential(self, **kw: Any) -> SigV4Credential:
        credential = SigV4Credential(reactor, self.pool, "us-east-1", session=StaticSession(), **kw)
        self.assertTrue(verifyObject(IUpstreamCredential, credential))
        return credential

    @inlineCallbacks
    def send(
        self,
        credential: SigV4Credential,
        method: bytes,
        target: bytes,
        body: bytes | None = None,
        bodyFile: Any = None,
        headers: dict[bytes, list[bytes]] | None = None,
        sendAs: bytes | None = None,
    ) -> Any:
        """Sign with C{credential}, then send with Agent (to C{sendAs} when given: a tampered target)."""
        outgoing = OutgoingRequest(
            method,
            self.base + target,
            Headers(headers or {b"Content-Type": [b"application/json"]}),
            body,
            bodyFile,
            len(body) if body is not None else (len(bodyFile.getvalue()) if isinstance(bodyFile, io.BytesIO) else _size(bodyFile)),
        )
        yield credential.apply(outgoing)
        producer = None
        if body:
            producer = FileBodyProducer(io.BytesIO(body))
        elif bodyFile is not None:
            producer = FileBodyProducer(bodyFile)
        response = yield self.agent.request(method, self.base + (sendAs or target), outgoing.headers, producer)
        content = yield readBody(response)
        return response.code, content, outgoing.headers

    @inlineCallbacks
    def test_invokeModelColonRaw(self) -> Any:
        """InvokeModel with a model id holding a raw C{:} is accepted, the path arriving as sent."""
        code, content, _ = yield self.send(self.credential(), b"POST", b"/model/" + MODEL.encode() + b"/invoke", b'{"prompt":"hi"}')
        self.assertEqual((code, self.upstream.seen[-1]["problem"]), (200, None))
        self.assertEqual(self.upstream.seen[-1]["uri"], b"/model/" + MODEL.encode() + b"/invoke")

    @inlineCallbacks
    def test_invokeModelColonEncoded(self) -> Any:
        """InvokeModel with the model id's C{:} sent as C{%3A} (boto3's form) is accepted, still C{%3A} on the wire."""
        target = b"/model/" + MODEL.replace(":", "%3A").encode() + b"/invoke"
        code, _, _ = yield self.send(self.credential(), b"POST", target, b'{"prompt":"hi"}')
        self.assertEqual((code, self.upstream.seen[-1]["problem"]), (200, None))
        self.assertEqual(self.upstream.seen[-1]["uri"], target)

    @inlineCallbacks
    def test_reencodedPathRejected(self) -> Any:
        """The check is real: a request signed for C{:} but sent with C{%3A} is refused (the encoding is signed)."""
        target = b"/model/" + MODEL.encode() + b"/invoke"
        code, content, _ = yield self.send(
            self.credential(), b"POST", target, b"{}", sendAs=target.replace(b":", b"%3A")
        )
        self.assertEqual(code, 403)
        self.assertIn(b"does not match", content)

    @inlineCallbacks
    def test_wrongSecretRejected(self) -> Any:
        """The check is real: a signature made with another secret is refused."""
        session = StaticSession()
        session.get_credentials = lambda: Credentials(ACCESS_KEY, "not-the-secret", None)  # type: ignore[method-assign]
        credential = SigV4Credential(reactor, self.pool, "us-east-1", session=session)
        code, _, _ = yield self.send(credential, b"POST", b"/model/m/converse", b"{}")
        self.assertEqual(code, 403)

    @inlineCallbacks
    def test_converse(self) -> Any:
        """Converse, with temporary credentials: the token is sent and signed."""
        code, _, headers = yield self.send(self.credential(), b"POST", b"/model/" + MODEL.encode() + b"/converse", b'{"messages":[]}')
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"x-amz-security-token"), [TOKEN.encode()])
        self.assertIn(b"x-amz-security-token", headers.getRawHeaders(b"authorization")[0])

    @inlineCallbacks
    def test_converseStream(self) -> Any:
        """ConverseStream and InvokeModelWithResponseStream are signed like any other operation."""
        credential = self.credential()
        for op in (b"converse-stream", b"invoke-with-response-stream"):
            code, content, _ = yield self.send(credential, b"POST", b"/model/" + MODEL.encode() + b"/" + op, b'{"messages":[]}')
            self.assertEqual((code, content), (200, b"chunk-1chunk-2"))

    @inlineCallbacks
    def test_query(self) -> Any:
        """A query string, unsorted and with encoded and raw reserved characters, is signed as sent."""
        target = b"/foundation-models?byProvider=Anthropic&byOutputModality=TEXT&x=a%20b&y=c:d&z"
        code, _, _ = yield self.send(self.credential(), b"GET", target, headers={b"Accept": [b"application/json"]})
        self.assertEqual((code, self.upstream.seen[-1]["uri"]), (200, target))

    @inlineCallbacks
    def test_emptyBody(self) -> Any:
        """An empty body signs as the hash of nothing."""
        code, _, _ = yield self.send(self.credential(), b"POST", b"/model/m/invoke", b"")
        self.assertEqual(code, 200)

    @inlineCallbacks
    def test_spooledBody(self) -> Any:
        """A spooled body (a file) is hashed in the pool, and the file is left where it was."""
        bodyFile = tempfile.TemporaryFile()
        self.addCleanup(bodyFile.close)
        payload = b'{"messages":[' + b'{"role":"user","content":[{"text":"x"}]},' * 40000 + b"{}]}"
        bodyFile.write(payload)
        bodyFile.seek(0)
        code, _, _ = yield self.send(self.credential(), b"POST", b"/model/" + MODEL.encode() + b"/converse", bodyFile=bodyFile)
        self.assertEqual(code, 200)
        self.assertEqual(self.upstream.seen[-1]["body"], payload)

    @inlineCallbacks
    def test_contentHashHeader(self) -> Any:
        """With C{sendContentHash}, X-Amz-Content-Sha256 is sent, signed and equal to the body's hash."""
        code, _, headers = yield self.send(self.credential(sendContentHash=True), b"POST", b"/model/m/invoke", b"{}")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"x-amz-content-sha256"), [hashlib.sha256(b"{}").hexdigest().encode()])

    @inlineCallbacks
    def test_clientSignatureReplaced(self) -> Any:
        """A client's own signature headers are replaced, never sent beside LMGate's."""
        headers = {
            b"Content-Type": [b"application/json"],
            b"Authorization": [b"Bearer lmg-client-key"],
            b"X-Amz-Date": [b"20000101T000000Z"],
            b"X-Amz-Security-Token": [b"client-token"],
        }
        code, _, sent = yield self.send(self.credential(), b"POST", b"/model/m/invoke", b"{}", headers=headers)
        self.assertEqual(code, 200)
        self.assertEqual(len(sent.getRawHeaders(b"authorization")), 1)
        self.assertEqual(sent.getRawHeaders(b"x-amz-security-token"), [TOKEN.encode()])

    @inlineCallbacks
    def test_boto3AcceptedByTheFake(self) -> Any:
        """The fake upstream's check agrees with botocore's own signing: boto3's InvokeModel (C{%3A} path) passes it."""
        client = boto3.session.Session().client(
            "bedrock-runtime",
            region_name="us-east-1",
            endpoint_url=self.base.decode(),
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            aws_session_token=TOKEN,
            config=Config(retries={"max_attempts": 1}),
        )
        call = lambda: client.invoke_model(modelId=MODEL, body=b'{"prompt":"hi"}', contentType="application/json")  # noqa: E731
        yield deferToThreadPool(reactor, self.pool, call)
        self.assertEqual(self.upstream.seen[-1]["problem"], None)
        self.assertIn(b"%3A", self.upstream.seen[-1]["uri"])


def _size(f: Any) -> int:
    if f is None:
        return 0
    position = f.tell()
    f.seek(0, 2)
    size = f.tell()
    f.seek(position)
    return int(size)


# -- refresh on a fake clock and a fake pool ----------------------------------------------------


@implementer(IReactorFromThreads)
class FakeReactor(Clock):
    """A clock that also takes results back from (fake) threads."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


class FakePool:
    """A thread pool that runs its jobs only when told, and records that they ran there."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
        self.inPool = False

    def callInThreadWithCallback(self, onResult: Any, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        self.jobs.append((onResult, f, args, kw))

    def run(self) -> int:
        ran = 0
        while self.jobs:
            onResult, f, args, kw = self.jobs.pop(0)
            self.inPool = True
            try:
                result = f(*args, **kw)
            except BaseException:
                self.inPool = False
                onResult(False, Failure())
            else:
                self.inPool = False
                onResult(True, result)
            ran += 1
        return ran


class RefreshingSession:
    """A botocore session stand-in with temporary credentials that refresh, on the fake clock."""

    def __init__(self, clock: Clock, pool: FakePool, lifetime: float = 3600.0) -> None:
        self.clock, self.pool, self.lifetime = clock, pool, lifetime
        self.refreshed: list[float] = []
        self.chainCalls = 0

    def _expiry(self) -> str:
        moment = datetime.datetime.fromtimestamp(self.clock.seconds() + self.lifetime, tz=tzutc())
        return moment.isoformat()

    def _refresh(self) -> dict[str, str]:
        assert self.pool.inPool, "credentials refreshed outside the thread pool"
        self.refreshed.append(self.clock.seconds())
        n = len(self.refreshed) + 1
        return {"access_key": f"ASIA{n:016d}", "secret_key": SECRET_KEY, "token": sessionToken(n), "expiry_time": self._expiry()}

    def get_credentials(self) -> RefreshableCredentials:
        assert self.pool.inPool, "credential chain run outside the thread pool"
        self.chainCalls += 1
        from dateutil.parser import parse

        return RefreshableCredentials(
            "ASIA0000000000000001",
            SECRET_KEY,
            sessionToken(1),
            parse(self._expiry()),
            self._refresh,
            "test",
            time_fetcher=lambda: datetime.datetime.fromtimestamp(self.clock.seconds(), tz=tzutc()),
        )


def outgoing(body: bytes | None = b"{}", bodyFile: Any = None, size: int | None = None) -> OutgoingRequest:
    return OutgoingRequest(
        b"POST",
        b"https://bedrock-runtime.us-east-1.amazonaws.com/model/" + MODEL.encode() + b"/converse",
        Headers({b"Content-Type": [b"application/json"]}),
        body,
        bodyFile,
        size if size is not None else len(body or b""),
    )


def tokenOf(request: OutgoingRequest) -> bytes:
    return (request.headers.getRawHeaders(b"x-amz-security-token") or [b""])[0]


class RefreshTests(SynchronousTestCase):
    """Credentials are obtained and refreshed in the pool, ahead of expiry; signing waits only for the first."""

    def setUp(self) -> None:
        self.clock = FakeReactor()
        self.clock.advance(T0)
        self.pool = FakePool()
        self.session = RefreshingSession(self.clock, self.pool)
        self.credential = SigV4Credential(self.clock, self.pool, "us-east-1", session=self.session)  # type: ignore[arg-type]

    def test_applyWaitsForTheFirstLoad(self) -> None:
        """Before credentials are known, apply returns a Deferred that signs once the pool has loaded them."""
        self.credential.startRefreshing()
        self.assertEqual(self.session.chainCalls, 0)  # not on the reactor thread
        request = outgoing()
        waiting = self.credential.apply(request)
        assert waiting is not None
        self.assertNoResult(waiting)
        self.assertEqual(self.pool.run(), 1)  # one load for the loop and the waiting call
        self.assertIsNone(self.successResultOf(waiting))
        self.assertEqual(tokenOf(request), sessionToken(1).encode())
        self.assertEqual(self.session.chainCalls, 1)

    def test_applyAloneStartsTheLoad(self) -> None:
        """Without startRefreshing, the first apply starts the load itself."""
        waiting = self.credential.apply(outgoing())
        assert waiting is not None
        self.pool.run()
        self.successResultOf(waiting)

    def test_freshCredentialsSignSynchronously(self) -> None:
        """Once loaded, apply signs at once (no Deferred, nothing sent to the pool)."""
        self.credential.startRefreshing()
        self.pool.run()
        request = outgoing()
        self.assertIsNone(self.credential.apply(request))
        self.assertEqual(self.pool.jobs, [])
        self.assertTrue(request.headers.getRawHeaders(b"authorization")[0].startswith(b"AWS4-HMAC-SHA256 Credential=ASIA0000000000000001/"))
        self.assertEqual(request.headers.getRawHeaders(b"x-amz-date"), [b"20260528T202640Z"])

    def test_refreshAheadOfExpiryInThePool(self) -> None:
        """The loop refreshes REFRESH_AHEAD before expiry, in the pool; calls meanwhile sign with the old keys."""
        self.credential.startRefreshing()
        self.pool.run()
        dueAt = T0 + 3600 - REFRESH_AHEAD
        for tick in range(100):
            if self.pool.jobs:
                break
            self.clock.advance(CHECK_INTERVAL)
        self.assertGreater(self.clock.seconds(), dueAt)  # not before it is due
        self.assertLessEqual(self.clock.seconds(), dueAt + CHECK_INTERVAL)  # within one check of it
        self.assertEqual(len(self.pool.jobs), 1)  # queued, not run on the reactor thread
        self.assertEqual(self.session.refreshed, [])
        request = outgoing()
        self.assertIsNone(self.credential.apply(request))  # still valid: signs now, no second refresh queued
        self.assertEqual(tokenOf(request), sessionToken(1).encode())
        self.assertEqual(len(self.pool.jobs), 1)
        self.pool.run()
        self.assertEqual(len(self.session.refreshed), 1)
        self.assertLess(self.session.refreshed[0], T0 + 3600)
        request = outgoing()
        self.assertIsNone(self.credential.apply(request))
        self.assertEqual(tokenOf(request), sessionToken(2).encode())

    def test_expiredCredentialsWait(self) -> None:
        """Credentials about to expire (the loop stopped) are not used: apply waits for the refresh."""
        self.credential.startRefreshing()
        self.pool.run()
        self.credential.stopRefreshing()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(3600 - 30)
        request = outgoing()
        waiting = self.credential.apply(request)
        assert waiting is not None
        self.assertNoResult(waiting)
        self.pool.run()
        self.successResultOf(waiting)
        self.assertEqual(tokenOf(request), sessionToken(2).encode())

    def test_spooledBodyHashedInThePool(self) -> None:
        """A spooled body is hashed in the pool: apply returns a Deferred even with fresh credentials."""
        self.credential.startRefreshing()
        self.pool.run()
        bodyFile = io.BytesIO(b"0123456789")
        bodyFile.seek(4)
        request = outgoing(None, bodyFile, 10)
        waiting = self.credential.apply(request)
        assert waiting is not None
        self.assertNoResult(waiting)
        self.assertEqual(self.pool.run(), 1)
        self.successResultOf(waiting)
        self.assertEqual(bodyFile.tell(), 4)
        self.assertIn(b"authorization", {k.lower() for k, _ in request.headers.getAllRawHeaders()})

    def test_noCredentials(self) -> None:
        """No credentials anywhere: CredentialUnavailable, and a call soon after fails at once without a new attempt."""
        self.session.get_credentials = lambda: None  # type: ignore[assignment, method-assign, return-value]
        waiting = self.credential.apply(outgoing())
        assert waiting is not None
        self.pool.run()
        failure = self.failureResultOf(waiting, CredentialUnavailable)
        self.assertIn("No AWS credentials found", str(failure.value))
        again = self.credential.apply(outgoing())
        assert again is not None
        self.failureResultOf(again, CredentialUnavailable)
        self.assertEqual(self.pool.jobs, [])
        self.clock.advance(60)
        retried = self.credential.apply(outgoing())
        assert retried is not None
        self.assertEqual(len(self.pool.jobs), 1)
        self.pool.run()
        self.failureResultOf(retried, CredentialUnavailable)

    def test_failureShowsNoSecret(self) -> None:
        """A failing chain's error, and the credential's repr, never show a secret."""

        def boom() -> None:
            raise RuntimeError(SECRET_KEY)

        self.session.get_credentials = boom  # type: ignore[assignment, method-assign]
        waiting = self.credential.apply(outgoing())
        assert waiting is not None
        self.pool.run()
        failure = self.failureResultOf(waiting, CredentialUnavailable)
        self.assertNotIn(SECRET_KEY, str(failure.value))
        self.assertIn("RuntimeError", str(failure.value))
        self.flushLoggedErrors()
        self.session = RefreshingSession(self.clock, self.pool)
        credential = SigV4Credential(self.clock, self.pool, "us-east-1", session=self.session)  # type: ignore[arg-type]
        credential.startRefreshing()
        self.pool.run()
        self.assertNotIn(SECRET_KEY, repr(credential))
        self.assertNotIn(sessionToken(1), repr(credential))
        self.assertIn("us-east-1", repr(credential))

    def test_cancelWhileWaiting(self) -> None:
        """A waiting call cancelled (client gone) lets go; the load still completes for the next call."""
        waiting = self.credential.apply(outgoing())
        assert waiting is not None
        waiting.cancel()
        self.failureResultOf(waiting)
        self.pool.run()
        self.assertIsNone(self.credential.apply(outgoing()))
