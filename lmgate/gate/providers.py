"""
What the gateway knows about each route: where it goes and how its responses
are read (how its errors look: L{lmgate.gate.shapes}).

A L{Provider} is built once per configured route at start-up, so the relay's
per-call work is an append of the raw path to bytes prepared here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit

from lmgate.config import ProviderSettings

if TYPE_CHECKING:
    from lmgate.governance.interfaces import IUpstreamCredential

#: Response headers that carry the provider's own id for a call, by format.
_REQUEST_ID_HEADERS: Mapping[str, tuple[bytes, ...]] = {
    "openai": (b"x-request-id", b"apim-request-id", b"request-id"),
    "anthropic": (b"request-id", b"x-request-id"),
    "google": (b"x-goog-request-id", b"x-request-id", b"x-cloud-trace-context"),
    "bedrock": (b"x-amzn-requestid", b"x-amzn-request-id", b"x-amz-request-id"),
}


class Provider:
    """
    One configured route.

    @ivar name: the path prefix and the record's C{provider}.
    @ivar format: how responses are read and errors shaped
        (openai, anthropic, google, bedrock; see L{lmgate.gate.shapes}).
    @ivar baseURL: the upstream URL, base path included, no trailing slash;
        the relayed request's raw path is appended to it.
    @ivar emptyRest: what stands for an empty rest of the path: C{/} when the
        base URL has no path (so a query can never follow the host directly,
        where a relay splitting at the first C{/} would take it for the path),
        nothing when it has one.
    @ivar requestIdHeaders: response headers holding the provider's call id.
    @ivar auth: how the route authenticates upstream, the record's C{auth}:
        C{client} (the client's key is relayed), C{managed} (C{credential} is
        added), C{stub} (served by the embedded stub: a managed route whose key
        is missing).
    @ivar managed: whether the client's credentials are removed before the
        request is sent (C{managed} and C{stub} routes).
    @ivar credential: the L{IUpstreamCredential} a managed route adds, else None.
    @ivar openaiPath: the route's C{openai_path}, as bytes.
    """

    def __init__(self, settings: ProviderSettings, auth: Any = None) -> None:
        """
        @param auth: the route's L{lmgate.governance.managed.RouteAuth} when it
            is managed, else None.
        """
        self.name = settings.name
        self.format = settings.format
        upstream = settings.upstream if auth is None or auth.stubURL is None else auth.stubURL
        self.baseURL = upstream.encode("ascii")
        self.emptyRest = b"" if urlsplit(upstream).path else b"/"
        self.requestIdHeaders = _REQUEST_ID_HEADERS[settings.format]
        self.auth: str = "client" if auth is None else auth.mode
        self.managed = auth is not None
        self.credential: IUpstreamCredential | None = None if auth is None else auth.credential
        #: Where the route's OpenAI-format API lives under its upstream (the unified endpoint's target path).
        self.openaiPath = settings.openaiPath.encode("ascii")

    def __repr__(self) -> str:
        return f"<Provider {self.name} {self.format} {self.baseURL.decode()} auth={self.auth}>"

    def upstreamURL(self, rest: bytes, query: bytes | None) -> bytes:
        """
        The upstream URL for a request: base URL + raw path (+ raw query). The
        URL always has a path (C{/} at least), so the query stays the query.

        @param rest: the path after the prefix, empty or starting with C{/},
            already checked by the router; never decoded.
        @param query: the raw query string, or L{None} when the request had no C{?}.
        """
        if not rest:
            rest = self.emptyRest
        if query is None:
            return self.baseURL + rest
        return self.baseURL + rest + b"?" + query
