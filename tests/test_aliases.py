"""
Aliases and fallbacks (lmgate.governance.aliases): the body's model found and
rewritten byte for byte, the order targets are tried in, cooldowns on a fake
clock, when a failure falls back, and the models:/fallback: configuration.
"""

from __future__ import annotations

import json
from random import Random
from typing import Any

import yaml
from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lmgate.governance.aliases import (
    DEFAULT_FALLBACK_ON,
    Alias,
    AliasConfigError,
    Choice,
    Cooldown,
    FallbackPolicy,
    FallbackSettings,
    ModelNotFound,
    Selector,
    Target,
    findModel,
    modelNotFoundResponse,
    modelsList,
    parseFallback,
    parseModels,
    parseOpenAIPath,
    resolveModel,
    rewriteModel,
    topLevelModel,
    unifiedPath,
    usableOnUnified,
)
from lmgate.usage.model import requestModel

# --- the body ---------------------------------------------------------------------


class RewriteModelTests(SynchronousTestCase):
    """Only the value of the top-level C{model} changes; every other byte stays."""

    def assertRewrites(self, body: bytes, expected: bytes, newModel: str = "gpt-4o-mini") -> None:
        self.assertEqual(rewriteModel(body, newModel), expected)
        self.assertEqual(json.loads(expected)["model"], newModel)

    def test_modelFirst(self) -> None:
        """The plain case: the value's bytes are replaced, the spacing kept."""
        self.assertRewrites(
            b'{"model": "default-chat", "messages": []}',
            b'{"model": "gpt-4o-mini", "messages": []}',
        )

    def test_modelNotFirst(self) -> None:
        """The model member may come anywhere among the top-level members."""
        self.assertRewrites(
            b'{"messages":[{"role":"user","content":"hi"}],"stream":true,"model":"fast"}',
            b'{"messages":[{"role":"user","content":"hi"}],"stream":true,"model":"gpt-4o-mini"}',
        )

    def test_escapedKey(self) -> None:
        """C{"mo\\u0064el"} is the key C{model} to any JSON parser, so it is the one rewritten."""
        self.assertRewrites(
            b'{"messages":[],"mo\\u0064el":"fast"}',
            b'{"messages":[],"mo\\u0064el":"gpt-4o-mini"}',
        )

    def test_escapedValue(self) -> None:
        """An escaped value is read decoded and replaced whole."""
        body = b'{"model":"f\\u0061st\\"x"}'
        self.assertEqual(topLevelModel(body), 'fast"x')
        self.assertRewrites(body, b'{"model":"gpt-4o-mini"}')

    def test_decoysInsideMessages(self) -> None:
        """C{"model"} as a nested key or inside a string value is never touched."""
        body = (
            b'{"messages":[{"role":"user","content":"\\"model\\": \\"x\\"","model":"inner"}],'
            b'"metadata":{"model":"nested"},"note":"model","model":"fast","tools":[{"model":"t"}]}'
        )
        expected = body.replace(b'"model":"fast"', b'"model":"gpt-4o-mini"')
        self.assertRewrites(body, expected)

    def test_whitespaceVariants(self) -> None:
        """JSON's four whitespace characters anywhere between tokens are kept as they are."""
        self.assertRewrites(
            b' \r\n{ \t"model" \n:\r\n "fast"\t, "n" : 1 }\n',
            b' \r\n{ \t"model" \n:\r\n "gpt-4o-mini"\t, "n" : 1 }\n',
        )

    def test_nonASCIIBeforeTheModel(self) -> None:
        """Offsets are bytes: multi-byte UTF-8 text before the model does not shift the splice."""
        body = '{"messages":[{"content":"héllo ☃ 𝄞"}],"model":"fast","x":"é"}'.encode("utf-8")
        self.assertRewrites(body, body.replace(b'"fast"', b'"gpt-4o-mini"'))

    def test_newModelEscaped(self) -> None:
        """The new value is written as a JSON string (quotes escaped, non-ASCII as \\u escapes)."""
        out = rewriteModel(b'{"model":"a"}', 'b"é')
        self.assertEqual(out, b'{"model":"b\\"\\u00e9"}')

    def test_duplicateKeys(self) -> None:
        """
        With duplicate top-level C{model} members a JSON parser keeps the last:
        that is the model read. Every one is rewritten, so a provider keeping
        the first sees the target too, never what the client slipped in.
        """
        body = b'{"model":"gpt-4-expensive","messages":[],"model":"fast"}'
        self.assertEqual(topLevelModel(body), "fast")
        self.assertEqual(topLevelModel(body), requestModel("openai", b"/v1/chat/completions", body))
        self.assertEqual(rewriteModel(body, "m"), b'{"model":"m","messages":[],"model":"m"}')

    def test_duplicateWithNonStringFirst(self) -> None:
        """Only the last duplicate must be a string; all are replaced."""
        self.assertEqual(rewriteModel(b'{"model":1,"model":"a"}', "m"), b'{"model":"m","model":"m"}')
        self.assertIsNone(rewriteModel(b'{"model":"a","model":null}', "m"))

    def test_notRewritable(self) -> None:
        """No top-level string model, or not one JSON object: None, never a guess."""
        for body in [
            b"",
            b"[]",
            b'["model","x"]',
            b'"model"',
            b"{}",
            b'{"messages":[{"model":"x"}]}',
            b'{"model":null}',
            b'{"model":3}',
            b'{"model":{"name":"x"}}',
            b'{"model":"x"',
            b'{"model":"x",}',
            b'{"model":"x"} {}',
            b'{"model":"x"}]',
            b"{'model':'x'}",
            b'{"model" "x"}',
            b'{"model":"x" "y":1}',
            b'{model:"x"}',
            b'\xef\xbb\xbf{"model":"x"}',  # a byte-order mark
            '{"model":"x"}'.encode("utf-16"),
            b'{"model":"x","s":"\xff"}',  # not UTF-8
            b'{"model":"\x01"}',  # a raw control character in a string
            b'{"model":"x","deep":' + b"[" * 100000 + b"]" * 100000 + b"}",
        ]:
            self.assertIsNone(findModel(body), body[:40])
            self.assertIsNone(rewriteModel(body, "m"))
            self.assertIsNone(topLevelModel(body))

    def test_agreesWithTheRecordsModel(self) -> None:
        """The model read for an alias is the one the record's reader sees in the body."""
        for body in [
            b'{"messages":[{"model":"x"}],"model":"fast"}',
            b'{"mo\\u0064el":"fast"}',
            b'{"model":"a","model":"b"}',
        ]:
            self.assertEqual(topLevelModel(body), requestModel("openai", b"/x", body))

    def test_foundOnceRewrittenPerAttempt(self) -> None:
        """A found model rewrites the same body for each attempt without scanning it again."""
        body = b'{"model":"fast","n":1}'
        found = findModel(body)
        assert found is not None
        self.assertEqual(found.model, "fast")
        self.assertEqual(found.spans, ((9, 15),))
        self.assertEqual(found.rewrite(body, "a"), b'{"model":"a","n":1}')
        self.assertEqual(found.rewrite(body, "bb"), b'{"model":"bb","n":1}')


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(["model", "content", "x"]) | st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
_whitespace = st.text(alphabet=" \t\r\n", max_size=3)
_modelKey = st.sampled_from(['"model"', '"mo\\u0064el"', '"\\u006d\\u006f\\u0064\\u0065\\u006c"'])


