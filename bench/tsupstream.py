"""
An SSE upstream that stamps each event with its send time (CLOCK_MONOTONIC,
shared by every process on the machine), so a client can compute each event's
relay delay exactly: arrival time minus the stamp.

    python bench/tsupstream.py PORT

Request headers: x-events (default 20), x-interval-ms (default 50).
"""

from __future__ import annotations

import asyncio
import sys
import time


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {}
            for line in head.split(b"\r\n")[1:]:
                if b":" in line:
                    k, v = line.split(b":", 1)
                    headers[k.strip().lower()] = v.strip()
            length = int(headers.get(b"content-length", b"0"))
            if length:
                await reader.readexactly(length)
            events = int(headers.get(b"x-events", b"20"))
            interval = int(headers.get(b"x-interval-ms", b"50")) / 1000
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(events):
                await asyncio.sleep(interval)
                event = b'data: {"t": %d}\n\n' % time.monotonic_ns()
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
