"""
The admission steps of every call, and L{defaultPipeline}: the one place they
are listed, in order.

The steps read the gateway's current routes and allow-list at each call (a
reload replaces them on the L{lmgate.gate.gateway.Gateway}).
"""

from __future__ import annotations

from random import Random
from typing import TYPE_CHECKING

from zope.interface import implementer

from lmgate.access.credentials import CredentialError, extractCredential, maskKey

from lmgate.gate.admission import CallContext, IAdmissionStep, Pipeline, Refusal, Verdict
from lmgate.gate.routing import RouteError, splitTarget
from lmgate.policy.streamusage import addIncludeUsage, wantsIncludeUsage
from lmgate.policy.step import PolicyStep
from lmgate.governance.aliases import (
    FoundModel,
    Target,
    UNIFIED_OPERATIONS,
    Choice,
    ModelNotFound,
    findModel,
    resolveModel,
    unifiedPath,
)

if TYPE_CHECKING:
    from lmgate.gate.gateway import Gateway

SIGV4_MESSAGE = (
    "AWS SigV4-signed requests are not accepted: the signature covers the host and path, "
    "which are the gateway's, not AWS's. Send your LMGate key as a Bedrock API key "
    "(AWS_BEARER_TOKEN_BEDROCK); on a managed route LMGate signs with its own AWS credentials."
)
NO_KEY_MESSAGE = "No API key was sent; this gateway admits allow-listed keys only."
UNKNOWN_KEY_MESSAGE = "The API key is not authorised to use this gateway."

#: The refusal of a call that arrives while the gateway shuts down: answered 503
#: with C{Connection: close} (its client may retry elsewhere), recorded as C{shutdown}.
SHUTTING_DOWN = Refusal("shutting_down", "The gateway is shutting down; retry on a new connection.", "shutdown")
_NO_PROVIDER = Refusal("not_found", "No provider is configured for this path.")
_NO_KEY = Refusal("forbidden", NO_KEY_MESSAGE)
_SIGV4 = Refusal("forbidden", SIGV4_MESSAGE)
_UNKNOWN_KEY = Refusal("forbidden", UNKNOWN_KEY_MESSAGE)
_CONNECT = Refusal("bad_request", "CONNECT is not relayed.")

#: The unified endpoint's prefix (OpenAI wire format, any route of format openai behind it); no route may take the name.
UNIFIED_PREFIX = b"v1"
#: The unified endpoint's own listing of the aliases (answered by LMGate, never relayed).
MODELS_PATH = b"/models"
_UNIFIED_NO_OPERATION = Refusal(
    "not_found",
    "The unified endpoint serves POST /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses and GET /v1/models.",
)
_UNIFIED_SPOOLED = Refusal(
    "body_too_large",
    "On the unified endpoint LMGate reads the body's model to pick the route: the body must be at most 1 MiB.",
)


@implementer(IAdmissionStep)
class Route:
    """
    Find the call's provider by the target's first segment (fills C{endpoint},
    C{provider}, C{rest}, C{query}); refuse a target LMGate will not relay (400)
    or an unknown prefix (404).
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def admit(self, context: CallContext) -> Refusal | None:
        uri = context.uri
        context.endpoint = uri.partition(b"?")[0]
        try:
            name, rest, query = splitTarget(uri)
        except RouteError as e:
            return Refusal(e.kind, e.message)
        provider = self._gateway.providers.get(name)
        if provider is None:
            if name != UNIFIED_PREFIX:
                return _NO_PROVIDER
            provider = self._gateway.unified  # the target's route replaces it in the body stage
        context.provider, context.rest, context.query = provider, rest, query
        return None


@implementer(IAdmissionStep)
class Draining:
    """Refuse a call that arrives while the gateway shuts down (503, recorded as C{shutdown})."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def admit(self, context: CallContext) -> Refusal | None:
        return SHUTTING_DOWN if self._gateway.draining else None


