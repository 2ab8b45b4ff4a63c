"""
A small load generator for when wrk cannot be installed (bench/run falls back
to it, in --smoke only): C keep-alive connections POSTing for D seconds.

    python bench/pyload.py URL --connections C --duration D [--header 'Name: value' ...] [--body JSON]

Prints one JSON object in wrk's terms: requests (responses completed), rps,
non2xx, errors, p50_ms/p99_ms. Much slower than wrk: its RPS says nothing about
the relay, only that the requests went through.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from urllib.parse import urlsplit


async def connection(args: argparse.Namespace, request: bytes, stop: float, out: dict[str, list[float] | int]) -> None:
    parts = urlsplit(args.url)
    try:
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
    except OSError:
        out["errors"] += 1  # type: ignore[operator]
        return
    try:
        for _ in range(10_000_000):  # bounded; the clock ends it first
            if time.monotonic() >= stop:
                break
            start = time.monotonic()
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            status = int(head[9:12])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:])}
            if b"content-length" in headers:
                await reader.readexactly(int(headers[b"content-length"]))
            elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            out["latencies"].append((time.monotonic() - start) * 1000)  # type: ignore[union-attr]
            if not 200 <= status < 400:
                out["non2xx"] += 1  # type: ignore[operator]
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
        out["errors"] += 1  # type: ignore[operator]
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--body", default='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}')
    args = parser.parse_args()
    parts = urlsplit(args.url)
    body = args.body.encode()
    head = f"POST {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nContent-Type: application/json\r\n"
    head += "".join(f"{h}\r\n" for h in args.header) + f"Content-Length: {len(body)}\r\n\r\n"
    out: dict[str, list[float] | int] = {"latencies": [], "non2xx": 0, "errors": 0}
    started = time.monotonic()
    stop = started + args.duration
    await asyncio.gather(*(connection(args, head.encode() + body, stop, out) for _ in range(args.connections)))
    elapsed = time.monotonic() - started
    latencies = sorted(out["latencies"])  # type: ignore[type-var]

    def pct(p: float) -> float | None:
        return latencies[max(0, math.ceil(p / 100 * len(latencies)) - 1)] if latencies else None

    print(json.dumps({"requests": len(latencies), "rps": len(latencies) / elapsed, "non2xx": out["non2xx"],
                      "errors": out["errors"], "p50_ms": pct(50), "p99_ms": pct(99)}))


if __name__ == "__main__":
    asyncio.run(main())
