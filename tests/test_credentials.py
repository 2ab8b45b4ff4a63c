"""Finding the key in a request, whichever way its SDK sends it; refusing ambiguity."""

from __future__ import annotations

from hypothesis import given, settings, strategies as st
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from lmgate.access.credentials import (
    CREDENTIAL_HEADERS,
    CREDENTIAL_PARAMETERS,
    CredentialError,
    extractCredential,
    maskKey,
    mayHoldCredential,
    redactQuery,
)

KEY = b"sk-allowed-0123456789abcdef"
OTHER = b"sk-smuggled-9876543210zyxw"


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

    def test_sameKeyInEveryCheckedFormIsOne(self) -> None:
        """An SDK sending one key in several of the forms LMGate reads (Authorization
        and x-api-key, say) is let through: the one key is the one checked."""
        headers = {b"Authorization": [b"Bearer " + KEY], b"X-API-Key": [KEY], b"api-key": [KEY], b"x-goog-api-key": [KEY]}
        self.assertEqual(extract(headers, b"alt=sse&key=" + KEY), ("bearer", KEY))

    def test_encodedKeyNameIsTheKey(self) -> None:
        """C{k%65y} is C{key} to the upstream, so it is read (and checked) as the key."""
        self.assertEqual(extract({}, b"alt=sse&k%65y=" + KEY), ("query-key", KEY))
        with self.assertRaises(CredentialError):
            extract({b"Authorization": [b"Bearer " + KEY]}, b"k%65y=" + OTHER)
        with self.assertRaises(CredentialError):
            extract({}, b"key=" + KEY + b"&k%65y=" + KEY)

    def test_uncheckedFormsRefused(self) -> None:
        """A credential in a form LMGate does not read is refused beside an allowed key,
        whatever its value (the same key included); the message names the form, never the value."""
        auth = {b"Authorization": [b"Bearer " + KEY]}
        headerCases = [
            b"x_api_key", b"X_API_KEY", b"x-api_key", b"api_key", b"x_goog_api_key", b"X-Goog_Api-Key",
            b"Ocp-Apim-Subscription-Key", b"ocp_apim_subscription_key", b"X-Amz-Security-Token",
        ]
        queryCases = [
            b"access_token", b"ACCESS_TOKEN", b"%61ccess_token", b"access-token", b"oauth_token", b"api_key",
            b"api-key", b"API%5Fkey", b"apikey", b"ApiKey", b"x-api-key", b"x_goog_api_key", b"KEY", b"Key",
            b"key+", b"%20key", b"k%2565y", b"subscription-key", b"X-Amz-Credential", b"X-Amz-Signature",
            b"x-amz-security-token",
        ]
        cases: list[tuple[dict[bytes, list[bytes]], bytes]] = []
        for name in headerCases:
            for value in (KEY, OTHER):
                cases.append(({**auth, name: [value]}, b""))
        for name in queryCases:
            for value in (KEY, OTHER):
                for query in (b"alt=sse&" + name + b"=" + value, name + b"=" + value + b"&a=1", b"a=1;" + name + b"=" + value):
                    cases.append((auth, query))
        for headers, query in cases:
            with self.assertRaises(CredentialError, msg=(headers, query)) as e:
                extract(headers, query)
            message = str(e.exception)
            self.assertIn("does not check", message)
            self.assertNotIn("sk-", message)

    def test_otherParametersPass(self) -> None:
        """Parameters that merely look like credentials (C{pageToken}, C{monkey}) are left alone."""
        auth = {b"Authorization": [b"Bearer " + KEY]}
        for query in [b"pageToken=abc&pageSize=2", b"monkey=1", b"alt=sse", b"after=x&limit=2&order=desc", b"a=%20"]:
            self.assertEqual(extract(auth, query), ("bearer", KEY), query)

    def test_everyCredentialNameIsHinted(self) -> None:
        """The cheap pre-test cannot miss a credential parameter, in any case."""
        for name in CREDENTIAL_PARAMETERS:
            for spelling in (name, name.upper(), name.replace(b"_", b"-"), name.title()):
                self.assertTrue(mayHoldCredential(spelling + b"=x"), spelling)

    @settings(max_examples=400, deadline=None)
    @given(st.data())
    def test_anySpellingOfAnUncheckedParameterIsRefused(self, data: st.DataObject) -> None:
        """Beside an allowed key, a credential parameter carrying another value under any
        spelling (cases mixed, C{-} and C{_} swapped, characters percent-encoded) is
        refused, and masked in the log."""
        name = data.draw(st.sampled_from(sorted(CREDENTIAL_PARAMETERS)))
        spelled = b""
        for byte in name:
            char = bytes([byte])
            if char in b"-_":
                char = data.draw(st.sampled_from([b"-", b"_"]))
            elif data.draw(st.booleans()):
                char = char.upper()
            if data.draw(st.integers(0, 3)) == 0:
                char = b"%%%02X" % char[0]
            spelled += char
        query = b"alt=sse&" + spelled + b"=" + OTHER + b"&x=1"
        self.assertTrue(mayHoldCredential(query))
        redacted = redactQuery(query)
        self.assertNotIn(OTHER, redacted)
        self.assertTrue(redacted.startswith(b"alt=sse&" + spelled + b"=") and redacted.endswith(b"&x=1"), redacted)
        try:
            credential = extract({b"Authorization": [b"Bearer " + KEY]}, query)
        except CredentialError:
            return
        self.fail(f"{query!r} gave {credential}")

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(sorted(CREDENTIAL_HEADERS)), st.data())
    def test_anySpellingOfACredentialHeaderIsRead(self, name: bytes, data: st.DataObject) -> None:
        """A credential header under any case and C{-}/C{_} spelling is either one LMGate
        reads (and checks), or is refused: it never passes unseen."""
        spelled = bytes(
            data.draw(st.sampled_from([b"-"[0], b"_"[0]])) if byte in b"-_" else (
                byte if not data.draw(st.booleans()) else bytes([byte]).upper()[0]
            )
            for byte in name
        )
        try:
            credential = extract({spelled: [OTHER]})
        except CredentialError:
            return
        self.assertEqual(credential, (name.decode(), OTHER))
        self.assertNotIn(b"_", spelled)

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

    def test_redactEveryCredentialParameter(self) -> None:
        """Every credential parameter is masked, however its name is encoded, C{;} or C{&} between."""
        secret = b"AIzaSyA0123456789secret"
        for name in [b"key", b"k%65y", b"KEY", b"access_token", b"%61ccess_token", b"api-key", b"X-Amz-Signature", b"key+"]:
            query = b"alt=sse&" + name + b"=" + secret + b";b=2"
            self.assertEqual(redactQuery(query), b"alt=sse&" + name + b"=AIza\xe2\x80\xa6cret;b=2", name)
        self.assertEqual(redactQuery(b"pageToken=abc&monkey=1"), b"pageToken=abc&monkey=1")
