"""
The audit trail: for a call a policy marks for audit (L{CallContext.audit}),
one JSON line holding its request and response, written beside its record.

The bodies are kept bounded (C{audit.max_body} bytes each) while the call
runs: the request body as it was sent upstream, the response body as the
client received it (a L{BodyCapture} beside the usage reader in the relay's
tee: it copies at most C{max_body} bytes and never holds the stream back).
Only when the call's record is written is the line built: a compressed
response decoded (bounded) for reading, a stream's text kept and reassembled
(the output text of an SSE stream or a Gemini JSON array stream, the decoded
payloads of an AWS event stream), every credential header redacted. The
line goes to its own L{lmgate.records.jsonl.UsageLog} (mode C{0600}).

A call that is not audited costs one truth test; nothing here runs for it.
"""

from __future__ import annotations

import base64
import json
import os
import re
from typing import TYPE_CHECKING, Any, Callable, Iterable

from twisted.logger import Logger
from twisted.web.http_headers import Headers

from lmgate.access.credentials import CLIENT_CREDENTIAL_HEADERS
from lmgate.usage.decoding import Undecodable, decoderFor

if TYPE_CHECKING:
    from twisted.web.server import Request

    from lmgate.records.jsonl import UsageLog
    from lmgate.records.record import UsageRecord

log = Logger()

#: What a credential header's value becomes in an audit line.
REDACTED = "[redacted]"

#: Headers that carry a secret (lower case), beside every spelling of the
#: client credential headers LMGate knows.
_SECRET_HEADERS = CLIENT_CREDENTIAL_HEADERS | frozenset(
    {b"cookie", b"set-cookie", b"set-cookie2", b"proxy-authorization", b"x-goog-iap-jwt-assertion"}
)

#: Any other header whose name says it holds a secret (C{x-foo-api-key},
#: C{x-vendor-token}, C{x-amz-security-token} ...). A count such as
#: C{x-ratelimit-remaining-tokens} does not end in one of these words.
_SECRET_NAME = re.compile(
    rb"(^|[-_])(auth|authorization|api[-_]?key|key|token|secret|password|signature|credentials?|session)$", re.IGNORECASE
)

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def redactedHeaders(headers: Headers) -> dict[str, list[str]]:
    """
    C{headers} for an audit line: names in lower case, each value as text,
    every credential's value replaced by L{REDACTED}.
    """
    out: dict[str, list[str]] = {}
    for rawName, values in headers.getAllRawHeaders():
        name = rawName.lower()
        secret = name in _SECRET_HEADERS or _SECRET_NAME.search(name) is not None
        out.setdefault(name.decode("latin-1"), []).extend(
            REDACTED if secret else value.decode("latin-1") for value in values
        )
    return out


class BodyCapture:
    """
    Keeps the first C{limit} bytes of a response body as they cross the tee,
    and counts them all. Never raises, never holds anything back.

    @ivar size: body bytes seen.
    """

    __slots__ = ("limit", "size", "_kept", "_room")

    def __init__(self, limit: int) -> None:
        self.limit, self.size = limit, 0
        self._kept: list[bytes] = []
        self._room = limit

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        room = self._room
        if room > 0:
            piece = data[:room] if len(data) > room else data
            self._kept.append(piece)
            self._room = room - len(piece)

    @property
    def truncated(self) -> bool:
        """More came than was kept."""
        return self.size > self.limit

    @property
    def data(self) -> bytes:
        """What was kept."""
        return b"".join(self._kept)


