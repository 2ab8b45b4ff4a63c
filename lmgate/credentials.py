"""
Finding the API key in a request, whichever way its SDK sends it.

SDKs differ: OpenAI and the anthropic SDK 2.x send C{Authorization: Bearer},
Anthropic's older SDKs C{x-api-key}, Azure OpenAI C{api-key}, the Gemini API
C{x-goog-api-key} or C{?key=}, Bedrock API keys a bearer token, and AWS SigV4 an
access key id inside its C{Authorization} header. A request is read for all of
them; two different keys, a repeated credential header or a malformed one are
refused rather than guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from twisted.web.http_headers import Headers


class CredentialError(Exception):
    """
    The request's credentials cannot be used. The message is safe to show to
    the client: it never repeats a key.
    """


@dataclass(frozen=True)
class Credential:
    """
    The key a request carries.

    @ivar kind: where it was found: C{bearer}, C{x-api-key}, C{api-key},
        C{x-goog-api-key}, C{query-key} or C{sigv4}.
    @ivar key: the key as sent (for C{sigv4}, the access key id).
    """

    kind: str
    key: bytes


_KEY_HEADERS = ((b"x-api-key", "x-api-key"), (b"api-key", "api-key"), (b"x-goog-api-key", "x-goog-api-key"))
_SIGV4 = b"aws4-hmac-sha256"


def _checkToken(token: bytes, where: str) -> bytes:
    """A key is one run of visible ASCII characters."""
    if not token:
        raise CredentialError(f"The {where} credential is empty.")
    for byte in token:
        if byte <= 0x20 or byte >= 0x7F:
            raise CredentialError(f"The {where} credential has characters that are not allowed.")
    return token


def _fromAuthorization(value: bytes) -> Credential:
    value = value.strip(b" \t")
    scheme, _, rest = value.partition(b" ")
    lowered = scheme.lower()
    if lowered == b"bearer":
        return Credential("bearer", _checkToken(rest.strip(b" \t"), "Authorization Bearer"))
    if lowered == _SIGV4:
        # Credential=<AccessKeyId>/<date>/<region>/<service>/aws4_request, SignedHeaders=..., Signature=...
        for part in rest.split(b","):
            name, eq, field = part.strip(b" \t").partition(b"=")
            if eq and name.lower() == b"credential":
                accessKey = field.split(b"/", 1)[0]
                if b"/" not in field:
                    break
                return Credential("sigv4", _checkToken(accessKey, "SigV4 Credential"))
        raise CredentialError("The AWS SigV4 Authorization header has no usable Credential=.")
    if not scheme:
        raise CredentialError("The Authorization header is empty.")
    raise CredentialError("The Authorization header uses a scheme this gateway does not accept.")


def _queryKeys(rawQuery: bytes) -> list[bytes]:
    keys = []
    for pair in rawQuery.split(b"&"):
        name, eq, value = pair.partition(b"=")
        if name == b"key":
            keys.append(unquote_to_bytes(value.replace(b"+", b" ")))
    return keys


def extractCredential(headers: Headers, rawQuery: bytes) -> Credential | None:
    """
    The one key a request carries, or L{None} when it carries none.

    The same key sent in two different places (say, C{Authorization} and
    C{x-api-key}) counts once.

    @raise CredentialError: two different keys, a repeated credential header or
        query parameter, or a malformed credential.
    """
    found: list[Credential] = []
    authorization = headers.getRawHeaders(b"authorization")
    if authorization is not None:
        if len(authorization) != 1:
            raise CredentialError("The request has more than one Authorization header.")
        found.append(_fromAuthorization(authorization[0]))
    for name, kind in _KEY_HEADERS:
        values = headers.getRawHeaders(name)
        if values is not None:
            if len(values) != 1:
                raise CredentialError(f"The request has more than one {kind} header.")
            found.append(Credential(kind, _checkToken(values[0].strip(b" \t"), kind)))
    if b"key=" in rawQuery:
        keys = _queryKeys(rawQuery)
        if len(keys) > 1:
            raise CredentialError("The request has more than one key query parameter.")
        if keys:
            found.append(Credential("query-key", _checkToken(keys[0], "key query parameter")))
    if not found:
        return None
    first = found[0]
    for other in found[1:]:
        if other.key != first.key:
            raise CredentialError("The request carries two different credentials.")
    return first


def maskKey(key: bytes) -> str:
    """
    A key shortened so it can be logged and recorded: at most the first 4 and
    last 4 characters (C{sk-p…a1b2}); short keys show less, and a key of 4
    characters or fewer shows nothing.
    """
    text = key.decode("ascii", "replace")
    if len(text) <= 4:
        return "…"
    if len(text) <= 12:
        return f"{text[:2]}…{text[-2:]}"
    return f"{text[:4]}…{text[-4:]}"


def redactQuery(rawQuery: bytes) -> bytes:
    """A raw query string with the value of every C{key=} parameter masked."""
    pairs = []
    for pair in rawQuery.split(b"&"):
        name, eq, value = pair.partition(b"=")
        if eq and name.lower() == b"key":
            pair = name + b"=" + maskKey(unquote_to_bytes(value)).encode("utf-8")
        pairs.append(pair)
    return b"&".join(pairs)
