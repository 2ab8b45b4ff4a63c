"""
What reaches the upstream: the request line it sees for each route shape, and
credentials LMGate did not check, which never reach it (nor the access log).
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.daemon import inThread, readRecords
from tests.helpers import ALLOWED_KEY, FakeUpstream, call, startGateway
from tests.test_abuse import exchange, status
from tests.test_daemon import PLAIN_KEY, DaemonTestCase

OTHER_KEY = "sk-smuggled-0000000000000000Zz99"


class _RequestLines(Protocol):
    """A bare HTTP/1.1 upstream: notes each request's first line, answers C{{}}."""

    def __init__(self, lines: list[bytes]) -> None:
        self.lines, self.buffer = lines, b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:  # bodiless GETs only
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.lines.append(head.split(b"\r\n", 1)[0])
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")


class RequestLineTests(DaemonTestCase):
    """Through the running daemon, on every route shape, the upstream sees the path and
    the query the client sent, under the base path: a query never becomes a path."""

    def setUp(self) -> None:
        super().setUp()
        self.lines: list[bytes] = []
        factory = Factory.forProtocol(lambda: _RequestLines(self.lines))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.rawURL = f"http://127.0.0.1:{port.getHost().port}"

    def config(self, **extra: str) -> str:
        routes = {"openai": "", "rootslash": "/", "based": "/base", "slashed": "/base/"}
        lines = [
            f'listen: "tcp:{self.port}:interface=127.0.0.1"',
            f"allowlist: {{path: {self.allowlistPath}}}",
            f"stats: {{path: {self.statsPath}, flush_interval: 0.2}}",
            "providers:",
        ]
        for name, basePath in routes.items():
            lines.append(f"  {name}: {{upstream: '{self.rawURL}{basePath}', format: openai}}")
        return "\n".join(lines) + "\n"

    async def test_queryStaysTheQuery(self) -> None:
        daemon = await self.startDaemon()
        auth = f"Authorization: Bearer {PLAIN_KEY}\r\n".encode()
        bare = [b"/", b"/", b"/?x", b"/?x", b"/v1/x?y", b"/?/../../etc/passwd", b"/?x=1"]
        based = [b"/base", b"/base/", b"/base?x", b"/base/?x", b"/base/v1/x?y", b"/base?/../../etc/passwd", b"/base?x=1"]
        expected = {"openai": bare, "rootslash": bare, "based": based, "slashed": based}
        shapes = [b"", b"/", b"?x", b"/?x", b"/v1/x?y", b"?/../../etc/passwd", b"?x=1"]
        sent = []
        for route, lines in expected.items():
            for shape, line in zip(shapes, lines):
                target = b"/" + route.encode() + shape
                request = b"GET " + target + b" HTTP/1.1\r\nHost: g\r\n" + auth + b"Connection: close\r\n\r\n"
                answer = await inThread(exchange, self.port, request)
                self.assertEqual(status(answer), 200, (target, answer[:200]))
                self.assertEqual(self.lines[-1], b"GET " + line + b" HTTP/1.1", target)
                sent.append(target)
        self.assertEqual(await daemon.stop(), 0)
        records = readRecords(self.statsPath)
        self.assertEqual([r["endpoint"] for r in records], [t.partition(b"?")[0].decode() for t in sent])


