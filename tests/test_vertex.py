"""
Vertex AI's managed credential: google-auth against a fake OAuth token endpoint on loopback.

google-auth's refresh is blocking HTTP, so the token endpoint runs in its own thread
(http.server on 127.0.0.1), the refresh in a real thread pool, and the tests wait on the
credential's Deferreds; the refresh schedule runs on a fake clock.
"""

from __future__ import annotations

import base64
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import google.auth.transport.requests
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.filepath import FilePath
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from lmgate.errors import ConfigError
from lmgate.governance.interfaces import CredentialUnavailable, IUpstreamCredential, OutgoingRequest
from lmgate.governance.vertex import CLOUD_PLATFORM, GoogleOAuthCredential
from tests.secretscan import SECRET_SUFFIX, providerSecret

ACCOUNT = "lmgate-test@test-project.iam.example"
LIFETIME = 3600


def issuedToken(n: int) -> str:
    """The C{n}th access token the fake token endpoint mints (a fake provider secret, marked)."""
    return providerSecret(f"google-token-{n}")

_key: rsa.RSAPrivateKey | None = None


def throwawayKey() -> rsa.RSAPrivateKey:
    """One RSA key for the whole module: generated here, never stored anywhere else."""
    global _key
    if _key is None:
        _key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return _key


def unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class FakeTokenEndpoint:
    """
    Google's OAuth token endpoint, as far as a service account's JWT grant goes: it checks the
    assertion's RS256 signature with the account's public key and answers a fresh token
    (L{issuedToken}C{(1)}, L{issuedToken}C{(2)}, ...) or, when C{failing}, C{400 invalid_grant}.
    """

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        self.publicKey = key.public_key()
        self.failing = False
        self.grants: list[dict[str, Any]] = []  # the claims of each assertion received
        self.issued: list[str] = []
        self.threads: list[int] = []  # the client thread of each call, via the transport
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                endpoint.answer(self, parse_qs(body.decode("ascii")))

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def answer(self, handler: BaseHTTPRequestHandler, form: dict[str, list[str]]) -> None:
        header, claims, signature = form["assertion"][0].split(".")
        self.publicKey.verify(unb64(signature), f"{header}.{claims}".encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        self.grants.append(dict(json.loads(unb64(claims)), grant_type=form["grant_type"][0]))
        if self.failing:
            status, reply = 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        else:
            self.issued.append(issuedToken(len(self.issued) + 1))
            status, reply = 200, {"access_token": self.issued[-1], "expires_in": LIFETIME, "token_type": "Bearer"}
        data = json.dumps(reply).encode("ascii")
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class RecordingTransport(google.auth.transport.requests.Request):
    """google-auth's requests transport, ignoring proxy settings (loopback only), noting each caller's thread."""

    def __init__(self, endpoint: FakeTokenEndpoint) -> None:
        self.session = requests.Session()
        self.session.trust_env = False
        super().__init__(self.session)
        self._endpoint = endpoint

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._endpoint.threads.append(threading.get_ident())
        return super().__call__(*args, **kwargs)


def outgoing() -> OutgoingRequest:
    return OutgoingRequest(b"POST", b"https://vertex.invalid/v1/x:generateContent", Headers({b"authorization": [b"Bearer lmgate-key"]}), b"{}", None, 2)


class GoogleOAuthCredentialTests(TestCase):
    def setUp(self) -> None:
        self.endpoint = FakeTokenEndpoint(throwawayKey())
        self.addCleanup(self.endpoint.stop)
        self.pool = ThreadPool(minthreads=1, maxthreads=2, name="test-vertex")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.transport = RecordingTransport(self.endpoint)
        self.addCleanup(self.transport.session.close)
        self.clock = Clock()
        self.accountFile = self.writeAccountFile(self.endpoint.url)
        self.logged: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            self.logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def writeAccountFile(self, tokenURI: str) -> FilePath[str]:
        pem = throwawayKey().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        info = {
            "type": "service_account",
            "project_id": "test-project",
            "private_key_id": "test-key-1",
            "private_key": pem.decode("ascii"),
            "client_email": ACCOUNT,
            "client_id": "1",
            "token_uri": tokenURI,
        }
        path = FilePath(self.mktemp() + SECRET_SUFFIX)  # a credential source: the secret scan skips it
        path.setContent(json.dumps(info).encode("ascii"))
        return path

    def credential(self, **kwargs: Any) -> GoogleOAuthCredential:
        kwargs.setdefault("serviceAccountFile", self.accountFile.path)
        credential = GoogleOAuthCredential(reactor, self.pool, clock=self.clock, transport=self.transport, **kwargs)
        self.addCleanup(credential.stopRefreshing)
        return credential

    def test_providesTheInterface(self) -> None:
        """The credential is an IUpstreamCredential whose records say C{managed}."""
        credential = self.credential()
        self.assertTrue(IUpstreamCredential.providedBy(credential))
        self.assertEqual((credential.kind, credential.account, credential.projectId), ("managed", ACCOUNT, "test-project"))

    async def test_mintsAToken(self) -> None:
        """
        startRefreshing mints a token from the service account's token endpoint (a JWT grant
        signed with the account's key, for the cloud-platform scope), off the reactor thread;
        then apply replaces the client's Authorization with the Bearer token synchronously.
        """
        credential = self.credential()
        credential.startRefreshing()
        self.assertTrue(credential.refreshing)
        await credential.refresh()
        [grant] = self.endpoint.grants
        self.assertEqual(
            (grant["iss"], grant["scope"], grant["grant_type"]),
            (ACCOUNT, CLOUD_PLATFORM, "urn:ietf:params:oauth:grant-type:jwt-bearer"),
        )
        self.assertNotIn(threading.get_ident(), self.endpoint.threads)
        request = outgoing()
        self.assertIsNone(credential.apply(request))
        self.assertEqual(request.headers.getRawHeaders(b"authorization"), [b"Bearer " + issuedToken(1).encode()])

    async def test_applyWaitsForTheFirstToken(self) -> None:
        """Without a token, apply returns a Deferred; concurrent calls share one refresh."""
        credential = self.credential()
        first, second = outgoing(), outgoing()
        waiting = [credential.apply(first), credential.apply(second)]
        self.assertNotIn(None, waiting)
        for d in waiting:
            await d
        self.assertEqual(len(self.endpoint.grants), 1)
        for request in first, second:
            self.assertEqual(request.headers.getRawHeaders(b"authorization"), [b"Bearer " + issuedToken(1).encode()])

    async def test_cancelledWait(self) -> None:
        """Cancelling apply's Deferred (the call went away) stops only that wait."""
        credential = self.credential()
        gone, staying = outgoing(), outgoing()
        cancelled, waiting = credential.apply(gone), credential.apply(staying)
        assert cancelled is not None and waiting is not None
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        await waiting
        self.assertEqual(staying.headers.getRawHeaders(b"authorization"), [b"Bearer " + issuedToken(1).encode()])
        self.assertEqual(gone.headers.getRawHeaders(b"authorization"), [b"Bearer lmgate-key"])

    async def test_refreshesAheadOfExpiry(self) -> None:
        """
        The next refresh is scheduled five minutes before the token expires; until then the
        held token is used, and after it the new one.
        """
        credential = self.credential()
        credential.startRefreshing()
        await credential.refresh()
        self.clock.advance(LIFETIME - 300 - 10)
        self.assertFalse(credential.refreshing)
        self.assertEqual(len(self.endpoint.grants), 1)
        request = outgoing()
        self.assertIsNone(credential.apply(request))
        self.assertEqual(request.headers.getRawHeaders(b"authorization"), [b"Bearer " + issuedToken(1).encode()])
        self.clock.advance(20)
        self.assertTrue(credential.refreshing)
        await credential.refresh()
        self.assertEqual(len(self.endpoint.grants), 2)
        request = outgoing()
        self.assertIsNone(credential.apply(request))
        self.assertEqual(request.headers.getRawHeaders(b"authorization"), [b"Bearer " + issuedToken(2).encode()])
        [nextRefresh] = self.clock.getDelayedCalls()
        self.assertLess(abs(nextRefresh.getTime() - (self.clock.seconds() + LIFETIME - 300)), 5)

    async def test_unavailableWithoutAToken(self) -> None:
        """A failing token endpoint and no token held: apply fails with CredentialUnavailable, no header set."""
        self.endpoint.failing = True
        credential = self.credential()
        request = outgoing()
        d = credential.apply(request)
        assert d is not None
        error = await self.assertFailure(d, CredentialUnavailable)
        self.assertIn("invalid_grant", str(error))
        self.assertEqual(request.headers.getRawHeaders(b"authorization"), [b"Bearer lmgate-key"])
        self.assertEqual(self.clock.getDelayedCalls(), [])  # not refreshing in the background: no retry

    async def test_failedRefreshKeepsTheValidToken(self) -> None:
        """
        A failed refresh keeps the held token while it is valid and retries with growing delays;
        once the token is near expiry and refreshes still fail, apply fails with
        CredentialUnavailable.
        """
        credential = self.credential()
        credential.startRefreshing()
        await credential.refresh()
        self.endpoint.failing = True
        self.clock.advance(LIFETIME - 300)
        await credential.refresh()
        request = outgoing()
        self.assertIsNone(credential.apply(request))
        self.assertEqual(request.headers.getRawHeaders(b"authorization"), [b"Bearer " + issuedToken(1).encode()])
        retries = []
        for _ in range(3):
            [retry] = self.clock.getDelayedCalls()
            retries.append(retry.getTime() - self.clock.seconds())
            self.clock.advance(retries[-1])
            await credential.refresh()
        self.assertEqual(retries, [1.0, 2.0, 4.0])
        self.clock.advance(300 - 7 - 30)  # the token is now too close to its expiry to be sent
        d = credential.apply(outgoing())
        assert d is not None
        await self.assertFailure(d, CredentialUnavailable)
        self.endpoint.failing = False
        request = outgoing()
        d = credential.apply(request)
        assert d is not None
        await d
        self.assertEqual(request.headers.getRawHeaders(b"authorization"), [b"Bearer " + issuedToken(2).encode()])
        self.assertTrue(any("keeping the current token" in line for line in self.logged))

    async def test_tokenNeverShown(self) -> None:
        """Neither the repr nor any log line shows the token, whether refreshes succeed or fail."""
        credential = self.credential()
        self.assertEqual(repr(credential), f"<GoogleOAuthCredential account={ACCOUNT!r} token=none>")
        credential.startRefreshing()
        await credential.refresh()
        self.endpoint.failing = True
        self.clock.advance(LIFETIME)
        await credential.refresh()
        self.assertEqual(repr(credential), f"<GoogleOAuthCredential account={ACCOUNT!r} token=<redacted>>")
        self.assertTrue(self.logged)
        for line in self.logged + [repr(credential)]:
            self.assertNotIn(issuedToken(1), line)

    async def test_stopRefreshing(self) -> None:
        """stopRefreshing cancels the scheduled refresh."""
        credential = self.credential()
        credential.startRefreshing()
        await credential.refresh()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        credential.stopRefreshing()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_applicationDefaultCredentials(self) -> None:
        """With no file named, the application default credentials are used (here: GOOGLE_APPLICATION_CREDENTIALS)."""
        self.setEnvironment("GOOGLE_APPLICATION_CREDENTIALS", self.accountFile.path)
        credential = self.credential(serviceAccountFile=None)
        self.assertEqual(credential.account, ACCOUNT)
        request = outgoing()
        d = credential.apply(request)
        assert d is not None
        await d
        self.assertEqual(request.headers.getRawHeaders(b"authorization"), [b"Bearer " + issuedToken(1).encode()])

    def test_noApplicationDefaultCredentials(self) -> None:
        """No file named and no application default credentials: a start-up error saying so."""
        missing = FilePath(self.mktemp())
        self.setEnvironment("GOOGLE_APPLICATION_CREDENTIALS", missing.path)
        error = self.assertRaises(ConfigError, self.credential, serviceAccountFile=None)
        self.assertIn("no application default credentials", str(error))

    def test_badServiceAccountFile(self) -> None:
        """A missing file, or one that is not a service account key, is a start-up error naming the file."""
        missing = FilePath(self.mktemp())
        error = self.assertRaises(ConfigError, self.credential, serviceAccountFile=missing.path)
        self.assertEqual(error.source, missing.path)
        notKey = FilePath(self.mktemp())
        notKey.setContent(b'{"type": "service_account", "client_email": "x"}')
        error = self.assertRaises(ConfigError, self.credential, serviceAccountFile=notKey.path)
        self.assertEqual(error.source, notKey.path)
        self.assertIn("not a usable service account key file", str(error))

    def setEnvironment(self, name: str, value: str) -> None:
        old = os.environ.get(name)
        os.environ[name] = value
        if old is None:
            self.addCleanup(os.environ.pop, name, None)
        else:
            self.addCleanup(os.environ.__setitem__, name, old)