@st.composite
def _bodies(draw: Any) -> tuple[bytes, tuple[int, int], dict[str, Any]]:
    """
    A JSON object body with a string top-level model at a random position,
    random spacing and escaping, and C{"model"} decoys nested and in strings;
    with the span of the model's value and the object a parser reads.
    """
    others = draw(
        st.dictionaries(
            st.text(max_size=8).filter(lambda k: k != "model") | st.sampled_from(["messages", "modelx", "Model"]),
            _json | st.just("model") | st.just('"model":"decoy"'),
            max_size=5,
        )
    )
    model = draw(st.text(max_size=20))
    members = list(others.items())
    position = draw(st.integers(0, len(members)))
    ascii = draw(st.booleans())
    ws = lambda: draw(_whitespace)  # noqa: E731
    span = (0, 0)
    pieces = [(json.dumps(k, ensure_ascii=ascii), v) for k, v in members]
    pieces.insert(position, (draw(_modelKey), model))
    body = (ws() + "{").encode()
    for i, (key, value) in enumerate(pieces):
        if i:
            body += (ws() + ",").encode()
        body += (ws() + key + ws() + ":" + ws()).encode()
        encoded = json.dumps(value, ensure_ascii=ascii).encode("utf-8")
        if i == position:
            span = (len(body), len(body) + len(encoded))
        body += encoded
    body += (ws() + "}" + ws()).encode()
    return body, span, dict(others, model=model)


class RewriteModelPropertyTests(SynchronousTestCase):
    """For any JSON object, the rewrite changes the model and nothing else."""

    @settings(max_examples=400, deadline=None)
    @given(_bodies(), st.text(max_size=20))
    def test_onlyTheValueChanges(self, case: tuple[bytes, tuple[int, int], dict[str, Any]], newModel: str) -> None:
        """The parsed result is the original with model replaced; bytes outside the value's span are identical."""
        body, (start, end), parsed = case
        self.assertEqual(json.loads(body), parsed)
        found = findModel(body)
        assert found is not None
        self.assertEqual((found.model, found.spans), (parsed["model"], ((start, end),)))
        out = rewriteModel(body, newModel)
        assert out is not None
        self.assertEqual(json.loads(out), dict(parsed, model=newModel))
        written = json.dumps(newModel).encode()
        self.assertEqual(out[:start], body[:start])
        self.assertEqual(out[start : start + len(written)], written)
        self.assertEqual(out[start + len(written) :], body[end:])

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(st.text(max_size=5), _json, max_size=5))
    def test_agreesWithJSONLoads(self, obj: dict[str, Any]) -> None:
        """On any object json.dumps writes, the model read is json.loads's, when it is a string."""
        body = json.dumps(obj).encode()
        model = obj.get("model")
        self.assertEqual(topLevelModel(body), model if isinstance(model, str) else None)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=40) | st.text(alphabet='{}[]":, model\\0x1ae', max_size=30).map(str.encode))
    def test_neverRaises(self, body: bytes) -> None:
        """Any bytes at all: a model that json.loads also reads, or None; never an exception."""
        try:
            parsed = json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError):
            parsed = None
        expected = parsed.get("model") if isinstance(parsed, dict) else None
        self.assertEqual(topLevelModel(body), expected if isinstance(expected, str) else None)


