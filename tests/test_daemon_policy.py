"""
The policy through the running daemon (docs/policy.md): rules and the shipped
RegexGuard refuse calls before they are sent, the openai SDK raising
PermissionDeniedError / BadRequestError with LMGate's message; a plugin module
written into a directory on PYTHONPATH is loaded as the docs tell users; a
plugin that cannot be loaded stops the start with one line; SIGHUP applies new
rules; every call has its one record naming the rules.
"""

from __future__ import annotations

import json
import os
import textwrap
from typing import Any

import openai
from twisted.trial.unittest import TestCase
from twisted.web.server import Request, Site

from tests.daemon import PROJECT, Daemon, daemonDirectory, freePort, inThread, readRecords, waitFor
from tests.helpers import FakeUpstream, listenLocal

KEY = "lmgate-app-key-policy-00000000Zz"
ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}

#: A plugin module, as docs/policy.md shows one: refuses calls carrying a header, tags the others.
PLUGIN = '''
from zope.interface import implementer
from lmgate.policy.interfaces import IPolicy, PolicyDecision


@implementer(IPolicy)
class HeaderGuard:
    def __init__(self, header, tag):
        self.header, self.tag = header.lower(), tag

    def decide(self, call):
        if any(name == self.header for name, value in call.headers):
            return PolicyDecision.deny(f"Requests with {self.header} are not accepted.")
        return PolicyDecision(tags=(self.tag,))

    def observe(self, record):
        pass
'''


def answer(request: Request) -> bytes:
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(ANSWER).encode()


class PolicyDaemonTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.directory, self.allowlistPath = daemonDirectory(self, KEY)
        self.upstream = FakeUpstream()
        self.upstream.handler = answer
        self.upstreamPort = listenLocal(self, Site(self.upstream))
        self.port = freePort()
        self.statsPath = os.path.join(self.directory, "var", "stats.jsonl")
        self.logPath = os.path.join(self.directory, "lmgate.log")
        self.plugins = os.path.join(self.directory, "site")
        os.makedirs(os.path.join(self.plugins, "mycompany"))
        with open(os.path.join(self.plugins, "mycompany", "__init__.py"), "w") as f:
            f.write("")
        with open(os.path.join(self.plugins, "mycompany", "lmgate_policies.py"), "w") as f:
            f.write(textwrap.dedent(PLUGIN))

    def config(self, policy: str) -> str:
        return "\n".join(
            [
                f'listen: "tcp:{self.port}:interface=127.0.0.1"',
                f"allowlist: {{path: {self.allowlistPath}}}",
                f"stats: {{path: {self.statsPath}, flush_interval: 0.2}}",
                "providers:",
                f"  openai: {{upstream: 'http://127.0.0.1:{self.upstreamPort}'}}",
                policy,
            ]
        ) + "\n"

    def daemon(self, policy: str) -> Daemon:
        daemon = Daemon(self, self.config(policy), self.directory)
        daemon.env["PYTHONPATH"] = os.pathsep.join([PROJECT, self.plugins])
        return daemon

    def chat(self, model: str, maxTokens: int = 10, content: str = "hello", headers: dict[str, str] | None = None) -> Any:
        """One chat call through the openai SDK (in a thread): the answer's text, or the exception it raised."""
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/openai/v1", api_key=KEY, max_retries=0)
        try:
            completion = client.chat.completions.create(
                model=model, max_tokens=maxTokens, messages=[{"role": "user", "content": content}], extra_headers=headers or {}
            )
        except openai.APIStatusError as e:
            return e
        return completion.choices[0].message.content

    async def test_rulesPluginsAndReload(self) -> None:
        """Rules, RegexGuard and a user's plugin refuse before sending; SIGHUP swaps the rules."""
        policy = textwrap.dedent(
            """\
            policy:
              rules:
                - {name: small-models, match: {owner: team-a}, allow_models: ["gpt-4o-mini"]}
                - {name: out-cap, max_output_tokens: 100}
                - {name: audit-all, audit: true, tags: [everyone]}
              plugins:
                - {factory: "lmgate.policy.plugins:RegexGuard", options: {patterns: ["\\\\b\\\\d{3}-\\\\d{2}-\\\\d{4}\\\\b"], message: "No SSNs, please.", tags: [pii]}}
                - {factory: "mycompany.lmgate_policies:HeaderGuard", options: {header: X-Debug, tag: checked}}
            """
        )
        daemon = self.daemon(policy)
        daemon.start(logfile=self.logPath)
        await daemon.waitUntilHealthy(self.port)

        self.assertEqual(await inThread(self.chat, "gpt-4o-mini"), "hi")
        denied = await inThread(self.chat, "gpt-4o")
        self.assertIsInstance(denied, openai.PermissionDeniedError)
        self.assertIn("`small-models`: the model `gpt-4o` is not allowed", denied.message)
        self.assertEqual(denied.code, "permission_denied")
        tooMuch = await inThread(self.chat, "gpt-4o-mini", 4096)
        self.assertIsInstance(tooMuch, openai.BadRequestError)
        self.assertIn("`out-cap`", tooMuch.message)
        ssn = await inThread(self.chat, "gpt-4o-mini", 10, "my number is 123-45-6789")
        self.assertIsInstance(ssn, openai.PermissionDeniedError)
        self.assertIn("No SSNs, please.", ssn.message)
        debug = await inThread(self.chat, "gpt-4o-mini", 10, "hello", {"X-Debug": "1"})
        self.assertIsInstance(debug, openai.PermissionDeniedError)
        self.assertIn("Requests with x-debug are not accepted.", debug.message)
        self.assertEqual(len(self.upstream.seen), 1)

        with open(daemon.configPath, "w") as f:
            f.write(self.config(policy.replace('allow_models: ["gpt-4o-mini"]', 'allow_models: ["gpt-4o*"]')))
        daemon.signal("HUP")

        def reloaded() -> bool:
            with open(self.logPath, "rb") as f:
                return b"Reloaded the configuration" in f.read()

        await waitFor(reloaded, "the reload")
        self.assertEqual(await inThread(self.chat, "gpt-4o"), "hi")

        with open(daemon.configPath, "w") as f:  # a rule that does nothing: the file is refused, the rules stay
            f.write(self.config(policy.replace("{name: out-cap, max_output_tokens: 100}", "{name: out-cap}")))
        daemon.signal("HUP")

        def refused() -> bool:
            with open(self.logPath, "rb") as f:
                return b"Keeping the running configuration" in f.read()

        await waitFor(refused, "the refused reload")
        with open(self.logPath, "rb") as f:
            self.assertIn(b"policy.rules[1]: rule 'out-cap' does nothing", f.read())
        kept = await inThread(self.chat, "gpt-3.5-turbo")
        self.assertIsInstance(kept, openai.PermissionDeniedError)
        self.assertEqual(await daemon.stop(), 0)
        self.assertEqual(len(self.upstream.seen), 2)

        records = readRecords(self.statsPath)
        self.assertEqual(len(records), 7)
        got = [(r["status"], r["error"], r["policy"], r["tags"], r["audited"]) for r in records]
        allowed = (200, None, ["small-models", "out-cap", "audit-all", "mycompany.lmgate_policies:HeaderGuard"], ["everyone", "checked"], True)
        self.assertEqual(
            got,
            [
                allowed,
                (403, "policy_denied", ["small-models"], [], False),
                (400, "policy_denied", ["small-models", "out-cap"], [], False),
                (403, "policy_denied", ["small-models", "out-cap", "audit-all", "lmgate.policy.plugins:RegexGuard"], ["everyone", "pii"], True),
                (403, "policy_denied", ["small-models", "out-cap", "audit-all", "mycompany.lmgate_policies:HeaderGuard"], ["everyone"], True),
                allowed,
                (403, "policy_denied", ["small-models"], [], False),
            ],
        )
        with open(self.logPath, "rb") as f:
            log = f.read()
        self.assertIn(b"RegexGuard: pattern 0 matched request", log)
        self.assertNotIn(b"123-45-6789", log)

    async def test_badPluginStopsTheStart(self) -> None:
        """A plugin that is not an IPolicy: the start fails with one line naming the file, the field and the problem."""
        await self.badPlugin()

    async def test_badPluginStopsTheStartWithWorkers(self) -> None:
        """With --workers the supervisor makes the plugins in the foreground too: the same one line, no worker started."""
        await self.badPlugin("--workers", "2")

    async def badPlugin(self, *extra: str) -> None:
        daemon = self.daemon('policy:\n  plugins:\n    - {factory: "mycompany.lmgate_policies:PolicyDecision"}\n')
        daemon.start(*extra)
        code = await daemon.watch.ended
        self.assertNotEqual(code, 0)
        output = daemon.watch.output.decode()
        self.assertIn(
            f"{daemon.configPath}: policy.plugins[0].factory: 'mycompany.lmgate_policies:PolicyDecision' made an object that does not provide IPolicy",
            output,
        )
        self.assertNotIn("Traceback", output)
