"""
The policy step (docs/policy.md, "Rules" and "Plugins"): rules matched on the
caller, route, method, path and the model the client asked for, refusing in
each provider's own shape and recorded as C{policy_denied}; plugins loaded
from dotted names, deciding now or later, failing closed (503, C{policy_error})
on a fake clock; the shipped C{RegexGuard}; the rules and plugins on reload.

Driven as TCP does it: a L{GatewayChannel} on a L{StringTransport}, the
gateway's clock a L{MemoryReactorClock}, an upstream that keeps what it is sent.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lmgate.config import ProviderSettings, settingsFrom
from lmgate.errors import ConfigError
from lmgate.gate.admission import CallContext
from lmgate.gate.gateway import Gateway, GatewayResource, GatewaySite
from lmgate.gate.providers import Provider
from lmgate.gate.steps import Limit, ResolveAlias, defaultPipeline
from lmgate.governance.aliases import FallbackSettings, parseModels
from lmgate.policy.engine import LoadedPlugin, Policy, loadPlugins
from lmgate.policy.interfaces import IPolicy, PolicyCall, PolicyDecision
from lmgate.policy.plugins import RegexGuard
from lmgate.policy.settings import PolicySettings, parsePolicy
from lmgate.policy.step import PolicyStep
from lmgate.records.record import KeyEntry
from tests.helpers import ALLOWED_ENTRY, ALLOWED_KEY, RecordingSink, StaticKeys

INTERN_KEY = b"sk-test-intern-0123456789abcdef0"
INTERN_ENTRY = KeyEntry("intern1", "interns", "2026-11-30")

#: One call per provider format: target, body naming a model and asking for C{out} output tokens.
FORMATS = {
    "openai": (b"/openai/v1/chat/completions", '{{"model": "{model}", "max_tokens": {out}, "messages": []}}'),
    "anthropic": (b"/anthropic/v1/messages", '{{"model": "{model}", "max_tokens": {out}, "messages": []}}'),
    "google": (b"/google/v1beta/models/{model}:generateContent", '{{"contents": [], "generationConfig": {{"maxOutputTokens": {out}}}}}'),
    "bedrock": (b"/bedrock/model/{model}/converse", '{{"messages": [], "inferenceConfig": {{"maxTokens": {out}}}}}'),
}
MODELS = {"openai": "gpt-4o", "anthropic": "claude-haiku-4", "google": "gemini-2.0-flash", "bedrock": "anthropic.claude-v2"}


def call(format: str, model: str | None = None, out: int = 100, key: bytes = ALLOWED_KEY, method: bytes = b"POST") -> bytes:
    """A whole request on the route of C{format}."""
    target, template = FORMATS[format]
    model = model or MODELS[format]
    target = target.replace(b"{model}", model.encode())
    body = template.format(model=model, out=out).encode()
    return b"%s %s HTTP/1.1\r\nHost: gate\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (
        method,
        target,
        key,
        len(body),
        body,
    )


def refusal(transport: StringTransport) -> tuple[int, str, str]:
    """The answer's status, its error type in the provider's words, and its message."""
    head, _, raw = transport.value().partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    body = json.loads(raw)
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b": ")
        if name.lower() == b"x-amzn-errortype":
            return status, value.decode(), body["message"]
    error = body["error"]
    if "status" in error:
        return status, error["status"], error["message"]
    if body.get("type") == "error":
        return status, error["type"], error["message"]
    return status, f'{error["type"]}/{error["code"]}', error["message"]


#: The error type each format's refusals carry: (403 deny, 400 cap, 503 plugin failure).
SHAPES = {
    "openai": ("invalid_request_error/permission_denied", "invalid_request_error/policy_limit_exceeded", "api_error/policy_unavailable"),
    "anthropic": ("permission_error", "invalid_request_error", "api_error"),
    "google": ("PERMISSION_DENIED", "INVALID_ARGUMENT", "UNAVAILABLE"),
    "bedrock": ("AccessDeniedException", "ValidationException", "ServiceUnavailableException"),
}


class FakeUpstream:
    """Keeps every request sent upstream, never answers."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes]] = []

    def send(self, method: bytes, url: bytes, headers: Headers, body: Any) -> Deferred[IResponse]:
        self.sent.append((method, url))
        return Deferred()


@implementer(IPolicy)
class Scripted:
    """A plugin answering what the test says; it notes the calls and records it is shown."""

    def __init__(self, answer: Any = None) -> None:
        self.answer = answer
        self.calls: list[PolicyCall] = []
        self.records: list[Any] = []

    def decide(self, call: PolicyCall) -> Any:
        self.calls.append(call)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def observe(self, record: Any) -> None:
        self.records.append(record)


