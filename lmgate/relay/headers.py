"""
Which headers cross the gateway.

Everything end-to-end passes unchanged; hop-by-hop headers (RFC 9110 section 7.6.1)
belong to one connection and are dropped, as are the headers a C{Connection}
header names. The request's C{Host} is the upstream's, and its C{Content-Length}
is set by the relay from the body it sends.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

#: Dropped in both directions (lower case).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)

#: Dropped from requests on top of the hop-by-hop ones: the relay sets these.
_REQUEST_ONLY = frozenset({b"host", b"content-length"})
_REQUEST_DROP = HOP_BY_HOP | _REQUEST_ONLY


def _named(headers: Headers) -> frozenset[bytes]:
    """The extra headers a C{Connection} header marks as hop-by-hop."""
    values = headers.getRawHeaders(b"connection")
    if not values:
        return frozenset()
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",") if token.strip()
    )


def upstreamRequestHeaders(received: Headers) -> Headers:
    """
    The headers to send upstream for a request that arrived with C{received}.
    """
    drop = _REQUEST_DROP | _named(received) if received.hasHeader(b"connection") else _REQUEST_DROP
    out = Headers()
    for name, values in received.getAllRawHeaders():
        if name.lower() not in drop:
            out.setRawHeaders(name, values)
    return out


def copyEndToEndHeaders(source: Headers, destination: Headers) -> None:
    """
    Copy a response's end-to-end headers onto the response for the client.
    """
    drop = HOP_BY_HOP | _named(source) if source.hasHeader(b"connection") else HOP_BY_HOP
    for name, values in source.getAllRawHeaders():
        if name.lower() not in drop:
            destination.setRawHeaders(name, values)
