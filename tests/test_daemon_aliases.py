"""
Model aliases end to end: C{twistd -n lmgate} as a child process, two fake
Anthropic-format upstreams on loopback (one pass-through route, one managed),
an alias on the native route, the byte-exact rewrite of the body's model, the
404 C{model_not_found} answer, and SIGHUP applying new aliases.
"""

from __future__ import annotations

import json
import os
from typing import Any

import treq
from twisted.trial.unittest import TestCase
from twisted.web.server import Request, Site

from tests.daemon import Daemon, daemonDirectory, freePort, inThread, readRecords, waitFor
from tests.helpers import FakeUpstream, jsonAnswer, listenLocal
from tests.secretscan import providerSecret

CLIENT_KEY = "lmgate-app-key-0000000000000000Qq"
PROVIDER_KEY = providerSecret("anthropic-111111111111111Aa")
#: "model" is not first, appears inside the messages, and the body has odd spacing: only the top-level value changes.
ALIASED = (
    b'{"max_tokens": 5,  "messages": [{"role": "user", "content": "model: \\"fast-claude\\"", "model": "x"}],\n'
    b' "model" : "fast-claude", "stream": false}'
)
ANSWER = {"id": "msg_1", "type": "message", "model": "claude-3-5-haiku", "usage": {"input_tokens": 3, "output_tokens": 2}}


def echoModel(request: Request) -> bytes:
    """Answer as Anthropic does, naming the model the request asked for."""
    content: Any = request.content
    content.seek(0)
    model = json.loads(content.read())["model"]
    return jsonAnswer(dict(ANSWER, model=model))(request)


class AliasDaemonTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.directory, self.allowlistPath = daemonDirectory(self, CLIENT_KEY)
        self.plain, self.managed = FakeUpstream(), FakeUpstream()
        self.plain.handler = self.managed.handler = echoModel
        self.plainPort = listenLocal(self, Site(self.plain))
        self.managedPort = listenLocal(self, Site(self.managed))
        self.port = freePort()
        self.statsPath = os.path.join(self.directory, "var", "stats.jsonl")
        self.logPath = os.path.join(self.directory, "var", "twistd.log")

    def config(self, models: str) -> str:
        return "\n".join(
            [
                f'listen: "tcp:{self.port}:interface=127.0.0.1"',
                f"allowlist: {{path: {self.allowlistPath}}}",
                f"stats: {{path: {self.statsPath}, flush_interval: 0.2}}",
                "providers:",
                f"  anthropic: {{upstream: 'http://127.0.0.1:{self.plainPort}'}}",
                f"  claude-eu: {{upstream: 'http://127.0.0.1:{self.managedPort}', format: anthropic,"
                f" credentials: {{env: LMGATE_TESTS_ANTHROPIC_KEY}}}}",
                f"  openai: {{upstream: 'http://127.0.0.1:{self.plainPort}'}}",
                models,
            ]
        ) + "\n"

    async def post(self, path: str, body: bytes) -> tuple[int, Any]:
        headers: Any = {"x-api-key": CLIENT_KEY, "content-type": "application/json"}
        response = await treq.post(f"http://127.0.0.1:{self.port}{path}", body, headers=headers, persistent=False)
        return response.code, json.loads(await response.content())

    async def test_aliasOnANativeRoute(self) -> None:
        """An alias in the body of /anthropic/v1/messages goes to its anthropic-format target's route
        (its upstream, its managed key, never the client's), with only the top-level model's value
        rewritten; a model that is no alias is relayed byte for byte; an alias with no target of the
        route's format is refused 404 in Anthropic's shape, never relayed; each call is recorded once
        with its alias, the target's route and model; SIGHUP applies a changed alias."""
        models = (
            "models:\n"
            "  fast-claude: {targets: [{provider: claude-eu, model: claude-3-5-haiku}, {provider: openai, model: gpt-4o-mini}]}\n"
            "  only-openai: {targets: [{provider: openai, model: gpt-4o-mini}]}\n"
        )
        daemon = Daemon(self, self.config(models), self.directory, env={"LMGATE_TESTS_ANTHROPIC_KEY": PROVIDER_KEY})
        daemon.start(logfile=self.logPath)
        await daemon.waitUntilHealthy(self.port)

        code, answer = await self.post("/anthropic/v1/messages", ALIASED)
        self.assertEqual((code, answer), (200, ANSWER))  # the target's model, as the provider names it
        plainBody = b'{"model": "claude-3-opus", "max_tokens": 5, "messages": []}'
        code, _ = await self.post("/anthropic/v1/messages", plainBody)
        self.assertEqual(code, 200)
        code, refused = await self.post("/anthropic/v1/messages", b'{"model": "only-openai", "messages": []}')
        self.assertEqual(code, 404)
        self.assertEqual(refused["type"], "error")
        self.assertEqual(refused["error"]["type"], "not_found_error")
        self.assertIn("only-openai", refused["error"]["message"])

        with open(daemon.configPath, "w") as f:
            f.write(self.config("models:\n  fast-claude: {targets: [{provider: anthropic, model: claude-3-opus}]}\n"))
        daemon.signal("HUP")

        def reloaded() -> bool:
            with open(self.logPath, "rb") as f:
                return b"Reloaded the configuration" in f.read()

        await waitFor(reloaded, "the reload")
        code, _ = await self.post("/anthropic/v1/messages", ALIASED)
        self.assertEqual(code, 200)
        self.assertEqual(await daemon.stop(), 0)

        [viaAlias] = self.managed.seen
        self.assertEqual(viaAlias.uri, b"/v1/messages")
        self.assertEqual(viaAlias.body, ALIASED.replace(b'"model" : "fast-claude"', b'"model" : "claude-3-5-haiku"'))
        self.assertEqual(viaAlias.headers.getRawHeaders(b"x-api-key"), [PROVIDER_KEY.encode()])
        plainSeen, afterReload = self.plain.seen
        self.assertEqual(plainSeen.body, plainBody)
        self.assertEqual(plainSeen.headers.getRawHeaders(b"x-api-key"), [CLIENT_KEY.encode()])
        self.assertEqual(afterReload.body, ALIASED.replace(b'"model" : "fast-claude"', b'"model" : "claude-3-opus"'))

        records = readRecords(self.statsPath)
        self.assertEqual(
            [(r["status"], r["provider"], r["model"], r["alias"], r["auth"], r["attempts"]) for r in records],
            [
                (200, "claude-eu", "claude-3-5-haiku", "fast-claude", "managed", 1),
                (200, "anthropic", "claude-3-opus", None, "client", 1),
                (404, "anthropic", "only-openai", None, "client", 0),
                (200, "anthropic", "claude-3-opus", "fast-claude", "client", 1),
            ],
        )
        self.assertEqual(records[2]["error"], "model_not_found")
        # request_bytes: what the client sent (docs/records.md), not the body rewritten for the target
        self.assertEqual([r["request_bytes"] for r in records], [len(ALIASED), len(plainBody), 40, len(ALIASED)])
        self.assertNotEqual(len(viaAlias.body), len(ALIASED))


