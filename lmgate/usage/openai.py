"""
OpenAI's usage format: chat completions, legacy completions, embeddings and
the Responses API, whole or streamed as server-sent events. Azure OpenAI and
OpenAI-compatible upstreams (Bedrock's included) answer in it too.
"""

from __future__ import annotations

import json
from typing import Any

from lmgate.records.record import Usage
from lmgate.usage.base import Json, asDict, asStr, count, errorType, guarded


@guarded
def applyOpenAI(usage: Usage, raw: Any) -> None:
    """Chat completions, legacy completions, embeddings (C{prompt_tokens}...) and Responses (C{input_tokens}...)."""
    u = asDict(raw)
    if not u:
        return
    if "input_tokens" in u or "output_tokens" in u:
        usage.input_tokens = count(u.get("input_tokens"))
        usage.output_tokens = count(u.get("output_tokens"))
        inputDetails, outputDetails = u.get("input_tokens_details"), u.get("output_tokens_details")
    else:
        usage.input_tokens = count(u.get("prompt_tokens"))
        usage.output_tokens = count(u.get("completion_tokens"))
        inputDetails, outputDetails = u.get("prompt_tokens_details"), u.get("completion_tokens_details")
    usage.cached_tokens = count(asDict(inputDetails).get("cached_tokens"))
    usage.reasoning_tokens = count(asDict(outputDetails).get("reasoning_tokens"))


def openaiBody(usage: Usage, body: Json) -> None:
    """A whole JSON response body."""
    usage.model = asStr(body.get("model"))
    applyOpenAI(usage, body.get("usage"))


class OpenAIStream:
    """Chat completions chunks and Responses API events."""

    def __init__(self) -> None:
        self.usage = Usage(streaming=True)

    def wanted(self, event: bytes, data: bytes) -> bool:
        if event:
            return event in (b"response.created", b"response.completed", b"response.incomplete", b"response.failed", b"error")
        return (
            (self.usage.model is None and b'"model"' in data)
            or b'"usage":{' in data
            or b'"usage": {' in data
            or b'"error"' in data
            or b'"response.' in data
        )

    def handle(self, event: bytes, data: bytes) -> None:
        if data == b"[DONE]":
            return
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            return
        kind = chunk.get("type")
        if isinstance(kind, str) and (kind.startswith("response.") or kind == "error"):
            response = asDict(chunk.get("response"))
            self.usage.model = asStr(response.get("model")) or self.usage.model
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                applyOpenAI(self.usage, response.get("usage"))
            if kind == "response.failed":
                self.usage.providerError = asStr(asDict(response.get("error")).get("code")) or "response_failed"
            elif kind == "error":
                self.usage.providerError = asStr(chunk.get("code")) or errorType(chunk)
            return
        if "error" in chunk and chunk.get("error"):
            self.usage.providerError = errorType(chunk)
        self.usage.model = self.usage.model or asStr(chunk.get("model"))
        if isinstance(chunk.get("usage"), dict):
            applyOpenAI(self.usage, chunk["usage"])

    def result(self) -> Usage:
        return self.usage