class FakeAudit:
    """Takes every audited call's line (the audit trail's part), noting its request id."""

    def __init__(self) -> None:
        self.marked: list[str] = []

    def requestBody(self, context: Any, request: Any) -> bytes:
        return context.body or b""

    def write(self, record: Any, *rest: Any) -> bool:
        self.marked.append(record.request_id)
        return True


class NotAPolicy:
    """Made by a factory, but no IPolicy."""

    def __init__(self, **options: Any) -> None:
        pass


def exploding(**options: Any) -> Any:
    raise RuntimeError("no licence file")


class Harness(SynchronousTestCase):
    """A gateway with one route per format and the policy the test gives."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.upstream = FakeUpstream()
        self.sink = RecordingSink()
        providers = {
            name: Provider(ProviderSettings(name, f"http://{name}.invalid", name)) for name in ("openai", "anthropic", "google", "bedrock")
        }
        keys = StaticKeys({ALLOWED_KEY: ALLOWED_ENTRY, INTERN_KEY: INTERN_ENTRY})
        self.gateway = Gateway(providers, keys, self.upstream, self.sink, self.clock)  # type: ignore[arg-type]
        self.audit = self.gateway.audit = FakeAudit()  # type: ignore[assignment]
        self.site = GatewaySite(GatewayResource(self.gateway), reactor=self.clock)

    def usePolicy(self, section: Any, plugins: list[Any] = (), bytesPerToken: float = 4.0) -> None:  # type: ignore[assignment]
        settings = parsePolicy(section)
        loaded = [LoadedPlugin(f"test:plugin{i}", p) for i, p in enumerate(plugins)]
        self.gateway.policy = Policy(settings, loaded, bytesPerToken, self.clock, self.gateway.rateLog)

    def send(self, request: bytes) -> StringTransport:
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(request)
        self.channel = channel
        return transport


class StepTests(Harness):
    """The step's place in the pipeline, and its cost without a policy."""

    def test_placeInThePipeline(self) -> None:
        """After the alias is resolved (rules see the alias), before the usage limits (a refused call reserves nothing)."""
        kinds = [type(step) for step in defaultPipeline(self.gateway).atBody]
        self.assertEqual(kinds[-3:], [ResolveAlias, PolicyStep, Limit])

    def test_noPolicyLetsEverythingOn(self) -> None:
        """No policy, or an empty one: every call is relayed, the record's policy fields empty."""
        self.send(call("openai"))
        self.usePolicy(None)
        self.assertFalse(self.gateway.policy and self.gateway.policy.active)
        self.send(call("openai"))
        self.assertEqual(len(self.upstream.sent), 2)