class UncheckedCredentialTests(TestCase):
    """In process: a second credential in a form LMGate does not check is refused in the
    provider's shape and recorded; the upstream never sees it."""

    async def test_refusedInTheProvidersShape(self) -> None:
        from tests.test_relay import _Lines

        lines = _Lines()
        gate = startGateway(self, FakeUpstream(), accessLog=lines)
        auth = {b"Authorization": [b"Bearer " + ALLOWED_KEY]}
        cases: list[tuple[str, str, dict[bytes, list[bytes]]]] = [
            ("openai", "/openai/v1/chat/completions?access_token=" + OTHER_KEY, auth),
            ("openai", "/openai/v1/chat/completions?k%65y=" + OTHER_KEY, auth),
            ("anthropic", "/anthropic/v1/messages", {**auth, b"x_api_key": [OTHER_KEY.encode()]}),
            ("gemini", "/gemini/v1beta/models/g:generateContent?alt=sse&API%5Fkey=" + OTHER_KEY, auth),
            ("bedrock", "/bedrock/model/m/converse?X-Amz-Signature=" + OTHER_KEY, auth),
        ]
        for route, path, headers in cases:
            response, body, _ = await call(self, gate.url + path, headers=headers)
            self.assertEqual(response.code, 403, path)
            answer = json.loads(body)
            message = {"openai": lambda: answer["error"]["message"], "anthropic": lambda: answer["error"]["message"],
                       "gemini": lambda: answer["error"]["message"], "bedrock": lambda: answer["message"]}[route]()
            self.assertTrue("does not check" in message or "two different" in message, message)
            self.assertNotIn(OTHER_KEY, message)
        self.assertEqual(gate.upstream.seen, [])
        self.assertEqual([(r.status, r.error) for r in gate.sink.records], [(403, "forbidden")] * len(cases))
        self.assertEqual(len(lines.lines), len(cases))
        for line in lines.lines:
            self.assertNotIn(OTHER_KEY.encode(), line)


class AccessLogTests(DaemonTestCase):
    """Through the running daemon: no key material reaches access.log, whatever the
    credential parameter is called, and smuggled credentials never reach the upstream."""

    async def test_noKeyMaterialInTheAccessLog(self) -> None:
        daemon = await self.startDaemon()
        auth = f"Authorization: Bearer {PLAIN_KEY}\r\n".encode()
        gemini = b"/gemini/v1beta/models/gemini-2.0-flash:generateContent"
        body = b'{"contents":[{"parts":[{"text":"hi"}]}]}'

        def post(target: bytes, headers: bytes = b"") -> bytes:
            return (
                b"POST " + target + b" HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n" + headers
                + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body
            )

        key, other = PLAIN_KEY.encode(), OTHER_KEY.encode()
        cases = [
            (post(gemini + b"?key=" + key), 200),
            (post(gemini + b"?k%65y=" + key), 200),  # key to any server: read, checked, masked
            (post(gemini + b"?alt=sse;KEY=" + key, auth), 403),
            (post(gemini + b"?access_token=" + other, auth), 403),
            (post(gemini + b"?k%65y=" + other, auth), 403),
            (post(gemini + b"?%61ccess%5Ftoken=" + other, auth), 403),
            (post(gemini + b"?X-Amz-Credential=" + other + b"&X-Amz-Signature=" + other, auth), 403),
            (post(gemini, auth + b"x_api_key: " + other + b"\r\n"), 403),
            (post(gemini, auth + b"X-Goog_Api-Key: " + key + b"\r\n"), 403),
            (post(b"/openai/v1/chat/completions?api-key=" + other, auth), 403),
            # a browser app's page URL, sent as the Referer, may carry a key too
            (post(gemini + b"?key=" + key, b"Referer: https://app.example/chat?k%65y=" + other + b"&tab=1\r\n"), 200),
        ]
        for request, code in cases:
            answer = await inThread(exchange, self.port, request)
            self.assertEqual(status(answer), code, (request[:120], answer[:300]))
        self.assertEqual(self.stub.count, 3)
        self.assertEqual(await daemon.stop(), 0)
        with open(os.path.join(os.path.dirname(self.statsPath), "access.log"), "rb") as f:
            log = f.read()
        self.assertIn(b'"https://app.example/chat?k%65y=', log)  # the Referer is kept, its key masked
        self.assertIn(b"&tab=1", log)
        self.assertEqual(len([line for line in log.splitlines() if b"/healthz" not in line]), len(cases))
        self.assertNotIn(key, log)
        self.assertNotIn(other, log)
        self.assertNotIn(key[4:-4], log)
        records: list[dict[str, Any]] = readRecords(self.statsPath)
        self.assertEqual([r["status"] for r in records], [code for _, code in cases])
        self.assertEqual({r["error"] for r in records[2:-1]}, {"forbidden"})
