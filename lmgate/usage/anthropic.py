"""
Anthropic's usage format: the Messages API, whole or streamed as server-sent
events (and, base64-wrapped, inside Bedrock's InvokeModelWithResponseStream).
"""

from __future__ import annotations

import json
from typing import Any

from lmgate.records.record import Usage
from lmgate.usage.base import Json, asDict, asStr, count, errorType, guarded, sumOf


@guarded
def applyAnthropic(usage: Usage, raw: Any) -> None:
    """C{input_tokens} + cache writes + cache reads is all input."""
    u = asDict(raw)
    if not u:
        return
    plain = count(u.get("input_tokens"))
    write = count(u.get("cache_creation_input_tokens"))
    read = count(u.get("cache_read_input_tokens"))
    usage.input_tokens = sumOf(plain, write, read)
    usage.cache_write_tokens = write
    usage.cached_tokens = read
    usage.output_tokens = count(u.get("output_tokens"))


def anthropicBody(usage: Usage, body: Json) -> None:
    """A whole JSON response body."""
    usage.model = asStr(body.get("model"))
    applyAnthropic(usage, body.get("usage"))


class AnthropicStream:
    """C{message_start}, then C{message_delta} usage overriding field by field."""

    def __init__(self, usage: Usage | None = None) -> None:
        self.usage = usage or Usage(streaming=True)
        self.raw: Json = {}

    def wanted(self, event: bytes, data: bytes) -> bool:
        if event:
            return event in (b"message_start", b"message_delta", b"error")
        return b'"message_start"' in data or b'"message_delta"' in data or b'"error"' in data

    def handle(self, event: bytes, data: bytes) -> None:
        self.take(json.loads(data))

    def take(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            return
        kind = chunk.get("type")
        if kind == "message_start":
            message = asDict(chunk.get("message"))
            self.usage.model = asStr(message.get("model")) or self.usage.model
            self.raw.update(asDict(message.get("usage")))
        elif kind == "message_delta":
            self.raw.update({k: v for k, v in asDict(chunk.get("usage")).items() if v is not None})
        elif kind == "error":
            self.usage.providerError = errorType(chunk)
        if kind in ("message_start", "message_delta"):
            applyAnthropic(self.usage, self.raw)

    def result(self) -> Usage:
        return self.usage
