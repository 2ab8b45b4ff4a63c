"""
A compression bomb through the running daemon: relayed byte for byte, read for
usage only up to a bound, and the gateway stays responsive while it streams.
"""

from __future__ import annotations

import hashlib
import struct
import time
import zlib
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.daemon import pause, readRecords
from lmgate.relay.upstream import BytesProducer
from tests.test_daemon import PLAIN_KEY, DaemonTestCase


def gzipBomb(blocks: int) -> tuple[bytes, int]:
    """
    A gzip body of C{blocks} MiB (about) of C{data: x} SSE lines, built cheaply:
    each block is compressed once after a full flush, so its bytes repeat.
    Returns the body and its decoded length.
    """
    block = b"data: x\n\n" * 116508
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    first = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(block) + c.flush(zlib.Z_FULL_FLUSH)
    crc = 0
    for _ in range(blocks):
        crc = zlib.crc32(block, crc)
    size = len(block) * blocks
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush()  # an empty final block
    return first + again * (blocks - 1) + end + struct.pack("<II", crc, size & 0xFFFFFFFF), size


class BombUpstream(Resource):
    """Answers any request with the bomb, as an SSE stream, in slices over a few seconds."""

    isLeaf = True

    def __init__(self, body: bytes, slice: int, interval: float) -> None:
        super().__init__()
        self.body, self.slice, self.interval = body, slice, interval

    def render(self, request: Request) -> Any:
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"content-encoding", b"gzip")
        self._send(request, 0)
        return NOT_DONE_YET

    def _send(self, request: Request, at: int) -> None:
        if request.finished or request._disconnected:
            return
        request.write(self.body[at : at + self.slice])
        if at + self.slice >= len(self.body):
            request.finish()
        else:
            reactor.callLater(self.interval, self._send, request, at + self.slice)  # type: ignore[attr-defined]


class Digest(Protocol):
    """Hashes a response body as it arrives; C{done} fires with how it ended."""

    def __init__(self) -> None:
        self.sha, self.size = hashlib.sha256(), 0
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason
        self.done.callback(None)  # not callback(reason): a Failure there goes down the errbacks


class CompressionBombTests(DaemonTestCase):
    async def test_gzipBombStaysResponsive(self) -> None:
        """A gzip SSE stream inflating to 1 GB is relayed byte for byte; its usage is read only up
        to the bound (the record says "truncated"), and /healthz answers within 2.5 s
        throughout (measured: before the bound, each wire chunk held the reactor for seconds)."""
        bomb, decoded = gzipBomb(1000)
        self.assertGreater(decoded, 1_000_000_000)
        upstream = reactor.listenTCP(  # type: ignore[attr-defined]
            0, Site(BombUpstream(bomb, 32 * 1024, 0.05)), interface="127.0.0.1"
        )
        self.addCleanup(upstream.stopListening)
        self.stubURL = f"http://127.0.0.1:{upstream.getHost().port}"
        daemon = await self.startDaemon()

        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, pool=pool)
        response = await agent.request(
            b"POST",
            (self.base + "/openai/v1/chat/completions").encode(),
            Headers({b"authorization": [b"Bearer " + PLAIN_KEY.encode()], b"content-type": [b"application/json"]}),
            BytesProducer(b'{"model": "gpt-4o-mini", "stream": true}'),
        )
        self.assertEqual(response.code, 200)
        body = Digest()
        response.deliverBody(body)

        latencies: list[float] = []
        for _ in range(600):  # the stream lasts about 3 s; bounded in case it never ends
            if body.done.called:
                break
            started = time.monotonic()
            health = await agent.request(b"GET", (self.base + "/healthz").encode())
            self.assertEqual(await readBody(health), b"ok")
            latencies.append(time.monotonic() - started)
            await pause(0.05)
        await body.done
        assert body.reason is not None
        self.assertTrue(body.reason.check(ResponseDone), body.reason)
        self.assertEqual((body.size, body.sha.hexdigest()), (len(bomb), hashlib.sha256(bomb).hexdigest()))
        self.assertGreaterEqual(len(latencies), 5)
        # Unbounded, each took 25-31 s; the bound leaves room for a loaded CI machine
        # (a single check took 1.2 s with four test suites sharing two cores).
        self.assertLess(max(latencies), 2.5, latencies)

        self.assertEqual(await daemon.stop(), 0)
        [record] = readRecords(self.statsPath)
        self.assertEqual(
            (record["status"], record["error"], record["usage_source"], record["response_bytes"], record["input_tokens"]),
            (200, None, "truncated", len(bomb), None),
        )
