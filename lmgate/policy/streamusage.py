"""
Exact usage on every stream (C{policy.stream_usage: true}).

An OpenAI-format streaming request that did not ask for usage gets
C{"stream_options": {"include_usage": true}} added to its body
(L{addIncludeUsage}), so the provider ends the stream with one extra chunk
carrying the counts (C{"choices": []} and a C{usage} object). The usage reader
sees that chunk; the client does not (L{UsageChunkFilter}): it receives the
events it would have received without the option.

The body is rewritten byte for byte but for the insertion, as the alias rewrite
changes only the model (L{lmgate.governance.aliases.FoundModel.rewrite}):
nothing is re-serialised.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

#: The JSON whitespace between tokens.
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_skipWhitespace: Callable[[str, int], re.Match[str]] = _WHITESPACE.match  # type: ignore[assignment]
_DECODER = json.JSONDecoder()
_scanString: Callable[[str, int, bool], tuple[str, int]] = getattr(json.decoder, "scanstring")

#: What LMGate adds: inside an existing C{stream_options} object, or as a new top-level member.
INCLUDE_USAGE = b'"include_usage":true'
STREAM_OPTIONS = b'"stream_options":{"include_usage":true}'

#: The operations whose streams end with a usage chunk when asked (the Responses API streams its usage anyway).
OPERATIONS = (b"/chat/completions", b"/completions")

_Member = tuple[str, Any, int, int]


def _members(text: str, at: int) -> tuple[list[_Member], int]:
    """
    The members of the JSON object whose C{{} is at C{at}, each value parsed by
    the C{json} module's own scanner.

    @return: C{(key, value, start, end)} of each member (character offsets of
        its value), and the offset of the object's closing C{}}.
    @raise ValueError: not a JSON object.
    """
    skip, scanKey, scanValue = _skipWhitespace, _scanString, _DECODER.raw_decode
    if text[at : at + 1] != "{":
        raise ValueError("not an object")
    found: list[_Member] = []
    at = skip(text, at + 1).end()
    if text[at : at + 1] == "}":
        return found, at
    while True:
        if text[at : at + 1] != '"':
            raise ValueError("expected a key")
        key, at = scanKey(text, at + 1, True)
        at = skip(text, at).end()
        if text[at : at + 1] != ":":
            raise ValueError("expected a colon")
        start = skip(text, at + 1).end()
        value, at = scanValue(text, start)
        found.append((key, value, start, at))
        at = skip(text, at).end()
        separator = text[at : at + 1]
        if separator == "}":
            return found, at
        if separator != ",":
            raise ValueError("expected a comma")
        at = skip(text, at + 1).end()


def addIncludeUsage(body: bytes) -> bytes | None:
    """
    C{body} with C{stream_options.include_usage} set to C{true}, every other
    byte unchanged; None when the request is left as it is.

    A body is rewritten when it is one UTF-8 JSON object whose top-level
    C{stream} is C{true} (the last member wins, as in C{json.loads}) and whose
    C{stream_options} does not already hold C{include_usage: true}:
      - no C{stream_options}: C{,"stream_options":{"include_usage":true}} goes
        before the object's closing brace;
      - a C{stream_options} object without C{include_usage}: the member goes
        before that object's closing brace (its other members stay);
      - C{include_usage} C{false} or C{null} (the client did not ask for
        usage), or C{stream_options: null}: that value is replaced.
    Anything else (duplicate C{stream_options} or C{include_usage} keys, values
    of another type, a body that is not JSON) is left for the provider to judge.
    """
    if b"stream" not in body and b"\\u" not in body:  # no key can be "stream" (escaped or not): no parse
        return None
    try:
        text = body.decode("utf-8")
        members, close = _members(text, _skipWhitespace(text, 0).end())
        if _skipWhitespace(text, close + 1).end() != len(text):
            return None
        edit = _edit(text, members, close)
    except (ValueError, RecursionError):
        return None
    if edit is None:
        return None
    start, end, insert = edit
    if len(text) != len(body):  # not ASCII: character offsets to byte offsets
        start, end = len(text[:start].encode("utf-8")), len(text[:end].encode("utf-8"))
    return body[:start] + insert + body[end:]


def _edit(text: str, members: list[_Member], close: int) -> tuple[int, int, bytes] | None:
    """The span of C{text} to replace and what with, or None: leave it."""
    streams = [value for key, value, _, _ in members if key == "stream"]
    if not streams or streams[-1] is not True:
        return None
    options = [(value, start, end) for key, value, start, end in members if key == "stream_options"]
    if not options:
        return close, close, b"," + STREAM_OPTIONS
    if len(options) > 1:
        return None
    value, start, end = options[0]
    if value is None:
        return start, end, STREAM_OPTIONS[len(b'"stream_options":') :]
    if not isinstance(value, dict):
        return None
    inner, innerClose = _members(text, start)
    flags = [(v, s, e) for key, v, s, e in inner if key == "include_usage"]
    if not flags:
        return innerClose, innerClose, (b"," if inner else b"") + INCLUDE_USAGE
    if len(flags) > 1:
        return None
    flag, flagStart, flagEnd = flags[0]
    if flag is True:
        return None  # the client asked for usage: its stream is its own
    if flag is False or flag is None:
        return flagStart, flagEnd, b"true"
    return None


def identityStream(headers: Any) -> None:
    """
    Ask the upstream for an uncompressed response (C{Accept-Encoding:
    identity}) on a call LMGate added the option to, so that the usage chunk
    can be taken out of the stream; every client accepts identity.
    """
    headers.setRawHeaders(b"accept-encoding", [b"identity"])


def wantsIncludeUsage(method: bytes, format: str, rest: bytes) -> bool:
    """Whether a request may get the option: a C{POST} to an OpenAI-format completions operation."""
    return method == b"POST" and format == "openai" and rest.endswith(OPERATIONS)


_LINE_END = re.compile(rb"\r\n|\r|\n")
_FIELD = re.compile(rb"([^:\r\n]*)(?::[ ]?)?(.*)")
#: The top-level C{choices} of a chunk has an element: not the usage chunk.
_CHOICES_FILLED = re.compile(rb'"choices"\s*:\s*\[\s*[^\s\]]')

#: An event held longer than this is relayed as it is: a usage chunk is a few hundred bytes.
HOLD_LIMIT = 65536


def isUsageChunk(event: bytes) -> bool:
    """
    Whether C{event} (one server-sent event, its lines with their endings) is
    the chunk C{include_usage} adds: only C{data} lines, whose data is a JSON
    object with C{"choices": []} and a C{usage} object.
    """
    data = []
    for line in _LINE_END.split(event):
        if not line:
            continue
        match = _FIELD.match(line)
        assert match is not None  # the pattern matches any line
        if match.group(1) != b"data":
            return False
        data.append(match.group(2))
    if not data:
        return False
    try:
        chunk = json.loads(b"\n".join(data))
    except (ValueError, RecursionError):
        return False
    return isinstance(chunk, dict) and chunk.get("choices") == [] and isinstance(chunk.get("usage"), dict)


def usageChunkFilter(response: Any) -> "UsageChunkFilter | None":
    """
    A filter for the body of C{response} (an C{IResponse}) to a call LMGate
    asked the usage chunk for: a successful, uncompressed event stream. None
    for anything else (an error body, a compressed stream): relayed as it
    comes, never altered.
    """
    if not 200 <= response.code < 300:
        return None
    headers = response.headers
    kind = (headers.getRawHeaders(b"content-type") or [b""])[0]
    if not kind.lower().lstrip().startswith(b"text/event-stream"):
        return None
    encodings = headers.getRawHeaders(b"content-encoding")
    if encodings and any(e.strip().lower() not in (b"", b"identity") for e in b",".join(encodings).split(b",")):
        return None
    return UsageChunkFilter()


class UsageChunkFilter:
    """
    Removes the usage chunk from a server-sent event stream on its way to the
    client; every other byte passes unchanged, in order.

    Bytes are held back only while they may still be the start of a usage
    chunk: an event is held from its first byte until it is complete (its
    blank line), or until its bytes show it is something else, whichever comes
    first. A line that is not C{data:} (a comment or keepalive, C{event:},
    C{id:}), data that is not a JSON object (C{[DONE]}), or a top-level
    C{choices} with an element (every content chunk) releases the event at
    once, and the rest of it passes as it comes. Providers write each event
    whole, so in practice nothing waits at all; an event split across reads
    waits for its other part. At most L{HOLD_LIMIT} bytes are held.

    Line endings may be CRLF, LF or CR, split across reads anywhere.
    """

    def __init__(self) -> None:
        self._held: list[bytes] = []
        self._heldSize = 0
        self._holding = True  # the current event's bytes are held (it may be the usage chunk)
        self._lineStart = True  # no byte of the current line seen yet
        self._pendingCR = False  # the last byte seen was a CR: an LF next ends the same line
        self._crTo = "out"  # where that LF goes: "out", "held", or "drop" (with its event)
        #: Usage chunks removed.
        self.removed = 0
        #: Also given what the client gets (the audit trail's capture), if set.
        self.copy: Callable[[bytes], None] | None = None

    def feed(self, data: bytes) -> bytes:
        """Take the next bytes of the stream; return those the client gets now."""
        passed = self._feed(data)
        if passed and self.copy is not None:
            self.copy(passed)
        return passed

    def _feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        at, size = 0, len(data)
        if self._pendingCR and size:
            self._pendingCR = False
            if data[:1] == b"\n":
                if self._crTo == "out":
                    out.append(b"\n")
                elif self._crTo == "held":
                    self._held.append(b"\n")
                    self._heldSize += 1
                at = 1
        if b"\r" not in data:  # LF endings, the usual: a memchr per line instead of the pattern
            while at < size:
                lf = data.find(b"\n", at)
                if lf < 0:
                    self._partLine(data[at:], out)
                    break
                self._line(data[at:lf], b"\n", out)
                at = lf + 1
            return b"".join(out)
        while at < size:
            match = _LINE_END.search(data, at)
            if match is None:
                self._partLine(data[at:], out)
                break
            end = match.end()
            self._line(data[at : match.start()], data[match.start() : end], out)
            if end == size and data[end - 1 : end] == b"\r":
                self._pendingCR = True
            at = end
        return b"".join(out)

    def flush(self) -> bytes:
        """The stream ended: the bytes still held (an unfinished event, unless it is the usage chunk)."""
        held = b"".join(self._held)
        self._held, self._heldSize, self._holding = [], 0, True
        if held and isUsageChunk(held):
            self.removed += 1
            return b""
        if held and self.copy is not None:
            self.copy(held)
        return held

    def _partLine(self, part: bytes, out: list[bytes]) -> None:
        """Bytes of a line whose end has not come yet."""
        self._lineStart = False
        if self._holding:
            self._hold(part, out)
        else:
            out.append(part)

    def _line(self, part: bytes, ending: bytes, out: list[bytes]) -> None:
        """The rest of a line and its ending."""
        if self._lineStart and not part:  # a blank line: the event ends
            held = self._held
            if held:
                event = b"".join(held)
                self._held, self._heldSize = [], 0
                if isUsageChunk(event):
                    self.removed += 1
                    self._crTo = "drop"
                else:
                    out += (event, ending)
                    self._crTo = "out"
            else:
                out.append(ending)
                self._crTo = "out"
            self._holding = True
            return
        self._lineStart = True
        if self._holding:
            self._hold(part + ending, out)
        else:
            out.append(part + ending)
        self._crTo = "held" if self._holding else "out"

    def _hold(self, data: bytes, out: list[bytes]) -> None:
        """Hold C{data} with its event, and release the event once it cannot be the usage chunk."""
        self._held.append(data)
        self._heldSize += len(data)
        held = b"".join(self._held) if len(self._held) > 1 else data
        self._held = [held]
        if self._heldSize > HOLD_LIMIT or not _mayBeUsageChunk(held):
            out.append(held)
            self._held, self._heldSize, self._holding = [], 0, False


def _mayBeUsageChunk(held: bytes) -> bool:
    """Whether the first bytes of an event may still be the usage chunk's."""
    if held[:5] != b"data:"[: len(held)]:
        return False  # a comment, keepalive or another field
    if len(held) <= 5:
        return True
    value = held[6:] if held[5:6] == b" " else held[5:]
    if value and value[:1] != b"{":
        return False  # [DONE], or not JSON
    return _CHOICES_FILLED.search(held) is None
