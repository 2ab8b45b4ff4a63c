"""
The four wire framings a usage reader follows: a whole JSON body, server-sent
events, Gemini's streamed JSON array and AWS event-stream frames.

A framing knows where one message (an event, an element, a frame) ends and
how much of it may be kept; what a message means is its provider format's
business (L{lmgate.usage.openai}, L{lmgate.usage.anthropic},
L{lmgate.usage.google}, L{lmgate.usage.bedrock}), handed in as callables.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable

from lmgate.records.record import Usage
from lmgate.usage.base import DecodingReader, Json
from lmgate.usage.decoding import Decoder


class JSONBodyReader(DecodingReader):
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


class SSEReader(DecodingReader):
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


class JSONArrayStreamReader(DecodingReader):
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


class EventStreamReader(DecodingReader):
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

