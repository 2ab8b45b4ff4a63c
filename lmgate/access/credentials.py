"""
Finding the API key in a request, whichever way its SDK sends it.

SDKs differ: OpenAI and the anthropic SDK 2.x send C{Authorization: Bearer},
Anthropic's older SDKs C{x-api-key}, Azure OpenAI C{api-key}, the Gemini API
C{x-goog-api-key} or C{?key=}, Bedrock API keys a bearer token, and AWS SigV4 an
access key id inside its C{Authorization} header. A request is read for all of
them; two different keys, a repeated credential header or a malformed one are
refused rather than guessed at. So is a credential in any other form a provider
(or a server in front of one) may take, such as C{x_api_key} or
C{?access_token=}: it would reach the upstream without LMGate having checked it.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from operator import itemgetter

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


def _stored(name: bytes) -> bytes:
    """A header name as twisted.web's C{Headers} stores it (C{Header-Case} today)."""
    headers = Headers()
    headers.addRawHeader(name, b"")
    return next(iter(headers.getAllRawHeaders()))[0]


def _spellings(name: bytes) -> list[bytes]:
    """C{name} with each C{-} as C{-} or C{_}: C{x-api-key}, C{x_api-key} ..."""
    words = name.split(b"-")
    return [
        words[0] + b"".join(sep + word for sep, word in zip(seps, words[1:]))
        for seps in itertools.product((b"-", b"_"), repeat=len(words) - 1)
    ]


#: The credential headers LMGate reads a key from, as C{Headers} stores their
#: names, and how messages name each one.
_KEY_HEADERS: dict[bytes, str] = {
    _stored(name): name.decode()
    for name in (b"Authorization", b"x-api-key", b"api-key", b"x-goog-api-key")
}

#: Every header a provider, or a server in front of one, takes a credential
#: from (lower case). Some servers read C{x_api_key} as C{x-api-key}, and
#: header names are case-insensitive: every such spelling but the ones in
#: L{_KEY_HEADERS} is a credential LMGate does not check, and is refused.
CREDENTIAL_HEADERS = frozenset(
    {
        b"authorization",
        b"x-api-key",
        b"api-key",
        b"x-goog-api-key",
        b"ocp-apim-subscription-key",
        b"x-amz-security-token",
    }
)

#: Every spelling of those, as C{Headers} stores it: one set intersection
#: finds them all in a request.
_ALL_CREDENTIAL_HEADERS = frozenset(
    _stored(spelling) for name in CREDENTIAL_HEADERS for spelling in _spellings(name)
)

#: Every query parameter a provider, or a server in front of one, takes a
#: credential from, as compared: percent-decoded, C{+} as a space, stripped,
#: lower case, C{_} for C{-}. Only C{key}, spelled exactly so once decoded, is
#: read as the request's key; the others are refused.
CREDENTIAL_PARAMETERS = frozenset(
    {
        b"key",
        b"api_key",
        b"apikey",
        b"x_api_key",
        b"x_goog_api_key",
        b"access_token",
        b"oauth_token",
        b"subscription_key",
        b"x_amz_credential",
        b"x_amz_signature",
        b"x_amz_security_token",
    }
)

#: Each name above contains C{key}, C{token} or C{amz}, so a name that reads
#: as one of them holds a C{%} or one of those (in any case): the cheap test
#: that lets the usual query (C{alt=sse}) skip the parse.
_HINT = re.compile(rb"%|key|token|amz", re.IGNORECASE)
_name = itemgetter(0)

_SIGV4 = b"aws4-hmac-sha256"
_TOKEN = re.compile(rb"[\x21-\x7e]+")
_SEPARATORS = re.compile(rb"([&;])")

KEY_FORMS = "Authorization, x-api-key, api-key, x-goog-api-key or ?key="


def _checkToken(token: bytes, where: str) -> bytes:
    """A key is one run of visible ASCII characters."""
    if not token:
        raise CredentialError(f"The {where} credential is empty.")
    if _TOKEN.fullmatch(token) is None:
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


def mayHoldCredential(rawQuery: bytes) -> bool:
    """
    Whether a raw query string may carry a credential parameter, however its
    name is encoded: a cheap test that never misses one (it may say yes to a
    query that has none; L{parameterKind} then decides).
    """
    return _HINT.search(rawQuery) is not None


def _decodedName(name: bytes) -> bytes:
    """A parameter name as a server reads it: C{+} a space, percent-decoded."""
    if b"%" in name or b"+" in name:
        return unquote_to_bytes(name.replace(b"+", b" "))
    return name


def parameterKind(name: bytes) -> str | None:
    """
    What a raw query parameter name carries: C{"key"} for the C{key}
    parameter LMGate reads, C{"other"} for a credential in a form LMGate does
    not check, L{None} for anything else.

    The name is compared as servers may read it: percent-decoded (up to three
    times: a double-encoded name is no more honest), stripped, lower case,
    C{-} and C{_} alike.
    """
    decoded = _decodedName(name)
    if decoded == b"key":
        return "key"
    for _ in range(2):
        if b"%" not in decoded:
            break
        decoded = unquote_to_bytes(decoded)
    folded = decoded.strip(b" \t\r\n\x00").lower().replace(b"-", b"_")
    return "other" if folded in CREDENTIAL_PARAMETERS else None