# --- choosing the targets -------------------------------------------------------------


class FixedRandom(Random):
    """A random source whose C{random()} answers the given values in turn."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


A, B, C = Target("openai", "gpt-4o-mini"), Target("gemini-openai", "gemini-2.5-flash"), Target("azure", "gpt-4o")


class SelectorTests(SynchronousTestCase):
    """The order targets are tried in: the strategy's, cooling targets last."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.cooldown = Cooldown(self.clock, failures=1)
        self.selector = Selector(self.cooldown)

    def test_orderedIsConfigurationOrder(self) -> None:
        """An ordered alias tries its targets as configured, without drawing a random number."""
        self.assertEqual(Selector().order(Alias("a", (A, B, C)), FixedRandom()), [A, B, C])

    def test_noCooldownAskedWhileNoneIsCooling(self) -> None:
        """The per-call path stays cheap: while no target is cooling down, the order is the strategy's
        without asking the cooldown about each target, nor does a success touch its tables; once one
        target cools down, every target is asked (and the cooling one goes last); its success ends that."""
        asked: list[Target] = []
        coolingDown = self.cooldown.coolingDown
        self.patch(self.cooldown, "coolingDown", lambda target: asked.append(target) or coolingDown(target))
        alias = Alias("a", (A, B, C))
        self.assertEqual(self.selector.order(alias, FixedRandom()), [A, B, C])
        self.cooldown.succeeded(A)
        self.assertEqual((asked, self.cooldown.anyCoolingDown), ([], False))
        self.cooldown.failed(A)
        self.assertTrue(self.cooldown.anyCoolingDown)
        self.assertEqual(self.selector.order(alias, FixedRandom()), [B, C, A])
        self.assertEqual(set(asked), {A, B, C})
        self.cooldown.succeeded(A)
        self.assertFalse(self.cooldown.anyCoolingDown)

    def test_narrowedKeepsAnAliasWhoseTargetsAllFit(self) -> None:
        """Narrowing to a format every target speaks (each call on its native route) keeps the alias as
        it is; otherwise only the targets of that format remain, in configuration order."""
        alias = Alias("a", (A, B, C))
        formats = {"openai": "openai", "gemini-openai": "openai", "azure": "openai"}
        self.assertIs(alias.narrowed("openai", formats), alias)
        self.assertEqual(alias.narrowed("openai", dict(formats, azure="anthropic")), Alias("a", (A, B)))
        self.assertEqual(alias.narrowed("google", formats), Alias("a", ()))

    def test_weightedPicksByWeightThenHeaviestFirst(self) -> None:
        """The first target is drawn by weight; the rest follow heaviest first, ties in configuration order."""
        light, heavy, middle = Target("p", "light", 1), Target("p", "heavy", 6), Target("p", "middle", 3)
        alias = Alias("w", (light, heavy, middle), "weighted")
        # cumulative weights 1, 7, 10 out of 10
        self.assertEqual(Selector().order(alias, FixedRandom(0.05)), [light, heavy, middle])
        self.assertEqual(Selector().order(alias, FixedRandom(0.1)), [heavy, middle, light])
        self.assertEqual(Selector().order(alias, FixedRandom(0.69)), [heavy, middle, light])
        self.assertEqual(Selector().order(alias, FixedRandom(0.7)), [middle, heavy, light])
        self.assertEqual(Selector().order(alias, FixedRandom(0.999999)), [middle, heavy, light])

    def test_weightZeroIsOnlyAFallback(self) -> None:
        """A target of weight 0 is never drawn first, but stays a fallback."""
        spare = Target("p", "spare", 0)
        alias = Alias("w", (spare, A), "weighted")
        for value in (0.0, 0.5, 0.99):
            self.assertEqual(Selector().order(alias, FixedRandom(value)), [A, spare])

    def test_weightedDistribution(self) -> None:
        """Over many seeded draws, each target comes first about as often as its weight says."""
        alias = Alias("w", (Target("p", "a", 1), Target("p", "b", 3)), "weighted")
        random = Random(1234)
        firsts = [Selector().order(alias, random)[0].model for _ in range(4000)]
        self.assertTrue(900 < firsts.count("a") < 1100, firsts.count("a"))

    def test_coolingTargetsGoLast(self) -> None:
        """A target cooling down is tried after the healthy ones."""
        self.cooldown.failed(A)
        self.assertEqual(self.selector.order(Alias("a", (A, B, C)), FixedRandom()), [B, C, A])
        self.cooldown.failed(C)
        self.assertEqual(self.selector.order(Alias("a", (A, B, C)), FixedRandom()), [B, A, C])

    def test_allCoolingFirstTriedAnyway(self) -> None:
        """When every target is cooling down, the strategy's order stands: the first is tried anyway."""
        for target in (A, B, C):
            self.cooldown.failed(target)
        self.assertEqual(self.selector.order(Alias("a", (A, B, C)), FixedRandom()), [A, B, C])
        weighted = Alias("w", (Target(A.provider, A.model, 1), Target(B.provider, B.model, 3)), "weighted")
        self.assertEqual([t.model for t in self.selector.order(weighted, FixedRandom(0.9))], [B.model, A.model])

    def test_weightedDrawsAmongHealthyTargets(self) -> None:
        """A weighted alias never draws a cooling target first while a healthy one is left."""
        heavy, light = Target("p", "heavy", 100), Target("p", "light", 1)
        self.cooldown.failed(heavy)
        self.assertEqual(self.selector.order(Alias("w", (heavy, light), "weighted"), FixedRandom(0.0, 0.0)), [light, heavy])

    def test_cooledDownTargetBackInOrder(self) -> None:
        """Once its cooldown is over, a target takes its configured place again."""
        self.cooldown.failed(A)
        self.clock.advance(60)
        self.assertEqual(self.selector.order(Alias("a", (A, B)), FixedRandom()), [A, B])

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=6),
        st.sampled_from(["ordered", "weighted"]),
        st.integers(0, 2**32),
    )
    def test_anOrderingOfTheTargets(self, spec: list[tuple[int, bool]], strategy: Any, seed: int) -> None:
        """Every target appears once, the healthy ones first (or all in strategy order when all cool)."""
        clock = Clock()
        cooldown = Cooldown(clock, failures=1)
        targets = tuple(Target("p", f"m{i}", weight) for i, (weight, _) in enumerate(spec))
        if strategy == "weighted" and sum(w for w, _ in spec) == 0:
            targets = targets[:-1] + (Target("p", f"m{len(spec) - 1}", 1),)
        for target, (_, cooling) in zip(targets, spec):
            if cooling:
                cooldown.failed(target)
        order = Selector(cooldown).order(Alias("a", targets, strategy), Random(seed))
        self.assertEqual(sorted(order, key=targets.index), list(targets))
        flags = [cooldown.coolingDown(t) for t in order]
        self.assertEqual(flags, sorted(flags))