def teeTo(first: Callable[[bytes], None], second: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """One observer for the tee that feeds C{first} then C{second}."""

    def both(data: bytes) -> None:
        first(data)
        second(data)

    return both


def _text(data: bytes, cut: bool) -> tuple[str, bool]:
    """
    C{data} as text: UTF-8 (a character split by a cut dropped), or base64.

    @return: the text, and whether it is base64.
    """
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError as e:
        if cut and e.start >= len(data) - 3 and e.end == len(data):
            try:
                return data[: e.start].decode("utf-8"), False
            except UnicodeDecodeError:
                pass
    return base64.b64encode(data).decode("ascii"), True


def _decoded(data: bytes, encoding: bytes | None, limit: int) -> tuple[bytes, bool, str | None]:
    """
    A response body decoded from its C{Content-Encoding}, at most C{limit} bytes.

    @return: the decoded bytes, whether they were cut at C{limit}, and why it
        could not be decoded (the wire bytes are returned then), or None.
    """
    try:
        decoder = decoderFor(encoding)
        pieces, room = [], limit
        for piece in decoder.decode(data):
            if len(piece) > room:
                pieces.append(piece[:room])
                return b"".join(pieces), True, None
            pieces.append(piece)
            room -= len(piece)
        return b"".join(pieces), False, None
    except Undecodable as e:
        return data, False, str(e) or "undecodable"


# -- reassembly -------------------------------------------------------------


def _sseData(text: bytes) -> Iterable[bytes]:
    """The C{data} of each complete SSE event in C{text}."""
    data: list[bytes] = []
    for line in text.splitlines():
        if not line:
            if data:
                yield b"\n".join(data)
                data = []
        elif line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
    if data:
        yield b"\n".join(data)


def _candidateText(chunk: Any) -> str:
    """The text parts of a Gemini response chunk's first candidate."""
    out = []
    candidates = chunk.get("candidates") if isinstance(chunk, dict) else None
    if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict):
        content = candidates[0].get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict) and isinstance(part.get("text"), str) and not part.get("thought"):
                out.append(part["text"])
    return "".join(out)


def _eventText(event: Any) -> str:
    """The output text one streamed event adds (OpenAI, Anthropic or Gemini shape)."""
    if not isinstance(event, dict):
        return ""
    kind = event.get("type")
    if kind == "content_block_delta":  # Anthropic
        delta = event.get("delta")
        return delta["text"] if isinstance(delta, dict) and isinstance(delta.get("text"), str) else ""
    if kind == "response.output_text.delta":  # OpenAI Responses
        return event["delta"] if isinstance(event.get("delta"), str) else ""
    choices = event.get("choices")
    if isinstance(choices, list):  # OpenAI chat (delta.content) and completions (text): the first choice
        out = []
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict) and isinstance(delta.get("content"), str):
                out.append(delta["content"])
            elif isinstance(choice.get("text"), str):
                out.append(choice["text"])
        return "".join(out)
    return _candidateText(event)


def _sseText(body: bytes) -> str:
    out = []
    for data in _sseData(body):
        try:
            out.append(_eventText(json.loads(data)))
        except ValueError:
            continue  # [DONE], a cut last event
    return "".join(out)


def _eventStreamPayloads(body: bytes) -> list[dict[str, Any]]:
    """Each complete AWS event-stream message: its event type and payload (JSON decoded; Bedrock's base64 C{bytes} too)."""
    from botocore.eventstream import EventStreamBuffer

    buffer = EventStreamBuffer()
    buffer.add_data(body)
    events: list[dict[str, Any]] = []
    try:
        for message in buffer:
            headers = message.headers
            payload: Any
            try:
                payload = json.loads(message.payload)
            except ValueError:
                payload, _ = _text(message.payload, False)
            if isinstance(payload, dict) and isinstance(payload.get("bytes"), str):
                try:
                    payload = {**payload, "bytes": json.loads(base64.b64decode(payload["bytes"]))}
                except ValueError:
                    pass
            events.append(
                {
                    "event": headers.get(":event-type") or headers.get(":exception-type") or headers.get(":message-type"),
                    "payload": payload,
                }
            )
    except Exception:  # a cut or corrupt frame: what came before it is kept
        pass
    return events


def reassembled(body: bytes, contentType: bytes | None, path: bytes) -> tuple[str, Any] | None:
    """
    A stream's reassembled form: C{("response_text", str)} for an SSE stream
    or a Gemini JSON array stream, C{("response_events", list)} for an AWS
    event stream; None for a body that is no stream.
    """
    kind = (contentType or b"").split(b";")[0].strip().lower()
    if kind == b"text/event-stream":
        return "response_text", _sseText(body)
    if kind == b"application/vnd.amazon.eventstream":
        return "response_events", _eventStreamPayloads(body)
    if b":streamGenerateContent" in path and kind in (b"application/json", b""):
        try:
            chunks = json.loads(body)
        except ValueError:
            return None
        if isinstance(chunks, list):
            return "response_text", "".join(_candidateText(chunk) for chunk in chunks)
    return None


# -- the line ---------------------------------------------------------------


