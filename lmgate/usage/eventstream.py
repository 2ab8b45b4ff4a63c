"""
Writing AWS event-stream frames (C{application/vnd.amazon.eventstream}), as
Bedrock's streaming APIs send them. Reading them is botocore's parser's job.

A frame: total length (4 bytes, big-endian), headers length (4), prelude CRC32
(4), headers, payload, message CRC32 (4). A header: name length (1), name,
value type (1; 7 is a string), value length (2), value.
"""

from __future__ import annotations

import struct
import zlib

_STRING = 7


def encodeHeaders(headers: dict[str, str]) -> bytes:
    out = []
    for name, value in headers.items():
        n, v = name.encode("utf-8"), value.encode("utf-8")
        out.append(struct.pack(">B", len(n)) + n + struct.pack(">BH", _STRING, len(v)) + v)
    return b"".join(out)


def encodeMessage(headers: dict[str, str], payload: bytes) -> bytes:
    """One complete event-stream frame."""
    encoded = encodeHeaders(headers)
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def event(eventType: str, payload: bytes) -> bytes:
    """An C{event} frame with a JSON payload."""
    return encodeMessage(
        {":event-type": eventType, ":content-type": "application/json", ":message-type": "event"}, payload
    )


def exception(exceptionType: str, payload: bytes) -> bytes:
    """An C{exception} frame, as Bedrock sends a throttling or validation error mid-stream."""
    return encodeMessage(
        {":exception-type": exceptionType, ":content-type": "application/json", ":message-type": "exception"}, payload
    )