class CooldownTests(SynchronousTestCase):
    """A target failing C{failures} times within C{window} seconds is skipped for C{seconds}, on the given clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.cooldown = Cooldown(self.clock, failures=3, window=30, seconds=60)

    def failTimes(self, target: Target, times: int, every: float = 0) -> None:
        for _ in range(times):
            self.cooldown.failed(target)
            self.clock.advance(every)

    def test_tripsOnTheThirdFailureInTheWindow(self) -> None:
        """Two failures leave a target healthy; the third within 30 s cools it down."""
        self.failTimes(A, 2, every=10)
        self.assertFalse(self.cooldown.coolingDown(A))
        self.clock.advance(10)  # the third at t=30: the first was exactly 30 s ago, still in the window
        self.cooldown.failed(A)
        self.assertTrue(self.cooldown.coolingDown(A))
        self.assertFalse(self.cooldown.coolingDown(B))

    def test_failuresOutsideTheWindowDoNotCount(self) -> None:
        """Failures spread wider than the window never cool a target down."""
        self.failTimes(A, 10, every=15.1)
        self.assertFalse(self.cooldown.coolingDown(A))

    def test_lastsSeconds(self) -> None:
        """The target is skipped for 60 s after the failure that tripped it, then tried again."""
        self.failTimes(A, 3)
        self.clock.advance(59.9)
        self.assertTrue(self.cooldown.coolingDown(A))
        self.clock.advance(0.1)
        self.assertFalse(self.cooldown.coolingDown(A))

    def test_countsAfreshAfterACooldown(self) -> None:
        """After a cooldown, one more failure does not trip it again; three do."""
        self.failTimes(A, 3)
        self.clock.advance(60)
        self.failTimes(A, 2)
        self.assertFalse(self.cooldown.coolingDown(A))
        self.failTimes(A, 1)
        self.assertTrue(self.cooldown.coolingDown(A))

    def test_successResets(self) -> None:
        """A success forgets past failures, and ends a cooldown at once."""
        self.failTimes(A, 2)
        self.cooldown.succeeded(A)
        self.failTimes(A, 2)
        self.assertFalse(self.cooldown.coolingDown(A))
        self.failTimes(A, 1)
        self.assertTrue(self.cooldown.coolingDown(A))
        self.cooldown.succeeded(A)
        self.assertFalse(self.cooldown.coolingDown(A))

    def test_keptPerRouteAndModel(self) -> None:
        """Cooldowns belong to a route and model: another model of the same route, or another weight, is the same or not accordingly."""
        self.failTimes(A, 3)
        self.assertTrue(self.cooldown.coolingDown(Target(A.provider, A.model, 5)))
        self.assertFalse(self.cooldown.coolingDown(Target(A.provider, "other")))

    def test_memoryIsBounded(self) -> None:
        """Targets whose failures are over are forgotten, so arbitrary model names cannot grow it without end."""
        for i in range(5000):
            self.cooldown.failed(Target("p", f"m{i}"))
            self.clock.advance(1)
        remembered = len(self.cooldown._recent) + len(self.cooldown._until)
        self.assertLessEqual(remembered, Cooldown.SWEEP_AT + 1)

    def test_fromSettings(self) -> None:
        """The fallback section's cooldown values build the cooldown."""
        cooldown = FallbackSettings(failures=1, window=5, seconds=7).cooldown(self.clock)
        cooldown.failed(A)
        self.clock.advance(6.9)
        self.assertTrue(cooldown.coolingDown(A))
        self.clock.advance(0.1)
        self.assertFalse(cooldown.coolingDown(A))


