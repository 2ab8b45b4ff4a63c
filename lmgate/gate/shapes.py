"""
The error answers LMGate gives itself, in each provider family's own shape.

A refused or failed call is answered so that the caller's SDK raises its usual
exception, carrying LMGate's message: L{errorResponse} builds that answer for a
route's format, L{genericErrorBody} for what belongs to no route (an unknown
prefix), and L{channelRefusal} for the requests the channel refuses before they
are routed (400, 408, 413, 431).
"""

from __future__ import annotations

import json

#: Error kinds LMGate itself answers with, and the HTTP status of each.
STATUS = {
    "bad_request": 400,
    "body_too_large": 413,
    "forbidden": 403,
    "not_found": 404,
    "model_not_found": 404,
    "rate_limited": 429,
    "quota_exceeded": 429,
    "internal_error": 500,
    "upstream_unreachable": 502,
    "credentials_unavailable": 502,
    "shutting_down": 503,
    "limits_unavailable": 503,
    "upstream_timeout": 504,
    "policy_denied": 403,
    "policy_exceeded": 400,
    "policy_unavailable": 503,
}

# Each provider family names its errors its own way; these are the names its SDK
# turns into the matching exception class.
_OPENAI_TYPES = {
    "bad_request": ("invalid_request_error", None),
    "body_too_large": ("invalid_request_error", "request_too_large"),
    "forbidden": ("invalid_request_error", "invalid_api_key"),
    "not_found": ("invalid_request_error", "unknown_url"),
    "model_not_found": ("invalid_request_error", "model_not_found"),
    "rate_limited": ("requests", "rate_limit_exceeded"),
    "quota_exceeded": ("insufficient_quota", "insufficient_quota"),
    "limits_unavailable": ("api_error", "limits_unavailable"),
    "internal_error": ("api_error", "internal_error"),
    "upstream_unreachable": ("api_error", "upstream_unreachable"),
    "credentials_unavailable": ("api_error", "credentials_unavailable"),
    "shutting_down": ("api_error", "shutting_down"),
    "upstream_timeout": ("api_error", "upstream_timeout"),
    "policy_denied": ("invalid_request_error", "permission_denied"),
    "policy_exceeded": ("invalid_request_error", "policy_limit_exceeded"),
    "policy_unavailable": ("api_error", "policy_unavailable"),
}
_ANTHROPIC_TYPES = {
    "bad_request": "invalid_request_error",
    "body_too_large": "request_too_large",
    "forbidden": "permission_error",
    "not_found": "not_found_error",
    "model_not_found": "not_found_error",
    "rate_limited": "rate_limit_error",
    "quota_exceeded": "rate_limit_error",
    "limits_unavailable": "api_error",
    "internal_error": "api_error",
    "upstream_unreachable": "api_error",
    "credentials_unavailable": "api_error",
    "shutting_down": "overloaded_error",
    "upstream_timeout": "timeout_error",
    "policy_denied": "permission_error",
    "policy_exceeded": "invalid_request_error",
    "policy_unavailable": "api_error",
}
_GOOGLE_STATUS = {
    "bad_request": "INVALID_ARGUMENT",
    "body_too_large": "INVALID_ARGUMENT",
    "forbidden": "PERMISSION_DENIED",
    "not_found": "NOT_FOUND",
    "model_not_found": "NOT_FOUND",
    "rate_limited": "RESOURCE_EXHAUSTED",
    "quota_exceeded": "RESOURCE_EXHAUSTED",
    "limits_unavailable": "UNAVAILABLE",
    "internal_error": "INTERNAL",
    "upstream_unreachable": "UNAVAILABLE",
    "credentials_unavailable": "UNAVAILABLE",
    "shutting_down": "UNAVAILABLE",
    "upstream_timeout": "DEADLINE_EXCEEDED",
    "policy_denied": "PERMISSION_DENIED",
    "policy_exceeded": "INVALID_ARGUMENT",
    "policy_unavailable": "UNAVAILABLE",
}
_BEDROCK_TYPES = {
    "bad_request": "ValidationException",
    "body_too_large": "ValidationException",
    "forbidden": "AccessDeniedException",
    "not_found": "ResourceNotFoundException",
    "model_not_found": "ResourceNotFoundException",
    "rate_limited": "ThrottlingException",
    "quota_exceeded": "ThrottlingException",
    "limits_unavailable": "ServiceUnavailableException",
    "internal_error": "InternalServerException",
    "upstream_unreachable": "ServiceUnavailableException",
    "credentials_unavailable": "ServiceUnavailableException",
    "shutting_down": "ServiceUnavailableException",
    "upstream_timeout": "ModelTimeoutException",
    "policy_denied": "AccessDeniedException",
    "policy_exceeded": "ValidationException",
    "policy_unavailable": "ServiceUnavailableException",
}

JSON_CONTENT_TYPE = b"application/json"


def genericErrorBody(kind: str, message: str) -> bytes:
    """The error shape for answers that belong to no provider (e.g. an unknown prefix)."""
    return json.dumps({"error": {"type": kind, "message": message}}).encode()


def errorResponse(format: str | None, kind: str, message: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """
    An error LMGate answers itself, in the shape of the route's provider
    format (openai, anthropic, google, bedrock), or the generic shape when
    there is no route (C{format} is None).

    @param kind: a key of L{STATUS}.
    @return: status, headers, body.
    """
    status = STATUS[kind]
    headers = [(b"content-type", JSON_CONTENT_TYPE)]
    body: object
    if format is None:
        return status, headers, genericErrorBody(kind, message)
    if format == "anthropic":
        body = {"type": "error", "error": {"type": _ANTHROPIC_TYPES[kind], "message": message}}
    elif format == "google":
        body = {"error": {"code": status, "message": message, "status": _GOOGLE_STATUS[kind]}}
    elif format == "bedrock":
        body = {"message": message}
        headers.append((b"x-amzn-errortype", _BEDROCK_TYPES[kind].encode()))
    else:
        errorType, code = _OPENAI_TYPES[kind]
        body = {"error": {"message": message, "type": errorType, "param": None, "code": code}}
    return status, headers, json.dumps(body).encode()


#: Reason phrases of statuses LMGate answers whose phrase Twisted's table lacks
#: (it would send "Unknown Status"), as providers send them.
_REASONS = {429: b"Too Many Requests", 431: b"Request Header Fields Too Large"}


def reasonPhrase(status: int) -> bytes | None:
    """The reason phrase for an answer of LMGate's own with C{status}; None: Twisted's own."""
    return _REASONS.get(status)


_CHANNEL_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
}
_CHANNEL_TYPES = {400: "bad_request", 408: "request_timeout", 413: "request_too_large", 431: "headers_too_large"}


def channelRefusal(status: int, message: str) -> tuple[str, bytes, bytes]:
    """
    The answer to a request the channel refuses before routing (400, 408, 413,
    431): the generic shape, as no route is known yet.

    @return: the error type (also the refusal's default name), the reason
        phrase, the body.
    """
    kind = _CHANNEL_TYPES[status]
    return kind, _CHANNEL_REASONS[status], genericErrorBody(kind, message)
