"""
Exact token accounting, read incrementally from the bytes of each response.

A reader sees a response body as it crosses the wire (compressed when it is),
in whatever chunks the network delivered. Non-streamed JSON bodies are kept up
to C{stats.capture_limit} decoded bytes and parsed at the end; streams (SSE,
AWS event streams, Gemini's streamed JSON array) are scanned event by event,
keeping at most one event, and only the events that can carry the model, the
usage or an error are parsed: a cheap byte check skips the content deltas.

The counts are normalised (docs/records.md, "Token semantics"): a count is
None where the provider did not report it, and a reader never raises. A count
that is not a sane integer makes the whole usage C{"invalid"}; reading that
stops at a bound (decoded bytes, an event-stream frame) makes it C{"truncated"}.
"""

from __future__ import annotations

import base64
from abc import ABC, abstractmethod
import json
import re
from functools import wraps
from typing import Any, Callable
from urllib.parse import unquote

from twisted.web.http_headers import Headers
from zope.interface import implementer

from lmgate.usage.decoding import BUDGET_FACTOR, CHUNK_BUDGET, Decoder, Truncated, Undecodable, decoderFor
from lmgate.interfaces import IUsageReader
from lmgate.records.record import Usage

Json = dict[str, Any]


#: Counts at or past this are not believed (nor can every reader of the record
#: hold them: JSON numbers are doubles to many, and a price times a huge integer
#: overflows a float).
COUNT_LIMIT = 2**53


class _InvalidCount(ValueError):
    """A count that is present but not a sane integer: the usage cannot be trusted."""


def _count(value: Any) -> int | None:
    """
    A token count: None when unreported (absent or null), else an integer
    0 <= n < L{COUNT_LIMIT}.

    @raise _InvalidCount: anything else (a string, a float, NaN, a boolean, a
        negative or huge number).
    """
    if value is None:
        return None
    if type(value) is int and 0 <= value < COUNT_LIMIT:
        return value
    raise _InvalidCount(repr(value)[:40])


def _invalidate(usage: Usage) -> None:
    """No count of this usage is believed: all unknown, and the record says why."""
    usage.input_tokens = usage.output_tokens = usage.cached_tokens = None
    usage.cache_write_tokens = usage.reasoning_tokens = None
    usage.unreadable = "invalid"


def _guarded(apply: Callable[[Usage, Any], None]) -> Callable[[Usage, Any], None]:
    """An apply function that leaves an unreadable usage alone and invalidates it on a bad count."""

    @wraps(apply)
    def guarded(usage: Usage, raw: Any) -> None:
        if usage.unreadable is not None:
            return
        try:
            apply(usage, raw)
        except _InvalidCount:
            _invalidate(usage)

    return guarded


