"""
An independent SigV4 check for fake AWS upstreams in tests: the signature of a
received request recomputed from its wire bytes with a known secret, as AWS does,
without the module under test (L{lmgate.governance.sigv4}).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from urllib.parse import unquote_to_bytes

from twisted.web.server import Request

UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")


def awsEncode(data: bytes, keep: bytes = b"") -> str:
    """Percent-encode every byte but the unreserved ones and C{keep}, upper-case hex."""
    return "".join(chr(b) if b in UNRESERVED or b in keep else "%%%02X" % b for b in data)


def wirePath(path: bytes) -> bytes:
    """Dot segments and empty segments removed (what AWS does for services other than S3)."""
    out: list[bytes] = []
    for segment in path.split(b"/"):
        if segment in (b"", b"."):
            continue
        if segment == b"..":
            if out:
                out.pop()
            continue
        out.append(segment)
    trailing = b"/" if path.endswith(b"/") and out else b""
    return b"/" + b"/".join(out) + trailing


def hmacSHA256(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def checkSignature(request: Request, body: bytes, secrets: dict[str, str]) -> str | None:
    """
    Recompute the signature of a received request from its wire bytes, independently of
    the module under test, as AWS does: the problem found, or None when it matches.
    """
    auth = (request.getHeader(b"authorization") or b"").decode("latin-1")
    found = re.fullmatch(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})", auth)
    if found is None:
        return f"malformed Authorization: {auth!r}"
    accessKey, day, region, service, signedNames, signature = found.groups()
    if accessKey not in secrets:
        return "unknown access key"
    amzDate = (request.getHeader(b"x-amz-date") or b"").decode("ascii")
    if not amzDate.startswith(day):
        return "X-Amz-Date does not match the credential scope"
    names = signedNames.split(";")
    if "host" not in names or "x-amz-date" not in names:
        return "host and x-amz-date must be signed"
    if request.getHeader(b"x-amz-security-token") is not None and "x-amz-security-token" not in names:
        return "the security token is not signed"
    payloadHash = hashlib.sha256(body).hexdigest()
    claimed = request.getHeader(b"x-amz-content-sha256")
    if claimed is not None and claimed.decode("ascii") != payloadHash:
        return "X-Amz-Content-Sha256 does not match the body"
    target = request.uri
    path, _, query = target.partition(b"?")
    pairs = []
    for pair in query.split(b"&") if query else []:
        k, _, v = pair.partition(b"=")
        pairs.append((awsEncode(unquote_to_bytes(k)), awsEncode(unquote_to_bytes(v))))
    canonicalHeaders = ""
    for name in names:
        values = request.requestHeaders.getRawHeaders(name.encode("ascii"))
        if values is None:
            return f"signed header {name} missing"
        canonicalHeaders += name + ":" + ",".join(" ".join(v.decode("latin-1").split()) for v in values) + "\n"
    canonical = "\n".join(
        [
            request.method.decode("ascii"),
            awsEncode(wirePath(path), keep=b"/"),
            "&".join(f"{k}={v}" for k, v in sorted(pairs)),
            canonicalHeaders,
            signedNames,
            payloadHash,
        ]
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    toSign = "\n".join(["AWS4-HMAC-SHA256", amzDate, scope, hashlib.sha256(canonical.encode("utf-8")).hexdigest()])
    key = ("AWS4" + secrets[accessKey]).encode("utf-8")
    for part in (day, region, service, "aws4_request"):
        key = hmacSHA256(key, part)
    expected = hmac.new(key, toSign.encode("utf-8"), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature):
        return "The request signature we calculated does not match the signature you provided."
    return None
