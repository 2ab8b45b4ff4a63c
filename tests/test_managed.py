"""
Managed routes: the C{credentials} settings, provider keys held by LMGate
(L{StaticKeyCredential}, L{ProviderCredentials}), and the relay that removes
every credential the client sent and adds the provider's own.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from lmgate.access.credentials import removeCredentials, withoutCredentialParameters
from lmgate.config import CredentialSettings, HealthSettings, ProviderSettings, settingsFrom
from lmgate.daemon.demo import demoSettings
from lmgate.errors import ConfigError
from lmgate.gate.providers import Provider
from lmgate.governance.interfaces import CredentialUnavailable, IUpstreamCredential, OutgoingRequest
from lmgate.governance.keys import EnvironmentKey, FileKey, StaticKeyCredential
from lmgate.governance.managed import MANAGED, STUB, CredentialParts, ProviderCredentials, RouteAuth
from lmgate.governance.sigv4 import SigV4Credential
from lmgate.records.record import RECORD_FIELDS
from tests.helpers import ALLOWED_KEY, FakeUpstream, call, clientAgent, jsonAnswer, startGateway
from tests.secretscan import SECRET_SUFFIX, providerSecret

MANAGED_KEY = providerSecret("managed-0123456789")
CHAT = "/v1/chat/completions"


def providersSection(entries: dict[str, Any], environ: dict[str, str] | None = None) -> dict[str, ProviderSettings]:
    return dict(settingsFrom({"providers": entries}, "etc/lmgate.yaml", environ or {}).providers)


class CredentialSettingsTests(SynchronousTestCase):
    """C{providers.<name>.credentials}, C{openai_path} and C{health} are checked at start-up."""

    def assertRefused(self, entries: dict[str, Any], line: str) -> None:
        e = self.assertRaises(ConfigError, providersSection, entries)
        self.assertEqual(str(e), line)

    def test_defaultHeaderPerProvider(self) -> None:
        """OpenAI and OpenAI-compatible: Authorization Bearer; Azure: api-key; Anthropic: x-api-key; Gemini: x-goog-api-key."""
        providers = providersSection(
            {
                "openai": {"upstream": "https://api.openai.com", "credentials": {"env": "A"}},
                "azure": {"upstream": "https://res.openai.azure.com", "credentials": {"env": "B"}},
                "myazure": {"upstream": "https://res.openai.azure.com", "format": "openai", "credentials": {"env": "B"}},
                "vllm": {"upstream": "http://10.0.0.5:8000", "format": "openai", "credentials": {"file": "/k"}},
                "anthropic": {"upstream": "https://api.anthropic.com", "credentials": {"env": "C"}},
                "gemini": {"upstream": "https://generativelanguage.googleapis.com", "credentials": {"env": "D"}},
            }
        )
        found = {name: (p.credentials.header, p.credentials.scheme) for name, p in providers.items() if p.credentials}
        self.assertEqual(
            found,
            {
                "openai": ("Authorization", "Bearer"),
                "azure": ("api-key", None),
                "myazure": ("api-key", None),
                "vllm": ("Authorization", "Bearer"),
                "anthropic": ("x-api-key", None),
                "gemini": ("x-goog-api-key", None),
            },
        )
        self.assertEqual((providers["openai"].credentials.env, providers["openai"].credentials.missing), ("A", "refuse"))  # type: ignore[union-attr]

    def test_headerAndSchemeOverrides(self) -> None:
        """C{header} and C{scheme} override the defaults; C{scheme: null} sends the bare key."""
        providers = providersSection(
            {
                "a": {"upstream": "https://a", "format": "openai", "credentials": {"env": "K", "header": "X-Key"}},
                "b": {"upstream": "https://b", "format": "openai", "credentials": {"env": "K", "scheme": "Token"}},
                "c": {"upstream": "https://c", "format": "openai", "credentials": {"env": "K", "scheme": None}},
            }
        )
        self.assertEqual(
            [(p.credentials.header, p.credentials.scheme) for p in providers.values() if p.credentials],
            [("X-Key", None), ("Authorization", "Token"), ("Authorization", None)],
        )

    def test_openaiPathAndHealth(self) -> None:
        """C{health} is taken: path, interval (default 10 s), timeout (default None:
        the probe's own default); absent, no probe. C{openai_path} is taken (the unified endpoint
        uses it), without its trailing slash, C{/v1} by default."""
        self.assertEqual(providersSection({"openai": {"upstream": "https://api.openai.com"}})["openai"].health, None)
        taken = providersSection(
            {
                "g": {"upstream": "https://g", "format": "openai", "health": {"path": "/v1/models", "interval": 5}},
                "h": {"upstream": "https://h", "format": "openai", "health": {"path": "/v1/models?limit=1", "timeout": 2.5}},
            }
        )
        self.assertEqual(taken["g"].health, HealthSettings("/v1/models", 5.0, None))
        self.assertEqual(taken["h"].health, HealthSettings("/v1/models?limit=1", 10.0, 2.5))
        taken = providersSection({"g": {"upstream": "https://g", "format": "openai", "openai_path": "/v1beta/openai/"}})
        self.assertEqual(taken["g"].openaiPath, "/v1beta/openai")
        self.assertEqual(providersSection({"g": {"upstream": "https://g", "format": "openai"}})["g"].openaiPath, "/v1")

    def test_awsAndGoogle(self) -> None:
        """C{credentials.aws} takes its region from the upstream host unless given; C{credentials.google} its optional keys."""
        providers = providersSection(
            {
                "bedrock": {"upstream": "https://bedrock-runtime.eu-west-3.amazonaws.com", "credentials": {"aws": {"profile": "p"}}},
                "b2": {"upstream": "https://proxy.example", "format": "bedrock", "credentials": {"aws": {"region": "us-east-2"}}},
                "google": {"upstream": "https://aiplatform.googleapis.com",
                           "credentials": {"google": {"service_account_file": "/sa.json", "scopes": ["s1"]}}},
                "vertex": {"upstream": "https://aiplatform.googleapis.com", "credentials": {"google": None}},
            }
        )
        aws = providers["bedrock"].credentials.aws  # type: ignore[union-attr]
        self.assertEqual((aws.region, aws.profile), ("eu-west-3", "p"))  # type: ignore[union-attr]
        self.assertEqual(providers["b2"].credentials.aws.region, "us-east-2")  # type: ignore[union-attr]
        google = providers["google"].credentials.google  # type: ignore[union-attr]
        self.assertEqual((google.serviceAccountFile, google.scopes), ("/sa.json", ("s1",)))  # type: ignore[union-attr]
        self.assertEqual(providers["vertex"].credentials.kind, "google")  # type: ignore[union-attr]

    def test_refusals(self) -> None:
        """Each wrong value is one line naming the key."""
        up = "https://api.openai.com"
        cases: list[tuple[dict[str, Any], str]] = [
            ({"openai": {"upstream": up, "credentials": "OPENAI_API_KEY"}},
             "providers.openai.credentials: must be a mapping (env, file, aws or google), got str"),
            ({"openai": {"upstream": up, "credentials": {}}}, "providers.openai.credentials: needs exactly one of env, file, aws, google"),
            ({"openai": {"upstream": up, "credentials": {"env": "A", "file": "/f"}}},
             "providers.openai.credentials: needs exactly one of env, file, aws, google"),
            ({"openai": {"upstream": up, "credentials": {"env": "A B"}}},
             "providers.openai.credentials.env: must be an environment variable's name, got 'A B'"),
            ({"openai": {"upstream": up, "credentials": {"env": "A", "missing": "ignore"}}},
             "providers.openai.credentials.missing: must be one of refuse, stub, got 'ignore'"),
            ({"openai": {"upstream": up, "credentials": {"env": "A", "header": "a b"}}},
             "providers.openai.credentials.header: must be an HTTP header name, got 'a b'"),
            ({"openai": {"upstream": up, "credentials": {"env": "A", "extra": 1}}}, "providers.openai.credentials.extra: unknown key"),
            ({"bedrock": {"upstream": "https://proxy.example", "credentials": {"aws": {}}}},
             "providers.bedrock.credentials.aws.region: required: the upstream host names no region (bedrock-runtime.<region>.amazonaws.com)"),
            ({"bedrock": {"upstream": up, "credentials": {"aws": {"region": "x"}, "header": "h"}}},
             "providers.bedrock.credentials.header: only with env or file (credentials.aws sets its own)"),
            ({"google": {"upstream": up, "credentials": {"google": {"scopes": "s"}}}},
             "providers.google.credentials.google.scopes: must be a list of non-empty strings, got 's'"),
            ({"openai": {"upstream": up, "openai_path": "v1"}}, "providers.openai.openai_path: must be a plain ASCII path starting with '/', without query, dots or escapes, got 'v1'"),
            ({"openai": {"upstream": up, "health": {"interval": 3}}}, "providers.openai.health.path: missing (the path probed, e.g. /v1/models)"),
            ({"openai": {"upstream": up, "health": {"path": "/m", "interval": 0}}},
             "providers.openai.health.interval: must be a number > 0, got 0"),
            ({"openai": {"upstream": up, "health": {"path": "/m", "timeout": "fast"}}},
             "providers.openai.health.timeout: must be a number > 0, got 'fast'"),
            ({"openai": {"upstream": up, "health": {"path": "v1/models"}}},
             "providers.openai.health.path: must start with '/', got 'v1/models'"),
            ({"openai": {"upstream": up, "health": {"path": "/v1/my models"}}},
             "providers.openai.health.path: must be plain ASCII without spaces or fragment, got '/v1/my models'"),
            ({"openai": {"upstream": up, "health": {"path": "/m", "every": 3}}}, "providers.openai.health.every: unknown key"),
            ({"openai": {"upstream": up, "health": "/v1/models"}},
             "providers.openai.health: must be a mapping (path, interval, timeout), got str"),
        ]
        for entries, line in cases:
            self.assertRefused(entries, "etc/lmgate.yaml: " + line)

    def test_settingsHoldNoKey(self) -> None:
        """The settings name where a key is, never hold it: a repr shows the source only."""
        providers = providersSection({"openai": {"upstream": "https://api.openai.com", "credentials": {"env": "OPENAI_API_KEY"}}},
                                     {"OPENAI_API_KEY": MANAGED_KEY})
        self.assertNotIn(MANAGED_KEY, repr(providers))


class StaticKeyTests(SynchronousTestCase):
    """A key from the environment or a file, in its header, reloaded in one swap, never shown."""

    def outgoing(self, headers: Headers | None = None) -> OutgoingRequest:
        return OutgoingRequest(b"POST", b"https://up/v1/x", headers or Headers(), b"{}", None, 2)

    def test_environmentKeyAsBearer(self) -> None:
        """C{Authorization: Bearer <key>} replaces whatever Authorization the request still had."""
        credential = StaticKeyCredential(EnvironmentKey("K", {"K": MANAGED_KEY + "\n"}), "Authorization", "Bearer")
        credential.reload()
        request = self.outgoing(Headers({b"authorization": [b"Bearer client"]}))
        self.assertIsNone(credential.apply(request))
        self.assertEqual(request.headers.getRawHeaders(b"authorization"), [b"Bearer " + MANAGED_KEY.encode()])
        self.assertTrue(IUpstreamCredential.providedBy(credential))
        self.assertEqual(credential.kind, "managed")

    def test_fileKeyReloadSwaps(self) -> None:
        """The file's first line is the key; read again, the next request gets the new one; reprs never show it."""
        path = self.mktemp() + SECRET_SUFFIX  # a credential source: the secret scan skips it
        with open(path, "w") as f:
            f.write(providerSecret("first-key") + "\nsecond line ignored\n")
        credential = StaticKeyCredential(FileKey(path), "x-api-key", None)
        credential.reload()
        request = self.outgoing()
        credential.apply(request)
        self.assertEqual(request.headers.getRawHeaders(b"x-api-key"), [providerSecret("first-key").encode()])
        with open(path, "w") as f:
            f.write(providerSecret("rotated-key") + "\n")
        credential.reload()
        request = self.outgoing()
        credential.apply(request)
        self.assertEqual(request.headers.getRawHeaders(b"x-api-key"), [providerSecret("rotated-key").encode()])
        self.assertNotIn("rotated", repr(credential))
        self.assertIn(path, repr(credential))

    def test_missingKeepsThePreviousKey(self) -> None:
        """A file gone on reload raises L{CredentialUnavailable} naming the file, never the key; the old key stays."""
        path = self.mktemp() + SECRET_SUFFIX  # a credential source: the secret scan skips it
        with open(path, "w") as f:
            f.write(providerSecret("kept-key") + "\n")
        credential = StaticKeyCredential(FileKey(path), "api-key", None)
        credential.reload()
        os.remove(path)
        e = self.assertRaises(CredentialUnavailable, credential.reload)
        self.assertIn(path, str(e))
        self.assertNotIn("kept-key", str(e))
        request = self.outgoing()
        credential.apply(request)
        self.assertEqual(request.headers.getRawHeaders(b"api-key"), [providerSecret("kept-key").encode()])

    def test_neverReadIsUnavailable(self) -> None:
        """An unset variable: the credential cannot be applied; an unsafe key is refused without being shown."""
        credential = StaticKeyCredential(EnvironmentKey("K", {}), "Authorization", "Bearer")
        self.assertIn("K is not set", str(self.assertRaises(CredentialUnavailable, credential.reload)))
        self.assertRaises(CredentialUnavailable, credential.apply, self.outgoing())
        bad = StaticKeyCredential(EnvironmentKey("K", {"K": "abc\rdef"}), "Authorization", "Bearer")
        e = self.assertRaises(CredentialUnavailable, bad.reload)
        self.assertNotIn("abc", str(e))


