"""
Usage limits through the running daemon, one instance, the memory store: a
burst on a fresh key admits exactly the figure, refusals reach the openai SDK
as RateLimitError with OpenAI's headers, a token quota holds to the records'
sums, concurrent calls never exceed the figure at the upstream, and every
call has its one record (docs/limits.md).
"""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.daemon import Daemon, daemonDirectory, freePort, inThread, readRecords, waitFor
from tests.helpers import FakeUpstream, Holder, listenLocal

KEY = "lmgate-app-key-limits-000000000Zz"
USAGE = {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50}


def chatAnswer(request: Request) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(
        {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini", "choices": [], "usage": USAGE}
    ).encode()


class LimitsDaemonTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.directory, self.allowlistPath = daemonDirectory(self, KEY)
        self.upstream = FakeUpstream()
        self.upstream.handler = chatAnswer
        self.upstreamPort = listenLocal(self, Site(self.upstream))
        self.port = freePort()
        self.statsPath = os.path.join(self.directory, "var", "stats.jsonl")

    def start(self, limits: str, *extra: str) -> Daemon:
        config = "\n".join(
            [
                f'listen: "tcp:{self.port}:interface=127.0.0.1"',
                f"allowlist: {{path: {self.allowlistPath}}}",
                f"stats: {{path: {self.statsPath}, flush_interval: 0.2}}",
                "providers:",
                f"  openai: {{upstream: 'http://127.0.0.1:{self.upstreamPort}'}}",
                limits,
            ]
        ) + "\n"
        daemon = Daemon(self, config, self.directory)
        daemon.start(*extra)
        return daemon

    async def post(self, body: dict[str, Any]) -> Any:
        return await treq.post(
            f"http://127.0.0.1:{self.port}/openai/v1/chat/completions",
            json.dumps(body).encode(),
            headers={"authorization": f"Bearer {KEY}", "content-type": "application/json"},
            persistent=False,
        )

    async def records(self, count: int) -> list[dict[str, Any]]:
        await waitFor(lambda: os.path.exists(self.statsPath) and len(readRecords(self.statsPath)) >= count, f"{count} records")
        return readRecords(self.statsPath)

    async def test_burstAdmitsExactlyTheFigure(self) -> None:
        """3N concurrent calls on a fresh key with requests_per_minute N: exactly N answered, 2N refused 429
        in OpenAI's shape with Retry-After and x-ratelimit-*; one record each, the refused ones naming the rule."""
        n = 8
        daemon = self.start(
            "usage_limits:\n  rules:\n    - {name: per-key-rpm, match: {owner: team-a}, per: key, requests_per_minute: %d}\n" % n
        )
        await daemon.waitUntilHealthy(self.port)
        responses = await gatherResults([Deferred.fromCoroutine(self.post({"model": "gpt-4o-mini", "max_tokens": 5})) for _ in range(3 * n)])
        codes = sorted(r.code for r in responses)
        self.assertEqual(codes, [200] * n + [429] * (2 * n))
        refused = next(r for r in responses if r.code == 429)
        self.assertEqual(refused.phrase, b"Too Many Requests")  # as providers send it (Twisted's table lacks 429)
        body = json.loads(await refused.content())
        self.assertEqual((body["error"]["type"], body["error"]["code"]), ("requests", "rate_limit_exceeded"))
        self.assertIn("per-key-rpm", body["error"]["message"])
        headers = refused.headers
        retryAfter = int(headers.getRawHeaders(b"retry-after")[0])
        self.assertTrue(1 <= retryAfter <= 8, retryAfter)
        self.assertEqual(headers.getRawHeaders(b"x-ratelimit-limit-requests"), [b"%d" % n])
        self.assertEqual(headers.getRawHeaders(b"x-ratelimit-remaining-requests"), [b"0"])
        self.assertTrue(headers.getRawHeaders(b"x-ratelimit-reset-requests")[0].endswith(b"s"))
        ok = next(r for r in responses if r.code == 200)
        self.assertIsNone(ok.headers.getRawHeaders(b"x-ratelimit-limit-requests"))  # relayed answers get no added header
        for r in responses:
            await r.content()
        self.assertEqual(len(self.upstream.seen), n)
        records = await self.records(3 * n)
        self.assertEqual(len(records), 3 * n)
        limited = [r for r in records if r["status"] == 429]
        self.assertEqual(len(limited), 2 * n)
        self.assertEqual({(r["error"], r["limited_by"], r["limits"]) for r in limited}, {("rate_limited", "per-key-rpm", "local")})
        answered = [r for r in records if r["status"] == 200]
        self.assertEqual({(r["error"], r["limited_by"], r["limits"]) for r in answered}, {(None, None, "local")})
        self.assertTrue(all(r["reserved_tokens"] > 5 for r in records))
        self.assertEqual(await daemon.stop(), 0)

    async def test_quotaHoldsToTheRecords(self) -> None:
        """tokens_per_day: calls are admitted while settled use + reservations fit; the records' total never exceeds it."""
        daemon = self.start(
            "usage_limits:\n  estimate: {bytes_per_token: 4, output_tokens: 100}\n"
            "  rules:\n    - {name: daily, per: owner, tokens_per_day: 400}\n"
        )
        await daemon.waitUntilHealthy(self.port)
        codes = []
        for _ in range(12):  # one after another: each settles (50 tokens) before the next
            response = await self.post({"model": "gpt-4o-mini", "max_tokens": 20})
            await response.content()
            codes.append(response.code)
        records = await self.records(12)
        used = sum(r["total_tokens"] or 0 for r in records)
        self.assertLessEqual(used, 400)
        self.assertIn(429, codes)
        self.assertEqual(codes, sorted(codes))  # admitted until the quota is reached, then refused
        refusal = next(r for r in records if r["status"] == 429)
        self.assertEqual((refusal["error"], refusal["limited_by"]), ("quota_exceeded", "daily"))
        self.assertEqual(await daemon.stop(), 0)

    async def test_concurrencyAtTheUpstream(self) -> None:
        """concurrent: K: never more than K calls in flight at the upstream; the lease is released at the record."""
        holder = self.upstream.handler = Holder()
        held = holder.held
        daemon = self.start("usage_limits:\n  rules:\n    - {name: two-at-once, per: rule, concurrent: 2}\n")
        await daemon.waitUntilHealthy(self.port)
        calls = [Deferred.fromCoroutine(self.post({"model": "gpt-4o-mini"})) for _ in range(6)]
        await waitFor(lambda: len(held) == 2 and sum(c.called for c in calls) == 4, "2 held upstream, 4 refused")
        refused = [c.result for c in calls if c.called]
        self.assertEqual({r.code for r in refused}, {429})
        body = json.loads(await refused[0].content())
        self.assertIn("two-at-once", body["error"]["message"])
        holder.answer(chatAnswer)
        for c in calls:
            await (await c).content()
        third = Deferred.fromCoroutine(self.post({"model": "gpt-4o-mini"}))  # the leases went back at the records
        await waitFor(lambda: len(held) == 3, "a third call admitted")
        held[2].write(chatAnswer(held[2]))
        held[2].finish()
        response = await third
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual(holder.most, 2)
        records = await self.records(7)
        self.assertEqual(sorted(r["error"] or "" for r in records), [""] * 3 + ["concurrency_limited"] * 4)
        self.assertEqual(await daemon.stop(), 0)

    async def test_openaiSDK(self) -> None:
        """The openai SDK raises RateLimitError with LMGate's message; its retries are off here."""
        import openai

        daemon = self.start("usage_limits:\n  rules:\n    - {name: one, requests_per_minute: 1}\n")
        await daemon.waitUntilHealthy(self.port)

        def twice() -> Any:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/openai/v1", api_key=KEY, max_retries=0)
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
            try:
                client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
            except openai.RateLimitError as e:
                return e
            return None

        error = await inThread(twice)
        self.assertIsInstance(error, Exception)
        self.assertIn("Rate limit reached: rule `one`", str(error))
        self.assertEqual(error.response.headers["x-ratelimit-limit-requests"], "1")
        self.assertEqual(await daemon.stop(), 0)

    async def test_memoryStoreRefusedWithWorkers(self) -> None:
        """The memory store counts in one process: with --workers 2 and rules, start-up fails with one line naming the key."""
        daemon = self.start("usage_limits:\n  rules:\n    - {name: one, requests_per_minute: 1}\n", "--workers", "2")
        code = await daemon.watch.ended
        self.assertNotEqual(code, 0)
        self.assertIn(b"usage_limits.store: memory counts in one process only", daemon.watch.output)

    async def test_showResetAndMetrics(self) -> None:
        """With the memory store: `lmgate limits show` reads the running daemon's counters from the admin port,
        `lmgate limits reset --key` forgets them (the next burst is admitted again), and /metrics counts the
        refusals by rule and reason."""
        import subprocess
        import sys

        adminPort = freePort()
        daemon = self.start(
            f'admin: {{listen: "tcp:{adminPort}:interface=127.0.0.1"}}\n'
            "usage_limits:\n  rules:\n    - {name: two, requests_per_minute: 2, tokens_per_day: 100000}\n"
        )
        await daemon.waitUntilHealthy(self.port)
        codes = []
        for _ in range(3):
            response = await self.post({"model": "gpt-4o-mini", "max_tokens": 10})
            await response.content()
            codes.append(response.code)
        self.assertEqual(codes, [200, 200, 429])
        await self.records(3)

        def lmgate(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "lmgate.cli", "limits", *args, "--config", daemon.configPath],
                capture_output=True, text=True, timeout=60, cwd=self.directory,
            )

        shown = await inThread(lmgate, "show", "--key", "app", "--json")
        self.assertEqual(shown.returncode, 0, shown.stderr)
        states = {s["kind"]: s for s in json.loads(shown.stdout)}
        self.assertEqual(states["requests_per_minute"]["counter"], "two|key=app")
        self.assertEqual((states["requests_per_minute"]["limit"], states["requests_per_minute"]["remaining"]), (2, 0))
        self.assertEqual((states["tokens_per_day"]["used"], states["tokens_per_day"]["reserved"]), (100, 0))
        table = await inThread(lmgate, "show")
        self.assertIn("two|key=app", table.stdout)
        self.assertIn("resets_at", table.stdout)
        reset = await inThread(lmgate, "reset", "--key", "app")
        self.assertEqual((reset.returncode, reset.stdout), (0, "Reset 2 counter state(s).\n"))
        response = await self.post({"model": "gpt-4o-mini"})
        await response.content()
        self.assertEqual(response.code, 200)
        page = await (await treq.get(f"http://127.0.0.1:{adminPort}/metrics", persistent=False)).text()
        self.assertIn('lmgate_limit_refusals_total{reason="rate_limited",rule="two"} 1.0', page)
        self.assertEqual(await daemon.stop(), 0)
