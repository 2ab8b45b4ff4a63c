"""
The audit trail: its writer (mode 0600, rotation, disk full, backlog), and the
lines an audited call yields through a gateway on loopback (bodies bounded,
decoded, reassembled; credentials redacted; nothing for a call not audited).
"""

from __future__ import annotations

import base64
import errno
import gzip
import json
import os
import stat
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.server import Request

from lmgate.config import Settings
from lmgate.daemon.assemble import AUDIT_MODE, auditFor, auditWanted
from lmgate.gate.admission import CallContext, Pipeline
from lmgate.gate.gateway import KEEP_BODY_LIMIT
from lmgate.policy.settings import AuditSettings, PluginSettings, PolicyRule, PolicySettings, parseAudit
from lmgate.records import jsonl
from lmgate.records.audit import REDACTED, AuditTrail, BodyCapture, redactedHeaders, reassembled
from lmgate.records.jsonl import UsageLog, checkStatsPath, synchronously
from lmgate.usage.eventstream import event
from tests.helpers import AUTH, FakeUpstream, Running, call, jsonAnswer, startGateway
from tests.test_jsonl import BEFORE_MIDNIGHT

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CHAT = "/openai/v1/chat/completions"


def fixture(name: str) -> bytes:
    with open(os.path.join(FIXTURES, name), "rb") as f:
        return f.read()


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class AuditWriterTests(SynchronousTestCase):
    """The audit log is the records' writer with exact permissions."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "audit.jsonl")
        self.clock = Clock()
        self.clock.advance(BEFORE_MIDNIGHT - 3600)
        saved = os.umask(0)  # nothing but the writer's mode decides
        self.addCleanup(os.umask, saved)

    def writer(self, **kwargs: Any) -> UsageLog:
        log = UsageLog(self.path, self.clock, runInThread=synchronously, mode=AUDIT_MODE, what="audit lines", **kwargs)
        log.startService()
        self.addCleanup(lambda: log.running and log.stopService())
        return log

    def test_createdOwnerOnly(self) -> None:
        """The file is created 0600 (even with a umask of 0)."""
        log = self.writer()
        log.writeLine(b'{"n":1}\n')
        self.clock.advance(1)
        self.assertEqual(mode(self.path), 0o600)

    def test_looseFileTightened(self) -> None:
        """A file found readable by others (made by hand) is set back to 0600 before lines go in."""
        with open(self.path, "wb"):
            pass
        os.chmod(self.path, 0o644)
        log = self.writer()
        log.writeLine(b'{"n":1}\n')
        self.clock.advance(1)
        self.assertEqual(mode(self.path), 0o600)

    def test_rotatedFilesKeepTheMode(self) -> None:
        """Rotated by size and by day, every file (the rotated ones and the new one) is 0600."""
        log = self.writer(maxBytes=20)
        for n in range(3):
            log.writeLine(b'{"n":%d,"pad":"xxx"}\n' % n)
            self.clock.advance(1)
        self.clock.advance(7200)  # past midnight
        log.writeLine(b'{"n":9}\n')
        self.clock.advance(1)
        names = sorted(os.listdir(self.directory))
        self.assertGreater(len(names), 2)
        for name in names:
            self.assertEqual(mode(os.path.join(self.directory, name)), 0o600, name)

    def test_recordsWriterUnchanged(self) -> None:
        """Without a mode (the records), files are created 0640 and an existing file is left as it is."""
        log = UsageLog(self.path, self.clock, runInThread=synchronously)
        log.startService()
        self.addCleanup(log.stopService)
        log.writeLine(b"{}\n")
        self.clock.advance(1)
        self.assertEqual(mode(self.path), 0o640)
        os.chmod(self.path, 0o644)
        log.writeLine(b"{}\n")
        self.clock.advance(1)
        self.assertEqual(mode(self.path), 0o644)

    def test_diskFullThenRecovery(self) -> None:
        """Disk full: no partial line, the lines wait in order and are written once there is room."""
        log = self.writer()
        real = jsonl._writeAll

        def halfThenFull(fd: int, data: bytes) -> None:
            os.write(fd, data[: len(data) // 2 + 1])
            raise OSError(errno.ENOSPC, "No space left on device")

        jsonl._writeAll = halfThenFull  # type: ignore[assignment]
        try:
            log.writeLine(b'{"n":1}\n')
            self.clock.advance(1)
            log.writeLine(b'{"n":2}\n')
            self.clock.advance(1)
            with open(self.path, "rb") as f:
                self.assertEqual(f.read(), b"")
            self.assertEqual(log.pending, 2)
        finally:
            jsonl._writeAll = real  # type: ignore[assignment]
        self.clock.advance(1)
        with open(self.path, "rb") as f:
            self.assertEqual([json.loads(line)["n"] for line in f], [1, 2])
        self.assertEqual(mode(self.path), 0o600)

    def test_backlogFullMeansNotAudited(self) -> None:
        """Past the audit backlog a line is dropped, and the trail says it was not handed over."""
        log = self.writer(backlog=1)
        trail = AuditTrail(log, 100)
        request = _FakeRequest()
        context = CallContext(b"POST", b"/x", Headers())
        context.body, context.bodySize = b"{}", 2
        self.assertTrue(trail.write(_record(), context, request, None, b"{}"))  # type: ignore[arg-type]
        self.assertFalse(trail.write(_record(), context, request, None, b"{}"))  # type: ignore[arg-type]
        self.assertEqual(log.dropped, 1)

    def test_checkPathOwnerOnly(self) -> None:
        """At start-up: the directory is created 0700, the file 0600; an existing loose file is tightened."""
        path = os.path.join(self.directory, "sub", "audit.jsonl")
        checkStatsPath(path, "etc/lmgate.yaml", "audit.path", mode=0o600)
        self.assertEqual((mode(os.path.dirname(path)), mode(path)), (0o700, 0o600))
        os.chmod(path, 0o666)
        checkStatsPath(path, "etc/lmgate.yaml", "audit.path", mode=0o600)
        self.assertEqual(mode(path), 0o600)

    def test_checkPathNamesTheKey(self) -> None:
        """A path that cannot be written fails at start-up naming C{audit.path}."""
        blocker = os.path.join(self.directory, "file")
        with open(blocker, "wb"):
            pass
        from lmgate.errors import ConfigError

        e = self.assertRaises(ConfigError, checkStatsPath, blocker + "/audit.jsonl", "etc/lmgate.yaml", "audit.path", None, 0o600)
        self.assertIn("audit.path", str(e))


class _FakeRequest:
    requestHeaders = Headers({b"content-type": [b"application/json"]})
    responseHeaders = Headers({b"content-type": [b"application/json"]})


def _record() -> Any:
    from tests.test_jsonl import record

    return record(1)


class AuditAssemblyTests(SynchronousTestCase):
    """The daemon builds an audit writer only when a rule or a plugin can ask for one."""

    def settings(self, policy: PolicySettings, path: str) -> Settings:
        return Settings(source="etc/lmgate.yaml", policy=policy, audit=AuditSettings(path=path))  # type: ignore[call-arg]

    def test_noRuleNoFile(self) -> None:
        """No audit rule and no plugin: no writer, and no file created."""
        path = os.path.join(os.path.abspath(self.mktemp()), "audit.jsonl")
        settings = self.settings(PolicySettings(rules=(PolicyRule("r", tags=("t",)),)), path)
        self.assertFalse(auditWanted(settings))
        self.assertIsNone(auditFor(settings, Clock(), None, None))
        self.assertFalse(os.path.exists(os.path.dirname(path)))

    def test_ruleMakesTheFile(self) -> None:
        """A rule with C{audit: true}: the writer, its file created 0600 at start-up (a worker's own name)."""
        directory = os.path.abspath(self.mktemp())
        path = os.path.join(directory, "audit.jsonl")
        settings = self.settings(PolicySettings(rules=(PolicyRule("legal", audit=True),)), path)
        writer = auditFor(settings, Clock(), None, None)
        assert writer is not None
        self.assertEqual((writer.path, mode(path)), (path, 0o600))
        worker = auditFor(settings, Clock(), 2, None)
        assert worker is not None
        self.assertEqual(worker.path, os.path.join(directory, "audit-w2.jsonl"))
        self.assertTrue(auditWanted(self.settings(PolicySettings(plugins=(PluginSettings("m:f"),)), path)))

    def test_backlogKey(self) -> None:
        """C{audit.backlog} is read (default 1000), and must be a whole number >= 1."""
        self.assertEqual(parseAudit({"backlog": 5}).backlog, 5)
        self.assertEqual(parseAudit(None).backlog, 1000)
        from lmgate.policy.settings import PolicyConfigError

        self.assertRaises(PolicyConfigError, parseAudit, {"backlog": 0})


class PieceTests(SynchronousTestCase):
    """The capture, the redaction and the reassembly on their own."""

    def test_captureBounded(self) -> None:
        """The capture keeps at most its limit and counts everything."""
        capture = BodyCapture(5)
        for piece in (b"abc", b"defg", b"hij"):
            capture.feed(piece)
        self.assertEqual((capture.data, capture.size, capture.truncated), (b"abcde", 10, True))

    def test_everyCredentialRedacted(self) -> None:
        """Every credential header, however spelt or cased, loses its value; the others keep theirs."""
        secrets = [
            b"Authorization", b"x-api-key", b"X_API_KEY", b"api-key", b"x-goog-api-key", b"x-amz-security-token",
            b"Ocp-Apim-Subscription-Key", b"Cookie", b"Set-Cookie", b"Proxy-Authorization", b"X-Vendor-Token",
            b"x-custom-secret",
        ]
        headers = Headers({name: [b"s3cret-" + name] for name in secrets})
        headers.setRawHeaders(b"content-type", [b"application/json"])
        headers.setRawHeaders(b"x-ratelimit-remaining-tokens", [b"99"])
        out = redactedHeaders(headers)
        for name in secrets:
            self.assertEqual(out[name.decode().lower()], [REDACTED], name)
        self.assertEqual(out["content-type"], ["application/json"])
        self.assertEqual(out["x-ratelimit-remaining-tokens"], ["99"])
        self.assertNotIn("s3cret", json.dumps(out))

    def test_reassembledStreams(self) -> None:
        """Each stream format gives its output text (SSE, Gemini) or its events (Bedrock)."""
        sse = b"text/event-stream"
        self.assertEqual(reassembled(fixture("openai/chat_completions_stream_usage.sse"), sse, b"/v1/chat/completions"), ("response_text", '"This is a test."'))
        self.assertEqual(reassembled(fixture("openai/responses_stream.sse"), sse, b"/v1/responses"), ("response_text", "This is a test."))
        self.assertEqual(reassembled(fixture("anthropic/messages_stream.sse"), sse, b"/v1/messages"), ("response_text", "2"))
        gemini = reassembled(fixture("gemini/stream_generate_content.sse"), sse, b"/v1beta/models/g:streamGenerateContent")
        assert gemini is not None
        self.assertTrue(gemini[1].startswith("1\n2\n3\n"))
        array = json.dumps([{"candidates": [{"content": {"parts": [{"text": "Hel"}]}}]}, {"candidates": [{"content": {"parts": [{"text": "lo"}]}}]}])
        self.assertEqual(reassembled(array.encode(), b"application/json", b"/v1beta/models/g:streamGenerateContent"), ("response_text", "Hello"))
        kind, events = reassembled(fixture("bedrock/converse_stream.bin"), b"application/vnd.amazon.eventstream", b"/model/m/converse-stream") or ("", [])
        expected = json.loads(fixture("bedrock/converse_stream.events.json"))
        self.assertEqual(kind, "response_events")
        self.assertEqual([e["event"] for e in events], [e["headers"][":event-type"] for e in expected])
        self.assertEqual([e["payload"] for e in events], [e["payload"] for e in expected])
        self.assertIsNone(reassembled(b'{"a":1}', b"application/json", b"/v1/chat/completions"))

    def test_invokeStreamBytesDecoded(self) -> None:
        """Bedrock's InvokeModelWithResponseStream chunks: the base64 C{bytes} are decoded too."""
        inner = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}}
        body = event("chunk", json.dumps({"bytes": base64.b64encode(json.dumps(inner).encode()).decode()}).encode())
        kind, events = reassembled(body + body[:10], b"application/vnd.amazon.eventstream", b"/model/m/invoke-with-response-stream") or ("", [])
        self.assertEqual(events, [{"event": "chunk", "payload": {"bytes": inner}}])  # the cut frame after it is left out


