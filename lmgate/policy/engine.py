"""
The policy as the gateway applies it: the configured rules, compiled, then
the plugins, deciding on every admitted call (L{Policy.admit}, run by the
admission step L{lmgate.policy.step.PolicyStep}), and the plugins shown each
record (L{Policy.observe}).

Rules are tried in order; each matching rule adds its name to the call's
C{policy} and its tags to its C{tags}, and may mark it audited; the first
rule that refuses ends the evaluation (the refusing rule is the last name in
C{policy}). Plugins run after the rules (only when no rule refused), in
order; one that fails or misses C{policy.plugin_timeout} refuses the call 503.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from fnmatch import translate
from typing import TYPE_CHECKING, Any, Callable, Sequence

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from lmgate.access.credentials import CLIENT_CREDENTIAL_HEADERS
from lmgate.gate.admission import Refusal, Verdict
from lmgate.limits.limiter import outputCap
from lmgate.policy.interfaces import IPolicy, PolicyCall, PolicyDecision
from lmgate.policy.settings import PolicyRule, PolicySettings
from lmgate.usage.model import requestModel

if TYPE_CHECKING:
    from lmgate.gate.admission import CallContext
    from lmgate.ops.ratelog import RateLimitedLog

log = Logger()

#: The record's C{error} for every refusal by a rule or a plugin's decision.
POLICY_DENIED = "policy_denied"
#: The record's C{error} for a call refused because a plugin failed or timed out.
POLICY_ERROR = "policy_error"
#: The request headers that carry a client's credential, never shown to plugins (lower-case).
_CREDENTIAL_HEADERS = frozenset(name.decode("ascii").lower() for name in CLIENT_CREDENTIAL_HEADERS)
#: Methods that may name no model under an C{allow_models} rule: they send no prompt.
MODEL_FREE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


@dataclass(frozen=True)
class LoadedPlugin:
    """A plugin made at start-up: its name (the factory, as configured) and the object providing L{IPolicy}."""

    name: str
    plugin: IPolicy


class _Facts:
    """
    What the rules and plugins see of one call, each worked out once: the
    body's JSON (parsed when a rule first needs it), the model asked for, the
    output cap, the input estimate.
    """

    __slots__ = ("key", "owner", "provider", "method", "path", "alias", "unread", "_context", "_format", "_document", "_model", "_parsed", "_cap")

    def __init__(self, context: CallContext, format: str, key: str, owner: str, provider: str) -> None:
        self._context, self._format = context, format
        self.key, self.owner, self.provider = key, owner, provider
        self.method = context.method.decode("latin-1").upper()
        self.path = context.rest.decode("latin-1")
        self.alias = context.alias
        #: The body was spooled to a file, not read (over 1 MiB): its model and caps are unknown.
        self.unread = context.body is None and bool(context.bodySize)
        self._parsed = False
        self._document: Any = None
        self._model: str | None = None
        self._cap: int | None = None

    def _parse(self) -> None:
        self._parsed = True
        context = self._context
        body = context.body
        if body and body.lstrip()[:1] == b"{":
            try:
                self._document = json.loads(body)
            except ValueError:
                self._document = None
        if context.alias is not None:
            self._model = context.alias
        else:
            document = self._document
            named = document.get("model") if isinstance(document, dict) else None
            self._model = named if isinstance(named, str) else requestModel(self._format, context.rest, None)

    @property
    def parsed(self) -> bool:
        """Whether a rule needed the body (and the model) already."""
        return self._parsed

    @property
    def model(self) -> str | None:
        """The model the client asked for: the alias it used, else its body's (or URL's) model."""
        if not self._parsed:
            self._parse()
        return self._model

    @property
    def outputCap(self) -> int:
        """The output the request asks for (0 when it names no cap)."""
        if self._cap is None:
            if not self._parsed:
                self._parse()
            self._cap = outputCap(self._document, 0)
        return self._cap


def _globs(patterns: Sequence[str]) -> Callable[[str], Any]:
    """One compiled test for several globs (case-sensitive): matches when any of them matches the whole value."""
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns)).match


class _Rule:
    """A rule, compiled: its match as exact-value sets and glob regexes, its model list as one regex."""

    __slots__ = ("rule", "name", "_exact", "_globs", "allowed", "tags", "matchIndex", "allowIndex")

    def __init__(self, rule: PolicyRule, matchIndex: int, allowIndex: int) -> None:
        self.rule, self.name, self.tags = rule, rule.name, rule.tags
        #: Rules with equal C{match} (or C{allow_models}) share an index: one call tests each once.
        self.matchIndex, self.allowIndex = matchIndex, allowIndex
        match = rule.match
        self._exact = tuple(
            (field, frozenset(wanted))
            for field in ("key", "owner", "provider", "method", "alias")
            if (wanted := getattr(match, field)) is not None
        )
        self._globs = tuple(
            (field, _globs(wanted)) for field in ("path", "model") if (wanted := getattr(match, field)) is not None
        )
        self.allowed = _globs(rule.allowModels) if rule.allowModels is not None else None

    def matches(self, facts: _Facts) -> bool:
        for field, values in self._exact:
            if getattr(facts, field) not in values:  # None is never in them
                return False
        for field, test in self._globs:
            value = getattr(facts, field)
            if value is None or test(value) is None:
                return False
        return True


def _visibleHeaders(context: CallContext) -> tuple[tuple[str, str], ...]:
    """The request headers a plugin is shown: lower-case names, text values, no credential."""
    return tuple(
        (lower, value.decode("latin-1"))
        for name, values in context.headers.getAllRawHeaders()
        if (lower := name.decode("latin-1").lower()) not in _CREDENTIAL_HEADERS
        for value in values
    )


def _why(reason: Failure) -> str:
    """One line saying what a plugin raised."""
    return f"{getattr(reason.type, '__name__', 'Exception')}: {reason.getErrorMessage()}"


def _denied(rule: str, message: str) -> Refusal:
    return Refusal("policy_denied", f"Refused by the gateway's policy rule `{rule}`: {message}", POLICY_DENIED, rule)


def _exceeded(rule: str, message: str) -> Refusal:
    return Refusal("policy_exceeded", f"Refused by the gateway's policy rule `{rule}`: {message}", POLICY_DENIED, rule)


#: Rule plans kept (one per key, route, method, path, alias and model seen); past it they are made afresh.
PLAN_CACHE_SIZE = 4096


@dataclass(frozen=True)
class _Plan:
    """
    What the rules make of a call given who calls what, before its body's size
    caps: the matching rules in order (up to and including the first that
    refuses it whatever its body), their names, tags and audit mark, which of
    them have caps (indexes) and the smallest caps, and where and how the call
    is refused (C{refusedAt} = the number of rules when it is not).
    """

    rules: tuple[_Rule, ...]
    names: tuple[str, ...]
    tags: tuple[str, ...]
    audit: bool
    capped: tuple[int, ...]
    minInput: int | None
    minOutput: int | None
    refusedAt: int
    refusal: Refusal | None


class Policy:
    """
    The rules and plugins in effect (replaced whole on reload).

    @ivar settings: the C{policy:} section the rules come from.
    @ivar plugins: the loaded plugins, in order.
    """

    def __init__(
        self,
        settings: PolicySettings,
        plugins: Sequence[LoadedPlugin],
        bytesPerToken: float,
        clock: IReactorTime,
        rateLog: RateLimitedLog,
    ) -> None:
        self.settings, self.plugins = settings, tuple(plugins)
        matches: dict[Any, int] = {}
        allows: dict[Any, int] = {}
        self._rules = tuple(
            _Rule(rule, matches.setdefault(rule.match, len(matches)), allows.setdefault(rule.allowModels, len(allows)))
            for rule in settings.rules
        )
        self._bytesPerToken, self._clock, self._rateLog = bytesPerToken, clock, rateLog
        self.active = bool(self._rules or self.plugins)
        #: Whether any rule looks at the model (its match, or an allow list): else the plans ignore it.
        self._modelMatters = any(r.rule.match.model is not None or r.rule.allowModels is not None for r in self._rules)
        self._plans: dict[tuple[Any, ...], _Plan] = {}

    # -- deciding --------------------------------------------------------------

    def admit(self, context: CallContext) -> Verdict:
        """Apply the rules, then the plugins, to an admitted call; fill its C{policy}, C{tags}, C{audit}."""
        entry, provider = context.entry, context.provider
        if entry is None or provider is None:
            return None
        facts = _Facts(context, provider.format, entry.id, entry.owner, provider.name)
        refusal = self._applyRules(facts, context) if self._rules else None
        if refusal is not None:
            return refusal
        if facts.parsed and context.requestedModel is None and context.alias is None:
            context.requestedModel = facts.model  # the record and the limits read it: parsed once
        if not self.plugins:
            return None
        return self._runPlugins(self._view(context, facts), context, 0)

    def _applyRules(self, facts: _Facts, context: CallContext) -> Refusal | None:
        """
        The rules, in order, on one call. What depends only on who calls what
        (key, owner, route, method, path, alias, model, and whether the body
        could be read) is worked out once
        per such combination and kept (L{_Plan}); only the size caps, which
        depend on the body, are checked on every call.
        """
        model = facts.model if self._modelMatters else None
        cacheKey = (facts.key, facts.owner, facts.provider, context.method, context.rest, facts.alias, model, facts.unread)
        plan = self._plans.get(cacheKey)
        if plan is None:
            if len(self._plans) >= PLAN_CACHE_SIZE:
                self._plans.clear()  # bounded: many distinct paths or models start it afresh
            plan = self._plans[cacheKey] = self._plan(facts)
        refusedAt, refusal = plan.refusedAt, plan.refusal
        if plan.capped and not self._withinCaps(plan, facts, context):
            for index in plan.capped:
                if index >= refusedAt:
                    break
                capRefusal = self._checkCaps(plan.rules[index].rule, facts, context)
                if capRefusal is not None:
                    refusedAt, refusal = index, capRefusal
                    break
        if refusedAt == len(plan.rules):
            if not plan.names:
                return None
            if context.policy or context.tags:
                self._note(context, plan.names, plan.tags, plan.audit)
            else:  # the common case: the plan's names and tags (each once already) as they are
                context.policy, context.tags = plan.names, plan.tags
                context.audit = context.audit or plan.audit
            return None
        ruleSet = plan.rules[: refusedAt + 1]
        tags = [tag for rule in ruleSet for tag in rule.tags]
        self._note(context, [rule.name for rule in ruleSet], tags, any(rule.rule.audit for rule in ruleSet))
        return refusal

    def _plan(self, facts: _Facts) -> _Plan:
        """The rules matching these facts, in order, up to the first that refuses them whatever the body."""
        matched: dict[int, bool] = {}
        allowed: dict[int, bool] = {}
        rules: list[_Rule] = []
        refusal: Refusal | None = None
        for rule in self._rules:
            hit = matched.get(rule.matchIndex)
            if hit is None:
                hit = matched[rule.matchIndex] = rule.matches(facts)
            if not hit:
                continue
            rules.append(rule)
            refusal = self._checkFacts(rule, facts, allowed)
            if refusal is not None:
                break
        tags: list[str] = []
        for rule in rules:
            tags.extend(t for t in rule.tags if t not in tags)
        capped = tuple(i for i, rule in enumerate(rules) if rule.rule.maxInputTokens is not None or rule.rule.maxOutputTokens is not None)
        inputs = [r.rule.maxInputTokens for r in rules if r.rule.maxInputTokens is not None]
        outputs = [r.rule.maxOutputTokens for r in rules if r.rule.maxOutputTokens is not None]
        refusedAt = len(rules) - 1 if refusal is not None else len(rules)
        return _Plan(
            tuple(rules), tuple(r.name for r in rules), tuple(tags), any(r.rule.audit for r in rules),
            capped, min(inputs) if inputs else None, min(outputs) if outputs else None, refusedAt, refusal,
        )

    @staticmethod
    def _note(context: CallContext, names: Sequence[str], tags: Sequence[str], audit: bool) -> None:
        """Add rule (or plugin) names, tags (each once) and the audit mark to the call."""
        context.policy = context.policy + tuple(names)
        if tags:
            have = context.tags
            added = [t for t in tags if t not in have]
            context.tags = have + tuple(t for i, t in enumerate(added) if t not in added[:i])
        if audit:
            context.audit = True

    def _checkFacts(self, compiled: _Rule, facts: _Facts, allowedBefore: dict[int, bool]) -> Refusal | None:
        """
        The refusal a matching rule gives whatever the body says beyond its
        model (C{deny}, C{allow_models}), or None. @param allowedBefore:
        C{allow_models} lists this call passed.
        """
        rule = compiled.rule
        if rule.deny is not None:
            return _denied(rule.name, rule.deny)
        allowed = compiled.allowed
        if allowed is not None and compiled.allowIndex not in allowedBefore:
            model = facts.model
            if model is None:
                if facts.method not in MODEL_FREE_METHODS:
                    if facts.unread:
                        why = "the request body is too large for LMGate to read the model it names, and this key may use only some models."
                    else:
                        why = "the request names no model, and this key may use only some models."
                    return _denied(rule.name, why)
            elif allowed(model) is None:
                return _denied(rule.name, f"the model `{model}` is not allowed for this key.")
            allowedBefore[compiled.allowIndex] = True
        return None

    def _withinCaps(self, plan: _Plan, facts: _Facts, context: CallContext) -> bool:
        """Whether the call is within the smallest caps of the plan's rules (then no cap refuses it: the common case, in one test)."""
        if plan.minInput is not None and math.ceil(context.bodySize / self._bytesPerToken) > plan.minInput:
            return False
        if plan.minOutput is not None and (facts.unread or facts.outputCap > plan.minOutput):
            return False
        return True

    def _checkCaps(self, rule: PolicyRule, facts: _Facts, context: CallContext) -> Refusal | None:
        """The refusal a matching rule's size caps give this call's body, or None."""
        if rule.maxInputTokens is not None:
            estimate = math.ceil(context.bodySize / self._bytesPerToken)
            if estimate > rule.maxInputTokens:
                return _exceeded(
                    rule.name,
                    f"the request's input (about {estimate} tokens, its body's {context.bodySize} bytes / "
                    f"{self._bytesPerToken:g}) is over the {rule.maxInputTokens} allowed.",
                )
        if rule.maxOutputTokens is not None:
            if context.body is None and context.bodySize:
                return _exceeded(rule.name, "the request body is too large for LMGate to read its output cap.")
            asked = facts.outputCap
            if asked > rule.maxOutputTokens:
                return _exceeded(rule.name, f"the request asks for up to {asked} output tokens; at most {rule.maxOutputTokens} are allowed.")
        return None

    def _view(self, context: CallContext, facts: _Facts) -> PolicyCall:
        """The read-only view plugins are shown: credentials removed from the headers."""
        return PolicyCall(
            keyId=facts.key,
            owner=facts.owner,
            provider=facts.provider,
            method=facts.method,
            path=facts.path,
            model=facts.model,
            alias=facts.alias,
            headers=lambda: _visibleHeaders(context),  # copied only if a plugin reads them
            body=context.body,
            bodySize=context.bodySize,
            requestId=context.requestId,
        )

    def _runPlugins(self, call: PolicyCall, context: CallContext, start: int) -> Verdict:
        """Ask the plugins from C{start} on, in order, until one refuses or waits."""
        for index in range(start, len(self.plugins)):
            loaded = self.plugins[index]
            try:
                answer = loaded.plugin.decide(call)
            except Exception:
                return self._failed(Failure(), loaded)
            if isinstance(answer, Deferred):
                waiting: Deferred[Any] = answer
                waiting.addTimeout(self.settings.pluginTimeout, self._clock)
                waiting.addCallback(self._decided, loaded, context)
                waiting.addCallback(self._afterWait, call, context, index + 1)
                waiting.addErrback(self._waitFailed, loaded)
                if waiting.called and not waiting.paused:
                    # It had answered already (succeed(...)), and so had any plugin after it: no wait.
                    now: list[Any] = []
                    waiting.addBoth(now.append)
                    return now[0]  # type: ignore[no-any-return]
                return waiting
            try:
                refusal = self._decided(answer, loaded, context)
            except Exception:
                return self._failed(Failure(), loaded)
            if refusal is not None:
                return refusal
        return None

    def _afterWait(self, refusal: Refusal | None, call: PolicyCall, context: CallContext, following: int) -> Verdict:
        if refusal is not None:
            return refusal
        return self._runPlugins(call, context, following)

    def _decided(self, answer: Any, loaded: LoadedPlugin, context: CallContext) -> Refusal | None:
        """Apply a plugin's decision to the call. @raise TypeError: the plugin answered something else."""
        if answer is None:
            return None
        if not isinstance(answer, PolicyDecision):
            raise TypeError(f"decide() returned {answer!r}, not a PolicyDecision or None")
        if answer.audit or answer.tags or not answer.allow:
            self._note(context, (loaded.name,), answer.tags, answer.audit)
        if answer.allow:
            return None
        make = _denied if answer.status == 403 else _exceeded
        return make(loaded.name, answer.message)

    def _waitFailed(self, reason: Failure, loaded: LoadedPlugin) -> Refusal | Failure:
        if reason.check(CancelledError):
            return reason  # the client left (or the drain ended): the call records that
        return self._failed(reason, loaded)

    def _failed(self, reason: Failure, loaded: LoadedPlugin) -> Refusal:
        """A plugin raised, failed or timed out: refuse the call 503 (fail closed), with a rate-limited log line."""
        if reason.check(TimeoutError):
            why = f"no decision within {self.settings.pluginTimeout:g}s"
        else:
            why = _why(reason)
        self._rateLog.info("policy plugin failures", "Policy plugin {plugin} failed: {why}", plugin=loaded.name, why=why)
        return Refusal(
            "policy_unavailable",
            f"The gateway's policy could not decide on this request (plugin `{loaded.name}` failed); it was not relayed.",
            POLICY_ERROR,
            loaded.name,
        )

    # -- after the record --------------------------------------------------------

    def observe(self, record: Any) -> None:
        """Show each plugin the record; what a plugin raises is logged (rate-limited) and changes nothing."""
        for loaded in self.plugins:
            try:
                observe: Any = loaded.plugin.observe
                result = observe(record)
            except Exception as e:
                self._observeFailed(Failure(e), loaded)
                continue
            if isinstance(result, Deferred):
                result.addErrback(self._observeFailed, loaded)

    def _observeFailed(self, reason: Failure, loaded: LoadedPlugin) -> None:
        self._rateLog.info(
            "policy plugin failures",
            "Policy plugin {plugin} failed to observe a record: {why}",
            plugin=loaded.name,
            why=_why(reason),
        )


