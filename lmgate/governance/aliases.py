"""
Model aliases and fallbacks for managed routes: the parts that decide, kept
free of requests and connections so each can be tested alone.

A client names an alias in its JSON body's top-level C{model}; LMGate picks a
target (a route and the model to ask it for), rewrites only the bytes of that
value (L{findModel}, L{rewriteModel}), and when the target fails before any
byte reached the client (L{FallbackPolicy}) tries the next one in the order
L{Selector} gave, skipping targets that failed often lately (L{Cooldown}).
L{parseModels} and L{parseFallback} check the C{models:} and C{fallback:}
configuration sections; L{resolveModel} says which targets a request may use,
or why none (L{ModelNotFound}, answered 404 C{model_not_found} by
L{modelNotFoundResponse}).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from random import Random
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Sequence

if TYPE_CHECKING:  # only annotations: the configuration imports this module without loading Twisted's runtime
    from twisted.internet.interfaces import IReactorTime

# --- the model in a request body ---------------------------------------------

_WHITESPACE = re.compile(r"[ \t\n\r]*")  # JSON's four whitespace characters, as json.loads has them
#: Never None: the pattern matches the empty string.
_skipWhitespace: Callable[[str, int], re.Match[str]] = _WHITESPACE.match  # type: ignore[assignment]
_DECODER = json.JSONDecoder()
#: The string scanner json.loads itself uses (C-accelerated; the type stubs leave it out).
_scanString: Callable[[str, int, bool], tuple[str, int]] = getattr(json.decoder, "scanstring")
#: What C{json.dumps} makes of a string (C{ensure_ascii}: C{\\u} escapes), without its two Python calls per use.
_encodeString: Callable[[str], str] = getattr(json.encoder, "encode_basestring_ascii")


@dataclass(frozen=True)
class FoundModel:
    """
    The top-level C{model} of a JSON request body, and where its value lies.

    @ivar model: the value a JSON parser keeps: the last top-level C{model}
        member's (duplicate keys: the last wins, as in C{json.loads}, JavaScript's
        C{JSON.parse} and Go's C{encoding/json}).
    @ivar spans: the byte ranges C{(start, end)} of the value of every top-level
        member whose key decodes to C{model} (C{"mo\\u0064el"} included), in
        body order.
    """

    model: str
    spans: tuple[tuple[int, int], ...]

    def rewrite(self, body: bytes, newModel: str) -> bytes:
        """
        C{body} with every top-level C{model} value replaced by C{newModel}
        as a JSON string, every other byte unchanged.

        Every duplicate is replaced, not only the last: whichever member a
        provider's parser keeps (the first or the last), it sees C{newModel},
        never the alias or a model the client slipped in beside it.

        @param body: the very body this was found in.
        """
        value = _encodeString(newModel).encode("ascii")  # as json.dumps: \\u escapes, ASCII whatever the name
        parts, at = [], 0
        for start, end in self.spans:
            parts += [body[at:start], value]
            at = end
        parts.append(body[at:])
        return b"".join(parts)


def findModel(body: bytes) -> FoundModel | None:
    """
    Find the top-level C{model} of a JSON request body without re-serialising
    anything, so that L{FoundModel.rewrite} changes only its value.

    C{"model"} inside nested objects (messages, tools) or inside string values
    is never taken for it. The body is checked whole, as strictly as
    C{json.loads} checks a string: the answer is None when the body is not
    UTF-8 JSON text (a byte-order mark or UTF-16 included), is not an object,
    has no top-level C{model}, or its (last) C{model} is not a string.
    """
    try:
        text = body.decode("utf-8")
        members = _modelMembers(text)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deep for the parser
        return None
    if not members or not isinstance(members[-1][0], str):
        return None
    if len(text) == len(body):  # ASCII: character offsets are byte offsets
        spans = tuple((start, end) for _, start, end in members)
    else:
        spans = tuple(
            (len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))) for _, start, end in members
        )
    return FoundModel(members[-1][0], spans)


def _modelMembers(text: str) -> list[tuple[Any, int, int]] | None:
    """
    Walk the members of the top-level object in C{text}: each value is parsed
    by the C{json} module's own scanner (so it is checked as C{json.loads}
    would), and the members keyed C{model} are kept with their spans.

    @return: C{(value, start, end)} of each C{model} member, or None when
        C{text} is not one JSON object.
    @raise ValueError: a value or key is not valid JSON.
    """
    skip, scanKey, scanValue = _skipWhitespace, _scanString, _DECODER.raw_decode  # local names: this runs per call
    at = skip(text, 0).end()
    if text[at : at + 1] != "{":
        return None
    found: list[tuple[Any, int, int]] = []
    at = skip(text, at + 1).end()
    if text[at : at + 1] == "}":
        at += 1
    else:
        while True:
            if text[at : at + 1] != '"':
                return None
            key, at = scanKey(text, at + 1, True)
            if text[at : at + 1] != ":":
                at = skip(text, at).end()
                if text[at : at + 1] != ":":
                    return None
            start = skip(text, at + 1).end()
            value, at = scanValue(text, start)
            if key == "model":
                found.append((value, start, at))
            separator = text[at : at + 1]
            if separator not in (",", "}"):
                at = skip(text, at).end()
                separator = text[at : at + 1]
            if separator == "}":
                at += 1
                break
            if separator != ",":
                return None
            at = skip(text, at + 1).end()
    if skip(text, at).end() != len(text):
        return None
    return found


def topLevelModel(body: bytes) -> str | None:
    """
    The model a JSON request body names at its top level, as a JSON parser
    reads it (the last C{model} member wins), or None (see L{findModel}).
    """
    found = findModel(body)
    return None if found is None else found.model


def rewriteModel(body: bytes, newModel: str) -> bytes | None:
    """
    C{body} with the value of its top-level C{model} replaced by C{newModel},
    every other byte unchanged; None when the body has no top-level string
    C{model} or is not a JSON object (see L{findModel}, L{FoundModel.rewrite}).
    """
    found = findModel(body)
    return None if found is None else found.rewrite(body, newModel)


# --- aliases and their targets ------------------------------------------------

Strategy = Literal["ordered", "weighted"]
STRATEGIES: tuple[Strategy, ...] = ("ordered", "weighted")


@dataclass(frozen=True)
class Target:
    """
    One place an alias can send a call: a configured route and the model to ask it for.

    @ivar weight: how often a C{weighted} alias picks this target first,
        relative to the others (0: only ever a fallback).
    """

    provider: str
    model: str
    weight: float = 1.0

    @property
    def key(self) -> tuple[str, str]:
        """What cooldowns are kept by: the route and the model, not the weight."""
        return (self.provider, self.model)


@dataclass(frozen=True)
class Alias:
    """
    A name clients put in C{model}, standing for one or more targets.

    @ivar strategy: C{ordered}: the targets are tried in configuration order;
        C{weighted}: the first is picked by weight, the rest follow as
        fallbacks, heaviest first.
    """

    name: str
    targets: tuple[Target, ...]
    strategy: Strategy = "ordered"

    def narrowed(self, format: str, formats: Mapping[str, str]) -> "Alias":
        """This alias with only the targets whose route speaks C{format} (configuration order kept)."""
        for target in self.targets:
            if formats.get(target.provider) != format:
                break
        else:
            return self  # every target speaks it (the usual case, asked per call): nothing to narrow
        return Alias(self.name, tuple(t for t in self.targets if formats.get(t.provider) == format), self.strategy)


class Selector:
    """
    The order in which a call tries an alias's targets.

    Targets cooling down (L{Cooldown}) and targets whose route fails its
    active health probe (C{healthy}, L{lmgate.governance.health.HealthProbes})
    go after the others, each group in the strategy's order; when every target
    is cooling down or unhealthy, the order is the strategy's own, so the
    first is tried anyway (a call is never refused only because its targets
    failed lately or their probes fail).

    @param healthy: whether a route (by name) is healthy; None: all are. A
        route without a probe is always healthy.
    """

    def __init__(self, cooldown: "Cooldown | None" = None, healthy: Callable[[str], bool] | None = None) -> None:
        self._cooldown = cooldown
        self._healthy = healthy

    def order(self, alias: Alias, random: Random) -> list[Target]:
        """
        The targets of C{alias}, first choice first.

        @param random: where a C{weighted} alias's pick comes from (seeded in
            tests); not used for an C{ordered} alias.
        """
        coolingDown = self._cooldown.coolingDown if self._cooldown is not None and self._cooldown.anyCoolingDown else None
        healthy = self._healthy
        later: list[Target]
        if coolingDown is None and healthy is None:  # the usual case, checked per call: nothing to put behind
            first, later = list(alias.targets), []
        else:
            first, later = [], []
            for t in alias.targets:
                behind = (coolingDown is not None and coolingDown(t)) or (healthy is not None and not healthy(t.provider))
                (later if behind else first).append(t)
        if alias.strategy == "weighted":
            return _byWeight(first, random) + _byWeight(later, random)
        return first + later


def _byWeight(targets: list[Target], random: Random) -> list[Target]:
    """One target picked by weight, then the rest heaviest first (ties in configuration order)."""
    total = sum(t.weight for t in targets)
    if total <= 0:
        return targets  # nothing to weigh (no target, or only weight 0): configuration order
    point, reached, chosen = random.random() * total, 0.0, -1
    for i, target in enumerate(targets):
        reached += target.weight
        if target.weight > 0:
            chosen = i  # rounding can leave the point past the sum: the last weighed target then
            if point < reached:
                break
    rest = targets[:chosen] + targets[chosen + 1 :]
    return [targets[chosen]] + sorted(rest, key=lambda t: -t.weight)


class Cooldown:
    """
    Which targets failed often enough lately to be skipped for a while.

    A target (route and model) that failed C{failures} times within C{window}
    seconds is cooling down for C{seconds}; a success ends that at once and
    forgets its failures. After a cooldown its count starts afresh. Time is
    the given clock's.
    """

    #: When more targets than this are remembered, forgotten ones are swept out.
    SWEEP_AT = 1024

    def __init__(self, clock: IReactorTime, failures: int = 3, window: float = 30.0, seconds: float = 60.0) -> None:
        self._clock = clock
        self.failures, self.window, self.seconds = failures, window, seconds
        self._recent: dict[tuple[str, str], list[float]] = {}
        self._until: dict[tuple[str, str], float] = {}

    def failed(self, target: Target) -> None:
        """Count a failure of C{target} (one that the fallback policy falls back on)."""
        now = self._clock.seconds()
        key = target.key
        recent = [t for t in self._recent.get(key, ()) if now - t <= self.window]
        recent.append(now)
        if len(recent) >= self.failures:
            self._until[key] = now + self.seconds
            self._recent.pop(key, None)
        else:
            self._recent[key] = recent
        if len(self._recent) + len(self._until) > self.SWEEP_AT:
            self._sweep(now)

    def succeeded(self, target: Target) -> None:
        """C{target} answered: forget its failures and any cooldown."""
        if self._recent or self._until:  # nothing remembered (the usual case): nothing to forget
            key = target.key
            self._recent.pop(key, None)
            self._until.pop(key, None)

    @property
    def anyCoolingDown(self) -> bool:
        """
        Whether any target may be cooling down (one did lately; an ended
        cooldown counts until it is swept or its target succeeds): when not,
        L{Selector.order} need not ask about each target.
        """
        return bool(self._until)

    def coolingDown(self, target: Target) -> bool:
        """Whether C{target} is to be tried only after the healthy targets."""
        until = self._until.get(target.key)
        return until is not None and self._clock.seconds() < until

    def _sweep(self, now: float) -> None:
        """Forget what no longer counts: cooldowns that ended, failures older than the window."""
        self._until = {k: u for k, u in self._until.items() if now < u}
        self._recent = {k: r for k, r in self._recent.items() if now - r[-1] <= self.window}


# --- when to fall back ----------------------------------------------------------

#: Failure classes C{fallback.on} may name beside statuses.
FAILURE_CLASSES = ("connect", "timeout", "malformed")

#: The class of each record C{error} that can end an attempt before its response
#: head (docs/records.md): a refused or reset connection, DNS or TLS failing are
#: C{connect} (the upstream never answered); a connect or response-head timeout
#: is C{timeout}; a response head that broke HTTP is C{malformed} (not in the defaults).
RECORD_ERROR_CLASSES: Mapping[str, str] = {
    "upstream_unreachable": "connect",
    "upstream_reset": "connect",
    "upstream_timeout": "timeout",
    "upstream_malformed": "malformed",
}

DEFAULT_FALLBACK_ON: tuple[int | str, ...] = (429, 500, 502, 503, 504, "connect", "timeout")


class FallbackPolicy:
    """
    Whether a failed attempt is discarded and the next target tried
    (C{fallback.on}): only while nothing of the answer reached the client.
    """

    def __init__(self, on: Iterable[int | str] = DEFAULT_FALLBACK_ON) -> None:
        self.on = frozenset(on)

    def __repr__(self) -> str:
        return f"<FallbackPolicy on={sorted(self.on, key=str)}>"

    def shouldFallBack(self, status: int | None, failureKind: str | None, bytesSentToClient: int) -> bool:
        """
        @param status: the response status, when a response head arrived
            (decide before writing that head to the client).
        @param failureKind: why the attempt ended without a response: a record
            C{error} (C{upstream_reset}, see L{RECORD_ERROR_CLASSES}) or a
            class (C{connect}); checked before the status.
        @param bytesSentToClient: bytes of this call already written to the
            client, status line and headers included; any byte forbids a fallback.
        """
        if bytesSentToClient > 0:
            return False
        if failureKind is not None:
            return RECORD_ERROR_CLASSES.get(failureKind, failureKind) in self.on
        return status is not None and status in self.on


# --- configuration: the models: and fallback: sections ---------------------------------


class AliasConfigError(ValueError):
    """
    A C{models:} or C{fallback:} value is wrong. The configuration turns it
    into a C{ConfigError} naming the file: C{ConfigError(source, e.where, e.problem)}.

    @ivar where: the dotted key path, e.g. C{models.default-chat.targets[1].provider}.
    @ivar problem: what is wrong, one line.
    """

    def __init__(self, where: str, problem: str) -> None:
        self.where, self.problem = where, problem
        super().__init__(f"{where}: {problem}")


ALIAS_KEYS = ("targets", "strategy")
TARGET_KEYS = ("provider", "model", "weight")
FALLBACK_KEYS = ("on", "cooldown")
COOLDOWN_KEYS = ("failures", "window", "seconds")
_NAME_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")


def _typeName(value: Any) -> str:
    return "a mapping" if isinstance(value, dict) else type(value).__name__


def _noUnknownKeys(where: str, entry: Mapping[Any, Any], known: Sequence[str]) -> None:
    for unknown in sorted((k for k in entry if k not in known), key=str):
        raise AliasConfigError(f"{where}.{unknown}", f"unknown key (known: {', '.join(known)})")


def parseModels(raw: Any, formats: Mapping[str, str]) -> dict[str, Alias]:
    """
    Check the C{models:} section and build its aliases (configuration order kept).

    An alias may mix formats: each request uses the targets its endpoint can
    speak (L{resolveModel}). An alias name cannot start with C{<route>/} for a
    configured route: on the unified endpoint that form names a route directly.

    @param raw: the section as parsed from YAML (None: no aliases).
    @param formats: each configured route's name and format.
    @raise AliasConfigError: naming the first wrong key.
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise AliasConfigError("models", f"must be a mapping of alias names, got {_typeName(raw)}")
    aliases: dict[str, Alias] = {}
    for name, entry in raw.items():
        where = f"models.{name}"
        if not isinstance(name, str) or not name or _NAME_FORBIDDEN.search(name):
            raise AliasConfigError(where, "an alias name is a non-empty string without spaces or control characters")
        route = name.partition("/")[0]
        if "/" in name and route in formats:
            raise AliasConfigError(where, f"starts with the route '{route}/': that form names a route and model directly")
        if not isinstance(entry, dict):
            raise AliasConfigError(where, f"must be a mapping with targets, got {_typeName(entry)}")
        _noUnknownKeys(where, entry, ALIAS_KEYS)
        strategy = entry.get("strategy", "ordered")
        if strategy not in STRATEGIES:
            raise AliasConfigError(f"{where}.strategy", f"must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        rawTargets = entry.get("targets")
        if not isinstance(rawTargets, list) or not rawTargets:
            raise AliasConfigError(f"{where}.targets", f"must be a non-empty list of targets, got {rawTargets!r}")
        targets = tuple(_target(f"{where}.targets[{i}]", t, formats) for i, t in enumerate(rawTargets))
        for i, target in enumerate(targets):
            first = next(j for j, t in enumerate(targets) if t.key == target.key)
            if first != i:
                raise AliasConfigError(f"{where}.targets[{i}]", f"repeats targets[{first}] ({target.provider}, {target.model})")
        if strategy == "weighted" and sum(t.weight for t in targets) <= 0:
            raise AliasConfigError(f"{where}.targets", "a weighted alias needs a target with weight > 0")
        aliases[name] = Alias(name, targets, strategy)
    return aliases


def _target(where: str, entry: Any, formats: Mapping[str, str]) -> Target:
    if not isinstance(entry, dict):
        raise AliasConfigError(where, f"must be a mapping with provider and model, got {_typeName(entry)}")
    _noUnknownKeys(where, entry, TARGET_KEYS)
    provider = entry.get("provider")
    if provider is None:
        raise AliasConfigError(f"{where}.provider", "missing (a route under providers)")
    if provider not in formats:
        raise AliasConfigError(f"{where}.provider", f"unknown provider {provider!r} (routes: {', '.join(sorted(formats))})")
    model = entry.get("model")
    if not isinstance(model, str) or not model.strip():
        raise AliasConfigError(f"{where}.model", f"must be a non-empty string, got {model!r}")
    weight = entry.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise AliasConfigError(f"{where}.weight", f"must be a number >= 0, got {weight!r}")
    return Target(provider, model, float(weight))


@dataclass(frozen=True)
class FallbackSettings:
    """The checked C{fallback:} section; L{policy} and L{cooldown} build what it describes."""

    on: tuple[int | str, ...] = DEFAULT_FALLBACK_ON
    failures: int = 3
    window: float = 30.0
    seconds: float = 60.0

    def policy(self) -> FallbackPolicy:
        """The policy falling back on C{on}."""
        return FallbackPolicy(self.on)

    def cooldown(self, clock: IReactorTime) -> Cooldown:
        """A cooldown with these values on C{clock} (one per gateway, shared by its calls)."""
        return Cooldown(clock, self.failures, self.window, self.seconds)


def parseFallback(raw: Any) -> FallbackSettings:
    """
    Check the C{fallback:} section; absent keys keep the defaults.

    YAML 1.1 (PyYAML) reads an unquoted key C{on} as the boolean C{true}: that
    key is taken for C{on}, so C{fallback: {on: [...]}} means what it says.

    @raise AliasConfigError: naming the first wrong key.
    """
    if raw is None:
        return FallbackSettings()
    if not isinstance(raw, dict):
        raise AliasConfigError("fallback", f"must be a mapping, got {_typeName(raw)}")
    raw = {("on" if key is True else key): value for key, value in raw.items()}
    _noUnknownKeys("fallback", raw, FALLBACK_KEYS)
    values: dict[str, Any] = {}
    if "on" in raw:
        values["on"] = _fallbackOn(raw["on"])
    cooldown = raw.get("cooldown")
    if cooldown is not None:
        if not isinstance(cooldown, dict):
            raise AliasConfigError("fallback.cooldown", f"must be a mapping, got {_typeName(cooldown)}")
        _noUnknownKeys("fallback.cooldown", cooldown, COOLDOWN_KEYS)
        if "failures" in cooldown:
            failures = cooldown["failures"]
            if isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
                raise AliasConfigError("fallback.cooldown.failures", f"must be a whole number >= 1, got {failures!r}")
            values["failures"] = failures
        for key in ("window", "seconds"):
            if key in cooldown:
                value = cooldown[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                    raise AliasConfigError(f"fallback.cooldown.{key}", f"must be a number >= 0, got {value!r}")
                values[key] = float(value)
    return FallbackSettings(**values)


def _fallbackOn(value: Any) -> tuple[int | str, ...]:
    if not isinstance(value, list):
        raise AliasConfigError("fallback.on", f"must be a list of statuses and {', '.join(FAILURE_CLASSES)}, got {value!r}")
    on: list[int | str] = []
    for i, item in enumerate(value):
        if isinstance(item, int) and not isinstance(item, bool) and 400 <= item <= 599:
            on.append(item)
        elif isinstance(item, str) and item in FAILURE_CLASSES:
            on.append(item)
        else:
            raise AliasConfigError(
                f"fallback.on[{i}]", f"must be an HTTP status 400-599 or one of {', '.join(FAILURE_CLASSES)}, got {item!r}"
            )
    return tuple(on)


def parseOpenAIPath(value: Any, where: str) -> str:
    """
    Check a route's C{openai_path} (where its OpenAI-format API lives under its
    upstream): a path starting with C{/}, plain ASCII, no query or fragment;
    None gives the default C{/v1}. Returned without a trailing C{/}.

    @param where: the key path for the error, e.g. C{providers.gemini-openai.openai_path}.
    """
    if value is None:
        return "/v1"
    if (
        not isinstance(value, str)
        or not value.startswith("/")
        or any(c in value for c in "?#%")
        or any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in value)
        or "/../" in value + "/"
        or "/./" in value + "/"
    ):
        raise AliasConfigError(where, f"must be a plain ASCII path starting with '/', without query, dots or escapes, got {value!r}")
    return value.rstrip("/")


# --- which targets a request may use ----------------------------------------------

#: The OpenAI-format operations the unified endpoint C{/v1} relays (POST, the path after C{/v1}).
UNIFIED_OPERATIONS = frozenset({b"/chat/completions", b"/completions", b"/embeddings", b"/responses"})


@dataclass(frozen=True)
class Choice:
    """
    The targets a request may use, in configuration order.

    @ivar alias: the alias narrowed to the targets the endpoint can speak; for
        the direct form, a one-target alias named after what the client sent.
    @ivar named: the record's C{alias}: the alias name, None for the direct form.
    """

    alias: Alias
    named: str | None


@dataclass(frozen=True)
class ModelNotFound:
    """
    A request whose model cannot be served here, never relayed: answered 404
    C{model_not_found} in the endpoint's format (L{modelNotFoundResponse}).

    @ivar model: what the client asked for (None: it named no model).
    @ivar message: for the client, saying which case it is.
    """

    model: str | None
    message: str


def resolveModel(
    requested: str | None,
    unified: bool,
    routeFormat: str,
    aliases: Mapping[str, Alias],
    formats: Mapping[str, str],
) -> Choice | ModelNotFound | None:
    """
    What a request's top-level C{model} asks for.

      - On the unified endpoint (C{unified}, OpenAI format): an alias, with its
        targets whose route is of format C{openai}; or C{<route>/<model>}
        naming an C{openai} route and a model directly; anything else,
        including no model, is L{ModelNotFound}.
      - On a native route: an alias, with its targets of the route's own
        format; any other model (or none) gives None: the request is relayed
        as it came, as on any route today.

    An alias none of whose targets speaks the endpoint's format is
    L{ModelNotFound}, never sent to a route of another format.

    @param requested: the body's top-level model (L{topLevelModel}).
    @param routeFormat: the endpoint's format (C{openai} for the unified endpoint).
    @param formats: each configured route's name and format.
    """
    alias = aliases.get(requested) if requested is not None else None
    if alias is not None:
        usable = alias.narrowed(routeFormat, formats)
        if not usable.targets:
            return ModelNotFound(
                requested, f"The model `{requested}` has no target in the {routeFormat} format on this endpoint."
            )
        return Choice(usable, alias.name)
    if not unified:
        return None
    if requested is None:
        return ModelNotFound(None, "The request names no model: use an alias (GET /v1/models) or <route>/<model>.")
    route, slash, model = requested.partition("/")
    if slash and route in formats:
        if formats[route] != "openai":
            return ModelNotFound(
                requested,
                f"The route `{route}` does not speak the OpenAI format: call it at /{route}/ in its own format.",
            )
        if not model:
            return ModelNotFound(requested, f"The model `{requested}` names route `{route}` but no model.")
        return Choice(Alias(requested, (Target(route, model),)), None)
    return ModelNotFound(
        requested, f"The model `{requested}` does not exist: use an alias (GET /v1/models) or <route>/<model>."
    )


def usableOnUnified(alias: Alias, formats: Mapping[str, str]) -> bool:
    """Whether the unified endpoint can send C{alias} anywhere (it has an C{openai}-format target)."""
    return any(formats.get(t.provider) == "openai" for t in alias.targets)


def unifiedPath(rest: bytes, openaiPath: bytes = b"/v1") -> bytes:
    """
    The path a unified-endpoint request takes on a target route: its
    C{openai_path} followed by the path after C{/v1}, raw as the client sent
    it; the route's upstream URL goes before it (C{Provider.upstreamURL}).

    C{unifiedPath(b"/chat/completions", b"/v1beta/openai")} is
    C{b"/v1beta/openai/chat/completions"}.

    @param rest: the path after C{/v1}: empty or starting with C{/}.
    @param openaiPath: the route's C{openai_path} (L{parseOpenAIPath}).
    """
    return openaiPath.rstrip(b"/") + rest


def modelsList(names: Iterable[str], created: int = 0) -> bytes:
    """
    The body of C{GET /v1/models} in the OpenAI list shape, one entry per
    alias name given (the caller gives those the key may use, in the order to show).
    """
    data = [{"id": name, "object": "model", "created": created, "owned_by": "lmgate"} for name in names]
    return json.dumps({"object": "list", "data": data}).encode("utf-8")


_NOT_FOUND_HEADERS = [(b"content-type", b"application/json")]


def modelNotFoundResponse(format: str, message: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """
    The 404 answer to L{ModelNotFound} in the endpoint's provider shape, which
    the format's SDK raises as its not-found error: OpenAI code
    C{model_not_found}, Anthropic C{not_found_error}, Google C{NOT_FOUND},
    Bedrock C{ResourceNotFoundException}.

    @return: status, headers, body.
    """
    headers = list(_NOT_FOUND_HEADERS)
    body: object
    if format == "anthropic":
        body = {"type": "error", "error": {"type": "not_found_error", "message": message}}
    elif format == "google":
        body = {"error": {"code": 404, "message": message, "status": "NOT_FOUND"}}
    elif format == "bedrock":
        body = {"message": message}
        headers.append((b"x-amzn-errortype", b"ResourceNotFoundException"))
    else:
        body = {"error": {"message": message, "type": "invalid_request_error", "param": "model", "code": "model_not_found"}}
    return 404, headers, json.dumps(body).encode("utf-8")
