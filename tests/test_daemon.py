"""
End to end: C{twistd -n lmgate} as a child process, driven by the real provider
SDKs (base_url swapped to the gateway) against the stub upstream.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.server import Site

from tests.daemon import LMGATE, TWISTD, Daemon, freePort, inThread, pause, portTaken, readRecords, waitFor
from tests.secretscan import SECRET_SUFFIX

PLAIN_KEY = "sk-plain-e2e-0000000000000000AbCd"
HASHED_KEY = "sk-ant-hashed-e2e-111111111111WxYz"


class CountingSite(Site):
    """The stub upstream, counting the requests that reach it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count = 0

    def getResourceFor(self, request: Any) -> Any:
        self.count += 1
        return super().getResourceFor(request)


def allowList(*rows: tuple[str, str, str]) -> str:
    lines = ["id,api_key,owner,added"]
    for ident, key, owner in rows:
        lines.append(f"{ident},{key},{owner},2026-11-23")
    return "\n".join(lines) + "\n"


class DaemonTestCase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        from lmgate.stub.server import makeStubResource

        self.stub = CountingSite(makeStubResource(reactor))
        port = reactor.listenTCP(0, self.stub, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        self.stubURL = f"http://127.0.0.1:{port.getHost().port}"
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.allowlistPath = os.path.join(self.directory, "allowlist.csv")
        hashed = "sha256:" + hashlib.sha256(HASHED_KEY.encode()).hexdigest()
        with open(self.allowlistPath, "w") as f:
            f.write(allowList(("plain", PLAIN_KEY, "team-plain"), ("hashed", hashed, "team-hashed")))
        self.port = freePort()
        self.statsPath = os.path.join(self.directory, "stats", "stats.jsonl")

    def config(self, **extra: str) -> str:
        lines = [
            f'listen: "tcp:{self.port}:interface=127.0.0.1"',
            f"allowlist: {{path: {self.allowlistPath}, reload_interval: {extra.get('reload', '0.2')}}}",
            f"stats: {{path: {self.statsPath}, flush_interval: 0.2}}",
            "providers:",
        ]
        for name in ("openai", "anthropic", "gemini", "bedrock"):
            lines.append(f"  {name}: {{upstream: '{self.stubURL}'}}")
        return "\n".join(lines) + "\n"

    async def startDaemon(self, **extra: str) -> Daemon:
        daemon = Daemon(self, self.config(**extra), self.directory)
        daemon.start()
        await daemon.waitUntilHealthy(self.port)
        return daemon

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class SDKTests(DaemonTestCase):
    async def test_openaiAndAnthropicSDKs(self) -> None:
        """The openai and anthropic SDKs work through the daemon by a base_url swap,
        streaming included; SIGTERM exits 0 with one record per call on disk."""
        daemon = await self.startDaemon()

        def openaiCalls() -> list[Any]:
            import openai

            client = openai.OpenAI(base_url=self.base + "/openai/v1", api_key=PLAIN_KEY, max_retries=0, timeout=20)
            chat = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi there"}])
            chunks = list(
                client.chat.completions.create(
                    model="gpt-4o-mini",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            return [chat, chunks]

        def anthropicCalls() -> list[Any]:
            import anthropic

            client = anthropic.Anthropic(base_url=self.base + "/anthropic", api_key=HASHED_KEY, max_retries=0, timeout=20)
            message = client.messages.create(
                model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hello"}]
            )
            with client.messages.stream(
                model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "hello"}]
            ) as stream:
                final = stream.get_final_message()
            return [message, final]

        chat, chunks = await inThread(openaiCalls)
        self.assertTrue(chat.choices[0].message.content)
        self.assertIsNotNone(chunks[-1].usage)
        message, final = await inThread(anthropicCalls)
        self.assertEqual(message.type, "message")
        self.assertEqual(final.usage.output_tokens, message.usage.output_tokens)

        self.assertEqual(await daemon.stop(), 0)
        records = readRecords(self.statsPath)
        self.assertEqual(len(records), 4)
        byEndpoint = [(r["provider"], r["endpoint"], r["streaming"], r["status"], r["error"]) for r in records]
        self.assertEqual(
            byEndpoint,
            [
                ("openai", "/openai/v1/chat/completions", False, 200, None),
                ("openai", "/openai/v1/chat/completions", True, 200, None),
                ("anthropic", "/anthropic/v1/messages", False, 200, None),
                ("anthropic", "/anthropic/v1/messages", True, 200, None),
            ],
        )
        self.assertEqual(records[0]["input_tokens"], chat.usage.prompt_tokens)
        self.assertEqual(records[0]["output_tokens"], chat.usage.completion_tokens)
        self.assertEqual(records[1]["output_tokens"], chunks[-1].usage.completion_tokens)
        self.assertEqual(records[2]["output_tokens"], message.usage.output_tokens)
        self.assertEqual(records[3]["output_tokens"], final.usage.output_tokens)
        self.assertEqual([r["lmgate_id"] for r in records], ["plain", "plain", "hashed", "hashed"])
        self.assertEqual([r["usage_source"] for r in records], ["response"] * 4)
        text = json.dumps(records)
        self.assertNotIn(PLAIN_KEY, text)
        self.assertNotIn(HASHED_KEY, text)
        self.assertNotIn(PLAIN_KEY, daemon.watch.output.decode())


class AccessControlTests(DaemonTestCase):
    async def test_refusedCallsNeverReachTheUpstream(self) -> None:
        """Missing and unknown keys get 403 and the upstream sees nothing; allowed keys, hashed or plain, get 200."""
        import treq

        daemon = await self.startDaemon()
        url = self.base + "/openai/v1/chat/completions"
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode()
        for headers in ({}, {"Authorization": "Bearer sk-not-on-the-list-9999"}):
            response = await treq.post(url, body, headers=headers, persistent=False)
            self.assertEqual(response.code, 403)
            self.assertEqual((await response.json())["error"]["code"], "invalid_api_key")
        self.assertEqual(self.stub.count, 0)
        for key in (PLAIN_KEY, HASHED_KEY):
            response = await treq.post(url, body, headers={"Authorization": f"Bearer {key}"}, persistent=False)
            self.assertEqual(response.code, 200)
            await response.content()
        self.assertEqual(self.stub.count, 2)
        self.assertEqual(await daemon.stop(), 0)
        self.assertEqual([r["status"] for r in readRecords(self.statsPath)], [403, 403, 200, 200])

    async def test_keyAddedWithoutRestart(self) -> None:
        """A key added with C{lmgate keys add} is accepted within one reload interval, no restart."""
        import treq

        daemon = await self.startDaemon()
        newKey = "sk-new-key-e2e-22222222222222Zz"
        url = self.base + "/openai/v1/models"
        headers = {"Authorization": f"Bearer {newKey}"}
        response = await treq.get(url, headers=headers, persistent=False)
        self.assertEqual(response.code, 403)
        await response.content()
        added = await inThread(
            subprocess.run,
            [LMGATE, "keys", "add", "--id", "new", "--owner", "team-new", "--file", self.allowlistPath],
            input=newKey + "\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        self.assertEqual(added.returncode, 0, added.stderr)
        with open(self.allowlistPath) as f:
            self.assertNotIn(newKey, f.read())  # stored hashed
        for _ in range(50):
            response = await treq.get(url, headers=headers, persistent=False)
            await response.content()
            if response.code == 200:
                break
            await pause(0.1)
        self.assertEqual(response.code, 200)
        await daemon.stop()

    async def test_sighupReloads(self) -> None:
        """SIGHUP reloads the allow-list at once, and the daemon keeps running."""
        import treq

        daemon = await self.startDaemon(reload="3600")
        with open(self.allowlistPath, "w") as f:
            f.write(allowList(("only", "sk-after-hup-333333333333", "t")))
        daemon.signal("HUP")
        url = self.base + "/openai/v1/models"
        for _ in range(50):
            response = await treq.get(url, headers={"Authorization": f"Bearer {PLAIN_KEY}"}, persistent=False)
            await response.content()
            if response.code == 403:
                break
            await pause(0.1)
        self.assertEqual(response.code, 403)
        response = await treq.get(url, headers={"Authorization": "Bearer sk-after-hup-333333333333"}, persistent=False)
        await response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(await daemon.stop(), 0)


class StartupErrorTests(DaemonTestCase):
    async def test_badConfigurationIsOneLine(self) -> None:
        """A wrong key stops the start with one line naming the file, the key and the problem."""
        path = os.path.join(self.directory, "bad.yaml")
        with open(path, "w") as f:
            f.write("timeouts: {connect: never}\n")
        result = await inThread(
            subprocess.run,
            [TWISTD, "-n", "--pidfile=", "lmgate", "--config", path],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.directory,
            env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stderr.strip().splitlines(), [f"lmgate: {path}: timeouts.connect: must be a number > 0, got 'never'"])

    async def refusedStart(self, config: str) -> tuple[str, str]:
        """Start the daemon with C{config}; it must fail with one line on stderr: (config path, line)."""
        path = os.path.join(self.directory, "lmgate.yaml")
        with open(path, "w") as f:
            f.write(config)
        result = await inThread(
            subprocess.run,
            [TWISTD, "-n", "--pidfile=", "lmgate", "--config", path],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.directory,
        )
        self.assertNotEqual(result.returncode, 0)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        return path, lines[0]

    async def test_missingAllowListFailsClosed(self) -> None:
        """Without a loadable allow-list the daemon does not start."""
        os.remove(self.allowlistPath)
        _, line = await self.refusedStart(self.config())
        self.assertIn(self.allowlistPath, line)

    async def test_unwritableAccessLogIsOneLine(self) -> None:
        """An access_log path that cannot be written stops the start with one line naming it."""
        blocker = os.path.join(self.directory, "a-file")
        open(blocker, "w").close()
        path, line = await self.refusedStart(self.config() + f"access_log: {blocker}/access.log\n")
        self.assertTrue(line.startswith(f"lmgate: {path}: access_log: cannot write {blocker}/access.log"), line)


_ = sys


def makeCertificate(directory: str) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1, as PEM files (key, cert); the key is a credential
    source the test wrote (C{key.pem.secret}: the secret scan skips it)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    keyPath, certPath = os.path.join(directory, "key.pem" + SECRET_SUFFIX), os.path.join(directory, "cert.pem")
    with open(keyPath, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with open(certPath, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return keyPath, certPath


class MoreSDKTests(DaemonTestCase):
    async def test_googleGenAIAndBoto3Bedrock(self) -> None:
        """google-genai (plain and streamed) and boto3 bedrock-runtime (converse and
        converse_stream, Bedrock API key over an ssl: listener) each yield a truthful record."""
        keyPath, certPath = makeCertificate(self.directory)
        config = self.config().replace(
            f'listen: "tcp:{self.port}:interface=127.0.0.1"',
            f'listen: "ssl:{self.port}:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}"',
        )
        daemon = Daemon(self, config, self.directory)
        daemon.start()
        await daemon.waitUntilHealthyTLS(self.port)

        def genaiCalls() -> list[Any]:
            from google import genai
            from google.genai import types

            client = genai.Client(
                api_key=PLAIN_KEY,
                http_options=types.HttpOptions(
                    base_url=f"https://127.0.0.1:{self.port}/gemini",
                    client_args={"verify": certPath},
                    timeout=20000,
                ),
            )
            plain = client.models.generate_content(model="gemini-2.0-flash", contents="hello there")
            chunks = list(client.models.generate_content_stream(model="gemini-2.0-flash", contents="hello"))
            return [plain, chunks]

        def bedrockCalls() -> list[Any]:
            import boto3
            from botocore.config import Config

            os.environ["AWS_BEARER_TOKEN_BEDROCK"] = HASHED_KEY
            try:
                client = boto3.client(
                    "bedrock-runtime",
                    region_name="us-east-1",
                    endpoint_url=f"https://127.0.0.1:{self.port}/bedrock",
                    verify=certPath,
                    config=Config(retries={"max_attempts": 1}, read_timeout=20, connect_timeout=5),
                )
                messages = [{"role": "user", "content": [{"text": "hello"}]}]
                modelId = "anthropic.claude-3-haiku-20240307-v1:0"
                converse = client.converse(modelId=modelId, messages=messages)
                stream = client.converse_stream(modelId=modelId, messages=messages)
                events = list(stream["stream"])
            finally:
                del os.environ["AWS_BEARER_TOKEN_BEDROCK"]
            return [converse, events]

        plain, chunks = await inThread(genaiCalls)
        converse, events = await inThread(bedrockCalls)
        self.assertEqual(await daemon.stop(), 0)
        records = readRecords(self.statsPath)
        self.assertEqual(
            [(r["provider"], r["streaming"], r["status"], r["error"]) for r in records],
            [("gemini", False, 200, None), ("gemini", True, 200, None), ("bedrock", False, 200, None), ("bedrock", True, 200, None)],
        )
        self.assertEqual(records[0]["input_tokens"], plain.usage_metadata.prompt_token_count)
        self.assertEqual(records[0]["output_tokens"], plain.usage_metadata.candidates_token_count + (plain.usage_metadata.thoughts_token_count or 0))
        last = [c for c in chunks if c.usage_metadata and c.usage_metadata.candidates_token_count][-1]
        self.assertEqual(records[1]["output_tokens"], last.usage_metadata.candidates_token_count + (last.usage_metadata.thoughts_token_count or 0))
        self.assertEqual(records[2]["input_tokens"], converse["usage"]["inputTokens"])
        self.assertEqual(records[2]["output_tokens"], converse["usage"]["outputTokens"])
        metadata = [e["metadata"] for e in events if "metadata" in e][0]
        self.assertEqual(records[3]["output_tokens"], metadata["usage"]["outputTokens"])
        self.assertEqual(records[2]["model"], "anthropic.claude-3-haiku-20240307-v1:0")
        self.assertEqual([r["lmgate_id"] for r in records], ["plain", "plain", "hashed", "hashed"])


class ShutdownTests(DaemonTestCase):
    async def streamUntilFirstChunk(self, events: int, delayMs: int) -> tuple[Any, list[bytes], Any]:
        import treq

        response = await treq.post(
            self.base + "/openai/v1/chat/completions",
            json.dumps({"model": "m", "messages": [], "stream": True}).encode(),
            headers={"Authorization": f"Bearer {PLAIN_KEY}", "x-lmgate-stub-events": str(events),
                     "x-lmgate-stub-delay-ms": str(delayMs)},
            unbuffered=True, persistent=False,
        )
        chunks: list[bytes] = []
        first: Any = Deferred()

        def collect(data: bytes) -> None:
            chunks.append(data)
            if not first.called:
                first.callback(None)

        done = treq.collect(response, collect)
        done.addErrback(lambda f: f.value)  # a cut stream ends in an error; the test inspects it
        await first
        return response, chunks, done

    async def test_sigtermDrainsInFlightCalls(self) -> None:
        """SIGTERM lets a stream in flight finish, refuses new connections, and
        every call that reached routing has exactly one record on disk (exit 0)."""
        import treq

        daemon = await self.startDaemon()
        for _ in range(3):
            r = await treq.get(self.base + "/openai/v1/models", headers={"Authorization": f"Bearer {PLAIN_KEY}"}, persistent=False)
            await r.content()
        _, chunks, done = await self.streamUntilFirstChunk(events=20, delayMs=150)
        daemon.signal("TERM")
        refused = False
        for _ in range(50):  # the listener closes as soon as the daemon handles SIGTERM
            try:
                r = await treq.get(self.base + "/healthz", persistent=False)
                await r.content()
            except Exception:
                refused = True
                break
            await pause(0.1)
        self.assertTrue(refused)
        self.assertFalse(done.called)  # while the stream in flight goes on
        result = await done
        self.assertIsNone(result)  # the stream ended cleanly
        self.assertTrue(b"".join(chunks).endswith(b"data: [DONE]\n\n"))
        self.assertEqual(await daemon.watch.ended, 0)
        records = readRecords(self.statsPath)
        self.assertEqual(len(records), 4)
        self.assertEqual([r["error"] for r in records], [None] * 4)

    async def test_drainTimeoutCutsTheRest(self) -> None:
        """Calls still running when the drain time is up are cut, and still recorded."""
        config = self.config() + "shutdown: {drain_timeout: 0.5}\n"
        daemon = Daemon(self, config, self.directory)
        daemon.start()
        await daemon.waitUntilHealthy(self.port)
        _, chunks, done = await self.streamUntilFirstChunk(events=100, delayMs=200)
        daemon.signal("TERM")
        result = await done
        self.assertIsNotNone(result)  # cut, not a clean end
        self.assertEqual(await daemon.watch.ended, 0)
        [record] = readRecords(self.statsPath)
        self.assertEqual(record["error"], "shutdown")

    async def test_secondSigtermWhileDraining(self) -> None:
        """A second SIGTERM (or SIGINT) while a stream drains is only logged: the
        stream still finishes, no traceback, exit 0."""
        daemon = await self.startDaemon()
        _, chunks, done = await self.streamUntilFirstChunk(events=6, delayMs=100)
        daemon.signal("TERM")
        # Each signal once it is handled: one still pending when the next of its kind comes would merge with it.
        await waitFor(lambda: b"Received SIGTERM, shutting down" in daemon.watch.output, "the first SIGTERM")
        daemon.signal("INT")
        await waitFor(lambda: b"Received SIGINT again" in daemon.watch.output, "SIGINT")
        daemon.signal("TERM")
        self.assertIsNone(await done)
        self.assertTrue(b"".join(chunks).endswith(b"data: [DONE]\n\n"))
        self.assertEqual(await daemon.watch.ended, 0)
        self.assertEqual(daemon.watch.output.count(b"again: already shutting down"), 2)
        self.assertNotIn(b"Traceback", daemon.watch.output)
        [record] = readRecords(self.statsPath)
        self.assertIsNone(record["error"])

    async def test_sighupReloadsConfiguration(self) -> None:
        """SIGHUP applies a new route; a broken file afterwards keeps the running configuration."""
        import treq

        daemon = await self.startDaemon(reload="3600")
        headers = {"Authorization": f"Bearer {PLAIN_KEY}"}
        url = self.base + "/extra/v1/models"
        response = await treq.get(url, headers=headers, persistent=False)
        await response.content()
        self.assertEqual(response.code, 404)
        with open(daemon.configPath, "a") as f:
            f.write(f"  extra: {{upstream: '{self.stubURL}', format: openai}}\n")
        daemon.signal("HUP")
        for _ in range(50):
            response = await treq.get(url, headers=headers, persistent=False)
            await response.content()
            if response.code == 200:
                break
            await pause(0.1)
        self.assertEqual(response.code, 200)
        with open(daemon.configPath, "a") as f:
            f.write("timeouts: {connect: never}\n")
        daemon.signal("HUP")
        for _ in range(50):
            if b"Keeping the running configuration" in daemon.watch.output:
                break
            await pause(0.1)
        self.assertIn(b"timeouts.connect: must be a number > 0", daemon.watch.output)
        response = await treq.get(url, headers=headers, persistent=False)
        await response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(await daemon.stop(), 0)

    async def test_sigusr1ReopensLogAndStats(self) -> None:
        """After an external tool renames the log and stats files, SIGUSR1 makes
        LMGate write to new files at the configured paths."""
        import treq

        logPath = os.path.join(self.directory, "lmgate.log")
        daemon = Daemon(self, self.config(), self.directory)
        daemon.start(logfile=logPath)
        await daemon.waitUntilHealthy(self.port)
        headers = {"Authorization": f"Bearer {PLAIN_KEY}"}
        r = await treq.get(self.base + "/openai/v1/models", headers=headers, persistent=False)
        await r.content()
        accessPath = os.path.join(os.path.dirname(self.statsPath), "access.log")

        def lines(path: str) -> list[str]:
            try:
                with open(path) as f:
                    return f.readlines()
            except FileNotFoundError:
                return []

        # Renamed only once the call's record and access line are on disk (each writer flushes on its own timer).
        await waitFor(lambda: len(lines(self.statsPath)) == 1 and any("/openai/v1/models" in line for line in lines(accessPath)),
                      "the first call's record and access line")
        os.rename(logPath, logPath + ".1")
        os.rename(self.statsPath, self.statsPath + ".rotated")
        os.rename(accessPath, accessPath + ".rotated")
        daemon.signal("USR1")
        # The twistd log is reopened last, after the stats and access writers: its new file means all three are done.
        await waitFor(lambda: os.path.exists(logPath), "the reopened twistd log")
        r = await treq.get(self.base + "/openai/v1/models", headers=headers, persistent=False)
        await r.content()
        self.assertEqual(await daemon.stop(), 0)
        with open(self.statsPath + ".rotated") as f:
            self.assertEqual(len(f.readlines()), 1)
        with open(self.statsPath) as f:
            self.assertEqual(len(f.readlines()), 1)
        self.assertEqual(len(lines(accessPath)), 1)
        with open(logPath + ".1") as f:
            self.assertIn("Received SIGUSR1", f.read())  # logged before the reopen
        with open(logPath) as f:
            self.assertIn("Server Shut Down", f.read())  # the reopened file took the rest
        self.assertFalse(os.path.exists(logPath + ".2"))  # reopened, not rotated again


    async def test_accessLogFileAndReload(self) -> None:
        """Access lines go to C{access.log} beside the records, not the twistd log;
        SIGHUP turns them off and on again; a new path waits for a restart."""
        import treq

        accessPath = os.path.join(os.path.dirname(self.statsPath), "access.log")
        daemon = await self.startDaemon(reload="3600")
        headers = {"Authorization": f"Bearer {PLAIN_KEY}"}

        async def calls(n: int) -> None:
            for _ in range(n):
                r = await treq.get(self.base + "/openai/v1/models", headers=headers, persistent=False)
                await r.content()

        async def reload(line: str) -> None:
            before = daemon.watch.output.count(b"Reloaded the configuration")
            with open(daemon.configPath, "a") as f:
                f.write(line)
            daemon.signal("HUP")
            for _ in range(50):
                if daemon.watch.output.count(b"Reloaded the configuration") > before:
                    return
                await pause(0.1)
            self.fail("no reload")

        await calls(2)
        await reload("access_log: false\n")
        await calls(3)
        await reload("access_log: true\n")
        await calls(4)
        await reload(f"access_log: {self.directory}/elsewhere.log\n")
        await calls(1)
        self.assertEqual(await daemon.stop(), 0)
        with open(accessPath) as f:
            lines = [line for line in f if "/openai/v1/models" in line]
        self.assertEqual(len(lines), 2 + 4 + 1)
        self.assertTrue(all(PLAIN_KEY not in line for line in lines))
        self.assertIn(b"applied at the next restart only: access_log", daemon.watch.output)
        self.assertFalse(os.path.exists(f"{self.directory}/elsewhere.log"))
        self.assertNotIn(b"/openai/v1/models HTTP/1.1", daemon.watch.output)  # the twistd log
        self.assertEqual(len(readRecords(self.statsPath)), 10)


class WorkerTests(DaemonTestCase):
    async def test_twoWorkersShareTheSocket(self) -> None:
        """--workers 2: both workers listen on the one socket; calls are served and
        recorded in per-worker stats and access files only; SIGHUP reaches both
        workers, and SIGTERM drains both and exits 0 with every record. Which
        worker the kernel hands each connection to is its own choice: not asserted."""
        import treq
        from twisted.internet.defer import gatherResults

        daemon = Daemon(self, self.config(), self.directory)
        daemon.start("--workers", "2")
        await daemon.waitUntilHealthy(self.port)
        # Healthy means one worker listens; wait for both.
        await waitFor(lambda: daemon.watch.output.count(b"GatewaySite starting on") >= 2, "both workers listening")
        headers = {"Authorization": f"Bearer {PLAIN_KEY}"}
        statsDir = os.path.dirname(self.statsPath)

        async def call() -> None:
            r = await treq.post(self.base + "/openai/v1/chat/completions", b'{"model":"m","messages":[]}',
                                headers=headers, persistent=False)
            await r.content()
            self.assertEqual(r.code, 200)

        calls = 20
        await gatherResults([Deferred.fromCoroutine(call()) for _ in range(calls)])
        daemon.signal("HUP")
        for _ in range(50):
            if daemon.watch.output.count(b"Reloaded the configuration") >= 2:
                break
            await pause(0.1)
        self.assertEqual(daemon.watch.output.count(b"Reloaded the configuration"), 2)
        self.assertNotIn(b"applied at the next restart only", daemon.watch.output)  # an unchanged file changes nothing
        self.assertEqual(await daemon.stop(), 0)
        # Only per-worker files hold lines (never the unsuffixed ones); how the calls spread over them is the kernel's.
        files = sorted(n for n in os.listdir(statsDir) if os.path.getsize(os.path.join(statsDir, n)))
        self.assertLessEqual(set(files), {"access-w1.log", "access-w2.log", "stats-w1.jsonl", "stats-w2.jsonl"}, files)
        access = []
        for name in ("access-w1.log", "access-w2.log"):
            if name in files:
                with open(os.path.join(statsDir, name)) as f:
                    access += [line for line in f if "/openai/v1/chat/completions" in line]
        self.assertEqual(len(access), calls)
        records = readRecords(os.path.join(statsDir, "stats"))
        self.assertEqual(len(records), calls)


class WorkerLifetimeTests(DaemonTestCase):
    async def test_workersEndWithTheSupervisor(self) -> None:
        """The supervisor killed outright (SIGKILL: no forwarding): its workers notice
        the pipe from it close, drain, flush their records and exit, freeing the port."""
        import treq

        daemon = Daemon(self, self.config(), self.directory)
        daemon.start("--workers", "2")
        await daemon.waitUntilHealthy(self.port)
        supervisor = daemon.process.pid
        with open(f"/proc/{supervisor}/task/{supervisor}/children") as f:
            workers = [int(pid) for pid in f.read().split()]
        self.assertEqual(len(workers), 2)
        self.addCleanup(_killStray, workers)
        for _ in range(5):
            r = await treq.get(self.base + "/openai/v1/models", headers={"Authorization": f"Bearer {PLAIN_KEY}"},
                               persistent=False)
            await r.content()
        daemon.signal("KILL")
        await daemon.watch.ended
        for _ in range(100):
            if not any(_alive(pid) for pid in workers):
                break
            await pause(0.1)
        self.assertEqual([pid for pid in workers if _alive(pid)], [])
        self.assertFalse(portTaken(self.port))
        self.assertEqual(len(readRecords(os.path.join(os.path.dirname(self.statsPath), "stats"))), 5)


def _alive(pid: int) -> bool:
    """A process that runs (a zombie awaiting its reaper has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _killStray(pids: list[int]) -> None:
    import signal

    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


class DemoTests(TestCase):
    """The README's first command, C{twistd -n lmgate}, exactly as written."""

    timeout = 120

    def setUp(self) -> None:
        if portTaken(8080) or portTaken(8081):
            raise SkipTest("the embedded demo needs 127.0.0.1:8080 and :8081, and one is taken")
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    async def demo(self, *extra: str) -> list[dict[str, Any]]:
        """Run the demo (in a fresh directory), call it with the openai SDK, stop it; its records."""
        daemon = Daemon(self, "", self.directory)
        daemon.startDemo(*extra)
        await daemon.waitUntilHealthy(8080)
        self.assertFalse(daemon.watch.ended.called, "another process answers on 8080")

        def calls() -> list[Any]:
            import openai

            client = openai.OpenAI(base_url="http://127.0.0.1:8080/openai/v1", api_key="lmgate-demo-key",
                                   max_retries=0, timeout=20)
            chat = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}])
            try:
                openai.OpenAI(base_url="http://127.0.0.1:8080/openai/v1", api_key="not-a-key",
                              max_retries=0, timeout=20).models.list()
            except openai.PermissionDeniedError as e:
                return [chat, e.status_code]
            return [chat, None]

        chat, refused = await inThread(calls)
        self.assertTrue(chat.choices[0].message.content)
        self.assertEqual(refused, 403)
        self.assertEqual(await daemon.stop(), 0)
        self.assertIn(b"running the embedded demo. Providers are routed to the stub upstream on tcp:8081",
                      daemon.watch.output)
        self.assertNotIn(b"stub upstream on None", daemon.watch.output)
        self.assertEqual(daemon.watch.output.count(b"running the embedded demo"), 1)
        return readRecords(os.path.join(self.directory, "var", "stats", "stats"))

    async def test_demo(self) -> None:
        """The demo answers the demo key, refuses another, and records both calls under
        var/stats; with --workers 2 the supervisor serves the stub and announces it once.
        (One test: the two runs need the same fixed ports, so they must not overlap.)"""
        records = await self.demo()
        self.assertEqual(sorted(r["status"] for r in records), [200, 403])
        self.assertTrue(os.path.exists(os.path.join(self.directory, "var", "stats", "stats.jsonl")))
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        records = await self.demo("--workers", "2")
        self.assertEqual(sorted(r["status"] for r in records), [200, 403])


class OperationsTests(DaemonTestCase):
    async def test_metricsAndCosts(self) -> None:
        """The admin listener's /metrics counts real calls and their tokens; records carry cost_usd."""
        import treq
        from prometheus_client.parser import text_string_to_metric_families

        self.admin = freePort()  # an attribute: a start that loses a bind race moves it
        prices = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "prices.yaml")
        config = self.config() + f'admin: {{listen: "tcp:{self.admin}:interface=127.0.0.1"}}\nprices: {{path: {prices}}}\n'
        daemon = Daemon(self, config, self.directory)
        daemon.start()
        await daemon.waitUntilHealthy(self.port)
        headers = {"Authorization": f"Bearer {PLAIN_KEY}"}
        for model in ("gpt-4o-mini", "gpt-4o-mini", "no-such-model"):
            r = await treq.post(self.base + "/openai/v1/chat/completions",
                                json.dumps({"model": model, "messages": [{"role": "user", "content": "a b c"}]}).encode(),
                                headers=headers, persistent=False)
            await r.content()
        r = await treq.get(self.base + "/openai/v1/models", headers={"Authorization": "Bearer nope-nope-nope"}, persistent=False)
        await r.content()
        r = await treq.get(f"http://127.0.0.1:{self.admin}/metrics", persistent=False)
        text = await r.text()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        self.assertEqual(samples[("lmgate_calls_total", (("error", "none"), ("provider", "openai"), ("status", "200")))], 3)
        self.assertEqual(samples[("lmgate_calls_total", (("error", "forbidden"), ("provider", "openai"), ("status", "403")))], 1)
        self.assertEqual(samples[("lmgate_tokens_total", (("kind", "input"), ("model", "gpt-4o"), ("provider", "openai")))], 6)
        self.assertEqual(samples[("lmgate_allowlist_keys", ())], 2)
        self.assertEqual(samples[("lmgate_overhead_seconds_count", ())], 3)
        self.assertEqual(await daemon.stop(), 0)
        records = readRecords(self.statsPath)
        self.assertEqual([r["cost_usd"] is not None for r in records], [True, True, False, False])
        first = records[0]
        self.assertAlmostEqual(first["cost_usd"], (first["input_tokens"] * 0.15 + first["output_tokens"] * 0.60) / 1e6)


class TacTests(DaemonTestCase):
    async def test_tacBuildsTheSameTree(self) -> None:
        """C{twistd -ny lmgate.tac} with LMGATE_CONFIG serves and records like the plugin."""
        import treq

        daemon = Daemon(self, self.config(), self.directory)
        daemon.startTac()
        await daemon.waitUntilHealthy(self.port)
        r = await treq.get(self.base + "/openai/v1/models", headers={"Authorization": f"Bearer {PLAIN_KEY}"}, persistent=False)
        await r.content()
        self.assertEqual(r.code, 200)
        self.assertEqual(await daemon.stop(), 0)
        self.assertEqual(len(readRecords(self.statsPath)), 1)
