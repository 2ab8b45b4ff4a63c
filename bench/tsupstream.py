"""
An SSE upstream that stamps each event with its send time (CLOCK_MONOTONIC,
shared by every process on the machine), so a client can compute each event's
relay delay exactly: its arrival time minus the stamp.

    python bench/tsupstream.py PORT

Request headers:
  x-events       events in the stream (default 20)
  x-interval-ms  time between events (default 50)
  x-phase        "random": the first event waits a random part of an interval
                 more, so concurrent streams send at spread-out times (as real
                 streams do); absent: every stream sends in lockstep (a burst of
                 one event per stream each interval: the worst case for a relay)

Events look like OpenAI chat chunks, so LMGate's SSE usage reader reads them as
it would a provider's; the stream ends with C{data: [DONE]}.
"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import time

HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"x-request-id: req_ts\r\nTransfer-Encoding: chunked\r\n\r\n"
)
EVENT = b'data: {"id":"chatcmpl-ts","object":"chat.completion.chunk","model":"ts","t": %d,"choices":[{"index":0,"delta":{"content":"word "}}]}\n\n'
DONE = b"data: [DONE]\n\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:  # keep-alive: relays reuse their upstream connections
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                if b":" in line:
                    k, v = line.split(b":", 1)
                    headers[k.strip().lower()] = v.strip()
            length = int(headers.get(b"content-length", b"0"))
            if length:
                await reader.readexactly(length)
            events = min(int(headers.get(b"x-events", b"20")), 100000)
            interval = int(headers.get(b"x-interval-ms", b"50")) / 1000
            writer.write(HEAD)
            if headers.get(b"x-phase") == b"random":
                await asyncio.sleep(random.uniform(0, interval))
            for _ in range(events):
                await asyncio.sleep(interval)
                writer.write(chunk(EVENT % time.monotonic_ns()))
                await writer.drain()
            writer.write(chunk(DONE) + b"0\r\n\r\n")
            await writer.drain()
            if headers.get(b"connection", b"").lower() == b"close":
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
