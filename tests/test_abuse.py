"""
Hostile clients against the running daemon, over raw sockets: request smuggling
attempts, path escapes, slow clients and bad edits, each with its documented
outcome and nothing reaching the upstream.
"""

from __future__ import annotations

import socket
import time

from tests.daemon import inThread, pause, readRecords
from tests.test_daemon import PLAIN_KEY, DaemonTestCase

AUTH = f"Authorization: Bearer {PLAIN_KEY}\r\n".encode()


def exchange(port: int, data: bytes, pauseAfter: float = 0.0, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes (bounded by C{timeout})."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if pauseAfter:
            time.sleep(pauseAfter)  # a slow client, in a worker thread: the test's reactor never sleeps
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def status(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


class AbuseTests(DaemonTestCase):
    def config(self, **extra: str) -> str:
        return super().config(**extra) + "limits: {header_timeout: 1, client_timeout: 2, max_body: 1000, header_bytes: 8192}\n"

    async def test_smugglingAndEscapes(self) -> None:
        """Framing tricks and path escapes are refused (or the connection closed); the upstream sees none."""
        daemon = await self.startDaemon()
        cases: list[tuple[str, bytes, set[int | None]]] = [
            ("CL and TE", b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: g\r\n" + AUTH
             + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /openai/v1/models HTTP/1.1\r\nHost: g\r\n\r\n", {400}),
            ("two Content-Lengths", b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: g\r\n" + AUTH
             + b"Content-Length: 4\r\nContent-Length: 40\r\n\r\nabcd", {400}),
            ("bad Transfer-Encoding", b"POST /openai/v1/x HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Transfer-Encoding: xchunked\r\n\r\n", {400}),
            ("bad chunk size", b"POST /openai/v1/x HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n", {400, None}),
            ("space before colon", b"GET /openai/v1/models HTTP/1.1\r\nHost: g\r\nContent-Length : 5\r\n" + AUTH + b"\r\n", {400}),
            ("two Host lines", b"GET /openai/v1/models HTTP/1.1\r\nHost: g\r\nHost: evil\r\n" + AUTH + b"\r\n", {400}),
            ("encoded dot segments", b"GET /openai/%2e%2e/admin HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Connection: close\r\n\r\n", {400}),
            ("encoded slash escape", b"GET /openai/v1/..%2f..%2fadmin HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Connection: close\r\n\r\n", {400}),
            ("network-path target", b"GET //evil.example/openai/v1 HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Connection: close\r\n\r\n", {400}),
            ("absolute-form target", b"GET http://evil.example/openai/v1/models HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Connection: close\r\n\r\n", {400}),
            ("header flood", b"GET /openai/v1/models HTTP/1.1\r\nHost: g\r\n" + AUTH + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 100) for i in range(200)) + b"\r\n", {431}),
            ("body over the limit", b"POST /openai/v1/x HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Content-Length: 100000000\r\n\r\n", {413}),
        ]
        for name, data, expected in cases:
            answer = await inThread(exchange, self.port, data)
            self.assertIn(status(answer), expected, (name, answer[:200]))
        self.assertEqual(self.stub.count, 0)
        self.assertEqual(await daemon.stop(), 0)

    async def test_slowClients(self) -> None:
        """Slowloris headers get 408 after header_timeout; a stalled body gets 408 after client_timeout."""
        daemon = await self.startDaemon()
        answer = await inThread(exchange, self.port, b"GET /openai/v1/models HTTP/1.1\r\nHost: g\r\n", 0, 10)
        self.assertEqual(status(answer), 408)
        answer = await inThread(exchange, self.port, b"POST /openai/v1/x HTTP/1.1\r\nHost: g\r\n" + AUTH + b"Content-Length: 50\r\n\r\nab", 0, 10)
        self.assertEqual(status(answer), 408)
        self.assertEqual(self.stub.count, 0)
        await daemon.stop()

    async def test_malformedAllowListMidTraffic(self) -> None:
        """A bad edit to the allow-list while calls flow keeps the old list: no call fails."""
        import treq

        daemon = await self.startDaemon()
        headers = {"Authorization": f"Bearer {PLAIN_KEY}"}
        codes = []
        for n in range(20):
            if n == 5:
                with open(self.allowlistPath, "a") as f:
                    f.write("broken,,,\n")
            if n == 10:
                daemon.signal("HUP")
            r = await treq.get(self.base + "/openai/v1/models", headers=headers, persistent=False)
            await r.content()
            codes.append(r.code)
            await pause(0.03)
        self.assertEqual(codes, [200] * 20)
        self.assertEqual(await daemon.stop(), 0)
        self.assertEqual(len(readRecords(self.statsPath)), 20)
        self.assertIn(b"Keeping the previous allow-list", daemon.watch.output)

    async def test_sigtermUnderLoad(self) -> None:
        """SIGTERM while calls flow: every call that got an answer has exactly one complete record."""
        import treq

        daemon = await self.startDaemon()
        headers = {"Authorization": f"Bearer {PLAIN_KEY}"}
        answered = 0
        refused = 0

        async def one() -> None:
            nonlocal answered, refused
            try:
                r = await treq.post(self.base + "/openai/v1/chat/completions", b'{"model":"m","messages":[]}',
                                    headers=headers, persistent=False)
                await r.content()
                answered += 1
            except Exception:
                refused += 1

        from twisted.internet.defer import Deferred, gatherResults

        pending = [Deferred.fromCoroutine(one()) for _ in range(30)]
        await pause(0.05)
        daemon.signal("TERM")
        pending += [Deferred.fromCoroutine(one()) for _ in range(10)]
        await gatherResults(pending)
        self.assertEqual(await daemon.watch.ended, 0)
        records = readRecords(self.statsPath)
        self.assertEqual(len(records), answered)  # every call that reached routing, exactly once
        self.assertEqual(len({r["request_id"] for r in records}), len(records))
        self.assertEqual(answered + refused, 40)


