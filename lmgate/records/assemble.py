"""
A call's record, assembled from what the call knew when it ended.

L{recordFor} is a function of the call's facts (L{CallFacts}) alone: the gate
gathers them, this module turns them into the L{UsageRecord} (times in
milliseconds, the model, the cost, the error). It never imports the gate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from twisted.logger import Logger

from lmgate.records.record import KeyEntry, Usage, UsageRecord

log = Logger()

_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def isoTimestamp(seconds: float) -> str:
    """ISO 8601 UTC with milliseconds (truncated), e.g. C{2026-11-23T02:49:14.123Z}."""
    whole = math.floor(seconds)
    micros = round((seconds - whole) * 1_000_000)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    if _second[0] != whole:
        _second[:] = [whole, datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")]
    return "%s.%03dZ" % (_second[1], micros // 1000)


@dataclass(slots=True)
class CallFacts:
    """
    What a call knew when it ended.

    @ivar startedAt: when the call began (its body in), in reactor seconds.
    @ivar endedAt: when it ended.
    @ivar responseAt: when the upstream's response head arrived, or None.
    @ivar provider: the route's name and format, or None when unrouted.
    @ivar upstreamPath: the raw path after the prefix (the model may be in it).
    @ivar body: the request body when kept, for the model it names.
    @ivar requestedModel: the model a step read from the request, if one did.
    @ivar usage: what the response's usage reader found.
    @ivar error: the ending's error name, or None for a clean one.
    @ivar prices: the price table (anything with L{lmgate.ops.prices.Prices.cost}), or None.
    @ivar auth: how the route authenticated upstream (C{client}, C{managed},
        C{stub}), or None for a call refused before routing and authentication.
    @ivar alias: the model alias the request named, or None.
    @ivar attempts: upstream attempts made (0: never sent upstream).
    @ivar limitedBy: the usage-limit rule that refused the call, or None.
    @ivar reservedTokens: the tokens the call reserved under usage limits, or None.
    @ivar limits: C{shared}, C{local} (counted in-process while the shared store
        failed), or None when no usage-limit rule matched.
    @ivar policy: the names of the policy rules that matched, in order.
    @ivar tags: the tags those rules gave the call.
    @ivar audited: whether the call's bodies went to the audit log.
    """

    requestId: str
    startedAt: float
    endedAt: float
    responseAt: float | None
    method: bytes
    endpoint: bytes
    provider: str | None
    format: str | None
    upstreamPath: bytes
    entry: KeyEntry | None
    maskedKey: str | None
    body: bytes | None
    requestedModel: str | None
    status: int
    usage: Usage
    requestBytes: int
    responseBytes: int
    upstreamRequestId: str | None
    client: str | None
    error: str | None
    prices: Any
    auth: str | None = None
    alias: str | None = None
    attempts: int = 0
    limitedBy: str | None = None
    reservedTokens: int | None = None
    limits: str | None = None
    policy: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    audited: bool = False


def recordFor(facts: CallFacts) -> UsageRecord:
    """The record of a call: who, where, what it cost and how it ended."""
    usage = facts.usage
    model = usage.model
    if model is None:
        model = facts.requestedModel
    if model is None and facts.format is not None and facts.upstreamPath:
        from lmgate.usage import requestModel

        try:
            model = requestModel(facts.format, facts.upstreamPath, facts.body)
        except Exception:
            log.failure("Reading the request's model failed")
    prices = facts.prices
    cost = None
    if prices is not None:
        cost = prices.cost(model, usage.input_tokens, usage.output_tokens, usage.cached_tokens, usage.cache_write_tokens)
    errorKind = facts.error
    if errorKind is None and usage.providerError is not None:
        errorKind = f"provider_error:{usage.providerError}"
    entry = facts.entry
    startedAt = facts.startedAt
    return UsageRecord(
        timestamp=isoTimestamp(startedAt),
        request_id=facts.requestId,
        lmgate_id=entry.id if entry else None,
        owner=entry.owner if entry else None,
        key=facts.maskedKey,
        provider=facts.provider,
        method=facts.method.decode("latin-1"),
        endpoint=facts.endpoint.decode("latin-1"),
        model=model,
        status=facts.status,
        streaming=usage.streaming,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_tokens=usage.cached_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        total_tokens=usage.total_tokens,
        usage_source=usage.usage_source,
        latency_ms=round((facts.endedAt - startedAt) * 1000, 3),
        ttfb_ms=None if facts.responseAt is None else round((facts.responseAt - startedAt) * 1000, 3),
        request_bytes=facts.requestBytes,
        response_bytes=facts.responseBytes,
        upstream_request_id=facts.upstreamRequestId,
        client=facts.client,
        error=errorKind,
        cost_usd=cost,
        alias=facts.alias,
        attempts=facts.attempts,
        auth=facts.auth,
        limited_by=facts.limitedBy,
        reserved_tokens=facts.reservedTokens,
        limits=facts.limits,
        policy=list(facts.policy),
        tags=list(facts.tags),
        audited=facts.audited,
    )