class MarkAudited:
    """A test-only body step standing for the policy step: every call it sees is audited."""

    def admit(self, context: CallContext) -> None:
        context.audit = True
        context.policy = ("legal-audit",)
        context.tags = ("legal",)
        return None


class AuditedCallTests(TestCase):
    """Calls through a gateway on loopback, audited by a test-only step."""

    maxBody = 1024 * 1024

    def gateway(self, upstream: FakeUpstream | None = None, audited: bool = True, maxBody: int | None = None) -> Running:
        gate = startGateway(self, upstream)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "audit.jsonl")
        self.clock = Clock()
        self.writer = UsageLog(self.path, self.clock, runInThread=synchronously, mode=AUDIT_MODE, what="audit lines")
        self.writer.startService()
        self.addCleanup(self.writer.stopService)
        gate.gateway.audit = AuditTrail(self.writer, maxBody or self.maxBody)
        if audited:
            pipeline = gate.gateway.pipeline
            gate.gateway.pipeline = Pipeline(pipeline.atHeaders, [MarkAudited(), *pipeline.atBody])
        return gate

    def lines(self) -> list[dict[str, Any]]:
        self.clock.advance(1)
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as f:
            return [json.loads(line) for line in f]

    async def test_jsonCall(self) -> None:
        """One line: the record's id, who, where, the request and response bodies and headers, rules and tags."""
        upstream = FakeUpstream()
        upstream.handler = jsonAnswer({"id": "x", "choices": [{"message": {"content": "héllo"}}]}, headers={b"set-cookie": b"s=1"})
        gate = self.gateway(upstream)
        sent = json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "secret plans"}]}).encode()
        await call(self, gate.url + CHAT, body=sent, headers={**AUTH, b"X-Vendor-Token": [b"sk-other"], b"Cookie": [b"c=1"]})
        [record] = await gate.sink.waitFor(1)
        [line] = self.lines()
        self.assertTrue(record.audited)
        self.assertEqual(
            {k: line[k] for k in ("request_id", "lmgate_id", "owner", "provider", "method", "endpoint", "status", "policy", "tags")},
            {
                "request_id": record.request_id, "lmgate_id": "app1", "owner": "team-a", "provider": "openai",
                "method": "POST", "endpoint": CHAT, "status": 200, "policy": ["legal-audit"], "tags": ["legal"],
            },
        )
        self.assertEqual(line["timestamp"], record.timestamp)
        self.assertEqual(line["request_body"], sent.decode())
        self.assertEqual(json.loads(line["response_body"])["choices"][0]["message"]["content"], "héllo")
        self.assertEqual((line["request_truncated"], line["response_truncated"]), (False, False))
        self.assertEqual((line["request_bytes"], line["response_bytes"]), (len(sent), record.response_bytes))
        for name in ("authorization", "x-vendor-token", "cookie"):
            self.assertEqual(line["request_headers"][name], [REDACTED])
        self.assertEqual(line["response_headers"]["set-cookie"], [REDACTED])
        self.assertEqual(line["response_headers"]["x-lmgate-request-id"], [record.request_id])
        raw = open(self.path, "rb").read()
        self.assertNotIn(AUTH[b"Authorization"][0].split()[1], raw)
        self.assertNotIn(b"sk-other", raw)

    async def test_notAuditedWritesNothing(self) -> None:
        """A call no rule audits: no line, no capture, the record's C{audited} false."""
        gate = self.gateway(audited=False)
        await call(self, gate.url + CHAT)
        [record] = await gate.sink.waitFor(1)
        self.assertFalse(record.audited)
        self.assertEqual(self.lines(), [])
        self.assertEqual(self.writer.written + self.writer.pending, 0)

    async def test_noWriterMeansNotAudited(self) -> None:
        """A call marked for audit without an audit log (none configured at start): relayed, C{audited} false."""
        gate = self.gateway()
        gate.gateway.audit = None
        response, _, _ = await call(self, gate.url + CHAT)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((response.code, record.audited), (200, False))

    async def test_gzipDecoded(self) -> None:
        """A gzip'd response: the client gets it compressed; the line holds it decoded, and says so."""
        upstream = FakeUpstream()
        answer = json.dumps({"id": "x", "text": "plain words"}).encode()
        compressed = gzip.compress(answer)

        def handler(request: Request) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-encoding", b"gzip")
            return compressed

        upstream.handler = handler
        gate = self.gateway(upstream)
        _, body, _ = await call(self, gate.url + CHAT, headers={**AUTH, b"Accept-Encoding": [b"gzip"]})
        self.assertEqual(body, compressed)
        await gate.sink.waitFor(1)
        [line] = self.lines()
        self.assertEqual(line["response_body"], answer.decode())
        self.assertEqual((line["response_content_encoding"], line["response_decoded"]), ("gzip", True))
        self.assertEqual(line["response_bytes"], len(compressed))

    async def test_sseReassembled(self) -> None:
        """An SSE stream: the text as the client received it, and the output text reassembled."""
        stream = fixture("openai/chat_completions_stream_usage.sse")
        upstream = FakeUpstream()

        def handler(request: Request) -> bytes:
            request.setHeader(b"content-type", b"text/event-stream")
            return stream

        upstream.handler = handler
        gate = self.gateway(upstream)
        await call(self, gate.url + CHAT, body=b'{"stream":true}')
        await gate.sink.waitFor(1)
        [line] = self.lines()
        self.assertEqual(line["response_body"], stream.decode())
        self.assertEqual(line["response_text"], '"This is a test."')

    async def test_eventStreamBase64AndEvents(self) -> None:
        """A Bedrock event stream is not text: base64 with the flag, and its decoded events."""
        stream = fixture("bedrock/converse_stream.bin")
        upstream = FakeUpstream()

        def handler(request: Request) -> bytes:
            request.setHeader(b"content-type", b"application/vnd.amazon.eventstream")
            return stream

        upstream.handler = handler
        gate = self.gateway(upstream)
        await call(self, gate.url + "/bedrock/model/m/converse-stream")
        await gate.sink.waitFor(1)
        [line] = self.lines()
        self.assertTrue(line["response_body_base64"])
        self.assertEqual(base64.b64decode(line["response_body"]), stream)
        self.assertEqual(line["response_events"][0]["event"], "messageStart")

    async def test_bodiesBounded(self) -> None:
        """Past C{max_body} each body is cut: flags set, full sizes given, never more kept."""
        upstream = FakeUpstream()
        answer = ('{"text":"' + "é" * 3000 + '"}').encode()

        def handler(request: Request) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            return answer

        upstream.handler = handler
        gate = self.gateway(upstream, maxBody=1000)
        sent = json.dumps({"content": "x" * 5000}).encode()
        _, received, _ = await call(self, gate.url + CHAT, body=sent)
        await gate.sink.waitFor(1)
        [line] = self.lines()
        self.assertEqual((line["request_truncated"], line["request_bytes"], line["request_body"]), (True, len(sent), sent[:1000].decode()))
        self.assertEqual((line["response_truncated"], line["response_bytes"]), (True, len(received)))
        self.assertFalse(line["response_body_base64"])  # a character cut in half is dropped, the text stays text
        self.assertEqual(line["response_body"], received[:999].decode())  # the 1000th byte began an "é" (2 bytes)

    async def test_spooledRequestBody(self) -> None:
        """A request body too large to keep in memory is read back (bounded) from its spooled file."""
        gate = self.gateway(maxBody=2048)
        sent = b'{"content":"' + b"y" * (KEEP_BODY_LIMIT + 10) + b'"}'
        response, _, _ = await call(self, gate.url + CHAT, body=sent)
        self.assertEqual(response.code, 200)
        self.assertEqual(gate.upstream.seen[0].body, sent)
        await gate.sink.waitFor(1)
        [line] = self.lines()
        self.assertEqual((line["request_body"], line["request_bytes"], line["request_truncated"]), (sent[:2048].decode(), len(sent), True))

    async def test_refusalAnswerAudited(self) -> None:
        """An audited call LMGate answers itself (upstream unreachable): its answer is the line's response body."""
        from tests.helpers import closedPort

        gate = startGateway(self, upstreamURL=f"http://127.0.0.1:{closedPort(self)}")
        self.path = os.path.join(os.path.abspath(self.mktemp()), "audit.jsonl")
        os.makedirs(os.path.dirname(self.path))
        self.clock = Clock()
        self.writer = UsageLog(self.path, self.clock, runInThread=synchronously, mode=AUDIT_MODE)
        self.writer.startService()
        self.addCleanup(self.writer.stopService)
        gate.gateway.audit = AuditTrail(self.writer, self.maxBody)
        gate.gateway.pipeline = Pipeline(gate.gateway.pipeline.atHeaders, [MarkAudited(), *gate.gateway.pipeline.atBody])
        response, body, _ = await call(self, gate.url + CHAT)
        [record] = await gate.sink.waitFor(1)
        [line] = self.lines()
        self.assertEqual((response.code, line["status"], line["error"]), (502, 502, record.error))
        self.assertEqual(line["response_body"], body.decode())
        self.assertTrue(record.audited)
