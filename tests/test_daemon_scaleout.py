"""
Usage limits across processes and machines, through the running daemons: two
LMGate instances, each with C{--workers 2}, behind HAProxy
(C{etc/haproxy/lmgate.cfg}, as shipped), one real C{redis-server}. A burst
still admits exactly the figure in total, a token quota and a dollar budget
hold to the sums of all four workers' records, and C{concurrent: K} never sees
more than K calls at the upstream. Then the faults, on one instance: Redis
killed under load (open: calls flow, records say local; closed: 503), Redis
restarted (its scripts reloaded, no LMGate restart), Redis hung (no call waits
longer than the timeout).

Skipped, saying what is missing, without C{redis-server} or C{haproxy}
(CI installs both with apt-get).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import time
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.daemon import PROJECT, Daemon, freePort, inThread, waitFor
from tests.helpers import FakeUpstream, Holder, listenLocal
from twisted.protocols.policies import WrappingFactory
from tests.redisserver import NO_REDIS, startRedis

KEY = "lmgate-app-key-scaleout-00000000Ss"
OTHER = "lmgate-app-key-scaleout-00000001Tt"
HAPROXY = shutil.which("haproxy")
#: The upstream's usage for every call: 50 tokens, $0.0000165 at gpt-4o-mini's prices.
USAGE = {"prompt_tokens": 30, "completion_tokens": 20, "total_tokens": 50}
PRICES = "models:\n  gpt-4o-mini: {input: 0.15, output: 0.60}\n"


def chatAnswer(request: Request) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"id": "c", "object": "chat.completion", "model": "gpt-4o-mini", "choices": [], "usage": USAGE}).encode()


class HAProxy:
    """C{haproxy} in the foreground with the shipped config, its addresses replaced; stopped by PID."""

    def __init__(self, case: TestCase, backends: list[int]) -> None:
        if HAPROXY is None:
            raise SkipTest("haproxy not found (apt-get install haproxy)")
        self.port = freePort()
        with open(os.path.join(PROJECT, "etc", "haproxy", "lmgate.cfg")) as f:
            config = f.read()
        config = config.replace("bind FRONT", f"bind 127.0.0.1:{self.port}")
        for index, port in enumerate(backends, 1):
            config = config.replace(f"LMGATE_{index} check", f"127.0.0.1:{port} check")
        path = os.path.join(os.path.abspath(case.mktemp()) + ".cfg")
        with open(path, "w") as f:
            f.write(config)
        self.log = path + ".log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", path], stdout=log, stderr=log)
        case.addCleanup(self.stop)

    def output(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def workerRecords(directory: str) -> list[dict[str, Any]]:
    """Every record of every instance's every worker under C{directory}."""
    records = []
    for path in sorted(glob.glob(os.path.join(directory, "*", "var", "stats*.jsonl*"))):
        with open(path, "rb") as f:
            records.extend(json.loads(line) for line in f)
    return records


