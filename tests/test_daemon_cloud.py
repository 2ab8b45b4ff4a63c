"""
Managed Bedrock and Vertex AI routes end to end, through C{twistd -n lmgate}:
boto3 over the TLS listener with its LMGate key as a Bedrock API key, LMGate
signing with its own AWS credentials for a fake Bedrock upstream that checks
each signature from the wire bytes; a Vertex call whose access token LMGate
mints from a service account against a fake token endpoint; C{missing: stub}
and C{missing: refuse} for both kinds.
"""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.server import Request, Site

from lmgate.stub.server import makeStubResource
from tests.daemon import Daemon, daemonDirectory, freePort, inThread, readRecords
from tests.helpers import FakeUpstream, listenLocal
from tests.secretscan import SECRET_SUFFIX, providerSecret
from tests.sigv4check import checkSignature
from tests.test_daemon import makeCertificate
from tests.test_vertex import ACCOUNT, FakeTokenEndpoint, issuedToken, throwawayKey

CLIENT_KEY = "lmgate-app-key-cloud-000000000000Zz"
ACCESS_KEY = "AKIDLMGATEDAEMON0001"
SECRET_KEY = providerSecret("aws-daemon/0123456789abcdEF")
MODEL = "anthropic.claude-3-haiku-20240307-v1:0"

#: Variables that could lead botocore (in the daemon) to credentials other than the test's.
AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_ROLE_ARN", "AWS_BEARER_TOKEN_BEDROCK", "GOOGLE_APPLICATION_CREDENTIALS",
)


class CloudDaemonTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.directory, self.allowlistPath = daemonDirectory(self, CLIENT_KEY)
        os.makedirs(os.path.join(self.directory, "var"))
        self.upstream = FakeUpstream()
        self.upstreamPort = listenLocal(self, Site(self.upstream))
        self.stub = makeStubResource(reactor)
        self.port = freePort()
        self.statsPath = os.path.join(self.directory, "var", "stats.jsonl")
        self.logPath = os.path.join(self.directory, "var", "twistd.log")

    def config(self, listen: str, *routes: str) -> str:
        return "\n".join(
            [
                f'listen: "{listen}"',
                f"allowlist: {{path: {self.allowlistPath}}}",
                f"stats: {{path: {self.statsPath}, flush_interval: 0.2}}",
                "providers:",
                *routes,
            ]
        ) + "\n"

    def daemon(self, config: str, **env: str) -> Daemon:
        """A daemon whose AWS and Google credentials are only those given (no shared files, no metadata service)."""
        daemon = Daemon(self, config, self.directory)
        for name in AWS_VARIABLES:
            daemon.env.pop(name, None)
        daemon.env.update(
            AWS_SHARED_CREDENTIALS_FILE=os.path.join(self.directory, "no-aws-credentials"),
            AWS_CONFIG_FILE=os.path.join(self.directory, "no-aws-config"),
            AWS_EC2_METADATA_DISABLED="true",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
            **env,
        )
        return daemon

    def headers(self, headers: dict[str, str]) -> Any:
        return headers

    def assertClientKeyNeverSent(self) -> None:
        for seen in self.upstream.seen:
            for _, values in seen.headers.getAllRawHeaders():
                for value in values:
                    self.assertNotIn(CLIENT_KEY.encode(), value)
            self.assertNotIn(CLIENT_KEY.encode(), seen.uri)

    def bedrockUpstream(self, request: Request) -> Any:
        """A fake Bedrock: 403 unless the SigV4 signature matches the wire bytes and the test's secret, else the stub's answer."""
        content: Any = request.content
        content.seek(0)
        problem = checkSignature(request, content.read(), {ACCESS_KEY: SECRET_KEY})
        if problem is not None:
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"x-amzn-errortype", b"InvalidSignatureException")
            return json.dumps({"message": problem}).encode()
        content.seek(0)
        return self.stub.render(request)

    async def test_boto3ThroughTLSSignedByLMGate(self) -> None:
        """boto3 with AWS_BEARER_TOKEN_BEDROCK=<LMGate key> over the TLS listener: converse, converse_stream
        and invoke_model reach the fake Bedrock signed by LMGate with its own AWS credentials (the signature
        checked from the wire bytes), the client's bearer key never sent upstream; records say C{managed}
        with the tokens."""
        self.upstream.handler = self.bedrockUpstream
        keyPath, certPath = makeCertificate(self.directory)
        listen = f"ssl:{self.port}:interface=127.0.0.1:privateKey={keyPath}:certKey={certPath}"
        route = f"  bedrock: {{upstream: 'http://127.0.0.1:{self.upstreamPort}', credentials: {{aws: {{region: us-east-1}}}}}}"
        daemon = self.daemon(self.config(listen, route), AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        daemon.start(logfile=self.logPath)
        await daemon.waitUntilHealthyTLS(self.port)

        def calls() -> list[Any]:
            import boto3
            from botocore.config import Config

            os.environ["AWS_BEARER_TOKEN_BEDROCK"] = CLIENT_KEY
            try:
                client = boto3.client(
                    "bedrock-runtime",
                    region_name="us-east-1",
                    endpoint_url=f"https://127.0.0.1:{self.port}/bedrock",
                    verify=certPath,
                    config=Config(retries={"max_attempts": 1}, read_timeout=20, connect_timeout=5),
                )


                def clientAmzHeaders(request: Any, **kwargs: Any) -> None:  # what a client might carry along: never relayed
                    request.headers["X-Amz-Date"] = "20200101T000000Z"
                    request.headers["X-Amz-Content-Sha256"] = "UNSIGNED-PAYLOAD"

                client.meta.events.register("before-send.bedrock-runtime.Converse", clientAmzHeaders)
                messages = [{"role": "user", "content": [{"text": "hello there"}]}]
                converse = client.converse(modelId=MODEL, messages=messages)
                stream = client.converse_stream(modelId=MODEL, messages=messages)
                events = list(stream["stream"])
                invoked = client.invoke_model(
                    modelId=MODEL, contentType="application/json",
                    body=json.dumps({"anthropic_version": "bedrock-2023-05-31", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}),
                )
                answer = json.loads(invoked["body"].read())
            finally:
                del os.environ["AWS_BEARER_TOKEN_BEDROCK"]
            return [converse, events, answer]

        converse, events, answer = await inThread(calls)
        self.assertEqual(await daemon.stop(), 0)

        self.assertTrue(converse["output"]["message"]["content"][0]["text"])
        self.assertGreater(converse["usage"]["outputTokens"], 0)
        self.assertIn("messageStop", [next(iter(e)) for e in events])
        metadata = [e["metadata"] for e in events if "metadata" in e][0]
        self.assertTrue(answer)

        self.assertEqual([seen.request.code for seen in self.upstream.seen], [200, 200, 200])
        for seen in self.upstream.seen:
            [authorization] = seen.headers.getRawHeaders(b"authorization") or []
            self.assertTrue(authorization.startswith(b"AWS4-HMAC-SHA256 Credential=" + ACCESS_KEY.encode()))
        self.assertNotEqual(self.upstream.seen[0].headers.getRawHeaders(b"x-amz-date"), [b"20200101T000000Z"])  # LMGate's own
        self.assertFalse(self.upstream.seen[0].headers.hasHeader(b"x-amz-content-sha256"))
        self.assertIn(b"%3A", self.upstream.seen[0].uri)  # the model id as boto3 encoded it, signed as sent
        self.assertClientKeyNeverSent()

        records = readRecords(self.statsPath)
        self.assertEqual(
            [(r["provider"], r["status"], r["auth"], r["streaming"]) for r in records],
            [("bedrock", 200, "managed", False), ("bedrock", 200, "managed", True), ("bedrock", 200, "managed", False)],
        )
        self.assertEqual(records[0]["input_tokens"], converse["usage"]["inputTokens"])
        self.assertEqual(records[0]["output_tokens"], converse["usage"]["outputTokens"])
        self.assertEqual(records[1]["output_tokens"], metadata["usage"]["outputTokens"])
        self.assertGreater(records[2]["output_tokens"], 0)
        with open(self.logPath, "rb") as f:
            log = f.read()
        for secret in (SECRET_KEY, CLIENT_KEY):
            self.assertNotIn(secret.encode(), log)
            with open(self.statsPath, "rb") as f:
                self.assertNotIn(secret.encode(), f.read())

    async def test_sigv4SignedClientRefused(self) -> None:
        """A client that signs with SigV4 itself (no LMGate key) is refused at authentication, 403 in Bedrock's
        shape, even on a managed route: clients authenticate with their LMGate key."""
        route = f"  bedrock: {{upstream: 'http://127.0.0.1:{self.upstreamPort}', credentials: {{aws: {{region: us-east-1}}}}}}"
        daemon = self.daemon(
            self.config(f"tcp:{self.port}:interface=127.0.0.1", route), AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY
        )
        daemon.start(logfile=self.logPath)
        await daemon.waitUntilHealthy(self.port)
        signed: Any = {
            "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDCLIENT/20261201/us-east-1/bedrock/aws4_request, "
            "SignedHeaders=host;x-amz-date, Signature=" + "0" * 64,
            "X-Amz-Date": "20261201T000000Z",
        }
        response = await treq.post(f"http://127.0.0.1:{self.port}/bedrock/model/{MODEL}/converse", b"{}", headers=signed, persistent=False)
        body = await response.content()
        self.assertEqual(await daemon.stop(), 0)
        self.assertEqual(response.code, 403, body)
        self.assertIn(b"AWS_BEARER_TOKEN_BEDROCK", body)
        self.assertEqual(self.upstream.seen, [])

    async def test_awsMissingServedByTheStub(self) -> None:
        """C{credentials.aws} with C{missing: stub} and no AWS credentials anywhere: the stub serves the route
        (streaming included), said once at start-up; the record says C{stub}. With C{missing: refuse}, the
        start stops with one line naming the route."""
        route = f"  bedrock: {{upstream: 'http://127.0.0.1:{self.upstreamPort}', credentials: {{aws: {{region: us-east-1}}, missing: stub}}}}"
        daemon = self.daemon(self.config(f"tcp:{self.port}:interface=127.0.0.1", route))
        daemon.start(logfile=self.logPath)
        await daemon.waitUntilHealthy(self.port)
        converse = b'{"messages": [{"role": "user", "content": [{"text": "hello"}]}]}'
        headers: Any = {"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}
        response = await treq.post(f"http://127.0.0.1:{self.port}/bedrock/model/{MODEL}/converse", converse, headers=headers, persistent=False)
        body = await response.content()
        self.assertEqual(response.code, 200, body)
        self.assertTrue(json.loads(body)["output"]["message"]["content"][0]["text"])
        response = await treq.post(f"http://127.0.0.1:{self.port}/bedrock/model/{MODEL}/converse-stream", converse, headers=headers, persistent=False)
        streamed = await response.content()
        self.assertEqual(response.code, 200, streamed)
        self.assertIn(b"messageStop", streamed)
        self.assertEqual(await daemon.stop(), 0)
        self.assertEqual(self.upstream.seen, [])
        records = readRecords(self.statsPath)
        self.assertEqual([(r["status"], r["auth"], r["streaming"]) for r in records], [(200, "stub", False), (200, "stub", True)])
        with open(self.logPath, "rb") as f:
            log = f.read()
        self.assertEqual(log.count(b"providers.bedrock: credentials.aws is missing"), 1, log)

        refused = self.daemon(self.config(f"tcp:{self.port}:interface=127.0.0.1", route.replace("missing: stub", "missing: refuse")))
        refused.start()
        self.assertNotEqual(await refused.watch.ended, 0)
        self.assertIn(
            f"lmgate: {refused.configPath}: providers.bedrock.credentials.aws: no AWS credentials found".encode(), refused.watch.output
        )
        self.assertIn(b"(missing: refuse)\n", refused.watch.output)
        self.assertNotIn(b"Traceback", refused.watch.output)

    def writeAccountFile(self, tokenURI: str) -> str:
        from cryptography.hazmat.primitives import serialization

        pem = throwawayKey().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        info = {
            "type": "service_account",
            "project_id": "test-project",
            "private_key_id": "test-key-1",
            "private_key": pem.decode("ascii"),
            "client_email": ACCOUNT,
            "client_id": "1",
            "token_uri": tokenURI,
        }
        path = os.path.join(self.directory, "sa.json" + SECRET_SUFFIX)  # a credential source: the secret scan skips it
        with open(path, "w") as f:
            json.dump(info, f)
        return path

    async def test_vertexTokenMintedByLMGate(self) -> None:
        """A Vertex AI route with C{credentials.google}: LMGate mints an access token from the service account
        (against a fake token endpoint) and sends it as C{Authorization: Bearer}; the client's key (header or
        C{?key=}) never reaches the upstream; streamed and not; records say C{managed} with the tokens."""
        endpoint = FakeTokenEndpoint(throwawayKey())
        self.addCleanup(endpoint.stop)
        accountFile = self.writeAccountFile(endpoint.url)

        def vertex(request: Request) -> Any:
            if request.getHeader(b"authorization") != b"Bearer " + (endpoint.issued[-1] if endpoint.issued else "-").encode():
                request.setResponseCode(401)
                request.setHeader(b"content-type", b"application/json")
                return b'{"error": {"code": 401, "message": "bad token", "status": "UNAUTHENTICATED"}}'
            content: Any = request.content
            content.seek(0)
            return self.stub.render(request)

        self.upstream.handler = vertex
        route = f"  google: {{upstream: 'http://127.0.0.1:{self.upstreamPort}', credentials: {{google: {{service_account_file: {accountFile}}}}}}}"
        daemon = self.daemon(self.config(f"tcp:{self.port}:interface=127.0.0.1", route))
        daemon.start(logfile=self.logPath)
        await daemon.waitUntilHealthy(self.port)
        path = "/google/v1/projects/test-project/locations/us-central1/publishers/google/models/gemini-2.0-flash"
        body = b'{"contents": [{"role": "user", "parts": [{"text": "hello there"}]}]}'
        response = await treq.post(
            f"http://127.0.0.1:{self.port}{path}:generateContent", body,
            headers=self.headers({"Authorization": f"Bearer {CLIENT_KEY}", "Content-Type": "application/json"}), persistent=False,
        )
        plain = await response.content()
        self.assertEqual(response.code, 200, plain)
        response = await treq.post(
            f"http://127.0.0.1:{self.port}{path}:streamGenerateContent?alt=sse&key={CLIENT_KEY}", body,
            headers=self.headers({"Content-Type": "application/json"}), persistent=False,
        )
        streamed = await response.content()
        self.assertEqual(response.code, 200, streamed)
        self.assertTrue(streamed.startswith(b"data: "), streamed)
        self.assertEqual(await daemon.stop(), 0)

        self.assertEqual(endpoint.issued, [issuedToken(1)])
        self.assertEqual(endpoint.grants[0]["iss"], ACCOUNT)
        self.assertEqual([seen.headers.getRawHeaders(b"authorization") for seen in self.upstream.seen], [[b"Bearer " + issuedToken(1).encode()]] * 2)
        self.assertEqual(self.upstream.seen[1].uri, path.removeprefix("/google").encode() + b":streamGenerateContent?alt=sse")
        self.assertClientKeyNeverSent()
        records = readRecords(self.statsPath)
        self.assertEqual([(r["provider"], r["status"], r["auth"], r["streaming"]) for r in records],
                         [("google", 200, "managed", False), ("google", 200, "managed", True)])
        self.assertEqual(records[0]["output_tokens"], json.loads(plain)["usageMetadata"]["candidatesTokenCount"])
        self.assertGreater(records[1]["output_tokens"], 0)
        with open(self.logPath, "rb") as f:
            self.assertNotIn(issuedToken(1).encode(), f.read())

    async def test_vertexAccountFileMissing(self) -> None:
        """A service account file that does not exist: C{missing: refuse} stops the start with one line naming
        the file; C{missing: stub} serves the route from the stub, said once."""
        absent = os.path.join(self.directory, "absent-sa.json")
        route = f"  google: {{upstream: 'http://127.0.0.1:{self.upstreamPort}', credentials: {{google: {{service_account_file: {absent}}}}}}}"
        refused = self.daemon(self.config(f"tcp:{self.port}:interface=127.0.0.1", route))
        refused.start()
        self.assertNotEqual(await refused.watch.ended, 0)
        line = f"lmgate: {refused.configPath}: providers.google.credentials.google: {absent}: cannot read the service account file"
        self.assertIn(line.encode(), refused.watch.output)
        self.assertIn(b"(missing: refuse)\n", refused.watch.output)
        self.assertNotIn(b"Traceback", refused.watch.output)

        stubbed = f"  google: {{upstream: 'http://127.0.0.1:{self.upstreamPort}', credentials: {{google: {{service_account_file: {absent}}}, missing: stub}}}}"
        daemon = self.daemon(self.config(f"tcp:{self.port}:interface=127.0.0.1", stubbed))
        daemon.start(logfile=self.logPath)
        await daemon.waitUntilHealthy(self.port)
        response = await treq.post(
            f"http://127.0.0.1:{self.port}/google/v1/projects/p/locations/l/publishers/google/models/gemini-2.0-flash:generateContent",
            b'{"contents": [{"parts": [{"text": "hi"}]}]}', headers=self.headers({"x-goog-api-key": CLIENT_KEY}), persistent=False,
        )
        body = await response.content()
        self.assertEqual(response.code, 200, body)
        self.assertEqual(await daemon.stop(), 0)
        self.assertEqual(self.upstream.seen, [])
        self.assertEqual([(r["status"], r["auth"]) for r in readRecords(self.statsPath)], [(200, "stub")])
        with open(self.logPath, "rb") as f:
            self.assertEqual(f.read().count(b"providers.google: credentials.google is missing"), 1)