def _sum(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _dict(value: Any) -> Json:
    return value if isinstance(value, dict) else {}


# -- normalisation, one function per provider family ---------------------------


@_guarded
def applyOpenAI(usage: Usage, raw: Any) -> None:
    """Chat completions, legacy completions, embeddings (C{prompt_tokens}...) and Responses (C{input_tokens}...)."""
    u = _dict(raw)
    if not u:
        return
    if "input_tokens" in u or "output_tokens" in u:
        usage.input_tokens = _count(u.get("input_tokens"))
        usage.output_tokens = _count(u.get("output_tokens"))
        inputDetails, outputDetails = u.get("input_tokens_details"), u.get("output_tokens_details")
    else:
        usage.input_tokens = _count(u.get("prompt_tokens"))
        usage.output_tokens = _count(u.get("completion_tokens"))
        inputDetails, outputDetails = u.get("prompt_tokens_details"), u.get("completion_tokens_details")
    usage.cached_tokens = _count(_dict(inputDetails).get("cached_tokens"))
    usage.reasoning_tokens = _count(_dict(outputDetails).get("reasoning_tokens"))


@_guarded
def applyAnthropic(usage: Usage, raw: Any) -> None:
    """C{input_tokens} + cache writes + cache reads is all input."""
    u = _dict(raw)
    if not u:
        return
    plain = _count(u.get("input_tokens"))
    write = _count(u.get("cache_creation_input_tokens"))
    read = _count(u.get("cache_read_input_tokens"))
    usage.input_tokens = _sum(plain, write, read)
    usage.cache_write_tokens = write
    usage.cached_tokens = read
    usage.output_tokens = _count(u.get("output_tokens"))


@_guarded
def applyGoogle(usage: Usage, raw: Any) -> None:
    """Gemini API and Vertex AI C{usageMetadata}."""
    u = _dict(raw)
    prompt = _count(u.get("promptTokenCount"))
    toolUse = _count(u.get("toolUsePromptTokenCount"))
    usage.input_tokens = None if prompt is None else prompt + (toolUse or 0)
    thoughts = _count(u.get("thoughtsTokenCount"))
    usage.output_tokens = _sum(_count(u.get("candidatesTokenCount")), thoughts)
    usage.reasoning_tokens = thoughts
    usage.cached_tokens = _count(u.get("cachedContentTokenCount"))


def _hasGoogleCounts(raw: Any) -> bool:
    """Any count present (applyGoogle then checks that it is one)."""
    u = _dict(raw)
    return any(u.get(k) is not None for k in ("promptTokenCount", "candidatesTokenCount", "totalTokenCount"))


@_guarded
def applyConverse(usage: Usage, raw: Any) -> None:
    """Bedrock Converse / ConverseStream C{usage}."""
    u = _dict(raw)
    if not u:
        return
    read = _count(u.get("cacheReadInputTokens"))
    write = _count(u.get("cacheWriteInputTokens"))
    plain = _count(u.get("inputTokens"))
    usage.input_tokens = None if plain is None else plain + (read or 0) + (write or 0)
    usage.output_tokens = _count(u.get("outputTokens"))
    usage.cached_tokens = read
    usage.cache_write_tokens = write


@_guarded
def applyInvocationMetrics(usage: Usage, raw: Any) -> None:
    """Bedrock C{amazon-bedrock-invocationMetrics} (InvokeModelWithResponseStream), if nothing better was read."""
    m = _dict(raw)
    if usage.input_tokens is None:
        usage.input_tokens = _count(m.get("inputTokenCount"))
    if usage.output_tokens is None:
        usage.output_tokens = _count(m.get("outputTokenCount"))


def _errorType(raw: Any) -> str:
    error = raw.get("error") if isinstance(raw, dict) else None
    if isinstance(error, dict):
        for key in ("type", "code", "status"):
            value = error.get(key)
            if isinstance(value, (str, int)) and not isinstance(value, bool) and str(value):
                return str(value)
    return "error"


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# -- the readers -----------------------------------------------------------------


@implementer(IUsageReader)
class NullReader:
    """For bodies that carry no usage (error statuses, unknown formats)."""

    def __init__(self, streaming: bool = False) -> None:
        self._streaming = streaming

    def feed(self, data: bytes) -> None:
        pass

    def finish(self) -> Usage:
        return Usage(streaming=self._streaming)


@implementer(IUsageReader)
class _DecodingReader(ABC):
    """Decodes the wire bytes and hands the pieces to C{_take}; any failure makes the usage unknown."""

    streaming = False

    def __init__(self, decoder: Decoder) -> None:
        self._decoder = decoder
        self._broken = False
        self._truncated = False  # reading stopped at a bound: the record says so

    def feed(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            for piece in self._decoder.decode(data):
                if piece:
                    self._take(piece)
                if self._broken:
                    return
        except Truncated:
            self._truncate()
        except Exception:  # Undecodable, or a reader's own mistake: never the client's problem
            self._broken = True

    def _truncate(self) -> None:
        """Stop reading at a bound: nothing more is decoded or kept, and the usage is C{"truncated"}."""
        self._broken = self._truncated = True

    @abstractmethod
    def _take(self, piece: bytes) -> None:
        """Read the next decoded piece."""

    @abstractmethod
    def _result(self) -> Usage:
        """The usage read, once the body has ended."""

    def finish(self) -> Usage:
        if self._broken:
            return Usage(streaming=self.streaming, unreadable="truncated" if self._truncated else None)
        try:
            return self._result()
        except Exception:
            return Usage(streaming=self.streaming)


class JSONBodyReader(_DecodingReader):
    """A non-streamed JSON body, kept up to the capture limit and parsed at the end."""

    def __init__(self, decoder: Decoder, limit: int, apply: Callable[[Usage, Json], None]) -> None:
        super().__init__(decoder)
        self._room, self._apply = limit, apply
        self._parts: list[bytes] = []

    def _take(self, piece: bytes) -> None:
        if len(piece) > self._room:
            self._parts = []  # over the cap: usage unknown
            self._truncate()
            return
        self._room -= len(piece)
        self._parts.append(piece)

    def _result(self) -> Usage:
        usage = Usage()
        body = json.loads(b"".join(self._parts))
        if isinstance(body, dict):
            self._apply(usage, body)
        return usage


class SSEReader(_DecodingReader):
    """
    Server-sent events, scanned line by line (CRLF, LF or CR endings). An event's
    data is kept only when C{wanted(event, firstData)} says it may matter, and
    only up to the capture limit.
    """

    streaming = True
    _LINE = re.compile(rb"\r\n|\r|\n")

    def __init__(
        self,
        decoder: Decoder,
        limit: int,
        wanted: Callable[[bytes, bytes], bool],
        handle: Callable[[bytes, bytes], None],
        result: Callable[[], Usage],
    ) -> None:
        super().__init__(decoder)
        self._limit, self._wanted, self._handle, self._resultOf = limit, wanted, handle, result
        self._buffer = b""
        self._pendingCR = False
        self._event = b""
        self._data: list[bytes] = []
        self._size = 0
        self._skip = False  # the current event does not matter
        self._overlong = False  # the current line is past the limit: dropped

    def _take(self, piece: bytes) -> None:
        if self._pendingCR and piece[:1] == b"\n":
            piece = piece[1:]  # the LF of a CRLF split across pieces
        self._pendingCR = False
        data = self._buffer + piece if self._buffer else piece
        start = 0
        for match in self._LINE.finditer(data):
            self._line(data[start : match.start()])
            start = match.end()
        rest = data[start:]
        self._pendingCR = start == len(data) and data.endswith(b"\r")
        if len(rest) > self._limit:
            self._overlong, rest = True, b""
        self._buffer = rest

    def _line(self, line: bytes) -> None:
        if self._overlong:
            self._overlong = False
            self._skip = True
            return
        if not line:
            self._dispatch()
            return
        if line.startswith(b"data:"):
            if self._skip:
                return
            value = line[6:] if line[5:6] == b" " else line[5:]
            if not self._data and not self._wanted(self._event, value):
                self._skip = True
                return
            self._size += len(value)
            if self._size > self._limit:
                self._skip, self._data = True, []
                return
            self._data.append(value)
        elif line.startswith(b"event:"):
            self._event = line[6:].strip()

    def _dispatch(self) -> None:
        if self._data and not self._skip:
            try:
                self._handle(self._event, b"\n".join(self._data))
            except Exception:
                pass  # one unreadable event does not spoil the rest of the stream
        self._event, self._data, self._size, self._skip = b"", [], 0, False

    def _result(self) -> Usage:
        if self._buffer and not self._overlong:
            self._line(self._buffer)
        self._buffer = b""
        self._dispatch()
        return self._resultOf()


class JSONArrayStreamReader(_DecodingReader):
    """
    Gemini's C{streamGenerateContent} without C{alt=sse}: one JSON array written
    element by element. Top-level elements are cut out with a string-aware
    bracket scanner and handed over one at a time.
    """

    streaming = True
    _SPECIAL = re.compile(rb'["\\{}\[\]]')

    def __init__(self, decoder: Decoder, limit: int, handle: Callable[[bytes], None], result: Callable[[], Usage]) -> None:
        super().__init__(decoder)
        self._limit, self._handle, self._resultOf = limit, handle, result
        self._element: list[bytes] = []
        self._size = 0
        self._depth = 0  # 1 inside the array, 2+ inside an element
        self._inString = False
        self._escape = False

    def _take(self, piece: bytes) -> None:
        start = 0  # where the current element's bytes in this piece begin
        position = 0
        while position < len(piece):
            if self._escape:
                self._escape = False
                position += 1
                continue
            if self._inString:
                quote = piece.find(b'"', position)
                backslash = piece.find(b"\\", position)
                if quote < 0 and backslash < 0:
                    break
                if backslash >= 0 and (quote < 0 or backslash < quote):
                    self._escape = True
                    position = backslash + 1
                    continue
                self._inString = False
                position = quote + 1
                continue
            match = self._SPECIAL.search(piece, position)
            if match is None:
                break
            char = match.group()
            position = match.end()
            if char == b'"':
                self._inString = True
            elif char == b"\\":
                self._escape = True
            elif char in (b"{", b"["):
                self._depth += 1
                if self._depth == 2:
                    start = match.start()
                    self._element, self._size = [], 0
            else:
                self._depth -= 1
                if self._depth == 1:
                    self._keep(piece[start:position])
                    if self._broken:
                        return
                    try:
                        self._handle(b"".join(self._element))
                    except Exception:
                        pass  # one unreadable element does not spoil the rest
                    self._element = []
                elif self._depth < 0:
                    self._broken = True
                    return
        if self._depth >= 2:
            self._keep(piece[start:])

    def _keep(self, part: bytes) -> None:
        self._size += len(part)
        if self._size > self._limit:
            self._element = []
            self._truncate()
            return
        self._element.append(part)

    def _result(self) -> Usage:
        return self._resultOf()


class EventStreamReader(_DecodingReader):
    """
    AWS C{application/vnd.amazon.eventstream} frames (CRCs checked by botocore's
    parser). Frame boundaries are followed here, so a frame announcing more than
    the capture limit is never buffered: reading stops there (C{"truncated"}).
    """

    streaming = True

    def __init__(self, decoder: Decoder, limit: int, handle: Callable[[dict[str, Any], bytes], None], result: Callable[[], Usage]) -> None:
        super().__init__(decoder)
        from botocore.eventstream import EventStreamBuffer

        self._buffer = EventStreamBuffer()
        self._limit, self._handle, self._resultOf = limit, handle, result
        self._frameLeft = 0  # bytes of the current frame still to come
        self._length = b""  # the start of the next frame's total length, split across pieces

    def _take(self, piece: bytes) -> None:
        position, size = 0, len(piece)
        while position < size:  # once per frame: lengths only, no copy
            if self._frameLeft:
                step = min(self._frameLeft, size - position)
                self._frameLeft -= step
                position += step
                continue
            taken = piece[position : position + 4 - len(self._length)]
            position += len(taken)
            self._length += taken
            if len(self._length) < 4:
                break
            total = int.from_bytes(self._length, "big")
            self._length = b""
            if total > self._limit:
                self._truncate()
                return
            self._frameLeft = max(total - 4, 0)  # a nonsense length fails botocore's checks below
        self._buffer.add_data(piece)
        for message in self._buffer:  # a CRC or framing error raises: the usage is unknown
            try:
                self._handle(message.headers, message.payload)
            except ValueError:
                pass  # an unreadable payload in a well-framed message

    def _result(self) -> Usage:
        return self._resultOf()


# -- per-format stream state -----------------------------------------------------


class _OpenAIStream:
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
            response = _dict(chunk.get("response"))
            self.usage.model = _str(response.get("model")) or self.usage.model
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                applyOpenAI(self.usage, response.get("usage"))
            if kind == "response.failed":
                self.usage.providerError = _str(_dict(response.get("error")).get("code")) or "response_failed"
            elif kind == "error":
                self.usage.providerError = _str(chunk.get("code")) or _errorType(chunk)
            return
        if "error" in chunk and chunk.get("error"):
            self.usage.providerError = _errorType(chunk)
        self.usage.model = self.usage.model or _str(chunk.get("model"))
        if isinstance(chunk.get("usage"), dict):
            applyOpenAI(self.usage, chunk["usage"])

    def result(self) -> Usage:
        return self.usage


class _AnthropicStream:
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
            message = _dict(chunk.get("message"))
            self.usage.model = _str(message.get("model")) or self.usage.model
            self.raw.update(_dict(message.get("usage")))
        elif kind == "message_delta":
            self.raw.update({k: v for k, v in _dict(chunk.get("usage")).items() if v is not None})
        elif kind == "error":
            self.usage.providerError = _errorType(chunk)
        if kind in ("message_start", "message_delta"):
            applyAnthropic(self.usage, self.raw)

    def result(self) -> Usage:
        return self.usage


class _GoogleStream:
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
            self.usage.providerError = _errorType(chunk)
        self.usage.model = _str(chunk.get("modelVersion")) or self.usage.model
        if _hasGoogleCounts(chunk.get("usageMetadata")):
            applyGoogle(self.usage, chunk["usageMetadata"])

    def result(self) -> Usage:
        return self.usage


class _BedrockStream:
    """ConverseStream events, and InvokeModelWithResponseStream chunks (Anthropic events in base64)."""

    def __init__(self) -> None:
        self.usage = Usage(streaming=True)
        self._anthropic = _AnthropicStream(self.usage)
        self._metrics: Json = {}

    def handle(self, headers: dict[str, Any], payload: bytes) -> None:
        if headers.get(":message-type") == "exception":
            self.usage.providerError = str(headers.get(":exception-type") or "exception")
            return
        event = headers.get(":event-type")
        if event == "metadata":
            applyConverse(self.usage, _dict(json.loads(payload)).get("usage"))
        elif event == "chunk":
            body = _dict(json.loads(payload)).get("bytes")
            if isinstance(body, str):
                inner = json.loads(base64.b64decode(body))
                self._anthropic.take(inner)
                self._metrics = _dict(_dict(inner).get("amazon-bedrock-invocationMetrics")) or self._metrics

    def result(self) -> Usage:
        if self._metrics:
            applyInvocationMetrics(self.usage, self._metrics)
        return self.usage


# -- choosing a reader -------------------------------------------------------------


def _openaiBody(usage: Usage, body: Json) -> None:
    usage.model = _str(body.get("model"))
    applyOpenAI(usage, body.get("usage"))


def _anthropicBody(usage: Usage, body: Json) -> None:
    usage.model = _str(body.get("model"))
    applyAnthropic(usage, body.get("usage"))


def _googleBody(usage: Usage, body: Json) -> None:
    usage.model = _str(body.get("modelVersion"))
    if _hasGoogleCounts(body.get("usageMetadata")):
        applyGoogle(usage, body["usageMetadata"])


def _bedrockBody(headers: Headers) -> Callable[[Usage, Json], None]:
    def apply(usage: Usage, body: Json) -> None:
        if isinstance(body.get("usage"), dict) and "inputTokens" in body["usage"]:
            applyConverse(usage, body["usage"])  # Converse
        elif isinstance(body.get("usage"), dict):
            _anthropicBody(usage, body)  # InvokeModel with an Anthropic body
        if usage.input_tokens is None and usage.output_tokens is None:
            _fromHeaders(usage, headers)

    return apply


def _fromHeaders(usage: Usage, headers: Headers) -> None:
    def header(name: bytes) -> int | None:
        values = headers.getRawHeaders(name)
        if not values:
            return None
        value = values[0].strip()
        return _count(int(value) if value.isdigit() and len(value) <= 20 else value)

    if usage.unreadable == "invalid":
        return
    try:
        input, output = header(b"x-amzn-bedrock-input-token-count"), header(b"x-amzn-bedrock-output-token-count")
    except _InvalidCount:
        _invalidate(usage)
        return
    usage.input_tokens, usage.output_tokens = input, output
    if input is not None or output is not None:
        usage.unreadable = None  # a body too large to read: the headers have the counts


class _HeaderFallback(JSONBodyReader):
    """Bedrock InvokeModel: the token-count headers stand when the body cannot be read."""

    def __init__(self, decoder: Decoder, limit: int, headers: Headers) -> None:
        super().__init__(decoder, limit, _bedrockBody(headers))
        self._headers = headers

    def finish(self) -> Usage:
        usage = super().finish()
        if usage.input_tokens is None and usage.output_tokens is None:
            _fromHeaders(usage, self._headers)
        return usage


def readerFor(fmt: str, status: int, headers: Headers, endpoint: bytes, captureLimit: int) -> IUsageReader:
    """
    The reader for one response.

    @param fmt: openai, anthropic, google or bedrock.
    @param headers: the upstream's response headers.
    @param endpoint: the request path as the upstream sees it (no query string).
    """
    contentType = (headers.getRawHeaders(b"content-type") or [b""])[0].lower()
    sse = b"text/event-stream" in contentType
    eventStream = b"application/vnd.amazon.eventstream" in contentType
    arrayStream = fmt == "google" and not sse and endpoint.endswith(b":streamGenerateContent")
    streaming = sse or eventStream or arrayStream
    if status >= 400:
        return NullReader(streaming)
    try:
        encodings = headers.getRawHeaders(b"content-encoding")
        # Streams are scanned byte by byte, so one wire chunk may not inflate past
        # CHUNK_BUDGET; a JSON body is only copied, up to the capture limit.
        perChunk = CHUNK_BUDGET if streaming else None
        decoder = decoderFor(encodings[0] if encodings else None, BUDGET_FACTOR * captureLimit, perChunk)
    except Undecodable:
        return NullReader(streaming)
    if sse:
        state: Any = {"openai": _OpenAIStream, "anthropic": _AnthropicStream, "google": _GoogleStream}.get(fmt)
        if state is None:  # Bedrock answers SSE only on its OpenAI-compatible route
            state = _OpenAIStream
        s = state()
        return SSEReader(decoder, captureLimit, s.wanted, s.handle, s.result)
    if eventStream:
        b = _BedrockStream()
        return EventStreamReader(decoder, captureLimit, b.handle, b.result)
    if arrayStream:
        g = _GoogleStream()
        return JSONArrayStreamReader(decoder, captureLimit, g.take, g.result)
    if b"json" not in contentType and contentType:
        return NullReader(streaming)
    if fmt == "bedrock":
        return _HeaderFallback(decoder, captureLimit, headers)
    apply = {"openai": _openaiBody, "anthropic": _anthropicBody, "google": _googleBody}[fmt]
    return JSONBodyReader(decoder, captureLimit, apply)


# -- the model a request names ----------------------------------------------------

_URL_MODEL = re.compile(rb"/models/([^/:?]+)(?::|/|$)")
_BEDROCK_MODEL = re.compile(rb"^/model/([^/]+)/")
_AZURE_DEPLOYMENT = re.compile(rb"/openai/deployments/([^/]+)/")


def requestModel(fmt: str, endpoint: bytes, body: bytes | None) -> str | None:
    """
    The model a request names: its JSON body's C{model}, else its URL (Gemini
    and Vertex C{.../models/M:method}, Bedrock C{/model/ID/...}, Azure
    C{/openai/deployments/D/...}). None when neither names one.
    """
    if body and len(body) <= 1024 * 1024 and body.lstrip()[:1] == b"{":
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        model = _str(_dict(parsed).get("model"))
        if model is not None:
            return model
    for pattern in (_BEDROCK_MODEL, _AZURE_DEPLOYMENT, _URL_MODEL):
        match = pattern.search(endpoint)
        if match:
            return unquote(match.group(1).decode("ascii", "replace"))
    return None
