"""
Choosing the usage reader for one response: from its provider format, status,
content type, encoding and endpoint, which framing to follow and which
format's counting rules to apply.
"""

from __future__ import annotations

from typing import Any

from lmgate.interfaces import IUsageReader
from lmgate.usage.anthropic import AnthropicStream, anthropicBody
from lmgate.usage.base import HeaderLookup, NullReader
from lmgate.usage.bedrock import BedrockStream, HeaderFallback
from lmgate.usage.decoding import BUDGET_FACTOR, CHUNK_BUDGET, Undecodable, decoderFor
from lmgate.usage.framing import EventStreamReader, JSONArrayStreamReader, JSONBodyReader, SSEReader
from lmgate.usage.google import GoogleStream, googleBody
from lmgate.usage.openai import OpenAIStream, openaiBody


def readerFor(fmt: str, status: int, header: HeaderLookup, endpoint: bytes, captureLimit: int) -> IUsageReader:
    """
    The reader for one response.

    @param fmt: openai, anthropic, google or bedrock.
    @param header: the first value of one of the upstream's response headers,
        by lowercase name (None when absent); read here and, for Bedrock's
        token-count headers, when the reader finishes.
    @param endpoint: the request path as the upstream sees it (no query string).
    """
    contentType = (header(b"content-type") or b"").lower()
    sse = b"text/event-stream" in contentType
    eventStream = b"application/vnd.amazon.eventstream" in contentType
    arrayStream = fmt == "google" and not sse and endpoint.endswith(b":streamGenerateContent")
    streaming = sse or eventStream or arrayStream
    if status >= 400:
        return NullReader(streaming)
    try:
        # Streams are scanned byte by byte, so one wire chunk may not inflate past
        # CHUNK_BUDGET; a JSON body is only copied, up to the capture limit.
        perChunk = CHUNK_BUDGET if streaming else None
        decoder = decoderFor(header(b"content-encoding"), BUDGET_FACTOR * captureLimit, perChunk)
    except Undecodable:
        return NullReader(streaming)
    if sse:
        state: Any = {"openai": OpenAIStream, "anthropic": AnthropicStream, "google": GoogleStream}.get(fmt)
        if state is None:  # Bedrock answers SSE only on its OpenAI-compatible route
            state = OpenAIStream
        s = state()
        return SSEReader(decoder, captureLimit, s.wanted, s.handle, s.result)
    if eventStream:
        b = BedrockStream()
        return EventStreamReader(decoder, captureLimit, b.handle, b.result)
    if arrayStream:
        g = GoogleStream()
        return JSONArrayStreamReader(decoder, captureLimit, g.take, g.result)
    if b"json" not in contentType and contentType:
        return NullReader(streaming)
    if fmt == "bedrock":
        return HeaderFallback(decoder, captureLimit, header)
    apply = {"openai": openaiBody, "anthropic": anthropicBody, "google": googleBody}[fmt]
    return JSONBodyReader(decoder, captureLimit, apply)
