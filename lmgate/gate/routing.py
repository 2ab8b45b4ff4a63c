"""
Where a request target goes: the provider prefix, the rest of the path and the query.

Routing works on the raw request target, never on twisted.web's decoded
C{postpath}: the bytes after the provider prefix go upstream exactly as the client
sent them, appended to the provider's base URL, so nothing in a request can change
the upstream's scheme, host or port, and dot segments (plain or encoded) that
could climb out of the base path are refused.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

HEALTH = b"healthz"

_PLAIN = re.compile(rb"^[\x21-\x7e]*$")
_ENCODED_DOT_OR_SLASH = re.compile(rb"%(2e|2f|5c)", re.IGNORECASE)

class RouteError(Exception):
    """A request target that LMGate will not relay."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


def splitTarget(uri: bytes) -> tuple[bytes, bytes, bytes | None]:
    """
    Split a raw request target into the provider name, the rest of the path and
    the raw query string.

    @return: C{(name, rest, query)}: C{rest} is empty or starts with C{/};
        C{query} is L{None} when the target has no C{?}.
    @raise RouteError: the target is not a plain origin-form path, or its rest
        could climb out of the upstream's base path.
    """
    if not uri.startswith(b"/") or uri.startswith(b"//"):
        raise RouteError("bad_request", "The request target must be an absolute path (origin-form).")
    path, sep, query = uri.partition(b"?")
    if not _PLAIN.match(uri) or b"#" in uri or b"\\" in path:
        raise RouteError("bad_request", "The request target has characters that are not allowed.")
    name, slash, tail = path[1:].partition(b"/")
    rest = slash + tail
    if rest:
        _checkRest(rest)
    return name, rest, (query if sep else None)


def _checkRest(rest: bytes) -> None:
    """Refuse dot segments, plain or percent-encoded, and encoded control bytes."""
    if b"." in rest:
        for segment in rest.split(b"/"):
            if segment == b"." or segment == b"..":
                raise RouteError("bad_request", "The path must not contain '.' or '..' segments.")
    if b"%" in rest:
        decoded = unquote_to_bytes(rest)
        for segment in decoded.replace(b"\\", b"/").split(b"/"):
            if segment == b"." or segment == b"..":
                raise RouteError("bad_request", "The path must not contain encoded '.' or '..' segments.")
        if any(byte < 0x20 or byte == 0x7F for byte in decoded):
            raise RouteError("bad_request", "The path must not contain encoded control characters.")
        if _ENCODED_DOT_OR_SLASH.search(decoded):
            raise RouteError("bad_request", "The path must not contain double-encoded '.', '/' or '\\'.")


def isHealth(uri: bytes) -> bool:
    """Whether a raw request target is the gateway's own C{/healthz} (query allowed)."""
    if not uri.startswith(b"/healthz"):
        return False
    try:
        name, rest, query = splitTarget(uri)
    except RouteError:
        return False
    return name == HEALTH and not rest
