"""
Concurrent SSE streams against one URL: time to first byte and each event's
relay delay (arrival minus the send stamp put in by tsupstream.py), or just
holding N streams open (for memory per stream).

    python bench/streams.py URL N [--events E] [--interval-ms I] [--hold SECONDS] [--key KEY]

Prints one JSON object: ttfb_ms p50/p99, event_delay_ms p50/p99, counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from urllib.parse import urlsplit

STAMP = re.compile(rb'"t": (\d+)')


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def one(url: str, key: str, events: int, interval: int, hold: float, ttfbs: list[float], delays: list[float], ok: list[int]) -> None:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    body = b'{"model":"bench","stream":true,"messages":[]}'
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.hostname}\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nx-events: {events}\r\n"
        f"x-interval-ms: {interval}\r\nx-lmgate-stub-events: {events}\r\nx-lmgate-stub-delay-ms: {interval}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    start = time.monotonic_ns()
    writer.write(request)
    first = True
    buffer = b""
    deadline = time.monotonic() + max(hold, events * interval / 1000) + 30
    try:
        while time.monotonic() < deadline:
            chunk = await asyncio.wait_for(reader.read(65536), timeout=max(1.0, deadline - time.monotonic()))
            now = time.monotonic_ns()
            if not chunk:
                break
            if first and b"\r\n\r\n" in (buffer + chunk):
                pass
            buffer += chunk
            head, sep, rest = buffer.partition(b"\r\n\r\n")
            if sep and first and STAMP.search(rest):
                ttfbs.append((now - start) / 1e6)
                first = False
            for match in STAMP.finditer(chunk):
                delays.append((now - int(match.group(1))) / 1e6)
            if len(buffer) > 1 << 20:
                buffer = buffer[-4096:]
            if b"0\r\n\r\n" in chunk[-7:] or b"[DONE]" in chunk:
                break
        ok.append(1)
    except (asyncio.TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("n", type=int)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--interval-ms", type=int, default=50)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--key", default="bench-key")
    args = parser.parse_args()
    ttfbs: list[float] = []
    delays: list[float] = []
    ok: list[int] = []
    await asyncio.gather(*(one(args.url, args.key, args.events, args.interval_ms, args.hold, ttfbs, delays, ok) for _ in range(args.n)))
    print(json.dumps({
        "streams": args.n, "completed": len(ok), "events": len(delays),
        "ttfb_ms_p50": percentile(ttfbs, 50), "ttfb_ms_p99": percentile(ttfbs, 99),
        "event_delay_ms_p50": percentile(delays, 50), "event_delay_ms_p99": percentile(delays, 99),
    }))


if __name__ == "__main__":
    asyncio.run(main())