def loadPlugins(source: str, settings: PolicySettings, importer: Callable[[str], Any] | None = None) -> tuple[LoadedPlugin, ...]:
    """
    Make the configured plugins: import C{module}, find C{attribute}, call it
    with the entry's options, check the result provides L{IPolicy}.

    @param source: the configuration file, named in the error.
    @raise ConfigError: naming the file, C{policy.plugins[i].factory} and what is wrong.
    """
    import importlib

    from zope.interface.exceptions import Invalid
    from zope.interface.verify import verifyObject

    from lmgate.errors import ConfigError

    load = importer or importlib.import_module
    plugins = []
    for index, entry in enumerate(settings.plugins):
        where = f"policy.plugins[{index}].factory"
        moduleName, _, attribute = entry.factory.partition(":")
        try:
            target: Any = load(moduleName)
        except Exception as e:
            raise ConfigError(source, where, f"cannot import {moduleName!r} ({type(e).__name__}: {e})") from None
        for part in attribute.split("."):
            try:
                target = getattr(target, part)
            except AttributeError:
                raise ConfigError(source, where, f"{moduleName!r} has no attribute {attribute!r}") from None
        if not callable(target):
            raise ConfigError(source, where, f"{entry.factory!r} is not callable")
        try:
            plugin = target(**entry.options)
        except Exception as e:
            raise ConfigError(source, where, f"{entry.factory!r} failed with its options ({type(e).__name__}: {e})") from None
        try:
            verifyObject(IPolicy, plugin)
        except Invalid as e:
            problem = " ".join(str(e).split())
            raise ConfigError(source, where, f"{entry.factory!r} made an object that does not provide IPolicy ({problem})") from None
        plugins.append(LoadedPlugin(entry.factory, plugin))
    return tuple(plugins)
