"""
What the gateway knows about each route: where it goes, how its responses are
read, and how its errors look.

A L{Provider} is built once per configured route at start-up, so the relay's
per-call work is an append of the raw path to bytes prepared here.
"""

from __future__ import annotations

import json
from typing import Mapping
from urllib.parse import urlsplit

from lmgate.config import ProviderSettings

#: Error kinds LMGate itself answers with, and the HTTP status of each.
STATUS = {
    "bad_request": 400,
    "forbidden": 403,
    "not_found": 404,
    "upstream_unreachable": 502,
    "shutting_down": 503,
    "upstream_timeout": 504,
}

# Each provider family names its errors its own way; these are the names its SDK
# turns into the matching exception class.
_OPENAI_TYPES = {
    "bad_request": ("invalid_request_error", None),
    "forbidden": ("invalid_request_error", "invalid_api_key"),
    "not_found": ("invalid_request_error", "unknown_url"),
    "upstream_unreachable": ("api_error", "upstream_unreachable"),
    "shutting_down": ("api_error", "shutting_down"),
    "upstream_timeout": ("api_error", "upstream_timeout"),
}
_ANTHROPIC_TYPES = {
    "bad_request": "invalid_request_error",
    "forbidden": "permission_error",
    "not_found": "not_found_error",
    "upstream_unreachable": "api_error",
    "shutting_down": "overloaded_error",
    "upstream_timeout": "timeout_error",
}
_GOOGLE_STATUS = {
    "bad_request": "INVALID_ARGUMENT",
    "forbidden": "PERMISSION_DENIED",
    "not_found": "NOT_FOUND",
    "upstream_unreachable": "UNAVAILABLE",
    "shutting_down": "UNAVAILABLE",
    "upstream_timeout": "DEADLINE_EXCEEDED",
}
_BEDROCK_TYPES = {
    "bad_request": "ValidationException",
    "forbidden": "AccessDeniedException",
    "not_found": "ResourceNotFoundException",
    "upstream_unreachable": "ServiceUnavailableException",
    "shutting_down": "ServiceUnavailableException",
    "upstream_timeout": "ModelTimeoutException",
}

#: Response headers that carry the provider's own id for a call, by format.
_REQUEST_ID_HEADERS: Mapping[str, tuple[bytes, ...]] = {
    "openai": (b"x-request-id", b"apim-request-id", b"request-id"),
    "anthropic": (b"request-id", b"x-request-id"),
    "google": (b"x-goog-request-id", b"x-request-id", b"x-cloud-trace-context"),
    "bedrock": (b"x-amzn-requestid", b"x-amzn-request-id", b"x-amz-request-id"),
}

JSON_CONTENT_TYPE = b"application/json"


def genericErrorBody(kind: str, message: str) -> bytes:
    """The error shape for answers that belong to no provider (e.g. an unknown prefix)."""
    return json.dumps({"error": {"type": kind, "message": message}}).encode()


class Provider:
    """
    One configured route.

    @ivar name: the path prefix and the record's C{provider}.
    @ivar format: how responses are read and errors shaped
        (openai, anthropic, google, bedrock).
    @ivar baseURL: the upstream URL, base path included, no trailing slash;
        the relayed request's raw path is appended to it.
    @ivar emptyRest: what stands for an empty rest of the path: C{/} when the
        base URL has no path (so a query can never follow the host directly,
        where a relay splitting at the first C{/} would take it for the path),
        nothing when it has one.
    @ivar requestIdHeaders: response headers holding the provider's call id.
    """

    def __init__(self, settings: ProviderSettings) -> None:
        self.name = settings.name
        self.format = settings.format
        self.baseURL = settings.upstream.encode("ascii")
        self.emptyRest = b"" if urlsplit(settings.upstream).path else b"/"
        self.requestIdHeaders = _REQUEST_ID_HEADERS[settings.format]

    def __repr__(self) -> str:
        return f"<Provider {self.name} {self.format} {self.baseURL.decode()}>"

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

    def errorResponse(self, kind: str, message: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """
        An error LMGate answers itself, in this provider's own shape, so the
        caller's SDK raises its usual exception with our message.

        @param kind: a key of L{STATUS}.
        @return: status, headers, body.
        """
        status = STATUS[kind]
        headers = [(b"content-type", JSON_CONTENT_TYPE)]
        body: object
        if self.format == "anthropic":
            body = {"type": "error", "error": {"type": _ANTHROPIC_TYPES[kind], "message": message}}
        elif self.format == "google":
            body = {"error": {"code": status, "message": message, "status": _GOOGLE_STATUS[kind]}}
        elif self.format == "bedrock":
            body = {"message": message}
            headers.append((b"x-amzn-errortype", _BEDROCK_TYPES[kind].encode()))
        else:
            errorType, code = _OPENAI_TYPES[kind]
            body = {"error": {"message": message, "type": errorType, "param": None, "code": code}}
        return status, headers, json.dumps(body).encode()