EMBEDDING = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5]}],
    "model": "emb-small",
    "usage": {"prompt_tokens": 1, "total_tokens": 1},
}


class UnifiedDaemonTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        from twisted.internet import reactor

        from lmgate.stub.server import makeStubResource

        self.directory, self.allowlistPath = daemonDirectory(self, CLIENT_KEY)
        self.stubPort = listenLocal(self, Site(makeStubResource(reactor)))
        self.compat = FakeUpstream()
        self.compat.handler = jsonAnswer(EMBEDDING)
        self.compatPort = listenLocal(self, Site(self.compat))
        self.port = freePort()
        self.statsPath = os.path.join(self.directory, "var", "stats.jsonl")

    async def test_openaiSDKOnTheUnifiedEndpoint(self) -> None:
        """The openai SDK pointed at /v1 reaches an alias's openai-format target, streamed and not;
        lists the aliases it can use; reaches a route directly as <route>/<model> under that route's
        openai_path; and gets NotFoundError (404 model_not_found, never relayed) for an unknown model,
        an alias with no openai-format target and a route of another format; a body too large to read
        in memory is refused 413 and another operation 404. One record each, with
        the target's route and model and the alias."""
        config = "\n".join(
            [
                f'listen: "tcp:{self.port}:interface=127.0.0.1"',
                f"allowlist: {{path: {self.allowlistPath}}}",
                f"stats: {{path: {self.statsPath}, flush_interval: 0.2}}",
                "providers:",
                f"  openai: {{upstream: 'http://127.0.0.1:{self.stubPort}'}}",
                f"  compat: {{upstream: 'http://127.0.0.1:{self.compatPort}', format: openai, openai_path: /v1beta/openai/}}",
                f"  anthropic: {{upstream: 'http://127.0.0.1:{self.compatPort}'}}",
                "models:",
                "  default-chat: {targets: [{provider: openai, model: gpt-4o-mini}]}",
                "  claude-only: {targets: [{provider: anthropic, model: claude-3-5-haiku}]}",
            ]
        ) + "\n"
        daemon = Daemon(self, config, self.directory)
        daemon.start()
        await daemon.waitUntilHealthy(self.port)
        base = f"http://127.0.0.1:{self.port}/v1"

        def calls() -> list[Any]:
            import openai

            client = openai.OpenAI(base_url=base, api_key=CLIENT_KEY, max_retries=0, timeout=20)
            chat = client.chat.completions.create(model="default-chat", messages=[{"role": "user", "content": "hi there"}])
            chunks = list(
                client.chat.completions.create(
                    model="default-chat",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            listed = [m.id for m in client.models.list()]
            embedding = client.embeddings.create(model="compat/emb-small", input="hi", encoding_format="float")
            refused = []
            for model in ("no-such-model", "claude-only", "anthropic/claude-3-5-haiku"):
                try:
                    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
                except openai.NotFoundError as e:
                    refused.append((model, e.code))
            return [chat, chunks, listed, embedding, refused]

        chat, chunks, listed, embedding, refused = await inThread(calls)
        headers: Any = {"Authorization": f"Bearer {CLIENT_KEY}"}
        big = b'{"model": "default-chat", "messages": [{"role": "user", "content": "' + b"x" * (1024 * 1024) + b'"}]}'
        tooLarge = await treq.post(base + "/chat/completions", big, headers=headers, persistent=False)
        self.assertEqual((tooLarge.code, json.loads(await tooLarge.content())["error"]["code"]), (413, "request_too_large"))
        other = await treq.post(base + "/audio/speech", b'{"model": "default-chat"}', headers=headers, persistent=False)
        self.assertEqual((other.code, json.loads(await other.content())["error"]["code"]), (404, "unknown_url"))
        self.assertTrue(chat.choices[0].message.content)
        self.assertIsNotNone(chunks[-1].usage)
        self.assertEqual(listed, ["default-chat"])
        self.assertEqual(embedding.data[0].embedding, [0.25, -0.5])
        self.assertEqual(
            refused,
            [
                ("no-such-model", "model_not_found"),
                ("claude-only", "model_not_found"),
                ("anthropic/claude-3-5-haiku", "model_not_found"),
            ],
        )
        self.assertEqual(await daemon.stop(), 0)

        [seen] = self.compat.seen  # nothing refused reached an upstream
        self.assertEqual(seen.uri, b"/v1beta/openai/embeddings")
        self.assertEqual(json.loads(seen.body)["model"], "emb-small")
        self.assertEqual(seen.headers.getRawHeaders(b"authorization"), [f"Bearer {CLIENT_KEY}".encode()])
        records = readRecords(self.statsPath)
        self.assertEqual(
            [(r["endpoint"], r["status"], r["provider"], r["model"], r["alias"], r["attempts"], r["error"]) for r in records],
            [
                ("/v1/chat/completions", 200, "openai", "gpt-4o-mini", "default-chat", 1, None),
                ("/v1/chat/completions", 200, "openai", "gpt-4o-mini", "default-chat", 1, None),
                ("/v1/models", 200, "v1", None, None, 0, None),
                ("/v1/embeddings", 200, "compat", "emb-small", None, 1, None),
                ("/v1/chat/completions", 404, "v1", "no-such-model", None, 0, "model_not_found"),
                ("/v1/chat/completions", 404, "v1", "claude-only", None, 0, "model_not_found"),
                ("/v1/chat/completions", 404, "v1", "anthropic/claude-3-5-haiku", None, 0, "model_not_found"),
                ("/v1/chat/completions", 413, "v1", None, None, 0, "body_too_large"),  # a spooled body is not read
                ("/v1/audio/speech", 404, "v1", "default-chat", None, 0, "not_found"),
            ],
        )
        self.assertTrue(records[1]["streaming"])

    async def test_fallbackThroughTheDaemon(self) -> None:
        """Through the running daemon: the alias's first target answers 503, the client gets the
        second target's answer; one record (two attempts, the second target's model) and one
        access-log line for the call."""
        def byModel(request: Request) -> bytes:
            content: Any = request.content
            content.seek(0)
            if json.loads(content.read())["model"] == "first":
                return jsonAnswer({"error": {"message": "overloaded"}}, 503)(request)
            return jsonAnswer({"id": "chatcmpl-2", "object": "chat.completion", "model": "second", "choices": []})(request)

        self.compat.handler = byModel
        config = "\n".join(
            [
                f'listen: "tcp:{self.port}:interface=127.0.0.1"',
                f"allowlist: {{path: {self.allowlistPath}}}",
                f"stats: {{path: {self.statsPath}, flush_interval: 0.2}}",
                "providers:",
                f"  compat: {{upstream: 'http://127.0.0.1:{self.compatPort}', format: openai}}",
                "models:",
                "  chat: {targets: [{provider: compat, model: first}, {provider: compat, model: second}]}",
                "fallback: {on: [503, connect]}",
            ]
        ) + "\n"
        daemon = Daemon(self, config, self.directory)
        daemon.start()
        await daemon.waitUntilHealthy(self.port)
        headers: Any = {"Authorization": f"Bearer {CLIENT_KEY}"}
        response = await treq.post(
            f"http://127.0.0.1:{self.port}/v1/chat/completions", b'{"model": "chat", "messages": []}', headers=headers,
            persistent=False,
        )
        self.assertEqual((response.code, json.loads(await response.content())["id"]), (200, "chatcmpl-2"))
        self.assertEqual(await daemon.stop(), 0)
        self.assertEqual([json.loads(s.body)["model"] for s in self.compat.seen], ["first", "second"])
        [record] = readRecords(self.statsPath)
        self.assertEqual((record["status"], record["provider"], record["model"], record["alias"], record["attempts"]),
                         (200, "compat", "second", "chat", 2))
        with open(os.path.join(os.path.dirname(self.statsPath), "access.log")) as f:
            self.assertEqual(len([line for line in f if "/v1/chat/completions" in line]), 1)