class RuleTests(Harness):
    """Each kind of rule on each provider format: refused in the provider's shape, recorded as policy_denied."""

    def check(self, format: str, request: bytes, status: int, shape: str, words: str, rule: str) -> None:
        transport = self.send(request)
        got = refusal(transport)
        self.assertEqual(got[:2], (status, shape), format)
        self.assertIn(words, got[2])
        self.assertIn(f"`{rule}`", got[2])
        record = self.sink.records[-1]
        self.assertEqual((record.status, record.error, record.policy[-1]), (status, "policy_denied", rule))

    def test_deny(self) -> None:
        """C{deny}: 403 with the rule's message, in every format's permission error."""
        self.usePolicy({"rules": [{"name": "no-batch", "match": {"method": "post"}, "deny": "Not through this gateway."}]})
        for format in FORMATS:
            self.check(format, call(format), 403, SHAPES[format][0], "Not through this gateway.", "no-batch")
        self.assertEqual(self.upstream.sent, [])

    def test_allowModels(self) -> None:
        """C{allow_models}: a model matching a glob goes on; any other is refused 403, whatever the format says it in."""
        self.usePolicy({"rules": [{"name": "small", "match": {"owner": "interns"}, "allow_models": ["gpt-4o-mini", "claude-haiku-*", "gemini-*-flash", "anthropic.*"]}]})
        small = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4", "google": "gemini-2.0-flash", "bedrock": "anthropic.claude-v2"}
        for format in FORMATS:
            self.send(call(format, small[format], key=INTERN_KEY))
        self.assertEqual(len(self.upstream.sent), 4)
        self.assertEqual([r.policy for r in self.sink.records], [])  # still in flight
        big = {"openai": "gpt-4o", "anthropic": "claude-opus-4", "google": "gemini-2.0-pro", "bedrock": "meta.llama3"}
        for format in FORMATS:
            self.check(format, call(format, big[format], key=INTERN_KEY), 403, SHAPES[format][0], f"`{big[format]}` is not allowed", "small")
        self.send(call("openai", "gpt-4o"))  # another owner: the rule does not match
        self.assertEqual(len(self.upstream.sent), 5)

    def test_allowModelsIsCaseSensitive(self) -> None:
        """Globs match case-sensitively: GPT-4O-MINI is not gpt-4o-mini."""
        self.usePolicy({"rules": [{"name": "small", "allow_models": ["gpt-4o-mini"]}]})
        self.check("openai", call("openai", "GPT-4O-MINI"), 403, SHAPES["openai"][0], "not allowed", "small")

    def test_allowModelsWithoutAModel(self) -> None:
        """
        Fail closed: a call that names no model is refused by C{allow_models},
        unless its method sends no prompt (GET, HEAD, OPTIONS, DELETE).
        """
        self.usePolicy({"rules": [{"name": "small", "allow_models": ["gpt-4o-mini"]}]})
        body = b'{"input_file_id": "f", "endpoint": "/v1/chat/completions"}'
        request = b"POST /openai/v1/batches HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (ALLOWED_KEY, len(body), body)
        self.check("openai", request, 403, SHAPES["openai"][0], "names no model", "small")
        self.send(b"GET /openai/v1/files HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer %s\r\n\r\n" % ALLOWED_KEY)
        self.assertEqual(len(self.upstream.sent), 1)

    def test_spooledBody(self) -> None:
        """A body over 1 MiB is not read: under C{allow_models} or C{max_output_tokens} it is refused (fail closed)."""
        body = b'{"model": "gpt-4o-mini", "max_tokens": 5, "pad": "%s"}' % (b"a" * (1 << 20))
        request = b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (ALLOWED_KEY, len(body), body)
        self.usePolicy({"rules": [{"name": "small", "allow_models": ["gpt-4o-mini"]}]})
        self.check("openai", request, 403, SHAPES["openai"][0], "too large for LMGate to read the model", "small")
        self.usePolicy({"rules": [{"name": "out", "max_output_tokens": 100}]})
        self.check("openai", request, 400, SHAPES["openai"][1], "too large for LMGate to read its output cap", "out")
        self.usePolicy({"rules": [{"name": "tag", "tags": ["big"]}]})
        self.send(request)
        self.assertEqual(len(self.upstream.sent), 1)

    def test_maxInputTokens(self) -> None:
        """C{max_input_tokens}: ⌈body bytes ÷ bytes_per_token⌉ over it is refused 400 in every format."""
        for format in FORMATS:
            size = len(call(format).partition(b"\r\n\r\n")[2])
            self.usePolicy({"rules": [{"name": "prompt-cap", "max_input_tokens": size // 2}]}, bytesPerToken=2.0)
            self.send(call(format))  # exactly at the cap (size even) or one under
            self.usePolicy({"rules": [{"name": "prompt-cap", "max_input_tokens": -(-size // 2) - 1}]}, bytesPerToken=2.0)
            self.check(format, call(format), 400, SHAPES[format][1], "over the", "prompt-cap")
        self.assertEqual(len(self.upstream.sent), sum(1 for f in FORMATS if len(call(f).partition(b"\r\n\r\n")[2]) % 2 == 0))

    def test_maxOutputTokens(self) -> None:
        """C{max_output_tokens}: each format's output cap over it is refused 400; at it, or not given, goes on."""
        self.usePolicy({"rules": [{"name": "out-cap", "max_output_tokens": 8192}]})
        for format in FORMATS:
            self.send(call(format, out=8192))
            self.check(format, call(format, out=8193), 400, SHAPES[format][1], "8193 output tokens", "out-cap")
        self.assertEqual(len(self.upstream.sent), 4)

    def test_recordNamesMatchingRulesTagsAudit(self) -> None:
        """Every matching rule adds its name and tags (each once) in order; C{audit} marks the record audited."""
        self.usePolicy(
            {
                "rules": [
                    {"name": "legal", "match": {"owner": "team-a"}, "audit": True, "tags": ["legal", "eu"]},
                    {"name": "other-owner", "match": {"owner": "interns"}, "tags": ["x"]},
                    {"name": "everyone", "tags": ["eu", "all"]},
                ]
            }
        )
        self.send(call("anthropic"))
        self.assertEqual(len(self.upstream.sent), 1)
        self.channel.connectionLost(Exception("gone"))
        [record] = self.sink.records
        self.assertEqual((record.policy, record.tags, record.audited), (["legal", "everyone"], ["legal", "eu", "all"], True))
        self.assertEqual(self.audit.marked, [record.request_id])

    def test_firstDenyWins(self) -> None:
        """Rules run in order: the first refusing rule ends it; the later ones are not applied nor named."""
        self.usePolicy(
            {
                "rules": [
                    {"name": "tag", "tags": ["seen"]},
                    {"name": "cap", "max_output_tokens": 10},
                    {"name": "deny", "deny": "No."},
                ]
            }
        )
        self.check("google", call("google"), 400, SHAPES["google"][1], "output tokens", "cap")
        record = self.sink.records[-1]
        self.assertEqual((record.policy, record.tags), (["tag", "cap"], ["seen"]))


    def test_sameCallerOtherBodies(self) -> None:
        """
        What the rules make of one caller, route, path and model is kept, but
        every call's own body is still checked against the caps, in rule order:
        a small body passes, a large one is refused by the first rule whose cap
        it passes, the next small one passes again; another model, or another
        key, is judged afresh.
        """
        self.usePolicy(
            {
                "rules": [
                    {"name": "tag", "tags": ["seen"]},
                    {"name": "in-cap", "max_input_tokens": 60},
                    {"name": "out-cap", "max_output_tokens": 50, "tags": ["capped"]},
                    {"name": "minis", "allow_models": ["gpt-4o-mini"]},
                ]
            },
            bytesPerToken=4.0,
        )
        for out, expected in ((10, None), (51, "out-cap"), (10, None), (50, None), (51, "out-cap")):
            before = len(self.upstream.sent)
            transport = self.send(call("openai", "gpt-4o-mini", out=out))
            if expected is None:
                self.assertEqual(len(self.upstream.sent), before + 1, out)
                self.channel.connectionLost(Exception("gone"))
                self.assertEqual((self.sink.records[-1].policy, self.sink.records[-1].tags), (["tag", "in-cap", "out-cap", "minis"], ["seen", "capped"]))
            else:
                self.assertEqual(refusal(transport)[0], 400)
                self.assertEqual((self.sink.records[-1].policy, self.sink.records[-1].tags), (["tag", "in-cap", "out-cap"], ["seen", "capped"]))
        long = json.dumps({"model": "gpt-4o-mini", "max_tokens": 1, "messages": [{"role": "user", "content": "x" * 300}]}).encode()
        request = b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer %s\r\nContent-Length: %d\r\n\r\n%s" % (ALLOWED_KEY, len(long), long)
        self.check("openai", request, 400, SHAPES["openai"][1], "over the 60 allowed", "in-cap")
        self.assertEqual(self.sink.records[-1].policy, ["tag", "in-cap"])
        self.check("openai", call("openai", "gpt-4o", out=10), 403, SHAPES["openai"][0], "`gpt-4o` is not allowed", "minis")
        self.check("openai", call("openai", "gpt-4o", out=51), 400, SHAPES["openai"][1], "output tokens", "out-cap")  # the cap comes first

    def test_manyCallersStayBounded(self) -> None:
        """The kept judgements are bounded: past the bound they are made afresh, and calls are judged the same."""
        from lmgate.policy import engine

        self.patch(engine, "PLAN_CACHE_SIZE", 3)
        self.usePolicy({"rules": [{"name": "minis", "allow_models": ["gpt-4o-mini"]}]})
        policy = self.gateway.policy
        assert policy is not None
        for i in range(10):
            self.check("openai", call("openai", f"gpt-{i}"), 403, SHAPES["openai"][0], f"`gpt-{i}` is not allowed", "minis")
            self.assertLessEqual(len(policy._plans), 3)
        self.send(call("openai", "gpt-4o-mini"))
        self.assertEqual(len(self.upstream.sent), 1)


class MatchTests(SynchronousTestCase):
    """Each match field, on a call's context directly."""

    def decide(self, match: dict[str, Any], method: bytes = b"POST", rest: bytes = b"/v1/chat/completions", body: bytes = b'{"model": "gpt-4o"}', alias: str | None = None, format: str = "openai") -> bool:
        settings = parsePolicy({"rules": [{"name": "r", "match": match, "deny": "no"}]})
        policy = Policy(settings, (), 4.0, MemoryReactorClock(), None)  # type: ignore[arg-type]
        context = CallContext(method, b"/x" + rest, Headers())
        context.entry, context.provider, context.rest = ALLOWED_ENTRY, Provider(ProviderSettings("main", "http://u.invalid", format)), rest
        context.body, context.bodySize, context.alias = body, len(body), alias
        return policy.admit(context) is not None

    def test_fields(self) -> None:
        self.assertTrue(self.decide({"key": "app1"}))
        self.assertFalse(self.decide({"key": ["app2", "app3"]}))
        self.assertTrue(self.decide({"owner": ["x", "team-a"]}))
        self.assertTrue(self.decide({"provider": "main"}))
        self.assertFalse(self.decide({"provider": "openai"}))
        self.assertTrue(self.decide({"method": "post"}))
        self.assertFalse(self.decide({"method": "GET"}))
        self.assertTrue(self.decide({"path": "/v1/chat/*"}))
        self.assertFalse(self.decide({"path": "/v1/batches*"}))
        self.assertTrue(self.decide({"path": "/v1/batches*"}, rest=b"/v1/batches/b1/cancel"))
        self.assertTrue(self.decide({"model": "gpt-4o*"}))
        self.assertFalse(self.decide({"model": "GPT-4O*"}))
        self.assertFalse(self.decide({"model": "*"}, body=b'{"input": "no model"}'))
        self.assertTrue(self.decide({"owner": "team-a", "model": "gpt-*"}))
        self.assertFalse(self.decide({"owner": "team-a", "model": "claude-*"}))

    def test_modelIsWhatTheClientAskedFor(self) -> None:
        """The alias the client used, not the target it was rewritten to; else the body's or the URL's model."""
        self.assertTrue(self.decide({"model": "default-chat"}, body=b'{"model": "gpt-4o"}', alias="default-chat"))
        self.assertFalse(self.decide({"model": "gpt-4o"}, body=b'{"model": "gpt-4o"}', alias="default-chat"))
        self.assertTrue(self.decide({"alias": "default-chat"}, alias="default-chat"))
        self.assertFalse(self.decide({"alias": "default-chat"}))
        self.assertTrue(self.decide({"model": "gemini-*"}, rest=b"/v1beta/models/gemini-2.0-flash:generateContent", body=b"{}", format="google"))


class AliasTests(Harness):
    """Through the gateway: a rule sees the alias, though the body relayed names the target."""

    def test_aliasAllowed(self) -> None:
        aliases = parseModels({"default-chat": {"targets": [{"provider": "openai", "model": "gpt-4o"}]}}, {"openai": "openai"})
        self.gateway.setAliases(aliases, FallbackSettings())
        self.usePolicy({"rules": [{"name": "small", "allow_models": ["default-chat"]}]})
        self.send(call("openai", "default-chat"))
        self.assertEqual(len(self.upstream.sent), 1)
        transport = self.send(call("openai", "gpt-4o"))
        self.assertEqual(refusal(transport)[0], 403)


class PluginTests(Harness):
    """Plugins decide after the rules, in order, now or later; failing ones refuse 503 (fail closed)."""

    def test_allowDenyAuditTags(self) -> None:
        first = Scripted(PolicyDecision(audit=True, tags=("pii",)))
        second = Scripted(PolicyDecision.deny("Too big for you.", status=400))
        self.usePolicy({"rules": [{"name": "r", "tags": ["t"]}]}, [first, second])
        for format in FORMATS:
            self.assertEqual(refusal(self.send(call(format)))[:2], (400, SHAPES[format][1]))
            record = self.sink.records[-1]
            self.assertEqual((record.error, record.policy, record.tags, record.audited), ("policy_denied", ["r", "test:plugin0", "test:plugin1"], ["t", "pii"], True))
            self.assertEqual(self.audit.marked[-1], record.request_id)
        self.assertIn("`test:plugin1`: Too big for you.", refusal(self.send(call("openai")))[2])
        self.assertEqual(self.upstream.sent, [])

    def test_callView(self) -> None:
        """A plugin sees the call, with no credential header."""
        plugin = Scripted(None)
        self.usePolicy(None, [plugin])
        self.send(call("openai", key=INTERN_KEY))
        [seen] = plugin.calls
        self.assertEqual((seen.keyId, seen.owner, seen.provider, seen.method, seen.path, seen.model), ("intern1", "interns", "openai", "POST", "/v1/chat/completions", "gpt-4o"))
        self.assertNotIn("authorization", dict(seen.headers))
        self.assertEqual(dict(seen.headers)["host"], "gate")
        self.assertIn(b'"gpt-4o"', seen.body or b"")
        self.assertEqual(len(seen.requestId), 32)
        self.assertEqual(len(self.upstream.sent), 1)

    def test_noPluginAfterARuleDenied(self) -> None:
        plugin = Scripted(None)
        self.usePolicy({"rules": [{"name": "r", "deny": "no"}]}, [plugin])
        self.send(call("openai"))
        self.assertEqual(plugin.calls, [])

    def test_deferredDecision(self) -> None:
        """A plugin that waits: nothing goes upstream until it decides; later plugins run after it."""
        waiting: Deferred[Any] = Deferred()
        later = Scripted(None)
        self.usePolicy(None, [Scripted(waiting), later])
        self.send(call("openai"))
        self.assertEqual((self.upstream.sent, later.calls), ([], []))
        waiting.callback(PolicyDecision(tags=("ok",)))
        self.assertEqual(len(self.upstream.sent), 1)
        self.assertEqual(len(later.calls), 1)

    def assertFailedClosed(self, transport: StringTransport, format: str = "openai") -> None:
        status, shape, message = refusal(transport)
        self.assertEqual((status, shape), (503, SHAPES[format][2]))
        self.assertIn("test:plugin0", message)
        record = self.sink.records[-1]
        self.assertEqual((record.status, record.error), (503, "policy_error"))
        self.assertEqual(self.upstream.sent, [])
        self.assertEqual(self.gateway.active, set())

    def test_raising(self) -> None:
        self.usePolicy(None, [Scripted(KeyError("boom"))])
        for format in FORMATS:
            self.assertFailedClosed(self.send(call(format)), format)

    def test_wrongAnswer(self) -> None:
        self.usePolicy(None, [Scripted("yes")])
        self.assertFailedClosed(self.send(call("openai")))

    def test_failingDeferred(self) -> None:
        self.usePolicy(None, [Scripted(fail(ValueError("store down")))])
        self.assertFailedClosed(self.send(call("openai")))

    def test_laterFailingDeferred(self) -> None:
        waiting: Deferred[Any] = Deferred()
        self.usePolicy(None, [Scripted(waiting)])
        transport = self.send(call("openai"))
        waiting.errback(ValueError("store down"))
        self.assertFailedClosed(transport)

    def test_firedDeferred(self) -> None:
        """A plugin answering with a Deferred that has already fired: decided at once, as a plain answer."""
        self.usePolicy(None, [Scripted(succeed(PolicyDecision.deny("no"))), Scripted(succeed(None))])
        self.assertEqual(refusal(self.send(call("openai")))[0], 403)
        self.assertEqual(self.gateway.active, set())
        self.usePolicy(None, [Scripted(succeed(None)), Scripted(succeed(None))])
        self.send(call("openai"))
        self.assertEqual(len(self.upstream.sent), 1)

    def test_firedThenWaiting(self) -> None:
        """A plugin that answered at once, then one that waits and refuses: the refusal stands."""
        waiting: Deferred[Any] = Deferred()
        self.usePolicy(None, [Scripted(succeed(None)), Scripted(waiting)])
        transport = self.send(call("openai"))
        self.assertEqual(transport.value(), b"")
        waiting.callback(PolicyDecision.deny("Later no."))
        self.assertEqual(refusal(transport)[0], 403)
        self.assertEqual(self.upstream.sent, [])
        self.assertEqual([r.error for r in self.sink.records], ["policy_denied"])

    def test_timeout(self) -> None:
        """No decision within C{plugin_timeout} (on the gateway's clock): 503, and the plugin's wait is cancelled."""
        cancelled: list[bool] = []
        waiting: Deferred[Any] = Deferred(lambda d: cancelled.append(True))
        self.usePolicy({"plugin_timeout": 0.5}, [Scripted(waiting)])
        transport = self.send(call("openai"))
        self.clock.advance(0.4)
        self.assertEqual((transport.value(), self.sink.records), (b"", []))
        self.clock.advance(0.1)
        self.assertFailedClosed(transport)
        self.assertEqual(cancelled, [True])

    def test_clientLeavesWhilePluginDecides(self) -> None:
        """The wait is cancelled; the call is recorded client_disconnected; the late answer changes nothing."""
        cancelled: list[bool] = []
        waiting: Deferred[Any] = Deferred(lambda d: cancelled.append(True))
        self.usePolicy(None, [Scripted(waiting)])
        self.send(call("openai"))
        self.channel.connectionLost(Exception("gone"))
        self.assertEqual(cancelled, [True])
        self.assertEqual([r.error for r in self.sink.records], ["client_disconnected"])
        self.clock.advance(5)
        self.assertEqual(len(self.sink.records), 1)

    def test_observeSeesTheRecord(self) -> None:
        """After the record is written each plugin sees it; one that raises changes nothing."""

        class Bad(Scripted):
            def observe(self, record: Any) -> None:
                raise RuntimeError("observer bug")

        good = Scripted(PolicyDecision.deny("no"))
        self.usePolicy(None, [Bad(None), good])
        self.send(call("openai"))
        self.assertEqual([r.error for r in good.records], ["policy_denied"])
        self.assertEqual(len(self.sink.records), 1)


class LoadingTests(SynchronousTestCase):
    """Plugins are made at start-up from C{module:attribute}; any problem is one line naming file and field."""

    def load(self, factory: str, options: dict[str, Any] | None = None) -> Any:
        settings = settingsFrom({"policy": {"plugins": [{"factory": "lmgate.policy.plugins:RegexGuard", "options": {"patterns": ["x"]}}, {"factory": factory, "options": options or {}}]}}, "etc/lmgate.yaml", {})
        return loadPlugins(settings.source, settings.policy)

    def wrong(self, factory: str, options: dict[str, Any] | None = None) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.load(factory, options)
        text = str(caught.exception)
        self.assertNotIn("\n", text)
        self.assertTrue(text.startswith("etc/lmgate.yaml: policy.plugins[1].factory: "), text)
        return text

    def test_loads(self) -> None:
        plugins = self.load("tests.test_policy:Scripted")
        self.assertEqual([p.name for p in plugins], ["lmgate.policy.plugins:RegexGuard", "tests.test_policy:Scripted"])
        self.assertIsInstance(plugins[0].plugin, RegexGuard)

    def test_problems(self) -> None:
        self.assertIn("cannot import 'tests.no_such_module'", self.wrong("tests.no_such_module:X"))
        self.assertIn("has no attribute 'Nope'", self.wrong("tests.test_policy:Nope"))
        self.assertIn("does not provide IPolicy", self.wrong("tests.test_policy:NotAPolicy"))
        self.assertIn("failed with its options (RuntimeError: no licence file)", self.wrong("tests.test_policy:exploding"))
        self.assertIn("failed with its options (TypeError", self.wrong("tests.test_policy:Scripted", {"colour": 1}))
        self.assertIn("failed with its options (ValueError: action must be deny or audit", self.wrong("lmgate.policy.plugins:RegexGuard", {"patterns": ["a"], "action": "log"}))

    def test_badFactoryName(self) -> None:
        """A factory that is not C{module:attribute} is refused when the file is read."""
        with self.assertRaises(ConfigError) as caught:
            settingsFrom({"policy": {"plugins": [{"factory": "tests.test_policy.Scripted"}]}}, "etc/lmgate.yaml", {})
        self.assertIn("etc/lmgate.yaml: policy.plugins[0].factory: must be module:attribute", str(caught.exception))


def view(body: bytes | None, size: int | None = None) -> PolicyCall:
    return PolicyCall("k", "o", "openai", "POST", "/v1/chat/completions", "gpt-4o", None, (), body, len(body or b"") if size is None else size, "r1")


class RegexGuardTests(SynchronousTestCase):
    """The shipped plugin: deny or audit on a match, never logging what matched."""

    def test_provides(self) -> None:
        self.assertTrue(verifyObject(IPolicy, RegexGuard(patterns=["x"])))

    def test_deny(self) -> None:
        events: list[dict[str, Any]] = []
        import lmgate.policy.plugins as module

        self.patch(module, "log", Logger(observer=events.append))  # type: ignore[arg-type]
        guard = RegexGuard(patterns=[r"secret-\d+", r"\b\d{3}-\d{2}-\d{4}\b"], message="No SSNs.", tags=["pii"])
        self.assertIsNone(guard.decide(view(b'{"messages": [{"content": "hello"}]}')))
        decision = guard.decide(view('{"content": "mine is 123-45-6789 ☃"}'.encode()))
        self.assertEqual(decision, PolicyDecision(allow=False, message="No SSNs.", tags=("pii",)))
        [event] = events
        self.assertEqual(event["index"], 1)
        self.assertNotIn("123-45-6789", repr(event))

    def test_audit(self) -> None:
        guard = RegexGuard(patterns=["confidential"], action="audit", tags=["legal"], ignore_case=True)
        self.assertEqual(guard.decide(view(b"CONFIDENTIAL memo")), PolicyDecision(audit=True, tags=("legal",)))
        self.assertIsNone(guard.decide(view(b"")))

    def test_spooledBody(self) -> None:
        """A body LMGate did not keep in memory is not read: a match by default (fail closed), or let on."""
        self.assertFalse(RegexGuard(patterns=["x"]).decide(view(None, 5 << 20)).allow)  # type: ignore[union-attr]
        self.assertIsNone(RegexGuard(patterns=["x"], unread="pass").decide(view(None, 5 << 20)))

    def test_badOptions(self) -> None:
        self.assertRaises(ValueError, RegexGuard, patterns=[])
        self.assertRaises(ValueError, RegexGuard, patterns="abc")
        self.assertRaises(ValueError, RegexGuard, patterns=["("])
        self.assertRaises(ValueError, RegexGuard, patterns=["a"], unread="maybe")

    def test_throughTheGateway(self) -> None:
        """Installed as a plugin, the guard refuses a matching call 403 in the route's shape."""
        harness = Harness()
        harness.setUp()
        harness.usePolicy(None, [RegexGuard(patterns=["gpt-4o"], message="Caught.")])
        status, shape, message = refusal(harness.send(call("anthropic", "gpt-4o")))
        self.assertEqual((status, shape), (403, "permission_error"))
        self.assertIn("Caught.", message)


class DecisionTests(SynchronousTestCase):
    def test_checked(self) -> None:
        self.assertRaises(ValueError, PolicyDecision, status=503)
        self.assertRaises(ValueError, PolicyDecision, tags="abc")
        self.assertEqual(PolicyDecision.deny("m", 400).status, 400)


class ReloadTests(SynchronousTestCase):
    """On reload the rules change; plugins are made again only when their list changed, and a failure keeps the old ones."""

    def setUp(self) -> None:
        from lmgate.daemon.reload import setPolicy

        self.setPolicy = setPolicy
        self.gateway = Gateway({}, StaticKeys({}), FakeUpstream(), RecordingSink(), MemoryReactorClock())  # type: ignore[arg-type]
        self.first = settingsFrom(
            {"policy": {"rules": [{"name": "a", "deny": "x"}], "plugins": [{"factory": "lmgate.policy.plugins:RegexGuard", "options": {"patterns": ["x"]}}]}},
            "etc/lmgate.yaml",
            {},
        )
        self.gateway.policy = Policy(self.first.policy, loadPlugins("etc/lmgate.yaml", self.first.policy), 4.0, self.gateway.clock, self.gateway.rateLog)

    def test_rulesChangeAndPluginsKept(self) -> None:
        old = self.gateway.policy
        assert old is not None
        raw = {"policy": {"rules": [{"name": "b", "deny": "y"}], "plugins": [{"factory": "lmgate.policy.plugins:RegexGuard", "options": {"patterns": ["x"]}}]}}
        self.setPolicy(settingsFrom(raw, "etc/lmgate.yaml", {}), self.gateway)
        new = self.gateway.policy
        assert new is not None
        self.assertEqual([r.name for r in new.settings.rules], ["b"])
        self.assertIs(new.plugins[0].plugin, old.plugins[0].plugin)

    def test_badPluginKeepsTheOld(self) -> None:
        old = self.gateway.policy
        assert old is not None
        raw = {"policy": {"rules": [{"name": "b", "deny": "y"}], "plugins": [{"factory": "tests.test_policy:NotAPolicy"}]}}
        self.setPolicy(settingsFrom(raw, "etc/lmgate.yaml", {}), self.gateway)
        new = self.gateway.policy
        assert new is not None
        self.assertEqual([r.name for r in new.settings.rules], ["b"])
        self.assertEqual([p.plugin for p in new.plugins], [old.plugins[0].plugin])
        self.assertEqual(new.settings.plugins, old.settings.plugins)
        errors = self.flushLoggedErrors()
        self.assertEqual(errors, [])

    def test_newPluginLoaded(self) -> None:
        raw = {"policy": {"plugins": [{"factory": "tests.test_policy:Scripted"}]}}
        self.setPolicy(settingsFrom(raw, "etc/lmgate.yaml", {}), self.gateway)
        assert self.gateway.policy is not None
        self.assertIsInstance(self.gateway.policy.plugins[0].plugin, Scripted)
        self.assertEqual(self.gateway.policy.settings.rules, ())
