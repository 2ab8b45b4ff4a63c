"""
Concurrent SSE streams against one URL, for bench/run: time to first byte, each
event's relay delay, or simply many streams held open (memory per stream).

    python bench/streams.py URL N [--repeat R] [--events E] [--interval-ms I]
                            [--phase random] [--key KEY] [--ready-file PATH] [--dump PATH]

N streams are connected first, then all N requests are written at once (so
connection set-up is not part of the figures). For each stream:

- TTFB: from writing the request to the first body byte after the response head;
- event delay: for every event carrying a send stamp (bench/tsupstream.py puts
  C{"t": monotonic_ns} in each), arrival time minus the stamp. Both processes
  read CLOCK_MONOTONIC on the same machine, so the difference is exact.

With C{--repeat R} the N-stream batch is run R times one after another (R single
streams: TTFB of one stream on a warm relay, the median of R). With
C{--ready-file}, the file is written once every stream has its first body byte
(every stream is open and flowing): bench/run samples the relay's memory then.

Prints one JSON object: ttfb_ms / event_delay_ms p50 and p99, counts.
The request carries the stub's and tsupstream's shaping headers, so one client
serves both upstreams; relays pass them on untouched.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import time
from urllib.parse import urlsplit

DUMP: list[tuple[int, int]] = []  # (send stamp, arrival) of every event, for --dump
STAMP = re.compile(rb'"t": ?(\d+)')
BODY = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Count to twenty."}]}'


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))]


class Stream:
    """One streaming request over its own connection (Connection: close)."""

    def __init__(self, url: str, args: argparse.Namespace) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.args = parts.hostname or "127.0.0.1", parts.port or 80, args
        phase = "x-phase: random\r\n" if args.phase == "random" else ""
        self.request = (
            f"POST {parts.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nAuthorization: Bearer {args.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n"
            f"x-events: {args.events}\r\nx-interval-ms: {args.interval_ms}\r\n{phase}"
            f"x-lmgate-stub-events: {args.events}\r\nx-lmgate-stub-delay-ms: {args.interval_ms}\r\n"
            "Connection: close\r\n\r\n"
        ).encode() + BODY
        self.ttfb: float | None = None
        self.delays: list[float] = []
        self.complete = False
        self.status = 0

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def run(self, firstByte: asyncio.Event | None, counter: list[int]) -> None:
        start = time.monotonic_ns()
        self.writer.write(self.request)
        head, tail = b"", b""  # the response head until complete; then the body's last bytes
        inBody = False
        budget = self.args.events * self.args.interval_ms / 1000 + 60
        deadline = time.monotonic() + budget
        try:
            while time.monotonic() < deadline:
                chunk = await asyncio.wait_for(self.reader.read(65536), timeout=max(0.1, deadline - time.monotonic()))
                now = time.monotonic_ns()
                if not chunk:
                    break
                if not inBody:
                    head += chunk
                    end = head.find(b"\r\n\r\n")
                    if end < 0:
                        continue
                    inBody, chunk = True, head[end + 4 :]
                    self.status = int(head[9:12])
                    if not chunk:
                        continue
                if self.ttfb is None:
                    self.ttfb = (now - start) / 1e6
                    counter[0] -= 1
                    if counter[0] == 0 and firstByte is not None:
                        firstByte.set()
                for match in STAMP.finditer(chunk):
                    self.delays.append((now - int(match.group(1))) / 1e6)
                    if self.args.dump:
                        DUMP.append((int(match.group(1)), now))
                tail = (tail + chunk)[-64:]
                if tail.endswith(b"\r\n0\r\n\r\n"):  # the chunked terminator: the stream is complete
                    break
            # complete: the chunked terminator, or (unframed, closed) the last event
            self.complete = self.status == 200 and (tail.endswith(b"\r\n0\r\n\r\n") or tail.rstrip().endswith(b"[DONE]"))
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            self.writer.close()


async def batch(args: argparse.Namespace) -> list[Stream]:
    streams = [Stream(args.url, args) for _ in range(args.n)]
    connected = await asyncio.gather(*(s.connect() for s in streams), return_exceptions=True)
    streams = [s for s, c in zip(streams, connected) if c is None]
    counter = [len(streams)]
    firstByte = asyncio.Event()
    if args.ready_file:

        async def ready() -> None:
            await firstByte.wait()
            with open(args.ready_file, "w") as f:
                f.write("ready\n")

        asyncio.ensure_future(ready())
    await asyncio.gather(*(s.run(firstByte, counter) for s in streams))
    return streams


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("n", type=int)
    parser.add_argument("--repeat", type=int, default=1, help="run the batch this many times, one after another")
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--interval-ms", type=int, default=50)
    parser.add_argument("--phase", choices=["lockstep", "random"], default="lockstep")
    parser.add_argument("--key", default="bench-key")
    parser.add_argument("--ready-file", default=None)
    parser.add_argument("--dump", default=None, help="write each event's send stamp and arrival (ns) to this file")
    args = parser.parse_args()
    done: list[Stream] = []
    for _ in range(max(1, min(args.repeat, 1000))):
        done += await batch(args)
    ttfbs = [s.ttfb for s in done if s.ttfb is not None]
    delays = [d for s in done for d in s.delays]
    print(json.dumps({
        "streams": args.n * args.repeat, "completed": sum(s.complete for s in done), "events": len(delays),
        "ttfb_ms_p50": percentile(ttfbs, 50), "ttfb_ms_p99": percentile(ttfbs, 99),
        "event_delay_ms_p50": percentile(delays, 50), "event_delay_ms_p99": percentile(delays, 99),
        "event_delay_ms_max": max(delays) if delays else None,
    }))
    if args.dump:
        with open(args.dump, "w") as f:
            f.writelines(f"{sent} {arrived}\n" for sent, arrived in DUMP)


if __name__ == "__main__":
    asyncio.run(main())
