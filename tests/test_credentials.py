"""Finding the key in a request, whichever way its SDK sends it; refusing ambiguity."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from lmgate.credentials import CredentialError, extractCredential, maskKey, redactQuery


def extract(headers: dict[bytes, list[bytes]], query: bytes = b"") -> tuple[str, bytes] | None:
    credential = extractCredential(Headers(headers), query)
    return None if credential is None else (credential.kind, credential.key)


class ExtractionTests(SynchronousTestCase):
    def test_everyStyle(self) -> None:
        """Each SDK's way of sending a key is recognised."""
        sig = b"AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20261123/us-east-1/bedrock/aws4_request, SignedHeaders=host, Signature=ab"
        cases = [
            ({b"Authorization": [b"Bearer sk-proj-abc"]}, b"", ("bearer", b"sk-proj-abc")),
            ({b"authorization": [b"bearer   sk-abc  "]}, b"", ("bearer", b"sk-abc")),
            ({b"x-api-key": [b"sk-ant-1"]}, b"", ("x-api-key", b"sk-ant-1")),
            ({b"api-key": [b"azure1"]}, b"", ("api-key", b"azure1")),
            ({b"x-goog-api-key": [b"AIza1"]}, b"", ("x-goog-api-key", b"AIza1")),
            ({}, b"alt=sse&key=AIza%2B2", ("query-key", b"AIza+2")),
            ({b"Authorization": [sig]}, b"", ("sigv4", b"AKIAIOSFODNN7EXAMPLE")),
        ]
        for headers, query, expected in cases:
            self.assertEqual(extract(headers, query), expected, headers)

    def test_none(self) -> None:
        """No credential at all is None (the gateway then refuses with 403)."""
        self.assertIsNone(extract({b"Content-Type": [b"application/json"]}, b"alt=sse&monkey=1"))

    def test_sameKeyTwiceIsOne(self) -> None:
        """The same key in two places counts once."""
        self.assertEqual(extract({b"Authorization": [b"Bearer k1"], b"x-api-key": [b"k1"]}), ("bearer", b"k1"))

    def test_refused(self) -> None:
        """Two different keys, repeated headers or parameters, and malformed values are refused."""
        for headers, query in [
            ({b"Authorization": [b"Bearer a"], b"x-api-key": [b"b"]}, b""),
            ({b"x-goog-api-key": [b"a"]}, b"key=b"),
            ({b"Authorization": [b"Bearer a", b"Bearer a"]}, b""),
            ({b"x-api-key": [b"a", b"a"]}, b""),
            ({}, b"key=a&key=a"),
            ({b"Authorization": [b"Bearer"]}, b""),
            ({b"Authorization": [b"Bearer "]}, b""),
            ({b"Authorization": [b""]}, b""),
            ({b"Authorization": [b"Basic dXNlcjpwYXNz"]}, b""),
            ({b"Authorization": [b"Bearer a b"]}, b""),
            ({b"Authorization": [b"Bearer caf\xc3\xa9"]}, b""),
            ({b"x-api-key": [b""]}, b""),
            ({}, b"key="),
            ({b"Authorization": [b"AWS4-HMAC-SHA256 SignedHeaders=host, Signature=x"]}, b""),
            ({b"Authorization": [b"AWS4-HMAC-SHA256 Credential=AKIAONLY"]}, b""),
        ]:
            with self.assertRaises(CredentialError, msg=(headers, query)) as e:
                extract(headers, query)
            self.assertNotIn("caf", str(e.exception))

    @settings(max_examples=300, deadline=None)
    @given(
        st.dictionaries(
            st.sampled_from([b"authorization", b"x-api-key", b"api-key", b"x-goog-api-key", b"x-other"]),
            st.lists(st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b), min_size=1, max_size=2),
        ),
        st.binary(max_size=40),
    )
    def test_neverRaisesAnythingElse(self, headers: dict[bytes, list[bytes]], query: bytes) -> None:
        """Arbitrary headers and queries give a credential, None, or a CredentialError."""
        try:
            extract(headers, query)
        except CredentialError:
            pass

    @settings(max_examples=200, deadline=None)
    @given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60))
    def test_wellFormedKeyRoundTrips(self, key: str) -> None:
        """A well-formed bearer key comes back exactly."""
        self.assertEqual(extract({b"Authorization": [b"Bearer " + key.encode()]}), ("bearer", key.encode()))


class MaskingTests(SynchronousTestCase):
    def test_mask(self) -> None:
        """At most the first and last four characters are shown; short keys show less."""
        self.assertEqual(maskKey(b"sk-proj-0123456789a1b2"), "sk-p…a1b2")
        self.assertEqual(maskKey(b"abcdefghij"), "ab…ij")
        self.assertEqual(maskKey(b"abcd"), "…")

    def test_redactQuery(self) -> None:
        """A C{key=} value in a query is masked, other parameters untouched."""
        self.assertEqual(redactQuery(b"alt=sse&key=AIzaSyA0123456789xyz"), "alt=sse&key=AIza…9xyz".encode())
        self.assertEqual(redactQuery(b"a=1"), b"a=1")
