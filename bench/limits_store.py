#!/usr/bin/env python3
"""
The Redis store for usage limits on its own: admit + settle round trips per
second and their latency, against a redis-server on loopback started here
(no persistence; stopped by PID at the end), and Redis's memory per 1,000
counters with every kind of figure.

    python bench/limits_store.py [SECONDS] [CONCURRENCY]

Sequential: one call at a time (the latency a request sees). Concurrent: N
calls in flight on the one connection (what a busy worker sees). A call is an
admission against all seven figures of one counter, then its settlement.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmgate.limits.store import Figure
    from tests.redisserver import RedisServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def figuresFor(counter: str) -> list["Figure"]:
    from lmgate.limits.store import NANO, Figure

    big = 10**12
    return [
        Figure(counter, "bench", "requests_per_minute", big),
        Figure(counter, "bench", "tokens_per_minute", big),
        Figure(counter, "bench", "concurrent", big),
        Figure(counter, "bench", "tokens_per_day", big),
        Figure(counter, "bench", "tokens_per_month", big),
        Figure(counter, "bench", "usd_per_day", 1000 * NANO),
        Figure(counter, "bench", "usd_per_month", 1000 * NANO),
    ]


def usedMemory(server: "RedisServer") -> int:
    """Redis's C{used_memory} (INFO memory), in bytes."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"INFO memory\r\n")
        data = b""
        while b"used_memory:" not in data or not data.endswith(b"\r\n"):
            data += s.recv(65536)
    for line in data.split(b"\r\n"):
        if line.startswith(b"used_memory:"):
            return int(line.split(b":")[1])
    raise RuntimeError("no used_memory in INFO")


def scriptCosts(server: "RedisServer") -> str:
    """Redis's own time per EVALSHA (INFO commandstats): the script's cost without the network or LMGate."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"INFO commandstats\r\n")
        data = b""
        while b"cmdstat_evalsha" not in data or not data.endswith(b"\r\n"):
            data += s.recv(65536)
    for line in data.split(b"\r\n"):
        if line.startswith(b"cmdstat_evalsha:"):
            fields = dict(f.split(b"=") for f in line.split(b":", 1)[1].split(b","))
            return f"{float(fields[b'usec_per_call']):.1f} µs over {int(fields[b'calls']):,} calls"
    return "unknown"


async def run(reactor: object, seconds: float, concurrency: int) -> None:
    from lmgate.limits.redis import RedisStore, parseRedisUrl
    from lmgate.limits.store import Settlement
    from tests.redisserver import RedisServer

    server = RedisServer()
    server.start()
    try:
        store = RedisStore(parseRedisUrl(server.url), reactor, timeout=1.0)  # type: ignore[arg-type]
        store.startService()
        figures = figuresFor("bench|key=k")
        n = 0

        async def one(i: int) -> float:
            started = time.perf_counter()
            d = store.admit(f"r{i}", figures, 1000, 5000, 60)
            await d
            store.settle(Settlement(f"r{i}", 900, 4000, True))
            return time.perf_counter() - started

        await one(-1)
        latencies = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            latencies.append(await one(n))
            n += 1
        rate = len(latencies) / seconds
        latencies.sort()
        print(f"sequential: {rate:,.0f} admit+settle/s, admit p50 {statistics.median(latencies) * 1000:.3f} ms, p99 {latencies[int(len(latencies) * 0.99)] * 1000:.3f} ms")

        from twisted.internet.defer import Deferred, gatherResults
        from twisted.internet.task import deferLater

        done = 0
        end = time.perf_counter() + seconds
        latencies = []

        async def worker() -> None:
            nonlocal n, done
            while time.perf_counter() < end:
                n += 1
                latencies.append(await one(n))
                done += 1

        started = time.perf_counter()
        await gatherResults([Deferred.fromCoroutine(worker()) for _ in range(concurrency)])
        elapsed = time.perf_counter() - started
        latencies.sort()
        print(f"concurrent ({concurrency} in flight): {done / elapsed:,.0f} admit+settle/s, admit p50 {statistics.median(latencies) * 1000:.3f} ms")

        print("inside Redis, per script call:", scriptCosts(server))

        # memory: 1,000 counters with all seven figures, each admitted once and still unsettled
        server.command("FLUSHALL")
        before = usedMemory(server)
        for i in range(1000):
            await store.admit(f"m{i}", figuresFor(f"bench|key=k{i}"), 1000, 5000, 60)
        unsettled = usedMemory(server)
        for i in range(1000):
            store.settle(Settlement(f"m{i}", 900, 4000, True))
        for _ in range(500):  # bounded: the settlements go within milliseconds
            if not store.queued:
                break
            await deferLater(reactor, 0.01, lambda: None)  # type: ignore[arg-type]
        settled = usedMemory(server)
        keys = int(server.command("DBSIZE").strip(b":\r\n"))
        print(
            f"memory per 1,000 counters (7 figures each): {(settled - before) / 1024:,.0f} KiB settled ({keys} keys), "
            f"{(unsettled - before) / 1024:,.0f} KiB with one unsettled call each"
        )
        await store.stopService()
    finally:
        server.stop()


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
    concurrency = int(sys.argv[2]) if len(sys.argv) > 2 else 50
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    react(lambda reactor: Deferred.fromCoroutine(run(reactor, seconds, concurrency)))


if __name__ == "__main__":
    main()