class FallbackPolicyTests(SynchronousTestCase):
    """Which failures fall back: the listed ones, and only before any byte reached the client."""

    def test_defaults(self) -> None:
        """Refused, reset, unreachable, timed out before headers, 429 and 5xx fall back; other answers do not."""
        policy = FallbackPolicy()
        self.assertEqual(policy.on, frozenset(DEFAULT_FALLBACK_ON))
        for status in (429, 500, 502, 503, 504):
            self.assertTrue(policy.shouldFallBack(status, None, 0), status)
        for status in (200, 400, 401, 403, 404, 413, 501):
            self.assertFalse(policy.shouldFallBack(status, None, 0), status)
        for kind in ("upstream_unreachable", "upstream_reset", "upstream_timeout", "connect", "timeout"):
            self.assertTrue(policy.shouldFallBack(None, kind, 0), kind)
        self.assertFalse(policy.shouldFallBack(None, "upstream_malformed", 0))
        self.assertFalse(policy.shouldFallBack(None, "client_disconnected", 0))
        self.assertFalse(policy.shouldFallBack(None, None, 0))

    def test_neverAfterTheFirstByte(self) -> None:
        """Once a byte (the head included) reached the client, nothing falls back."""
        policy = FallbackPolicy()
        self.assertFalse(policy.shouldFallBack(503, None, 1))
        self.assertFalse(policy.shouldFallBack(200, "upstream_reset", 100))
        self.assertFalse(policy.shouldFallBack(None, "upstream_timeout", 1))

    def test_failureKindBeforeStatus(self) -> None:
        """A failure kind decides over a status given with it."""
        self.assertTrue(FallbackPolicy().shouldFallBack(200, "upstream_reset", 0))
        self.assertFalse(FallbackPolicy([200]).shouldFallBack(200, "upstream_reset", 0))

    def test_configured(self) -> None:
        """Only what C{fallback.on} lists falls back."""
        policy = parseFallback({"on": [429, "timeout", "malformed"]}).policy()
        self.assertTrue(policy.shouldFallBack(429, None, 0))
        self.assertFalse(policy.shouldFallBack(503, None, 0))
        self.assertFalse(policy.shouldFallBack(None, "upstream_unreachable", 0))
        self.assertTrue(policy.shouldFallBack(None, "upstream_timeout", 0))
        self.assertTrue(policy.shouldFallBack(None, "upstream_malformed", 0))


# --- configuration ----------------------------------------------------------------------

CONTRACT = """
models:
  default-chat:
    targets:
      - {provider: openai, model: gpt-4o-mini}
      - {provider: gemini-openai, model: gemini-2.5-flash}
    strategy: ordered
  embed: {targets: [{provider: openai, model: text-embedding-3-small}]}
  fast-claude: {targets: [{provider: anthropic, model: claude-3-5-haiku-latest}]}
  mixed:
    strategy: weighted
    targets:
      - {provider: openai, model: gpt-4o, weight: 3}
      - {provider: anthropic, model: claude-sonnet-4, weight: 1}
fallback:
  on: [429, 500, 502, 503, 504, connect, timeout]
  cooldown: {failures: 3, window: 30, seconds: 60}
"""

FORMATS = {
    "openai": "openai",
    "azure": "openai",
    "anthropic": "anthropic",
    "gemini": "google",
    "google": "google",
    "bedrock": "bedrock",
    "gemini-openai": "openai",
}


