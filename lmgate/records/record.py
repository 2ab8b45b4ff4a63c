"""
The values that travel between the gateway's parts: allow-list entries, the usage
read from a response, and the one record each proxied call yields.

The record's field names are a contract with everyone who reads the stats files:
extend, never rename (see docs/records.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

#: One encoder for every record (json.dumps with options builds a new one per call).
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class KeyEntry:
    """
    One row of the allow-list.

    @ivar id: the operator's name for the key (the record's C{lmgate_id}).
    @ivar owner: who the key belongs to (the record's C{owner}).
    @ivar added: the C{added} column, as written.
    @ivar extra: any further columns, kept for later features (limits, budgets).
    """

    id: str
    owner: str
    added: str
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Usage:
    """
    Token usage read from one response, already normalised so the numbers mean the
    same across providers (docs/records.md, "Token semantics").

    A count is L{None} where the provider did not report it, 0 only where it
    reported 0.

    @ivar unreadable: why the counts are unknown although the response may have
        carried them: C{"truncated"} (reading stopped at a bound, the relay went
        on) or C{"invalid"} (a count that is not a sane integer); None otherwise.
    """

    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    cache_write_tokens: int | None = None
    reasoning_tokens: int | None = None
    streaming: bool = False
    providerError: str | None = None  # the provider's error type, seen inside a 200 stream
    unreadable: str | None = None

    @property
    def usage_source(self) -> str:
        """
        C{"response"} when the response carried any count, C{"truncated"} or
        C{"invalid"} when it could not be read (L{unreadable}), else C{"absent"}.
        """
        if self.unreadable is not None:
            return self.unreadable
        counts = (
            self.input_tokens,
            self.output_tokens,
            self.cached_tokens,
            self.cache_write_tokens,
            self.reasoning_tokens,
        )
        return "absent" if all(c is None for c in counts) else "response"

    @property
    def total_tokens(self) -> int | None:
        """Input plus output; the input alone when no output is reported; else None."""
        if self.input_tokens is None:
            return None
        return self.input_tokens + (self.output_tokens or 0)


#: The record's fields, in the order they are written.
RECORD_FIELDS = (
    "timestamp",
    "request_id",
    "lmgate_id",
    "owner",
    "key",
    "provider",
    "method",
    "endpoint",
    "model",
    "status",
    "streaming",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "total_tokens",
    "usage_source",
    "latency_ms",
    "ttfb_ms",
    "request_bytes",
    "response_bytes",
    "upstream_request_id",
    "client",
    "error",
    "cost_usd",
    "alias",
    "attempts",
    "auth",
    "limited_by",
    "reserved_tokens",
    "limits",
    "policy",
    "tags",
    "audited",
)


@dataclass
class UsageRecord:
    """
    What one proxied call did: who, where, what it cost and how it ended.
    """

    timestamp: str
    request_id: str
    lmgate_id: str | None
    owner: str | None
    key: str | None
    provider: str | None
    method: str
    endpoint: str
    model: str | None
    status: int
    streaming: bool
    input_tokens: int | None
    output_tokens: int | None
    cached_tokens: int | None
    cache_write_tokens: int | None
    reasoning_tokens: int | None
    total_tokens: int | None
    usage_source: str
    latency_ms: float
    ttfb_ms: float | None
    request_bytes: int
    response_bytes: int
    upstream_request_id: str | None
    client: str | None
    error: str | None
    cost_usd: float | None = None
    alias: str | None = None
    attempts: int = 0
    auth: str | None = None
    limited_by: str | None = None
    reserved_tokens: int | None = None
    limits: str | None = None
    policy: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    audited: bool = False

    def asDict(self) -> dict[str, Any]:
        """The record as a plain dict, fields in contract order."""
        return {name: getattr(self, name) for name in RECORD_FIELDS}

    def toLine(self) -> bytes:
        """One complete JSONL line (UTF-8, ending in a newline)."""
        return (_encoder.encode(self.asDict()) + "\n").encode("utf-8")
