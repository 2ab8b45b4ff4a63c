"""
Google's usage format (C{usageMetadata}): the Gemini API and Vertex AI, whole,
streamed as server-sent events (C{alt=sse}) or as one JSON array.
"""

from __future__ import annotations

import json
from typing import Any

from lmgate.records.record import Usage
from lmgate.usage.base import Json, asDict, asStr, count, errorType, guarded, sumOf


@guarded
def applyGoogle(usage: Usage, raw: Any) -> None:
    """Gemini API and Vertex AI C{usageMetadata}."""
    u = asDict(raw)
    prompt = count(u.get("promptTokenCount"))
    toolUse = count(u.get("toolUsePromptTokenCount"))
    usage.input_tokens = None if prompt is None else prompt + (toolUse or 0)
    thoughts = count(u.get("thoughtsTokenCount"))
    usage.output_tokens = sumOf(count(u.get("candidatesTokenCount")), thoughts)
    usage.reasoning_tokens = thoughts
    usage.cached_tokens = count(u.get("cachedContentTokenCount"))


def hasGoogleCounts(raw: Any) -> bool:
    """Any count present (applyGoogle then checks that it is one)."""
    u = asDict(raw)
    return any(u.get(k) is not None for k in ("promptTokenCount", "candidatesTokenCount", "totalTokenCount"))


def googleBody(usage: Usage, body: Json) -> None:
    """A whole JSON response body."""
    usage.model = asStr(body.get("modelVersion"))
    if hasGoogleCounts(body.get("usageMetadata")):
        applyGoogle(usage, body["usageMetadata"])


class GoogleStream:
    """Keep the last chunk's usage that has counts (early chunks may carry an empty one)."""

    def __init__(self) -> None:
        self.usage = Usage(streaming=True)

    def wanted(self, event: bytes, data: bytes) -> bool:
        return b"usageMetadata" in data or b'"error"' in data or (self.usage.model is None and b"modelVersion" in data)

    def handle(self, event: bytes, data: bytes) -> None:
        self.take(data)

    def take(self, data: bytes) -> None:
        chunk = json.loads(data)
        if isinstance(chunk, list):  # some servers put one element per array
            for item in chunk:
                self._chunk(item)
        else:
            self._chunk(chunk)

    def _chunk(self, chunk: Any) -> None:
        if not isinstance(chunk, dict):
            return
        if chunk.get("error"):
            self.usage.providerError = errorType(chunk)
        self.usage.model = asStr(chunk.get("modelVersion")) or self.usage.model
        if hasGoogleCounts(chunk.get("usageMetadata")):
            applyGoogle(self.usage, chunk["usageMetadata"])

    def result(self) -> Usage:
        return self.usage
