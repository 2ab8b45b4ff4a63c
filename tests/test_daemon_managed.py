"""
Managed routes end to end: C{twistd -n lmgate} as a child process, a fake
OpenAI upstream on loopback that checks which key it got, SIGHUP rotating a
key file under a call in flight, C{missing: refuse} and C{missing: stub}, the
embedded demo without a provider key, and no provider key in any file LMGate
wrote.
"""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.daemon import Daemon, daemonDirectory, freePort, readRecords, waitFor
from tests.helpers import FakeUpstream, closedPort, jsonAnswer, listenLocal
from tests.secretscan import filesHolding, providerSecret

CLIENT_KEY = "lmgate-app-key-0000000000000000Qq"
PROVIDER_KEYS = (providerSecret("first-111111111111Aa"), providerSecret("second-22222222222Bb"))
ABSENT = "LMGATE_TESTS_ABSENT_PROVIDER_KEY_VARIABLE"
CHAT = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}'


class ManagedDaemonTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.directory, self.allowlistPath = daemonDirectory(self, CLIENT_KEY)
        self.keyPath = os.path.join(self.directory, "secrets", "openai")
        os.makedirs(os.path.dirname(self.keyPath))
        self.writeKey(PROVIDER_KEYS[0])
        self.upstream = FakeUpstream()
        self.upstreamPort = listenLocal(self, Site(self.upstream))
        self.port = freePort()
        self.statsPath = os.path.join(self.directory, "var", "stats.jsonl")
        self.logPath = os.path.join(self.directory, "var", "twistd.log")

    def writeKey(self, key: str) -> None:
        """Replace the key file as a secret mount does: a new file renamed over the old."""
        with open(self.keyPath + ".new", "w") as f:
            f.write(key + "\n")
        os.replace(self.keyPath + ".new", self.keyPath)

    def config(self, *routes: str) -> str:
        return "\n".join(
            [
                f'listen: "tcp:{self.port}:interface=127.0.0.1"',
                f"allowlist: {{path: {self.allowlistPath}}}",
                f"stats: {{path: {self.statsPath}, flush_interval: 0.2}}",
                "providers:",
                *routes,
            ]
        ) + "\n"

    async def post(self, path: str, body: bytes = CHAT, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        sent: Any = headers or {"Authorization": f"Bearer {CLIENT_KEY}"}
        response = await treq.post(f"http://127.0.0.1:{self.port}{path}", body, headers=sent, persistent=False)
        return response.code, await response.content()

    def assertNoProviderKeyWritten(self) -> None:
        """No provider key in any file LMGate wrote (records, access log, twistd's log); the key file
        itself lies under secrets/, which the scan skips (L{tests.secretscan.isCredentialSource})."""
        written = [os.path.join(root, name) for root, _, names in os.walk(self.directory) for name in names]
        self.assertIn(self.logPath, written)
        self.assertIn(self.statsPath, written)
        self.assertIn(os.path.join(self.directory, "var", "access.log"), written)
        self.assertEqual(filesHolding(self.directory, PROVIDER_KEYS), [])

    async def test_managedKeyRotatedOnSighupUnderACallInFlight(self) -> None:
        """The upstream gets the key from the file, never the client's; SIGHUP after the file is replaced
        sends the new key from the next call on, while a call already in flight finishes untouched;
        no provider key reaches a file LMGate wrote."""
        held: list[Request] = []

        def handler(request: Request) -> Any:
            if not held:
                held.append(request)
                return NOT_DONE_YET
            return jsonAnswer({"id": "chatcmpl-2", "model": "gpt-4o-mini", "usage": {"prompt_tokens": 2, "completion_tokens": 1}})(request)

        self.upstream.handler = handler
        route = f"  openai: {{upstream: 'http://127.0.0.1:{self.upstreamPort}', credentials: {{file: {self.keyPath}}}}}"
        daemon = Daemon(self, self.config(route), self.directory)
        daemon.start(logfile=self.logPath)
        await daemon.waitUntilHealthy(self.port)

        first = Deferred.fromCoroutine(self.post("/openai/v1/chat/completions?key=" + CLIENT_KEY + "&trace=1"))
        await waitFor(lambda: held, "the first call to reach the upstream")
        self.writeKey(PROVIDER_KEYS[1])
        daemon.signal("HUP")

        def reloaded() -> bool:
            with open(self.logPath, "rb") as f:
                return b"Reloaded the configuration" in f.read()

        await waitFor(reloaded, "the reload")
        code, body = await self.post("/openai/v1/chat/completions", headers={"x-api-key": CLIENT_KEY})
        self.assertEqual(code, 200, body)
        held[0].setHeader(b"content-type", b"application/json")
        held[0].write(b'{"id": "chatcmpl-1", "model": "gpt-4o-mini", "usage": {"prompt_tokens": 2, "completion_tokens": 1}}')
        held[0].finish()
        code, body = await first
        self.assertEqual(code, 200, body)
        self.assertEqual(await daemon.stop(), 0)

        self.assertEqual(
            [seen.headers.getRawHeaders(b"authorization") for seen in self.upstream.seen],
            [[b"Bearer " + key.encode()] for key in PROVIDER_KEYS],
        )
        self.assertEqual(self.upstream.seen[0].uri, b"/v1/chat/completions?trace=1")
        for seen in self.upstream.seen:
            self.assertFalse(seen.headers.hasHeader(b"x-api-key"))
            self.assertNotIn(CLIENT_KEY.encode(), seen.uri)
        records = readRecords(self.statsPath)
        self.assertEqual(sorted((r["status"], r["auth"], r["attempts"], r["alias"]) for r in records), [(200, "managed", 1, None)] * 2)
        self.assertNoProviderKeyWritten()

    async def test_missingKeyRefusesStartUp(self) -> None:
        """C{missing: refuse} (the default) with the variable unset: one line naming it, a non-zero exit."""
        route = f"  openai: {{upstream: 'http://127.0.0.1:{self.upstreamPort}', credentials: {{env: {ABSENT}}}}}"
        daemon = Daemon(self, self.config(route), self.directory)
        daemon.env.pop(ABSENT, None)
        daemon.start()
        code = await daemon.watch.ended
        self.assertNotEqual(code, 0)
        self.assertIn(
            f"lmgate: {daemon.configPath}: providers.openai.credentials.env: {ABSENT} is not set (missing: refuse)\n".encode(),
            daemon.watch.output,
        )
        self.assertNotIn(b"Traceback", daemon.watch.output)

    async def test_missingKeyServedByTheStub(self) -> None:
        """C{missing: stub} with the key absent: every format is answered by the embedded stub, streaming
        included, the upstream never called; the record says C{auth: stub}; /healthz answers 200; the
        start-up log says so once per route. A managed route whose key is present is served beside it."""
        routes = [
            f"  openai: {{upstream: 'http://127.0.0.1:{self.upstreamPort}', credentials: {{env: {ABSENT}, missing: stub}}}}",
            f"  anthropic: {{upstream: 'http://127.0.0.1:{self.upstreamPort}', credentials: {{env: {ABSENT}, missing: stub}}}}",
            f"  gemini: {{upstream: 'http://127.0.0.1:{self.upstreamPort}', credentials: {{env: {ABSENT}, missing: stub}}}}",
            f"  azure: {{upstream: 'http://127.0.0.1:{self.upstreamPort}', credentials: {{file: {self.keyPath}, missing: stub}}}}",
        ]
        daemon = Daemon(self, self.config(*routes), self.directory)
        daemon.env.pop(ABSENT, None)
        daemon.start(logfile=self.logPath)
        await daemon.waitUntilHealthy(self.port)
        code, body = await self.post("/openai/v1/chat/completions")
        self.assertEqual(code, 200, body)
        self.assertTrue(json.loads(body)["choices"][0]["message"]["content"])
        streamed = b'{"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}'
        code, body = await self.post("/openai/v1/chat/completions", streamed)
        self.assertEqual(code, 200, body)
        self.assertTrue(body.startswith(b"data: "), body)
        self.assertIn(b"data: [DONE]", body)
        messages = b'{"model": "claude-sonnet-4", "max_tokens": 10, "stream": true, "messages": [{"role": "user", "content": "Hi"}]}'
        code, body = await self.post("/anthropic/v1/messages", messages, headers={"x-api-key": CLIENT_KEY})
        self.assertEqual(code, 200, body)
        self.assertIn(b"event: message_stop", body)
        gemini = b'{"contents": [{"parts": [{"text": "Hi"}]}]}'
        code, body = await self.post("/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse&key=" + CLIENT_KEY, gemini, headers={"x-ignored": "1"})
        self.assertEqual(code, 200, body)
        self.assertTrue(body.startswith(b"data: "), body)
        code, body = await self.post("/azure/openai/deployments/d/chat/completions?api-version=2024-10-21", headers={"api-key": CLIENT_KEY})
        self.assertEqual(code, 200, body)
        self.assertEqual(await daemon.stop(), 0)

        self.assertEqual(len(self.upstream.seen), 1)  # azure: its key is present
        self.assertEqual(self.upstream.seen[0].headers.getRawHeaders(b"api-key"), [PROVIDER_KEYS[0].encode()])
        records = readRecords(self.statsPath)
        self.assertEqual(
            sorted((r["provider"], r["status"], r["auth"], r["streaming"]) for r in records),
            [("anthropic", 200, "stub", True), ("azure", 200, "managed", False), ("gemini", 200, "stub", True),
             ("openai", 200, "stub", False), ("openai", 200, "stub", True)],
        )
        with open(self.logPath, "rb") as f:
            log = f.read()
        for name in (b"openai", b"anthropic", b"gemini"):
            self.assertEqual(log.count(b"providers." + name + b": " + ABSENT.encode() + b" is missing"), 1, log)
        self.assertIn(b"served by the embedded stub upstream", log)
        self.assertNoProviderKeyWritten()

    async def test_demoWithoutProviderKey(self) -> None:
        """The embedded demo, OPENAI_API_KEY unset: its managed openai route is served by the stub
        (C{auth: stub}) with the demo key, directly and through the unified endpoint's C{default-chat}
        alias; the other routes relay as before (C{auth: client})."""
        stubPort = freePort()
        env = {
            "LMGATE_STUB__LISTEN": f"tcp:{stubPort}:interface=127.0.0.1",
            "LMGATE_PROVIDERS__ANTHROPIC__UPSTREAM": f"http://127.0.0.1:{stubPort}",
            "LMGATE_STATS__PATH": self.statsPath,
        }
        daemon = Daemon(self, "", self.directory, env=env)
        daemon.env.pop("OPENAI_API_KEY", None)
        daemon.startDemo("--listen", f"tcp:{self.port}:interface=127.0.0.1")
        await daemon.waitUntilHealthy(self.port)
        code, body = await self.post("/openai/v1/chat/completions", headers={"Authorization": "Bearer lmgate-demo-key"})
        self.assertEqual(code, 200, body)
        aliased = b'{"model": "default-chat", "messages": [{"role": "user", "content": "Hello"}]}'
        code, body = await self.post("/v1/chat/completions", aliased, headers={"Authorization": "Bearer lmgate-demo-key"})
        self.assertEqual(code, 200, body)
        messages = b'{"model": "claude-sonnet-4", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}'
        code, body = await self.post("/anthropic/v1/messages", messages, headers={"x-api-key": "lmgate-demo-key"})
        self.assertEqual(code, 200, body)
        self.assertEqual(await daemon.stop(), 0)
        self.assertIn(b"providers.openai: OPENAI_API_KEY is missing", daemon.watch.output)
        records = readRecords(self.statsPath)
        self.assertEqual(sorted((r["provider"], r["status"], r["auth"], r["alias"] or "") for r in records),
                         [("anthropic", 200, "client", ""), ("openai", 200, "stub", ""), ("openai", 200, "stub", "default-chat")])


class NoProviderSecretWrittenTests(TestCase):
    """
    One daemon with a managed route of every kind, driven through success,
    failure and streaming: afterwards no file it wrote holds a provider secret.
    """

    timeout = 120

    def setUp(self) -> None:
        self.directory, self.allowlistPath = daemonDirectory(self, CLIENT_KEY)
        self.var = os.path.join(self.directory, "var")
        os.makedirs(os.path.join(self.var, "tmp"))
        #: Credential sources the test writes: under secrets/, which the scan skips.
        self.azureKeyPath = os.path.join(self.directory, "secrets", "azure")
        os.makedirs(os.path.dirname(self.azureKeyPath))
        self.secrets = {
            "openai": providerSecret("bearer-openai-0000000000Aa"),
            "azure": providerSecret("api-key-azure-000000000Bb"),
            "anthropic": providerSecret("x-api-key-anthropic-000Cc"),
            "gemini": providerSecret("x-goog-api-key-gemini-00Dd"),
            "aws": providerSecret("aws-secret/000000000000000Ee"),
        }
        with open(self.azureKeyPath, "w") as f:
            f.write(self.secrets["azure"] + "\n")
        self.upstream = FakeUpstream()
        self.upstream.handler = self.answer
        self.upstreamPort = listenLocal(self, Site(self.upstream))
        self.port = freePort()
        self.statsPath = os.path.join(self.var, "stats.jsonl")
        self.logPath = os.path.join(self.var, "twistd.log")
        self.pidPath = os.path.join(self.var, "twistd.pid")

    def answer(self, request: Request) -> bytes:
        """200 with usage (an SSE stream when asked), or 500 when the query says C{fail}."""
        if b"fail=1" in request.uri:
            return jsonAnswer({"error": {"message": "upstream broke", "type": "server_error"}}, 500)(request)
        if b'"stream": true' in request.content.getvalue():  # type: ignore[attr-defined]
            request.setHeader(b"content-type", b"text/event-stream")
            return b'data: {"id": "c", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}\n\ndata: [DONE]\n\n'
        return jsonAnswer({"id": "c", "model": "m", "usage": {"prompt_tokens": 2, "completion_tokens": 1}})(request)

    def config(self) -> str:
        upstream = f"http://127.0.0.1:{self.upstreamPort}"
        return "\n".join(
            [
                f'listen: "tcp:{self.port}:interface=127.0.0.1"',
                f"allowlist: {{path: {self.allowlistPath}}}",
                f"stats: {{path: {self.statsPath}, flush_interval: 0.2}}",
                "providers:",
                f"  openai: {{upstream: '{upstream}', credentials: {{env: LMGATE_TESTS_OPENAI_KEY}}}}",
                f"  azure: {{upstream: '{upstream}', credentials: {{file: {self.azureKeyPath}}}}}",
                f"  anthropic: {{upstream: '{upstream}', credentials: {{env: LMGATE_TESTS_ANTHROPIC_KEY}}}}",
                f"  gemini: {{upstream: '{upstream}', credentials: {{env: LMGATE_TESTS_GEMINI_KEY}}}}",
                f"  bedrock: {{upstream: '{upstream}', credentials: {{aws: {{region: us-east-1}}}}}}",
                f"  stubbed: {{upstream: '{upstream}', format: openai, credentials: {{env: {ABSENT}, missing: stub}}}}",
                f"  down: {{upstream: 'http://127.0.0.1:{closedPort(self)}', format: openai,"
                " credentials: {env: LMGATE_TESTS_OPENAI_KEY}}",
            ]
        ) + "\n"

    async def test_noProviderSecretInAnyFileLMGateWrote(self) -> None:
        """Managed bearer, api-key, x-api-key, x-goog-api-key, SigV4 and stub routes, with calls that
        succeed, an upstream 500, an unreachable upstream, a streamed call and a key file gone at SIGHUP:
        every provider secret reached the upstream as its route says, and after the daemon stopped no
        file it wrote (records, access log, log, pid) holds any of them, nor the test secrets' mark."""
        from tests.test_daemon_cloud import AWS_VARIABLES

        daemon = Daemon(self, self.config(), self.directory)
        daemon.env.pop(ABSENT, None)
        for name in AWS_VARIABLES:
            daemon.env.pop(name, None)
        daemon.env.update(
            LMGATE_TESTS_OPENAI_KEY=self.secrets["openai"],
            LMGATE_TESTS_ANTHROPIC_KEY=self.secrets["anthropic"],
            LMGATE_TESTS_GEMINI_KEY=self.secrets["gemini"],
            AWS_ACCESS_KEY_ID="AKIDLMGATESCAN000001",
            AWS_SECRET_ACCESS_KEY=self.secrets["aws"],
            AWS_SHARED_CREDENTIALS_FILE=os.path.join(self.directory, "no-aws-credentials"),
            AWS_CONFIG_FILE=os.path.join(self.directory, "no-aws-config"),
            AWS_EC2_METADATA_DISABLED="true",
            TMPDIR=os.path.join(self.var, "tmp"),  # any spool file lands in var/ too
        )
        daemon.start(logfile=self.logPath, pidfile=self.pidPath)
        await daemon.waitUntilHealthy(self.port)

        chat = "/openai/v1/chat/completions"
        streamed = b'{"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "Hi"}]}'
        messages = b'{"model": "claude-3-5-haiku", "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]}'
        gemini = b'{"contents": [{"parts": [{"text": "Hi"}]}]}'
        azure = "/azure/openai/deployments/d/chat/completions?api-version=2024-10-21"
        calls: list[tuple[str, bytes, dict[str, str] | None, int]] = [
            (chat, CHAT, None, 200),
            (chat + "?fail=1", CHAT, None, 500),
            (chat, streamed, None, 200),
            (azure, CHAT, {"api-key": CLIENT_KEY}, 200),
            ("/anthropic/v1/messages", messages, {"x-api-key": CLIENT_KEY}, 200),
            ("/anthropic/v1/messages?fail=1", messages, {"x-api-key": CLIENT_KEY}, 500),
            ("/gemini/v1beta/models/gemini-2.5-flash:generateContent?key=" + CLIENT_KEY, gemini, {}, 200),
            ("/bedrock/model/anthropic.claude-3-haiku-20240307-v1:0/converse", b'{"messages": []}', None, 200),
            ("/stubbed/v1/chat/completions", CHAT, None, 200),
            ("/down/v1/chat/completions", CHAT, None, 502),
        ]
        for path, body, headers, expected in calls:
            code, answer = await self.post(path, body, headers)
            self.assertEqual(code, expected, (path, answer))

        os.remove(self.azureKeyPath)  # gone at the reload: the previous key stays in use, the file is named
        daemon.signal("HUP")

        def reloaded() -> bool:
            with open(self.logPath, "rb") as f:
                return b"Reloaded the configuration" in f.read()

        await waitFor(reloaded, "the reload")
        code, answer = await self.post(azure, CHAT, {"api-key": CLIENT_KEY})
        self.assertEqual(code, 200, answer)
        self.assertEqual(await daemon.stop(), 0)

        sent: dict[bytes, set[bytes]] = {}
        for seen in self.upstream.seen:
            for name, values in seen.headers.getAllRawHeaders():
                sent.setdefault(name.lower(), set()).update(values)
        self.assertIn(b"Bearer " + self.secrets["openai"].encode(), sent[b"authorization"])
        self.assertEqual(sent[b"api-key"], {self.secrets["azure"].encode()})
        self.assertEqual(sent[b"x-api-key"], {self.secrets["anthropic"].encode()})
        self.assertEqual(sent[b"x-goog-api-key"], {self.secrets["gemini"].encode()})
        self.assertTrue(any(value.startswith(b"AWS4-HMAC-SHA256 ") for value in sent[b"authorization"]))
        self.assertNotIn(b"Bearer " + CLIENT_KEY.encode(), sent[b"authorization"])
        with open(self.logPath, "rb") as f:
            self.assertIn(self.azureKeyPath.encode(), f.read())  # the failed reload names the file
        records = readRecords(self.statsPath)
        self.assertEqual(len(records), len(calls) + 1)
        self.assertEqual({r["auth"] for r in records}, {"managed", "stub"})

        written = [os.path.join(root, name) for root, _, names in os.walk(self.directory) for name in names]
        for path in (self.statsPath, self.logPath, os.path.join(self.var, "access.log")):  # (twistd removed its pid file)
            self.assertIn(path, written)
        self.assertEqual(filesHolding(self.directory, self.secrets.values()), [])

    async def post(self, path: str, body: bytes, headers: dict[str, str] | None) -> tuple[int, bytes]:
        sent: Any = {"Authorization": f"Bearer {CLIENT_KEY}"} if headers is None else headers
        response = await treq.post(f"http://127.0.0.1:{self.port}{path}", body, headers=sent, persistent=False)
        return response.code, await response.content()
