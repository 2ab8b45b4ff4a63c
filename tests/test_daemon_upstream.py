"""
The running daemon (C{twistd -n lmgate}) against upstreams that misbehave
before or while answering: a resolver that cannot load its codec, and a raw
socket upstream on loopback sending hostile response heads.
"""

from __future__ import annotations

import json
import os

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from lmgate.relay.upstream import UPSTREAM_HEADER_BYTES
from tests.daemon import PROJECT, Daemon, inThread, readRecords
from tests.test_abuse import AUTH, exchange
from tests.test_daemon import DaemonTestCase

#: A head with a bare CR in its status line, a NUL in a value, a named hop-by-hop header,
#: a header line of 200 KiB and a head one byte over the limit, by path (/openai/N).
_STATUS, _END = b"HTTP/1.1 200 OK\r\n", b"Content-Length: 2\r\n\r\n"
_BIG = b"v" * (UPSTREAM_HEADER_BYTES - len(_STATUS) - len(_END) - len(b"X-Big: \r\n"))
ANSWERS = [
    b"HTTP/1.1 200 OK\rSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: secret\r\nX-Keep: 1\r\nContent-Length: 2\r\n\r\nok",
    _STATUS + b"X-Big: " + _BIG + b"\r\n" + _END + b"ok",
    _STATUS + b"X-Big: v" + _BIG + b"\r\n" + _END + b"ok",
]


class _Raw(Protocol):
    def dataReceived(self, data: bytes) -> None:
        if b"\r\n\r\n" in data:
            index = int(data.split(b" ", 2)[1].rsplit(b"/", 1)[1])
            self.transport.write(ANSWERS[index])
            self.transport.loseConnection()


def _split(answer: bytes) -> tuple[int, bytes, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, body


class DaemonUpstreamTests(DaemonTestCase):
    async def test_hostileHeads(self) -> None:
        """Control bytes in the head are a 502 with an C{upstream_malformed} record, a named
        hop-by-hop header is dropped, a head of exactly 256 KiB (one 256 KiB line) is relayed
        whole and one byte more is a 502."""
        port = reactor.listenTCP(0, Factory.forProtocol(_Raw), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.stubURL = f"http://127.0.0.1:{port.getHost().port}"
        daemon = await self.startDaemon()
        answers = []
        for index in range(len(ANSWERS)):
            request = b"GET /openai/%d HTTP/1.1\r\nHost: g\r\n%sConnection: close\r\n\r\n" % (index, AUTH)
            answers.append(_split(await inThread(exchange, self.port, request)))
        for index in (0, 1, 4):
            status, head, body = answers[index]
            self.assertEqual((status, json.loads(body)["error"]["code"]), (502, "upstream_unreachable"), index)
            self.assertNotIn(b"injected", head)
            self.assertNotIn(b"\x00", head)
        status, head, body = answers[2]
        self.assertEqual((status, body), (200, b"ok"))
        self.assertIn(b"\r\nx-keep: 1", head.lower())
        self.assertNotIn(b"x-hop", head.lower())
        status, head, body = answers[3]
        self.assertEqual((status, body), (200, b"ok"))
        self.assertIn(b"\r\nX-Big: " + _BIG + b"\r\n", head + b"\r\n")
        self.assertEqual(await daemon.stop(), 0)
        records = sorted(readRecords(self.statsPath), key=lambda r: r["endpoint"])
        self.assertEqual(
            [(r["endpoint"], r["status"], r["error"]) for r in records],
            [
                ("/openai/0", 502, "upstream_malformed"),
                ("/openai/1", 502, "upstream_malformed"),
                ("/openai/2", 200, None),
                ("/openai/3", 200, None),
                ("/openai/4", 502, "upstream_malformed"),
            ],
        )

    async def test_resolverWithoutItsCodec(self) -> None:
        """The resolver cannot load the idna codec (getaddrinfo raises LookupError): the call is
        answered 502 at once (not 504 after C{timeouts.response}), one record, no unhandled error."""
        site = os.path.abspath(self.mktemp())
        os.makedirs(site)
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write('import sys\nsys.modules["encodings.idna"] = None  # the codec cannot be loaded\n')
        daemon = Daemon(self, self.config() + "timeouts: {response: 60}\n", self.directory)
        daemon.env["PYTHONPATH"] = site + os.pathsep + PROJECT
        daemon.start()
        await daemon.waitUntilHealthy(self.port)
        request = b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: g\r\n%sContent-Length: 2\r\nConnection: close\r\n\r\n{}" % AUTH
        status, _, body = _split(await inThread(exchange, self.port, request, 0, 30))
        self.assertEqual((status, json.loads(body)["error"]["code"]), (502, "upstream_unreachable"))
        self.assertEqual(await daemon.stop(), 0)
        [record] = readRecords(self.statsPath)
        self.assertEqual((record["status"], record["error"]), (502, "upstream_unreachable"))
        self.assertNotIn(b"Unhandled error", daemon.watch.output)
        self.assertIn(b"unknown encoding: idna", daemon.watch.output)