class ScaleOutTests(TestCase):
    """Two instances × two workers behind HAProxy, one Redis."""

    timeout = 240

    def setUp(self) -> None:
        if NO_REDIS is not None:
            raise SkipTest(NO_REDIS)
        if HAPROXY is None:
            raise SkipTest("haproxy not found (apt-get install haproxy)")
        self.redis = startRedis(self)
        self.upstream = FakeUpstream()
        self.upstream.handler = chatAnswer
        #: Tracks the upstream's connections: the workers' pooled ones must be gone before the test ends.
        self.upstreamSite = WrappingFactory(Site(self.upstream))
        listening = reactor.listenTCP(0, self.upstreamSite, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(listening.stopListening)
        self.upstreamPort = listening.getHost().port
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.daemons: list[Daemon] = []
        self.addCleanup(self.stopFleet)

    async def stopFleet(self) -> None:
        """Stop every instance (SIGTERM: each drains and exits 0), then wait for their upstream connections to close."""
        daemons, self.daemons = self.daemons, []
        for daemon in daemons:
            if not daemon.watch.ended.called:
                self.assertEqual(await daemon.stop(), 0)
        await waitFor(lambda: not self.upstreamSite.protocols, "the workers' upstream connections closed")

    async def fleet(self, rules: str, workers: int = 2) -> int:
        """Two instances behind HAProxy with C{rules}; HAProxy's port once every instance is in."""
        ports = []
        for index in (1, 2):
            directory = os.path.join(self.root, f"i{index}")
            os.makedirs(os.path.join(directory, "var"))
            with open(os.path.join(directory, "allowlist.csv"), "w") as f:
                f.write(f"id,api_key,owner,added\napp,{KEY},team-a,2026-12-01\nother,{OTHER},team-b,2026-12-01\n")
            with open(os.path.join(directory, "prices.yaml"), "w") as f:
                f.write(PRICES)
            port = freePort()
            config = "\n".join(
                [
                    f'listen: "tcp:{port}:interface=127.0.0.1"',
                    f"allowlist: {{path: {directory}/allowlist.csv}}",
                    f"stats: {{path: {directory}/var/stats.jsonl, flush_interval: 0.2}}",
                    f"prices: {{path: {directory}/prices.yaml}}",
                    "providers:",
                    f"  openai: {{upstream: 'http://127.0.0.1:{self.upstreamPort}'}}",
                    "usage_limits:",
                    f"  store: {self.redis.url}",
                    "  redis: {timeout: 0.5}",
                    rules,
                ]
            ) + "\n"
            daemon = Daemon(self, config, directory)
            self.daemons.append(daemon)
            daemon.start("--workers", str(workers))
            await daemon.waitUntilHealthy(port)
            ports.append(daemon.port(port))
        proxy = HAProxy(self, ports)
        try:
            await waitFor(lambda: self._through(proxy.port), "HAProxy admitting calls")
        except AssertionError:
            raise AssertionError(f"HAProxy did not admit calls:\n{proxy.output()}") from None
        return proxy.port

    def _through(self, port: int) -> bool:
        import socket

        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return b" 200 " in s.recv(100)
        except OSError:
            return False

    async def post(self, port: int, body: dict[str, Any], key: str = KEY) -> tuple[int, bytes]:
        response = await treq.post(
            f"http://127.0.0.1:{port}/openai/v1/chat/completions",
            json.dumps(body).encode(),
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
            persistent=False,
        )
        return response.code, await response.content()

    async def burst(self, port: int, count: int, body: dict[str, Any]) -> list[int]:
        results = await gatherResults([Deferred.fromCoroutine(self.post(port, body)) for _ in range(count)])
        return [code for code, _ in results]

    async def settled(self, count: int) -> list[dict[str, Any]]:
        await waitFor(lambda: len(workerRecords(self.root)) >= count, f"{count} records")
        return workerRecords(self.root)

    async def test_burstAcrossTheFleet(self) -> None:
        """3N concurrent calls through HAProxy to four workers with requests_per_minute N: exactly N admitted."""
        n = 10
        port = await self.fleet("  rules:\n    - {name: fleet-rpm, per: key, requests_per_minute: %d}\n" % n)
        codes = await self.burst(port, 3 * n, {"model": "gpt-4o-mini", "max_tokens": 5})
        self.assertEqual(sorted(codes), [200] * n + [429] * (2 * n))
        records = await self.settled(3 * n)
        self.assertEqual(len(records), 3 * n)
        self.assertEqual(len({r["client"] for r in records}), 1)  # all through HAProxy
        files = {os.path.basename(p) for p in glob.glob(os.path.join(self.root, "*", "var", "stats-w*.jsonl"))}
        self.assertEqual(files, {"stats-w1.jsonl", "stats-w2.jsonl"})
        self.assertEqual({r["limits"] for r in records}, {"shared"})
        self.assertEqual(len(self.upstream.seen), n)

    async def test_quotaAndBudgetAcrossTheFleet(self) -> None:
        """A tokens_per_day quota (key app) and a usd_per_day budget (key other) hold to the sums of all
        four workers' records: waves of concurrent calls until refused, never over."""
        quota, budget = 1000, 0.0005  # 1000 tokens: at most 20 calls of 50; $0.0005: at most 30 calls of $0.0000165
        port = await self.fleet(
            "  estimate: {bytes_per_token: 4, output_tokens: 40}\n"
            "  rules:\n"
            f"    - {{name: daily-tokens, match: {{key: app}}, tokens_per_day: {quota}}}\n"
            f"    - {{name: daily-dollars, match: {{key: other}}, usd_per_day: {budget}}}\n"
        )
        body = {"model": "gpt-4o-mini", "max_tokens": 40}  # reserves 11 + 40 tokens; each call uses 50: the estimate holds
        sent = 0
        for _ in range(8):
            results = await gatherResults(
                [Deferred.fromCoroutine(self.post(port, body, key)) for key in (KEY, OTHER) for _ in range(8)]
            )
            sent += len(results)
        records = await self.settled(sent)
        mine = [r for r in records if r["lmgate_id"] == "app"]
        theirs = [r for r in records if r["lmgate_id"] == "other"]
        used = sum(r["total_tokens"] or 0 for r in mine)
        spent = sum(r["cost_usd"] or 0 for r in theirs)
        self.assertLessEqual(used, quota)
        self.assertGreater(used, quota - 100)  # refused only once the quota was (nearly) used: reservations of 51 tokens
        self.assertLessEqual(spent, budget + 1e-12)
        self.assertGreater(spent, budget / 2)
        self.assertEqual({r["error"] for r in mine if r["status"] == 429}, {"quota_exceeded"})
        self.assertEqual({r["error"] for r in theirs if r["status"] == 429}, {"budget_exceeded"})

    async def test_concurrencyAcrossTheFleet(self) -> None:
        """concurrent: K over four workers: the upstream never has more than K calls in flight."""
        k = 3
        holder = self.upstream.handler = Holder()
        held = holder.held
        port = await self.fleet("  rules:\n    - {name: three, per: rule, concurrent: %d}\n" % k)
        calls = [Deferred.fromCoroutine(self.post(port, {"model": "gpt-4o-mini"})) for _ in range(4 * k)]
        await waitFor(lambda: len(held) == k and sum(c.called for c in calls) == 3 * k, "K held, the rest refused")
        self.assertEqual({c.result[0] for c in calls if c.called}, {429})
        holder.answer(chatAnswer)
        await gatherResults(calls)
        self.assertEqual(holder.most, k)
        records = await self.settled(4 * k)
        self.assertEqual(sorted(r["error"] or "" for r in records), [""] * k + ["concurrency_limited"] * (3 * k))


class RedisFaultTests(TestCase):
    """One instance, one worker, a Redis that fails under it."""

    timeout = 180

    def setUp(self) -> None:
        if NO_REDIS is not None:
            raise SkipTest(NO_REDIS)
        self.redis = startRedis(self)
        self.upstream = FakeUpstream()
        self.upstream.handler = chatAnswer
        self.upstreamPort = listenLocal(self, Site(self.upstream))
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.directory, "var"))
        with open(os.path.join(self.directory, "allowlist.csv"), "w") as f:
            f.write(f"id,api_key,owner,added\napp,{KEY},team-a,2026-12-01\n")
        self.port = freePort()
        self.statsPath = os.path.join(self.directory, "var", "stats.jsonl")

    async def start(self, onStoreError: str, timeout: float = 0.2) -> Daemon:
        config = "\n".join(
            [
                f'listen: "tcp:{self.port}:interface=127.0.0.1"',
                f"allowlist: {{path: {self.directory}/allowlist.csv}}",
                f"stats: {{path: {self.statsPath}, flush_interval: 0.2}}",
                "providers:",
                f"  openai: {{upstream: 'http://127.0.0.1:{self.upstreamPort}'}}",
                "usage_limits:",
                f"  store: {self.redis.url}",
                f"  redis: {{timeout: {timeout}}}",
                f"  on_store_error: {onStoreError}",
                "  rules:\n    - {name: roomy, requests_per_minute: 100000}",
            ]
        ) + "\n"
        daemon = Daemon(self, config, self.directory)
        daemon.start()
        await daemon.waitUntilHealthy(self.port)
        return daemon

    async def call(self) -> tuple[int, float]:
        started = time.monotonic()
        response = await treq.post(
            f"http://127.0.0.1:{self.port}/openai/v1/chat/completions",
            b'{"model":"gpt-4o-mini"}',
            headers={"authorization": f"Bearer {KEY}"},
            persistent=False,
        )
        await response.content()
        return response.code, time.monotonic() - started

    def records(self) -> list[dict[str, Any]]:
        if not os.path.exists(self.statsPath):
            return []
        with open(self.statsPath, "rb") as f:
            return [json.loads(line) for line in f]

    async def test_killedOpenThenRestarted(self) -> None:
        """open: with Redis killed, calls keep flowing and their records say the limits were local; Redis
        restarted (empty, its scripts gone): calls are counted in Redis again, LMGate not restarted."""
        daemon = await self.start("open")
        self.assertEqual((await self.call())[0], 200)
        self.redis.kill()
        for _ in range(10):
            self.assertEqual((await self.call())[0], 200)
        await inThread(self.redis.start)
        codes = []
        for _ in range(60):  # the circuit's cool-off ends within seconds; then Redis has the scripts loaded again
            code, _ = await self.call()
            codes.append(code)
            if self.records() and self.records()[-1]["limits"] == "shared" and len(self.records()) > 11:
                break
            await Deferred.fromCoroutine(_pause(0.2))
        self.assertEqual(set(codes), {200})
        await waitFor(lambda: self.records()[-1]["limits"] == "shared", "a call counted in Redis again")
        limits = [r["limits"] for r in self.records()]
        self.assertEqual(limits[0], "shared")
        self.assertIn("local", limits)
        self.assertIn(b"lmgate:s:roomy|key=app", self.redis.command("KEYS", "*roomy*"))
        self.assertEqual(await daemon.stop(), 0)

    async def test_killedClosed(self) -> None:
        """closed: with Redis down, calls are refused 503 limits_unavailable, in the provider's shape."""
        daemon = await self.start("closed")
        self.redis.kill()
        response = await treq.post(
            f"http://127.0.0.1:{self.port}/openai/v1/chat/completions",
            b'{"model":"gpt-4o-mini"}',
            headers={"authorization": f"Bearer {KEY}"},
            persistent=False,
        )
        body = json.loads(await response.content())
        self.assertEqual((response.code, body["error"]["code"]), (503, "limits_unavailable"))
        await waitFor(lambda: self.records() != [], "the record")
        self.assertEqual((self.records()[-1]["error"], self.records()[-1]["limited_by"]), ("limits_unavailable", "roomy"))
        self.assertEqual(len(self.upstream.seen), 0)
        self.assertEqual(await daemon.stop(), 0)

    async def test_hungRedis(self) -> None:
        """A hung Redis (SIGSTOP): no call waits much longer than the timeout (0.2 s here; the bound allows a
        loaded machine), and calls go on, counted locally."""
        daemon = await self.start("open", timeout=0.2)
        self.assertEqual((await self.call())[0], 200)
        self.redis.hang()
        try:
            results = await gatherResults([Deferred.fromCoroutine(self.call()) for _ in range(10)])
        finally:
            self.redis.resume()
        self.assertEqual({code for code, _ in results}, {200})
        self.assertLess(max(seconds for _, seconds in results), 3.0)
        self.assertEqual(await daemon.stop(), 0)


async def _pause(seconds: float) -> None:
    from twisted.internet.task import deferLater

    await deferLater(reactor, seconds, lambda: None)