class ParseModelsTests(SynchronousTestCase):
    """The models: section becomes aliases, or one error naming the key path."""

    def assertInvalid(self, raw: Any, where: str, problem: str) -> None:
        with self.assertRaises(AliasConfigError) as caught:
            parseModels(raw, FORMATS)
        self.assertEqual((caught.exception.where, caught.exception.problem), (where, problem))
        self.assertIsInstance(caught.exception, ValueError)
        self.assertEqual(str(caught.exception), f"{where}: {problem}")

    def test_contract(self) -> None:
        """The issue's example parses to its aliases, in order, strategy ordered by default."""
        models = parseModels(yaml.safe_load(CONTRACT)["models"], FORMATS)
        self.assertEqual(list(models), ["default-chat", "embed", "fast-claude", "mixed"])
        self.assertEqual(
            models["default-chat"],
            Alias(
                "default-chat",
                (Target("openai", "gpt-4o-mini"), Target("gemini-openai", "gemini-2.5-flash")),
                "ordered",
            ),
        )
        self.assertEqual(models["embed"].strategy, "ordered")
        self.assertEqual([t.weight for t in models["mixed"].targets], [3.0, 1.0])

    def test_empty(self) -> None:
        """No section, or an empty one: no aliases."""
        self.assertEqual(parseModels(None, FORMATS), {})
        self.assertEqual(parseModels({}, FORMATS), {})

    def test_errors(self) -> None:
        """Each mistake is named by its key path, in one line."""
        ok = {"provider": "openai", "model": "m"}
        self.assertInvalid([], "models", "must be a mapping of alias names, got list")
        self.assertInvalid(
            {"a": {"targets": [ok, {"provider": "x", "model": "m"}]}},
            "models.a.targets[1].provider",
            "unknown provider 'x' (routes: anthropic, azure, bedrock, gemini, gemini-openai, google, openai)",
        )
        self.assertInvalid({"a": {"targets": [{"model": "m"}]}}, "models.a.targets[0].provider", "missing (a route under providers)")
        self.assertInvalid({"a": {"targets": [{"provider": "openai"}]}}, "models.a.targets[0].model", "must be a non-empty string, got None")
        self.assertInvalid({"a": {"targets": [dict(ok, model=" ")]}}, "models.a.targets[0].model", "must be a non-empty string, got ' '")
        self.assertInvalid({"a": {"targets": [dict(ok, weight=-1)]}}, "models.a.targets[0].weight", "must be a number >= 0, got -1")
        self.assertInvalid({"a": {"targets": [dict(ok, weight=True)]}}, "models.a.targets[0].weight", "must be a number >= 0, got True")
        self.assertInvalid({"a": {"targets": [dict(ok, weight="2")]}}, "models.a.targets[0].weight", "must be a number >= 0, got '2'")
        self.assertInvalid(
            {"a": {"targets": [dict(ok, region="x")]}}, "models.a.targets[0].region", "unknown key (known: provider, model, weight)"
        )
        self.assertInvalid({"a": {"targets": ["openai/m"]}}, "models.a.targets[0]", "must be a mapping with provider and model, got str")
        self.assertInvalid({"a": {"targets": []}}, "models.a.targets", "must be a non-empty list of targets, got []")
        self.assertInvalid({"a": {}}, "models.a.targets", "must be a non-empty list of targets, got None")
        self.assertInvalid({"a": None}, "models.a", "must be a mapping with targets, got NoneType")
        self.assertInvalid(
            {"a": {"targets": [ok], "strategy": "random"}}, "models.a.strategy", "must be one of ordered, weighted, got 'random'"
        )
        self.assertInvalid({"a": {"targets": [ok], "fallback": 1}}, "models.a.fallback", "unknown key (known: targets, strategy)")
        self.assertInvalid({"a": {"targets": [ok, dict(ok, weight=2)]}}, "models.a.targets[1]", "repeats targets[0] (openai, m)")
        self.assertInvalid(
            {"a": {"targets": [dict(ok, weight=0)], "strategy": "weighted"}},
            "models.a.targets",
            "a weighted alias needs a target with weight > 0",
        )

    def test_aliasNames(self) -> None:
        """An alias name is a string without spaces; it cannot take the form of a direct <route>/<model>."""
        ok = {"targets": [{"provider": "openai", "model": "m"}]}
        problem = "an alias name is a non-empty string without spaces or control characters"
        self.assertInvalid({1: ok}, "models.1", problem)
        self.assertInvalid({"my alias": ok}, "models.my alias", problem)
        self.assertInvalid({"": ok}, "models.", problem)
        self.assertInvalid(
            {"openai/gpt-4o": ok},
            "models.openai/gpt-4o",
            "starts with the route 'openai/': that form names a route and model directly",
        )
        self.assertEqual(list(parseModels({"meta-llama/Llama-3": ok}, FORMATS)), ["meta-llama/Llama-3"])


