"""
Bedrock's usage formats: Converse and ConverseStream (C{inputTokens}...),
InvokeModel with an Anthropic body, InvokeModelWithResponseStream's AWS event
stream (Anthropic events in base64, then C{amazon-bedrock-invocationMetrics}),
and the token-count response headers when the body says nothing readable.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable

from lmgate.records.record import Usage
from lmgate.usage.anthropic import AnthropicStream, anthropicBody
from lmgate.usage.base import HeaderLookup, InvalidCount, Json, asDict, count, guarded, invalidate
from lmgate.usage.decoding import Decoder
from lmgate.usage.framing import JSONBodyReader


@guarded
def applyConverse(usage: Usage, raw: Any) -> None:
    """Bedrock Converse / ConverseStream C{usage}."""
    u = asDict(raw)
    if not u:
        return
    read = count(u.get("cacheReadInputTokens"))
    write = count(u.get("cacheWriteInputTokens"))
    plain = count(u.get("inputTokens"))
    usage.input_tokens = None if plain is None else plain + (read or 0) + (write or 0)
    usage.output_tokens = count(u.get("outputTokens"))
    usage.cached_tokens = read
    usage.cache_write_tokens = write


@guarded
def applyInvocationMetrics(usage: Usage, raw: Any) -> None:
    """Bedrock C{amazon-bedrock-invocationMetrics} (InvokeModelWithResponseStream), if nothing better was read."""
    m = asDict(raw)
    if usage.input_tokens is None:
        usage.input_tokens = count(m.get("inputTokenCount"))
    if usage.output_tokens is None:
        usage.output_tokens = count(m.get("outputTokenCount"))


class BedrockStream:
    """ConverseStream events, and InvokeModelWithResponseStream chunks (Anthropic events in base64)."""

    def __init__(self) -> None:
        self.usage = Usage(streaming=True)
        self._anthropic = AnthropicStream(self.usage)
        self._metrics: Json = {}

    def handle(self, headers: dict[str, Any], payload: bytes) -> None:
        if headers.get(":message-type") == "exception":
            self.usage.providerError = str(headers.get(":exception-type") or "exception")
            return
        event = headers.get(":event-type")
        if event == "metadata":
            applyConverse(self.usage, asDict(json.loads(payload)).get("usage"))
        elif event == "chunk":
            body = asDict(json.loads(payload)).get("bytes")
            if isinstance(body, str):
                inner = json.loads(base64.b64decode(body))
                self._anthropic.take(inner)
                self._metrics = asDict(asDict(inner).get("amazon-bedrock-invocationMetrics")) or self._metrics

    def result(self) -> Usage:
        if self._metrics:
            applyInvocationMetrics(self.usage, self._metrics)
        return self.usage


def bedrockBody(header: HeaderLookup) -> Callable[[Usage, Json], None]:
    """How to read a whole JSON body from Bedrock, falling back to the response's token-count headers."""

    def apply(usage: Usage, body: Json) -> None:
        if isinstance(body.get("usage"), dict) and "inputTokens" in body["usage"]:
            applyConverse(usage, body["usage"])  # Converse
        elif isinstance(body.get("usage"), dict):
            anthropicBody(usage, body)  # InvokeModel with an Anthropic body
        if usage.input_tokens is None and usage.output_tokens is None:
            fromHeaders(usage, header)

    return apply


def fromHeaders(usage: Usage, header: HeaderLookup) -> None:
    """The counts of C{x-amzn-bedrock-input-token-count} and C{-output-token-count}: digits only, below 2**53."""

    def headerCount(name: bytes) -> int | None:
        value = header(name)
        if value is None:
            return None
        value = value.strip()
        return count(int(value) if value.isdigit() and len(value) <= 20 else value)

    if usage.unreadable == "invalid":
        return
    try:
        input, output = headerCount(b"x-amzn-bedrock-input-token-count"), headerCount(b"x-amzn-bedrock-output-token-count")
    except InvalidCount:
        invalidate(usage)
        return
    usage.input_tokens, usage.output_tokens = input, output
    if input is not None or output is not None:
        usage.unreadable = None  # a body too large to read: the headers have the counts


class HeaderFallback(JSONBodyReader):
    """Bedrock InvokeModel: the token-count headers stand when the body cannot be read."""

    def __init__(self, decoder: Decoder, limit: int, header: HeaderLookup) -> None:
        super().__init__(decoder, limit, bedrockBody(header))
        self._header = header

    def finish(self) -> Usage:
        usage = super().finish()
        if usage.input_tokens is None and usage.output_tokens is None:
            fromHeaders(usage, self._header)
        return usage