class StripTests(SynchronousTestCase):
    """Every credential the client sent is removed; nothing else is touched."""

    def test_headers(self) -> None:
        """Authorization, x-api-key, api-key, x-goog-api-key, SigV4's parts and their other spellings go."""
        headers = Headers()
        for name in (b"Authorization", b"x-api-key", b"API-KEY", b"x-goog-api-key", b"x_api_key", b"x-amz-date",
                     b"x-amz-security-token", b"X-Amz-Content-Sha256", b"ocp-apim-subscription-key"):
            headers.addRawHeader(name, b"secret")
        headers.addRawHeader(b"content-type", b"application/json")
        headers.addRawHeader(b"anthropic-version", b"2023-06-01")
        removeCredentials(headers)
        self.assertEqual(sorted(name.lower() for name, _ in headers.getAllRawHeaders()), [b"anthropic-version", b"content-type"])

    def test_query(self) -> None:
        """Only the credential parameters go; the rest of the raw query stays byte for byte."""
        cases = {
            b"key=abc": None,
            b"alt=sse&key=abc": b"alt=sse",
            b"key=abc&alt=sse": b"alt=sse",
            b"a=%2F+x&k%65y=abc;b=&c": b"a=%2F+x;b=&c",
            b"alt=sse": b"alt=sse",
            b"": b"",
        }
        for query, expected in cases.items():
            self.assertEqual(withoutCredentialParameters(query), expected, query)