def _quoteName(raw: bytes) -> str:
    """A header or parameter name, short and printable, for a message."""
    text = raw[:40].decode("ascii", "replace")
    return "".join(c if 0x20 < ord(c) < 0x7F else "?" for c in text)


def _queryKeys(rawQuery: bytes) -> list[bytes]:
    """The values of the C{key} parameters; refuses any other credential parameter."""
    keys = []
    for pair in rawQuery.split(b"&") if b";" not in rawQuery else _SEPARATORS.split(rawQuery)[::2]:
        name, eq, value = pair.partition(b"=")
        if name == b"key":
            kind: str | None = "key"
        elif _HINT.search(name) is None:
            continue
        else:
            kind = parameterKind(name)
        if kind == "key":
            keys.append(unquote_to_bytes(value.replace(b"+", b" ")))
        elif kind is not None:
            raise CredentialError(
                f"The request carries a credential in the {_quoteName(name)} query parameter, which this gateway "
                f"does not check; send one key, in {KEY_FORMS}."
            )
    return keys


def extractCredential(headers: Headers, rawQuery: bytes) -> Credential | None:
    """
    The one key a request carries, or L{None} when it carries none.

    The same key sent in two of the forms LMGate reads (say, C{Authorization}
    and C{x-api-key}, as some SDKs do) counts once. A credential in any other
    form a provider or a server in front of it may take (C{x_api_key},
    C{?access_token=}, C{?API%5Fkey=}, a presigned C{X-Amz-Signature} ...)
    would reach the upstream unchecked, so it is refused whatever its value.
    (C{?k%65y=} is C{key} to any server, and read as such.)

    @raise CredentialError: two different keys, a repeated credential header or
        C{key} parameter, a credential in a form LMGate does not check, or a
        malformed credential.
    """
    found: list[Credential] = []
    present = _ALL_CREDENTIAL_HEADERS.intersection(map(_name, headers.getAllRawHeaders()))
    if present:
        if not present.issubset(_KEY_HEADERS):
            unchecked = min(present.difference(_KEY_HEADERS)).lower().decode("ascii")
            raise CredentialError(
                f"The request carries a credential in the {unchecked} header, which this gateway does not check; "
                f"send one key, in {KEY_FORMS}."
            )
        for name, where in _KEY_HEADERS.items():
            if name in present:
                values = headers.getRawHeaders(name, ())
                if len(values) != 1:
                    raise CredentialError(f"The request has more than one {where} header.")
                if where == "Authorization":
                    found.append(_fromAuthorization(values[0]))  # first: a SigV4 header is the one reported
                else:
                    found.append(Credential(where, _checkToken(values[0].strip(b" \t"), where)))
    if rawQuery and _HINT.search(rawQuery) is not None:  # mayHoldCredential, inline
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
    """
    A raw query string with the value of every credential parameter masked,
    however its name is encoded (C{key}, C{k%65y}, C{access_token},
    C{X-Amz-Signature} ...: see L{parameterKind}); C{&} and C{;} both separate.
    """
    parts = _SEPARATORS.split(rawQuery)
    for i in range(0, len(parts), 2):
        name, eq, value = parts[i].partition(b"=")
        if eq and parameterKind(name) is not None:
            parts[i] = name + b"=" + maskKey(unquote_to_bytes(value.replace(b"+", b" "))).encode("utf-8")
    return b"".join(parts)


#: Request headers that carry, or belong to, a client's credential (lower case):
#: every form above plus the parts of a SigV4 signature. A managed route's
#: request loses them all before LMGate adds the provider's own.
CLIENT_CREDENTIAL_HEADERS = frozenset(
    spelling.lower()
    for name in CREDENTIAL_HEADERS | {b"x-amz-date", b"x-amz-content-sha256"}
    for spelling in _spellings(name)
)


def removeCredentials(headers: Headers) -> None:
    """
    Remove from C{headers} every header that carries a client's credential
    (L{CLIENT_CREDENTIAL_HEADERS}, however spelt or cased).
    """
    for name in [name for name, _ in headers.getAllRawHeaders() if name.lower() in CLIENT_CREDENTIAL_HEADERS]:
        headers.removeHeader(name)


def withoutCredentialParameters(rawQuery: bytes) -> bytes | None:
    """
    A raw query string without its credential parameters (C{key}, however its
    name is encoded, and every other form L{parameterKind} knows); every other
    byte is kept as sent, separators included.

    @return: the rest of the query, or None when nothing is left.
    """
    if _HINT.search(rawQuery) is None:  # mayHoldCredential, inline
        return rawQuery
    parts = _SEPARATORS.split(rawQuery)
    kept: list[tuple[bytes, bytes]] = []  # (the separator before, the parameter)
    for i in range(0, len(parts), 2):
        if parameterKind(parts[i].partition(b"=")[0]) is None:
            kept.append((parts[i - 1] if i else b"", parts[i]))
    if len(kept) * 2 - 1 == len(parts):
        return rawQuery
    if not kept:
        return None
    return kept[0][1] + b"".join(separator + pair for separator, pair in kept[1:])