class ParseFallbackTests(SynchronousTestCase):
    """The fallback: section, with its defaults."""

    def assertInvalid(self, raw: Any, where: str, problem: str) -> None:
        with self.assertRaises(AliasConfigError) as caught:
            parseFallback(raw)
        self.assertEqual((caught.exception.where, caught.exception.problem), (where, problem))

    def test_defaults(self) -> None:
        """No section, or an empty one: the contract's values."""
        expected = FallbackSettings((429, 500, 502, 503, 504, "connect", "timeout"), 3, 30.0, 60.0)
        self.assertEqual(parseFallback(None), expected)
        self.assertEqual(parseFallback({}), expected)
        self.assertEqual(parseFallback({"cooldown": None}), expected)

    def test_contractAsYAMLReadsIt(self) -> None:
        """PyYAML reads the unquoted key C{on} as true; it is still taken for C{on}."""
        raw = yaml.safe_load("fallback: {on: [429, connect], cooldown: {failures: 5, window: 10, seconds: 2.5}}")["fallback"]
        self.assertIn(True, raw)
        self.assertEqual(parseFallback(raw), FallbackSettings((429, "connect"), 5, 10.0, 2.5))
        self.assertEqual(parseFallback({"on": []}).on, ())

    def test_errors(self) -> None:
        """Each mistake is named by its key path."""
        self.assertInvalid([], "fallback", "must be a mapping, got list")
        self.assertInvalid({"on": "429"}, "fallback.on", "must be a list of statuses and connect, timeout, malformed, got '429'")
        self.assertInvalid(
            {"on": [429, "reset"]}, "fallback.on[1]", "must be an HTTP status 400-599 or one of connect, timeout, malformed, got 'reset'"
        )
        self.assertInvalid(
            {"on": [200]}, "fallback.on[0]", "must be an HTTP status 400-599 or one of connect, timeout, malformed, got 200"
        )
        self.assertInvalid({"retry": 1}, "fallback.retry", "unknown key (known: on, cooldown)")
        self.assertInvalid({"cooldown": 3}, "fallback.cooldown", "must be a mapping, got int")
        self.assertInvalid({"cooldown": {"failures": 0}}, "fallback.cooldown.failures", "must be a whole number >= 1, got 0")
        self.assertInvalid({"cooldown": {"failures": 1.5}}, "fallback.cooldown.failures", "must be a whole number >= 1, got 1.5")
        self.assertInvalid({"cooldown": {"window": -1}}, "fallback.cooldown.window", "must be a number >= 0, got -1")
        self.assertInvalid({"cooldown": {"seconds": "60"}}, "fallback.cooldown.seconds", "must be a number >= 0, got '60'")
        self.assertInvalid({"cooldown": {"ttl": 1}}, "fallback.cooldown.ttl", "unknown key (known: failures, window, seconds)")


class OpenAIPathTests(SynchronousTestCase):
    """A route's openai_path, and the path a unified request takes on it."""

    def test_parse(self) -> None:
        """Default /v1; a trailing slash dropped; anything but a plain path refused, naming the key."""
        self.assertEqual(parseOpenAIPath(None, "k"), "/v1")
        self.assertEqual(parseOpenAIPath("/v1beta/openai/", "k"), "/v1beta/openai")
        self.assertEqual(parseOpenAIPath("/", "k"), "")
        for bad in ("v1", "/v1?x=1", "/v1#f", "/v 1", "/a/../b", "/a/.", "/%2e", "/é", 1, ""):
            with self.assertRaises(AliasConfigError) as caught:
                parseOpenAIPath(bad, "providers.x.openai_path")
            self.assertEqual(caught.exception.where, "providers.x.openai_path")

    def test_unifiedPath(self) -> None:
        """The path after /v1 goes after the route's openai_path, raw."""
        self.assertEqual(unifiedPath(b"/chat/completions"), b"/v1/chat/completions")
        self.assertEqual(unifiedPath(b"/chat/completions", b"/v1beta/openai"), b"/v1beta/openai/chat/completions")
        self.assertEqual(unifiedPath(b"/embeddings", b"/openai/v1/"), b"/openai/v1/embeddings")
        self.assertEqual(unifiedPath(b"/x%2Fy", b""), b"/x%2Fy")
        self.assertEqual(unifiedPath(b"", b"/v1"), b"/v1")


# --- resolving a request's model ---------------------------------------------------------