def staticCredential(header: str, scheme: str | None, key: str = MANAGED_KEY) -> StaticKeyCredential:
    credential = StaticKeyCredential(EnvironmentKey("K", {"K": key}), header, scheme)
    credential.reload()
    return credential


def managedProvider(name: str, base: str, fmt: str, credential: Any, upstream: str | None = None) -> Provider:
    spec = CredentialSettings(env="K")
    return Provider(ProviderSettings(name, upstream or base, fmt, credentials=spec), RouteAuth(MANAGED, spec, credential))


@implementer(IUpstreamCredential)
class WaitingCredential:
    """A credential whose token refresh has not finished: C{apply} waits on C{pending}."""

    kind = "managed"

    def __init__(self) -> None:
        self.waits: list[Deferred[None]] = []
        self.cancelled = 0

    def apply(self, request: OutgoingRequest) -> Deferred[None]:
        def cancel(d: Deferred[None]) -> None:
            self.cancelled += 1

        d: Deferred[None] = Deferred(cancel)
        self.waits.append(d)
        d.addCallback(lambda _: request.headers.setRawHeaders(b"authorization", [b"Bearer " + providerSecret("refreshed-token").encode()]))
        return d

    def startRefreshing(self) -> None:
        pass

    def stopRefreshing(self) -> None:
        pass


