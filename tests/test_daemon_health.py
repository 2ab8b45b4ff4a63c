"""
Active health probes end to end: C{twistd -n lmgate} as a child process, two
managed openai-format routes behind an C{ordered} alias, each with a fake
upstream on loopback; the first route's health path answers 503, then 200.
"""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from twisted.trial.unittest import TestCase
from twisted.web.server import Request, Site

from tests.daemon import Daemon, daemonDirectory, freePort, readRecords, waitFor
from tests.helpers import FakeUpstream, listenLocal

CLIENT_KEY = "lmgate-app-key-health-000000000Qq"
KEY_A = "sk-provider-a-health-0000000000000Aa"
KEY_B = "sk-provider-b-health-0000000000000Bb"
ANSWER = {"id": "c1", "object": "chat.completion", "model": "m", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class Upstream(FakeUpstream):
    """Answers GET /v1/models with C{self.health}, every POST with a chat completion."""

    def __init__(self) -> None:
        super().__init__()
        self.health = 200
        self.handler = self.answer

    def answer(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.method == b"GET":
            request.setResponseCode(self.health)
            return b'{"object": "list", "data": []}'
        content: Any = request.content
        content.seek(0)
        return json.dumps(dict(ANSWER, model=json.loads(content.read())["model"])).encode()

    def probes(self) -> list[Any]:
        return [s for s in self.seen if s.method == b"GET"]

    def posts(self) -> list[Any]:
        return [s for s in self.seen if s.method == b"POST"]


class HealthDaemonTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.directory, self.allowlistPath = daemonDirectory(self, CLIENT_KEY)
        self.a, self.b = Upstream(), Upstream()
        self.a.health = 503
        self.aPort = listenLocal(self, Site(self.a))
        self.bPort = listenLocal(self, Site(self.b))
        self.port = freePort()
        self.admin = freePort()
        self.statsPath = os.path.join(self.directory, "var", "stats.jsonl")
        self.logPath = os.path.join(self.directory, "var", "twistd.log")

    def config(self, bHealth: str = "") -> str:
        return "\n".join(
            [
                f'listen: "tcp:{self.port}:interface=127.0.0.1"',
                f'admin: {{listen: "tcp:{self.admin}:interface=127.0.0.1"}}',
                f"allowlist: {{path: {self.allowlistPath}}}",
                f"stats: {{path: {self.statsPath}, flush_interval: 0.2}}",
                "providers:",
                f"  a: {{upstream: 'http://127.0.0.1:{self.aPort}', format: openai, credentials: {{env: LMGATE_TESTS_KEY_A}},"
                " health: {path: /v1/models, interval: 0.3, timeout: 10}}",
                f"  b: {{upstream: 'http://127.0.0.1:{self.bPort}', format: openai, credentials: {{env: LMGATE_TESTS_KEY_B}}{bHealth}}}",
                "models:",
                "  chat: {targets: [{provider: a, model: model-a}, {provider: b, model: model-b}], strategy: ordered}",
            ]
        ) + "\n"

    def logged(self, text: bytes) -> int:
        with open(self.logPath, "rb") as f:
            return f.read().count(text)

    async def chat(self) -> int:
        headers: Any = {"authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"}
        body = b'{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}'
        response = await treq.post(f"http://127.0.0.1:{self.port}/v1/chat/completions", body, headers=headers, persistent=False)
        await response.content()
        return int(response.code)

    async def metrics(self) -> str:
        response = await treq.get(f"http://127.0.0.1:{self.admin}/metrics", persistent=False)
        return (await response.content()).decode()

    async def test_unhealthyTargetIsSkippedUntilHealthyAgain(self) -> None:
        """After the first probe finds route a unhealthy (503), alias calls go to route b and a never
        receives the POST; once a's probe succeeds again, calls go back to a. Each probe carried a's
        managed key, never the client's; the admin metrics show the health; SIGHUP restarts the
        probes with the new routes."""
        env = {"LMGATE_TESTS_KEY_A": KEY_A, "LMGATE_TESTS_KEY_B": KEY_B}
        daemon = Daemon(self, self.config(), self.directory, env=env)
        daemon.start(logfile=self.logPath)
        await daemon.waitUntilHealthy(self.port)
        await waitFor(lambda: self.logged(b"providers.a: unhealthy") == 1, "the first probe's verdict")

        self.assertEqual(await self.chat(), 200)
        self.assertEqual(await self.chat(), 200)
        self.assertEqual((len(self.a.posts()), len(self.b.posts())), (0, 2))
        self.assertIn('lmgate_upstream_healthy{provider="a"} 0.0', await self.metrics())
        self.assertNotIn('lmgate_upstream_healthy{provider="b"}', await self.metrics())  # not probed

        self.a.health = 200
        await waitFor(lambda: self.logged(b"providers.a: healthy again") == 1, "a healthy again")
        self.assertEqual(await self.chat(), 200)
        self.assertEqual((len(self.a.posts()), len(self.b.posts())), (1, 2))
        page = await self.metrics()
        self.assertIn('lmgate_upstream_healthy{provider="a"} 1.0', page)
        self.assertIn('lmgate_upstream_probe_failures_total{provider="a"}', page)

        with open(daemon.configPath, "w") as f:
            f.write(self.config(", health: {path: /v1/models, interval: 0.3}"))
        daemon.signal("HUP")
        await waitFor(lambda: len(self.b.probes()) >= 1, "b probed after the reload")
        self.assertEqual(self.logged(b"providers.a: unhealthy"), 1)  # a's state was kept, not announced again
        self.assertEqual(await daemon.stop(), 0)

        self.assertTrue(self.a.probes())
        for probe in self.a.probes():
            self.assertEqual(probe.uri, b"/v1/models")
            self.assertEqual(probe.headers.getRawHeaders(b"authorization"), [f"Bearer {KEY_A}".encode()])
        self.assertEqual(self.b.probes()[0].headers.getRawHeaders(b"authorization"), [f"Bearer {KEY_B}".encode()])
        for seen in self.a.seen + self.b.seen:
            self.assertNotIn(CLIENT_KEY.encode(), b"".join(v for _, vs in seen.headers.getAllRawHeaders() for v in vs))
        with open(self.logPath, "rb") as f:
            log = f.read()
        for key in (KEY_A, KEY_B, CLIENT_KEY):
            self.assertNotIn(key.encode(), log)
        records = readRecords(self.statsPath)
        self.assertEqual([(r["provider"], r["model"], r["alias"], r["attempts"]) for r in records],
                         [("b", "model-b", "chat", 1), ("b", "model-b", "chat", 1), ("a", "model-a", "chat", 1)])
