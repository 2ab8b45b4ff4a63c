"""
Hostile clients against the running daemon, over raw sockets: request smuggling
attempts, path escapes, slow clients and bad edits, each with its documented
outcome and nothing reaching the upstream.
"""

from __future__ import annotations

import os
import socket
import time

from tests.daemon import freePort, inThread, pause, readRecords
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




def _readToEnd(s: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """What the server sends until it closes (True) or the deadline passes (False)."""
    chunks = []
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return b"".join(chunks), True
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
    return b"".join(chunks), False


def _spoolFiles(pid: int) -> list[str]:
    """The deleted (temporary) files a process holds open: twisted.web's request-body spools."""
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return [link for link in links if link.endswith("(deleted)")]


def refusedUpload(port: int, pid: int, head: bytes, body: bytes) -> tuple[bytes, bool, list[str]]:
    """Send a head and part of its body; the answer, whether the server closed, and its spool files then."""
    with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
        s.sendall(head)
        try:
            s.sendall(body)
        except OSError:
            pass
        answer, closed = _readToEnd(s, time.monotonic() + 5)
        return answer, closed, _spoolFiles(pid)


def expectContinue(port: int, head: bytes, body: bytes) -> tuple[bytes, bytes]:
    """Send a head with C{Expect: 100-continue}, wait for the interim answer, send the body."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(head)
        interim = b""
        while not interim.endswith(b"\r\n\r\n"):
            chunk = s.recv(1)
            if not chunk:
                break
            interim += chunk
        s.sendall(body)
        answer, _ = _readToEnd(s, time.monotonic() + 5)
        return interim, answer


def trickle(port: int, data: bytes, interval: float) -> tuple[bytes, float]:
    """Send C{data} a byte every C{interval} seconds until the server answers; the answer and when."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=interval) as s:
        for byte in data:
            try:
                s.sendall(bytes([byte]))
                answer = s.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return b"", time.monotonic() - started
            return answer, time.monotonic() - started
    return b"", time.monotonic() - started


def idleConnections(port: int, count: int) -> list[bytes]:
    """Open C{count} connections that send nothing; what each got before it was closed."""
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]
    try:
        return [_readToEnd(s, time.monotonic() + 5)[0] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class HeadersCompleteTests(DaemonTestCase):
    """Through the running daemon: route and key are decided when the headers are complete,
    and the channel's own refusals are counted, logged at a bounded rate and in the access log."""

    def config(self, **extra: str) -> str:
        self.admin = freePort()
        return super().config(**extra) + (
            "limits: {header_timeout: 1}\n" f'admin: {{listen: "tcp:{self.admin}:interface=127.0.0.1"}}\n'
        )

    async def test_refusedBodyNeverRead(self) -> None:
        """No key, or an unknown one, with a 32 MiB body announced: 403 at once, no C{100 Continue},
        the connection closed, nothing spooled; one record each, its access line too."""
        daemon = await self.startDaemon()
        pid = daemon.process.pid
        target = b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Length: 33554432\r\n"
        for head in (target + b"Expect: 100-continue\r\n\r\n", target + b"Authorization: Bearer sk-unknown-000000000000\r\n\r\n"):
            answer, closed, spools = await inThread(refusedUpload, self.port, pid, head, b'{"model": "gpt-4o", ' + b" " * 262144)
            self.assertEqual(status(answer), 403, answer[:300])
            self.assertNotIn(b"100 Continue", answer)
            self.assertTrue(closed)
            self.assertEqual(spools, [])
        interim, answer = await inThread(
            expectContinue, self.port,
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: g\r\nConnection: close\r\n" + AUTH
            + b"Content-Length: 28\r\nExpect: 100-continue\r\n\r\n", b'{"model":"m","messages":[]}\n',
        )
        self.assertEqual(interim, b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(status(answer), 200)
        self.assertEqual(self.stub.count, 1)
        self.assertEqual(await daemon.stop(), 0)
        records = readRecords(self.statsPath)
        self.assertEqual([(r["status"], r["error"]) for r in records], [(403, "forbidden"), (403, "forbidden"), (200, None)])
        self.assertEqual(records[2]["request_bytes"], 28)
        self.assertTrue(all(r["response_bytes"] > 0 for r in records))
        with open(os.path.join(os.path.dirname(self.statsPath), "access.log")) as f:
            self.assertEqual([line.split('" ')[2].split()[0] for line in f], ["200", "403", "403", "200"])  # healthz first

    async def test_trickledAndSilentClients(self) -> None:
        """A request line trickled byte by byte gets 408 at the header deadline; silent connections too;
        each refusal is counted by reason and has an access line; the log stays short."""
        import treq
        from prometheus_client.parser import text_string_to_metric_families

        daemon = await self.startDaemon()
        answer, elapsed = await inThread(trickle, self.port, b"GET /openai/v1/models HTTP/1.1\r\n", 0.3)
        self.assertEqual(status(answer), 408, answer)
        self.assertLess(elapsed, 5)
        answers = await inThread(idleConnections, self.port, 30)
        self.assertEqual([status(a) for a in answers], [408] * 30)
        r = await treq.get(f"http://127.0.0.1:{self.admin}/metrics", persistent=False)
        text = await r.text()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        self.assertEqual(samples[("lmgate_client_refusals_total", (("reason", "header_timeout"),))], 31)
        self.assertEqual(await daemon.stop(), 0)
        self.assertLessEqual(daemon.watch.output.count(b"Refused a request"), 10)
        self.assertNotIn(b"Timing out client", daemon.watch.output)
        with open(os.path.join(os.path.dirname(self.statsPath), "access.log")) as f:
            lines = f.readlines()
        self.assertEqual(sum(1 for line in lines if '" 408 ' in line), 31)
        self.assertEqual(sum(1 for line in lines if '"- - -" 408' in line), 31)  # no request line ever completed
        self.assertEqual(readRecords(self.statsPath), [])  # not calls: no usage record