@implementer(IUpstreamCredential)
class NoCredential:
    """A credential that cannot be had (now, or after a wait)."""

    kind = "managed"

    def __init__(self, later: bool = False) -> None:
        self.later = later

    def apply(self, request: OutgoingRequest) -> Deferred[None] | None:
        if self.later:
            return fail(CredentialUnavailable("token endpoint unreachable"))
        raise CredentialUnavailable("no key in the file /etc/k")

    def startRefreshing(self) -> None:
        pass

    def stopRefreshing(self) -> None:
        pass


class ManagedRelayTests(TestCase):
    """Through a gateway on loopback: the upstream gets LMGate's key and never the client's."""

    def gateway(self, fmt: str = "openai", credential: Any = None, name: str = "managed") -> Any:
        gate = startGateway(self)
        base = f"http://127.0.0.1:{gate.upstreamPort}"
        gate.gateway.providers[name.encode()] = managedProvider(
            name, base, fmt, credential if credential is not None else staticCredential("Authorization", "Bearer")
        )
        return gate

    def assertNoClientKey(self, seen: Any) -> None:
        self.assertNotIn(ALLOWED_KEY, seen.uri)
        for name, values in seen.headers.getAllRawHeaders():
            for value in values:
                self.assertNotIn(ALLOWED_KEY, value, name)

    async def test_everyClientFormReplaced(self) -> None:
        """Whichever way the client sends its LMGate key (Bearer, x-api-key, api-key, x-goog-api-key, ?key=),
        the upstream gets only the managed key; the rest of the query is relayed byte for byte."""
        gate = self.gateway()
        forms: list[tuple[dict[bytes, list[bytes]], str]] = [
            ({b"Authorization": [b"Bearer " + ALLOWED_KEY]}, ""),
            ({b"x-api-key": [ALLOWED_KEY]}, ""),
            ({b"api-key": [ALLOWED_KEY]}, "?api-version=2024-10-21"),
            ({b"x-goog-api-key": [ALLOWED_KEY], b"x-amz-date": [b"20260101T000000Z"]}, ""),
            ({}, "?alt=sse&key=" + ALLOWED_KEY.decode() + "&x=%2F+y"),
            ({b"Authorization": [b"Bearer " + ALLOWED_KEY]}, "?key=" + ALLOWED_KEY.decode()),
        ]
        for headers, query in forms:
            response, body, _ = await call(self, gate.url + "/managed" + CHAT + query, headers=headers)
            self.assertEqual(response.code, 200, body)
        self.assertEqual(len(gate.upstream.seen), len(forms))
        for seen in gate.upstream.seen:
            self.assertNoClientKey(seen)
            self.assertEqual(seen.headers.getRawHeaders(b"authorization"), [b"Bearer " + MANAGED_KEY.encode()])
            self.assertFalse(seen.headers.hasHeader(b"x-amz-date"))
        self.assertEqual(
            [seen.uri for seen in gate.upstream.seen],
            [CHAT.encode(), CHAT.encode(), CHAT.encode() + b"?api-version=2024-10-21", CHAT.encode(),
             CHAT.encode() + b"?alt=sse&x=%2F+y", CHAT.encode()],
        )
        records = await gate.sink.waitFor(len(forms))
        self.assertEqual({(r.auth, r.attempts, r.alias, r.error) for r in records}, {("managed", 1, None, None)})
        self.assertEqual({r.key for r in records}, {"sk-t…cdef"})

    async def test_eachFormatsHeader(self) -> None:
        """Azure gets api-key, Anthropic x-api-key, Gemini x-goog-api-key: each the managed key alone."""
        gate = startGateway(self)
        base = f"http://127.0.0.1:{gate.upstreamPort}"
        routes = {
            "azure": ("openai", "api-key", None, "/openai/deployments/d/chat/completions?api-version=1"),
            "anthropic": ("anthropic", "x-api-key", None, "/v1/messages"),
            "gemini": ("google", "x-goog-api-key", None, "/v1beta/models/gemini-2.5-flash:generateContent?key=" + ALLOWED_KEY.decode()),
        }
        for name, (fmt, header, scheme, _) in routes.items():
            gate.gateway.providers[name.encode()] = managedProvider(name, base, fmt, staticCredential(header, scheme))
        for name, (fmt, header, scheme, path) in routes.items():
            headers = {} if "?key=" in path else {b"x-api-key": [ALLOWED_KEY]}
            response, body, _ = await call(self, f"{gate.url}/{name}{path}", headers=headers)
            self.assertEqual(response.code, 200, body)
            seen = gate.upstream.seen[-1]
            self.assertNoClientKey(seen)
            self.assertEqual(seen.headers.getRawHeaders(header.encode()), [MANAGED_KEY.encode()], name)
            others = {b"authorization", b"x-api-key", b"api-key", b"x-goog-api-key"} - {header.encode()}
            self.assertEqual([n for n, _ in seen.headers.getAllRawHeaders() if n.lower() in others], [], name)
        self.assertEqual(gate.upstream.seen[-1].uri, b"/v1beta/models/gemini-2.5-flash:generateContent")

    async def test_passThroughUnchanged(self) -> None:
        """A route without C{credentials} relays the client's key as before; its record says C{auth: client}."""
        gate = self.gateway()
        response, body, _ = await call(self, gate.url + "/openai" + CHAT)
        self.assertEqual(response.code, 200)
        self.assertEqual(gate.upstream.seen[0].headers.getRawHeaders(b"authorization"), [b"Bearer " + ALLOWED_KEY])
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.auth, record.attempts), ("client", 1))

    async def test_refusedBeforeAuthHasNoAuth(self) -> None:
        """A call refused at authentication is never sent: C{auth} null, C{attempts} 0."""
        gate = self.gateway()
        response, body, _ = await call(self, gate.url + "/managed" + CHAT, headers={b"Authorization": [b"Bearer nope-not-a-key"]})
        self.assertEqual(response.code, 403)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.auth, record.attempts, record.alias), (None, 0, None))
        self.assertEqual(gate.upstream.seen, [])

    async def test_unavailableIs502(self) -> None:
        """No credential (now, or after a wait): 502 C{credentials_unavailable} in the provider's shape, recorded
        once, never relayed; the answer names no file and no key."""
        gate = self.gateway(credential=NoCredential())
        gate.gateway.providers[b"later"] = managedProvider("later", "http://127.0.0.1:9", "anthropic", NoCredential(later=True))
        response, body, _ = await call(self, gate.url + "/managed" + CHAT)
        self.assertEqual(response.code, 502)
        error = json.loads(body)["error"]
        self.assertEqual((error["type"], error["code"]), ("api_error", "credentials_unavailable"))
        self.assertNotIn("/etc/k", error["message"])
        response, body, _ = await call(self, gate.url + "/later/v1/messages")
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["error"]["type"], "api_error")
        records = await gate.sink.waitFor(2)
        self.assertEqual([(r.status, r.error, r.auth, r.attempts) for r in records],
                         [(502, "credentials_unavailable", "managed", 0)] * 2)
        self.assertEqual(gate.upstream.seen, [])

    async def test_waitingCredential(self) -> None:
        """A credential that waits is waited on; then the request goes with what it added."""
        credential = WaitingCredential()
        gate = self.gateway(credential=credential)
        pending = Deferred.fromCoroutine(call(self, gate.url + "/managed" + CHAT))
        from tests.daemon import waitFor

        await waitFor(lambda: credential.waits, "the credential to be asked")
        self.assertEqual(gate.upstream.seen, [])
        credential.waits[0].callback(None)
        response, body, _ = await pending
        self.assertEqual(response.code, 200)
        self.assertEqual(gate.upstream.seen[0].headers.getRawHeaders(b"authorization"), [b"Bearer " + providerSecret("refreshed-token").encode()])
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.auth, record.attempts, record.error), ("managed", 1, None))

    async def test_clientLeavingCancelsTheWait(self) -> None:
        """A client that leaves while the credential waits cancels the wait; recorded once, never sent."""
        credential = WaitingCredential()
        gate = self.gateway(credential=credential)
        from twisted.web.client import Agent
        from lmgate.relay.upstream import BytesProducer

        agent: Agent = clientAgent(self)
        request = agent.request(b"POST", (gate.url + "/managed" + CHAT).encode(),
                                Headers({b"authorization": [b"Bearer " + ALLOWED_KEY]}), BytesProducer(b"{}"))
        from tests.daemon import waitFor

        await waitFor(lambda: credential.waits, "the credential to be asked")
        request.cancel()
        self.assertIsInstance(self.failureResultOf(request).value.reasons[0].value, CancelledError)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.status, record.error, record.attempts), (499, "client_disconnected", 0))
        self.assertEqual(credential.cancelled, 1)
        self.assertEqual(gate.upstream.seen, [])
        self.assertEqual(gate.gateway.active, set())

    async def test_drainAbortsTheWait(self) -> None:
        """At shutdown, a call whose credential still waits is aborted when the drain time runs out, recorded as shutdown."""
        credential = WaitingCredential()
        gate = self.gateway(credential=credential)
        pending = Deferred.fromCoroutine(call(self, gate.url + "/managed" + CHAT))
        pending.addErrback(lambda reason: None)
        from tests.daemon import waitFor

        await waitFor(lambda: credential.waits, "the credential to be asked")
        await gate.gateway.drain(0)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.error, record.attempts), ("shutdown", 0))
        self.assertEqual(credential.cancelled, 1)
        await pending