class ResolveModelTests(SynchronousTestCase):
    """Which targets a request may use: aliases, the direct form, and refusals saying why."""

    def setUp(self) -> None:
        self.aliases = parseModels(yaml.safe_load(CONTRACT)["models"], FORMATS)

    def resolve(self, requested: str | None, unified: bool = True, fmt: str = "openai") -> Choice | ModelNotFound | None:
        return resolveModel(requested, unified, fmt, self.aliases, FORMATS)

    def test_aliasOnUnified(self) -> None:
        """An alias on /v1 gets its openai-format targets, in order; the record names the alias."""
        choice = self.resolve("default-chat")
        self.assertEqual(choice, Choice(self.aliases["default-chat"], "default-chat"))
        mixed = self.resolve("mixed")
        assert isinstance(mixed, Choice)
        self.assertEqual(mixed.alias.targets, (Target("openai", "gpt-4o", 3),))
        self.assertEqual(mixed.alias.strategy, "weighted")

    def test_aliasOnNativeRoute(self) -> None:
        """On a native route an alias uses only targets of the route's format."""
        choice = self.resolve("fast-claude", unified=False, fmt="anthropic")
        self.assertEqual(choice, Choice(self.aliases["fast-claude"], "fast-claude"))
        mixed = self.resolve("mixed", unified=False, fmt="anthropic")
        assert isinstance(mixed, Choice)
        self.assertEqual(mixed.alias.targets, (Target("anthropic", "claude-sonnet-4", 1),))

    def test_wrongFormat(self) -> None:
        """An alias with no target in the endpoint's format is refused, never sent to another format."""
        self.assertEqual(
            self.resolve("fast-claude"),
            ModelNotFound("fast-claude", "The model `fast-claude` has no target in the openai format on this endpoint."),
        )
        self.assertEqual(
            self.resolve("default-chat", unified=False, fmt="anthropic"),
            ModelNotFound("default-chat", "The model `default-chat` has no target in the anthropic format on this endpoint."),
        )

    def test_nativeNonAliasRelayedAsItCame(self) -> None:
        """On a native route a model that is no alias (or no model) is left alone: None."""
        self.assertIsNone(self.resolve("claude-3-5-haiku-latest", unified=False, fmt="anthropic"))
        self.assertIsNone(self.resolve("openai/gpt-4o", unified=False, fmt="openai"))
        self.assertIsNone(self.resolve(None, unified=False, fmt="google"))

    def test_directForm(self) -> None:
        """<route>/<model> on /v1 names an openai-format route and model; the record has no alias."""
        self.assertEqual(
            self.resolve("gemini-openai/gemini-2.5-pro"),
            Choice(Alias("gemini-openai/gemini-2.5-pro", (Target("gemini-openai", "gemini-2.5-pro"),)), None),
        )
        together = self.resolve("azure/meta-llama/Llama-3")
        assert isinstance(together, Choice)
        self.assertEqual(together.alias.targets, (Target("azure", "meta-llama/Llama-3"),))

    def test_unifiedRefusals(self) -> None:
        """On /v1: an unknown name, a route of another format, a route without a model, or no model at all."""
        self.assertEqual(
            self.resolve("gpt-5"),
            ModelNotFound("gpt-5", "The model `gpt-5` does not exist: use an alias (GET /v1/models) or <route>/<model>."),
        )
        self.assertEqual(
            self.resolve("nowhere/gpt-5"),
            ModelNotFound("nowhere/gpt-5", "The model `nowhere/gpt-5` does not exist: use an alias (GET /v1/models) or <route>/<model>."),
        )
        self.assertEqual(
            self.resolve("anthropic/claude-sonnet-4"),
            ModelNotFound(
                "anthropic/claude-sonnet-4",
                "The route `anthropic` does not speak the OpenAI format: call it at /anthropic/ in its own format.",
            ),
        )
        self.assertEqual(
            self.resolve("openai/"), ModelNotFound("openai/", "The model `openai/` names route `openai` but no model.")
        )
        self.assertEqual(
            self.resolve(None),
            ModelNotFound(None, "The request names no model: use an alias (GET /v1/models) or <route>/<model>."),
        )

    def test_usableOnUnified(self) -> None:
        """Only aliases with an openai-format target can be listed on /v1."""
        usable = [name for name, alias in self.aliases.items() if usableOnUnified(alias, FORMATS)]
        self.assertEqual(usable, ["default-chat", "embed", "mixed"])


class AnswersTests(SynchronousTestCase):
    """The bodies LMGate answers itself: the model list and model_not_found."""

    def test_modelsList(self) -> None:
        """GET /v1/models lists the given aliases in OpenAI's list shape."""
        self.assertEqual(
            json.loads(modelsList(["default-chat", "embed"])),
            {
                "object": "list",
                "data": [
                    {"id": "default-chat", "object": "model", "created": 0, "owned_by": "lmgate"},
                    {"id": "embed", "object": "model", "created": 0, "owned_by": "lmgate"},
                ],
            },
        )
        self.assertEqual(json.loads(modelsList([])), {"object": "list", "data": []})

    def test_modelNotFoundShapes(self) -> None:
        """A 404 in each format's own not-found shape."""
        status, headers, body = modelNotFoundResponse("openai", "No.")
        self.assertEqual((status, headers), (404, [(b"content-type", b"application/json")]))
        self.assertEqual(
            json.loads(body),
            {"error": {"message": "No.", "type": "invalid_request_error", "param": "model", "code": "model_not_found"}},
        )
        self.assertEqual(
            json.loads(modelNotFoundResponse("anthropic", "No.")[2]),
            {"type": "error", "error": {"type": "not_found_error", "message": "No."}},
        )
        self.assertEqual(
            json.loads(modelNotFoundResponse("google", "No.")[2]),
            {"error": {"code": 404, "message": "No.", "status": "NOT_FOUND"}},
        )
        status, headers, body = modelNotFoundResponse("bedrock", "No.")
        self.assertEqual((status, json.loads(body)), (404, {"message": "No."}))
        self.assertIn((b"x-amzn-errortype", b"ResourceNotFoundException"), headers)