@implementer(IAdmissionStep)
class Authenticate:
    """
    Find the caller's credential and its allow-list entry (fills C{credential},
    C{maskedKey}, C{entry}); refuse no key, an ambiguous or malformed one, a
    SigV4 signature, or a key not on the allow-list (403).
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def admit(self, context: CallContext) -> Refusal | None:
        try:
            credential = extractCredential(context.headers, context.query or b"")
        except CredentialError as e:
            return Refusal("forbidden", str(e))
        if credential is None:
            return _NO_KEY
        context.credential = credential
        context.entry = self._gateway.keyCheck.lookup(credential.key)
        context.maskedKey = maskKey(credential.key)
        if credential.kind == "sigv4":
            return _SIGV4
        if context.entry is None:
            return _UNKNOWN_KEY
        return None


@implementer(IAdmissionStep)
class NoConnect:
    """Refuse C{CONNECT}: LMGate relays requests, not tunnels (400)."""

    def admit(self, context: CallContext) -> Refusal | None:
        return _CONNECT if context.method == b"CONNECT" else None


@implementer(IAdmissionStep)
class ResolveAlias:
    """
    A body whose top-level C{model} names an alias goes to one of the alias's
    targets of the route's own format: the step puts the target's route in
    C{provider} (its upstream, and its managed credential or the client's key,
    as that route says), the alias in C{alias}, the target in C{target}, and
    the body with only the C{model} value rewritten in C{body} (the call sends
    that body). An alias with no target of this format is refused 404
    C{model_not_found}, never relayed.

    Without C{models:} configured the step costs one truth test. A body LMGate
    spooled to a file (over L{lmgate.gate.gateway.KEEP_BODY_LIMIT}) is not read
    for an alias: it is relayed as it came, as on a route without aliases.

    The first target in the L{lmgate.governance.aliases.Selector}'s order
    (healthy targets first) is used; the rest wait in C{fallbacks} (L{Targets})
    for the call to fall back on.
    """

    def __init__(self, gateway: Gateway, random: Random | None = None) -> None:
        self._gateway = gateway
        self._random = random or Random()

    def admit(self, context: CallContext) -> Refusal | None:
        gateway = self._gateway
        provider = context.provider
        if provider is gateway.unified:
            return self._unified(context)
        aliases = gateway.aliases
        body = context.body
        if not aliases or not body or provider is None:
            return None
        found = findModel(body)
        if found is None or found.model not in aliases:
            return None  # not an alias: relayed unchanged
        return self._toTarget(context, found.model, found, False, provider.format)

    def _unified(self, context: CallContext) -> Refusal | None:
        """
        The unified endpoint: C{GET /v1/models} goes on (the gateway answers
        it); an operation's body must name an alias with an C{openai}-format
        target, or C{<route>/<model>} naming an C{openai} route.
        """
        rest = context.rest
        if context.method in (b"GET", b"HEAD") and rest == MODELS_PATH:
            return None
        if context.method != b"POST" or rest not in UNIFIED_OPERATIONS:
            return _UNIFIED_NO_OPERATION
        body = context.body
        if body is None and context.bodySize:
            return _UNIFIED_SPOOLED
        found = findModel(body) if body else None
        return self._toTarget(context, found.model if found is not None else None, found, True, "openai")

    def _toTarget(
        self, context: CallContext, requested: str | None, found: FoundModel | None, unified: bool, format: str
    ) -> Refusal | None:
        """Send the call to the first target the request's model allows, its body's model rewritten."""
        gateway = self._gateway
        choice = resolveModel(requested, unified, format, gateway.aliases, gateway.formats)
        if choice is None:
            return None
        if isinstance(choice, ModelNotFound):
            return Refusal("model_not_found", choice.message)
        assert isinstance(choice, Choice)
        assert found is not None and context.body is not None  # a model was found: there is a body
        order = gateway.selector.order(choice.alias, self._random)
        targets = Targets(gateway, order, context.body, found, context.rest if unified else None)
        if not targets.advance(context):  # the routes and aliases are replaced together on reload; kept as a guard
            return Refusal("model_not_found", f"The model `{requested}` has no target on this gateway.")
        context.alias = choice.named
        context.fallbacks = targets
        return None


class Targets:
    """
    The targets one call may still try, in the order the selector gave, and
    how each is put into the call's context: the target's route, the path on
    it (unified endpoint: its C{openai_path}), the body as the client sent it
    with only the top-level C{model} rewritten. The call asks for the next one
    when a target fails before any byte reached the client
    (L{lmgate.gate.call.ProxiedCall}).
    """

    def __init__(
        self, gateway: Gateway, order: list[Target], body: bytes, found: FoundModel, unifiedRest: bytes | None
    ) -> None:
        self._gateway, self._order = gateway, order
        self._body, self._found, self._unifiedRest = body, found, unifiedRest

    def advance(self, context: CallContext) -> bool:
        """Put the next target whose route exists into C{context}; False when none is left."""
        while self._order:
            target = self._order.pop(0)
            provider = self._gateway.providers.get(target.provider.encode("ascii"))
            if provider is None:
                continue
            if self._unifiedRest is not None:
                context.rest = unifiedPath(self._unifiedRest, provider.openaiPath)
            context.target, context.provider, context.requestedModel = target, provider, target.model
            # bodySize stays what the client sent (the record's request_bytes,
            # the reservation); the rewritten body is sent from memory
            context.body = self._found.rewrite(self._body, target.model)
            return True
        return False


@implementer(IAdmissionStep)
class Limit:
    """
    Usage limits (C{usage_limits:}): the call is admitted against every rule
    it matches, reserving its estimate until its record is written, or refused
    429 in the provider's shape (503 when the store fails and a rule is
    C{closed}). Last of the steps: it counts only calls every other step let
    on. Without rules the step costs one truth test.
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def admit(self, context: CallContext) -> Verdict:
        limiter = self._gateway.limiter
        if limiter is None or not limiter.active or context.provider is self._gateway.unified:
            return None  # no rules; or GET /v1/models, answered by the gateway itself
        return limiter.admit(context)  # cancelled while the store decides, it releases what the store may still admit


@implementer(IAdmissionStep)
class StreamUsage:
    """
    C{policy.stream_usage}: an OpenAI-format streaming completion that did not
    ask for usage gets C{stream_options.include_usage} added to its body (only
    that inserted, L{lmgate.policy.streamusage.addIncludeUsage}); the relay
    then keeps the usage chunk this adds from the client. Before the alias
    step, so that every target an alias falls back to is sent the same body
    (the unified endpoint is OpenAI-format too). A spooled body is relayed as
    it came. Off: one truth test.
    """

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def admit(self, context: CallContext) -> None:
        if not self._gateway.streamUsage:
            return None
        provider, body = context.provider, context.body
        if provider is None or not body or not wantsIncludeUsage(context.method, provider.format, context.rest):
            return None
        rewritten = addIncludeUsage(body)
        if rewritten is not None:
            context.body, context.streamUsage = rewritten, True  # bodySize: what the client sent (request_bytes)
        return None


def defaultPipeline(gateway: Gateway) -> Pipeline:
    """
    The steps every call passes, in order. A new step is added here: to the
    headers stage when it needs only the request's head (its refusal then
    saves reading the body), to the body stage otherwise.
    """
    return Pipeline(
        atHeaders=[Route(gateway), Draining(gateway), Authenticate(gateway), NoConnect()],
        atBody=[StreamUsage(gateway), ResolveAlias(gateway), PolicyStep(gateway), Limit(gateway)],
    )