class ProviderCredentialsTests(SynchronousTestCase):
    """Each managed route's credential at start-up and on SIGHUP."""

    def settings(self, credentials: dict[str, Any], name: str = "openai", upstream: str = "https://api.openai.com") -> Any:
        return settingsFrom({"providers": {name: {"upstream": upstream, "credentials": credentials}}}, "etc/lmgate.yaml", {})

    def service(self, environ: dict[str, str] | None = None) -> ProviderCredentials:
        return ProviderCredentials(CredentialParts("etc/lmgate.yaml", None, None, environ or {}), lambda: "http://127.0.0.1:7")

    def test_refuseNamesTheVariable(self) -> None:
        """C{missing: refuse} (the default): a missing key is one start-up line naming the variable or file."""
        e = self.assertRaises(ConfigError, self.service().configure, self.settings({"env": "OPENAI_API_KEY"}))
        self.assertEqual(str(e), "etc/lmgate.yaml: providers.openai.credentials.env: OPENAI_API_KEY is not set (missing: refuse)")
        path = self.mktemp()
        e = self.assertRaises(ConfigError, self.service().configure, self.settings({"file": path}))
        self.assertEqual(str(e), f"etc/lmgate.yaml: providers.openai.credentials.file: {path} does not exist (missing: refuse)")

    def awsEnvironment(self, **variables: str) -> None:
        """botocore (which reads C{os.environ}) finds only C{variables}: no shared files, no metadata service."""
        directory = self.mktemp()
        environ = {
            "AWS_SHARED_CREDENTIALS_FILE": os.path.join(directory, "none"),
            "AWS_CONFIG_FILE": os.path.join(directory, "none"),
            "AWS_EC2_METADATA_DISABLED": "true",
            **variables,
        }
        self.patch(os, "environ", environ)

    def test_awsAndGoogle(self) -> None:
        """C{credentials.aws} builds a SigV4 signer when botocore's chain finds credentials, and is refused in
        one line naming the route when it finds none; C{credentials.google} names a service account file it
        cannot read."""
        bedrock = self.settings({"aws": {}}, "bedrock", "https://bedrock-runtime.eu-west-3.amazonaws.com")
        self.awsEnvironment(AWS_ACCESS_KEY_ID="AKIDTEST", AWS_SECRET_ACCESS_KEY=providerSecret("aws-secret"))
        from tests.test_sigv4 import FakePool, FakeReactor

        service = ProviderCredentials(CredentialParts("etc/lmgate.yaml", FakeReactor(), FakePool()), lambda: "http://127.0.0.1:7")
        service.configure(bedrock)
        route = service.authFor("bedrock")
        assert route is not None
        self.assertIsInstance(route.credential, SigV4Credential)
        self.assertEqual((route.mode, route.credential.region), (MANAGED, "eu-west-3"))  # type: ignore[union-attr]
        self.assertNotIn(providerSecret("aws-secret"), repr(route.credential))

        self.awsEnvironment()
        e = self.assertRaises(ConfigError, self.service().configure, bedrock)
        self.assertTrue(str(e).startswith("etc/lmgate.yaml: providers.bedrock.credentials.aws: no AWS credentials found"), str(e))
        self.assertTrue(str(e).endswith("(missing: refuse)"), str(e))

        path = os.path.abspath(self.mktemp())
        e = self.assertRaises(ConfigError, self.service().configure,
                              self.settings({"google": {"service_account_file": path}}, "google", "https://aiplatform.googleapis.com"))
        self.assertTrue(str(e).startswith(f"etc/lmgate.yaml: providers.google.credentials.google: {path}: cannot read"), str(e))

    def test_selfRefreshingKeptOnReload(self) -> None:
        """SIGHUP with unchanged C{credentials.aws}/C{google} keeps the credential (it refreshes itself in the
        pool): the chain is not searched again on the reactor thread. Changed settings build a new one."""
        built: list[Any] = []

        def factory(provider: Any, parts: Any) -> Any:
            built.append(StaticKeyCredential(EnvironmentKey("K", {"K": providerSecret("key-a")}), "Authorization", "Bearer"))
            built[-1].reload()
            return built[-1]

        service = ProviderCredentials(CredentialParts("etc/lmgate.yaml"), lambda: "http://127.0.0.1:7", kinds={"aws": factory})
        settings = self.settings({"aws": {}}, "bedrock", "https://bedrock-runtime.us-east-1.amazonaws.com")
        service.configure(settings)
        service.reload(settings)
        self.assertEqual(len(built), 1)
        self.assertIs(service.authFor("bedrock").credential, built[0])  # type: ignore[union-attr]
        service.reload(self.settings({"aws": {"region": "us-west-2"}}, "bedrock", "https://bedrock-runtime.us-east-1.amazonaws.com"))
        self.assertEqual(len(built), 2)
        self.assertIs(service.authFor("bedrock").credential, built[1])  # type: ignore[union-attr]

    def test_stubWhenMissing(self) -> None:
        """C{missing: stub}: the route goes to the stub; with the key present, it is managed."""
        service = self.service()
        service.configure(self.settings({"env": "OPENAI_API_KEY", "missing": "stub"}))
        route = service.authFor("openai")
        assert route is not None
        self.assertEqual((route.mode, route.credential, route.stubURL), (STUB, None, "http://127.0.0.1:7"))
        provider = Provider(self.settings({"env": "OPENAI_API_KEY", "missing": "stub"}).providers["openai"], route)
        self.assertEqual((provider.auth, provider.baseURL, provider.managed), ("stub", b"http://127.0.0.1:7", True))
        service = self.service({"OPENAI_API_KEY": MANAGED_KEY})
        service.configure(self.settings({"env": "OPENAI_API_KEY", "missing": "stub"}))
        self.assertEqual(service.authFor("openai").mode, MANAGED)  # type: ignore[union-attr]
        self.assertIsNone(service.authFor("anthropic"))

    def test_reload(self) -> None:
        """SIGHUP: a rotated file is used from the next call; a vanished one keeps the previous key (refuse),
        or sends a C{missing: stub} route to the stub, and back once the file is there again."""
        path = self.mktemp() + SECRET_SUFFIX  # a credential source: the secret scan skips it
        with open(path, "w") as f:
            f.write(providerSecret("key-one") + "\n")
        settings = self.settings({"file": path})
        service = self.service()
        service.configure(settings)

        def sent() -> list[bytes]:
            request = OutgoingRequest(b"POST", b"u", Headers(), None, None, 0)
            route = service.authFor("openai")
            assert route is not None and route.credential is not None
            route.credential.apply(request)
            return list(request.headers.getRawHeaders(b"authorization", []))

        with open(path, "w") as f:
            f.write(providerSecret("key-two") + "\n")
        service.reload(settings)
        self.assertEqual(sent(), [b"Bearer " + providerSecret("key-two").encode()])
        os.remove(path)
        service.reload(settings)
        self.assertEqual(sent(), [b"Bearer " + providerSecret("key-two").encode()])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

        stubbed = self.settings({"file": path, "missing": "stub"})
        service.reload(stubbed)
        self.assertEqual(service.authFor("openai").mode, STUB)  # type: ignore[union-attr]
        with open(path, "w") as f:
            f.write(providerSecret("key-three") + "\n")
        service.reload(stubbed)
        self.assertEqual(service.authFor("openai").mode, MANAGED)  # type: ignore[union-attr]
        self.assertEqual(sent(), [b"Bearer " + providerSecret("key-three").encode()])

    def test_demoIsManaged(self) -> None:
        """The demo's openai route is managed: the stub without OPENAI_API_KEY, the real OpenAI API with it."""
        settings = demoSettings({})
        openai = settings.providers["openai"]
        self.assertEqual(openai.upstream, "https://api.openai.com")
        self.assertEqual((openai.credentials.env, openai.credentials.missing), ("OPENAI_API_KEY", "stub"))  # type: ignore[union-attr]
        service = self.service()
        service.configure(settings)
        self.assertEqual(Provider(openai, service.authFor("openai")).baseURL, b"http://127.0.0.1:7")
        service = self.service({"OPENAI_API_KEY": MANAGED_KEY})
        service.configure(settings)
        provider = Provider(openai, service.authFor("openai"))
        self.assertEqual((provider.auth, provider.baseURL), ("managed", b"https://api.openai.com"))
        self.assertEqual({name for name, p in settings.providers.items() if p.credentials}, {"openai"})


class RecordFieldTests(SynchronousTestCase):
    def test_fieldsExtended(self) -> None:
        """C{alias}, C{attempts} and C{auth} are appended (then the usage limits' fields): no field renamed or moved."""
        self.assertEqual(RECORD_FIELDS[-10:-6], ("cost_usd", "alias", "attempts", "auth"))
        self.assertEqual(RECORD_FIELDS[-6:-3], ("limited_by", "reserved_tokens", "limits"))
        self.assertEqual(RECORD_FIELDS[-3:], ("policy", "tags", "audited"))