def requestBody(context: Any, request: "Request", limit: int) -> bytes:
    """
    @param context: the call's L{lmgate.gate.admission.CallContext} (the
        records never import the gate: only its C{body}, C{bodySize},
        C{policy}, C{tags} and C{rest} are read here).

    The first C{limit} bytes of the body sent upstream: in memory, or read
    from the spooled file without moving it (a producer may be sending it).
    Read while the request is open: twisted.web closes the file once the
    response is finished.
    """
    if context.body is not None:
        return bytes(context.body[:limit])
    content: Any = getattr(request, "content", None)
    if not context.bodySize or content is None:
        return b""
    try:
        return bytes(os.pread(content.fileno(), limit, 0))
    except (AttributeError, OSError, ValueError):
        position = content.tell()
        try:
            content.seek(0)
            return bytes(content.read(limit))
        finally:
            content.seek(position)


class AuditTrail:
    """
    Builds a call's audit line and hands it to its writer.

    @ivar writer: the audit log's writer (its own file, mode 0600).
    @ivar maxBody: bytes kept of each body.
    """

    def __init__(self, writer: "UsageLog", maxBody: int) -> None:
        self.writer, self.maxBody = writer, maxBody

    def capture(self) -> BodyCapture:
        """A capture for a response body, bounded by C{max_body}."""
        return BodyCapture(self.maxBody)

    def requestBody(self, context: Any, request: "Request") -> bytes:
        """The request body as sent upstream, bounded by C{max_body}: kept when the call is sent."""
        return requestBody(context, request, self.maxBody)

    def lineFor(
        self,
        record: "UsageRecord",
        context: Any,
        request: "Request",
        capture: BodyCapture | None,
        answer: bytes | None,
        sent: bytes | None = None,
    ) -> dict[str, Any]:
        """
        The audit line of a call, as a dict in the order written.

        @param capture: the relayed response body, if one was relayed.
        @param answer: the body of LMGate's own answer (a refusal), if it answered.
        @param sent: the request body kept when the call was sent (L{requestBody});
            None: read now.
        """
        limit = self.maxBody
        if sent is None:
            sent = requestBody(context, request, limit)
        sentSize = len(context.body) if context.body is not None else context.bodySize  # an alias may rewrite it
        requestText, requestBase64 = _text(sent, sentSize > limit)
        line: dict[str, Any] = {
            "timestamp": record.timestamp,
            "request_id": record.request_id,
            "lmgate_id": record.lmgate_id,
            "owner": record.owner,
            "key": record.key,
            "provider": record.provider,
            "method": record.method,
            "endpoint": record.endpoint,
            "status": record.status,
            "error": record.error,
            "policy": list(context.policy),
            "tags": list(context.tags),
            "request_headers": redactedHeaders(request.requestHeaders),
            "request_body": requestText,
            "request_body_base64": requestBase64,
            "request_bytes": sentSize,
            "request_truncated": sentSize > limit,
            "response_headers": redactedHeaders(request.responseHeaders),
        }
        if capture is not None:
            wire, size, cut = capture.data, capture.size, capture.truncated
        else:
            wire = (answer or b"")[:limit]
            size = len(answer or b"")
            cut = size > limit
        encoding = request.responseHeaders.getRawHeaders(b"content-encoding", [None])[0] if capture is not None else None
        body, cutDecoding, undecodable = _decoded(wire, encoding, limit)
        responseText, responseBase64 = _text(body, cut or cutDecoding)
        line["response_body"] = responseText
        line["response_body_base64"] = responseBase64
        line["response_bytes"] = size
        line["response_truncated"] = cut or cutDecoding
        if encoding is not None and encoding.strip().lower() not in (b"", b"identity"):
            line["response_content_encoding"] = encoding.decode("latin-1")
            line["response_decoded"] = undecodable is None
        if capture is not None:
            contentType = request.responseHeaders.getRawHeaders(b"content-type", [None])[0]
            try:
                stream = reassembled(body, contentType, context.rest) if undecodable is None else None
            except Exception:
                log.failure("Reassembling an audited stream failed")
                stream = None
            if stream is not None:
                line[stream[0]] = stream[1]
        return line

    def write(
        self,
        record: "UsageRecord",
        context: Any,
        request: "Request",
        capture: BodyCapture | None,
        answer: bytes | None,
        sent: bytes | None = None,
    ) -> bool:
        """
        Hand the call's audit line to the writer.

        @return: whether it was (not dropped for a full backlog, nor failed to build).
        """
        writer = self.writer
        try:
            line = (_encoder.encode(self.lineFor(record, context, request, capture, answer, sent)) + "\n").encode("utf-8")
        except Exception:
            log.failure("The audit line of {requestId} could not be built", requestId=record.request_id)
            return False
        dropped = writer.dropped
        writer.writeLine(line)
        return writer.dropped == dropped
