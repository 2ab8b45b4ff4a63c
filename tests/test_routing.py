"""
Routing: the raw request target picks a provider, and nothing in it can send a
request anywhere but under the configured upstream's base path.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from lmgate.config import ProviderSettings
from lmgate.gateway import RouteError, splitTarget
from lmgate.providers import Provider


def _join(upstream: str, target: bytes) -> bytes:
    name, rest, query = splitTarget(target)
    return Provider(ProviderSettings(name.decode(), upstream, "openai")).upstreamURL(rest, query)


class SplitTargetTests(SynchronousTestCase):
    def test_prefixRestAndQuery(self) -> None:
        """The first segment is the provider; the rest and the query stay raw."""
        self.assertEqual(
            splitTarget(b"/gemini/v1beta/models/x:generateContent?alt=sse&key=a%2Bb"),
            (b"gemini", b"/v1beta/models/x:generateContent", b"alt=sse&key=a%2Bb"),
        )

    def test_noQuery(self) -> None:
        """A target without C{?} has no query; an empty query is kept as empty."""
        self.assertEqual(splitTarget(b"/openai/v1/models"), (b"openai", b"/v1/models", None))
        self.assertEqual(splitTarget(b"/openai/v1/models?"), (b"openai", b"/v1/models", b""))

    def test_prefixOnly(self) -> None:
        """A bare prefix has an empty rest."""
        self.assertEqual(splitTarget(b"/healthz"), (b"healthz", b"", None))
        self.assertEqual(splitTarget(b"/openai/"), (b"openai", b"/", None))

    def test_encodedCharactersStayEncoded(self) -> None:
        """Percent-encoding is never decoded: a Bedrock ARN model id keeps its %3A and %2F."""
        target = b"/bedrock/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A1%3Ainference-profile%2Fus.x-v1%3A0/converse"
        self.assertEqual(splitTarget(target)[1], target[len(b"/bedrock") :])

    def test_atSignInPathIsPlainData(self) -> None:
        """C{@} in the path (Vertex model versions) cannot become userinfo of the upstream URL."""
        url = _join("https://aiplatform.example", b"/google/v1/models/claude@20240620:rawPredict")
        self.assertEqual(url, b"https://aiplatform.example/v1/models/claude@20240620:rawPredict")
        self.assertEqual(_join("https://up.example", b"/openai/@evil.example/x"), b"https://up.example/@evil.example/x")

    def test_refused(self) -> None:
        """Absolute-form, authority-form, dot segments (plain, encoded, mixed,
        double-encoded), backslashes, control bytes and fragments are refused."""
        for target in [
            b"http://evil.example/openai/v1/chat",
            b"evil.example:443",
            b"*",
            b"//evil.example/openai/v1",
            b"/openai/../admin",
            b"/openai/v1/..",
            b"/openai/./v1",
            b"/openai/%2e%2e/admin",
            b"/openai/%2E%2e/admin",
            b"/openai/.%2e/admin",
            b"/openai/v1/..%2fadmin",
            b"/openai/v1/..%2Fadmin",
            b"/openai/v1/%2e%2e%2fadmin",
            b"/openai/v1/..%5cadmin",
            b"/openai/v1\\..\\admin",
            b"/openai/v1/%252e%252e/admin",
            b"/openai/v1/%00x",
            b"/openai/v1/%0d%0aHost:%20evil",
            b"/openai/v1/chat#frag",
            b"/openai/v1/\x7f",
            b"/openai/v1/caf\xc3\xa9",
        ]:
            with self.assertRaises(RouteError, msg=target) as e:
                splitTarget(target)
            self.assertEqual(e.exception.kind, "bad_request")

    def test_dotsInsideSegmentsAreFine(self) -> None:
        """Dots that are not whole segments (model ids, versions) pass."""
        self.assertEqual(
            splitTarget(b"/bedrock/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/invoke")[0], b"bedrock"
        )
        self.assertEqual(splitTarget(b"/openai/v1/...x/a..b")[1], b"/v1/...x/a..b")


class UpstreamURLTests(SynchronousTestCase):
    def test_basePathKept(self) -> None:
        """C{https://host/api} + C{/v1/x} gives C{https://host/api/v1/x}."""
        self.assertEqual(_join("https://host/api", b"/vllm/v1/x?a=1"), b"https://host/api/v1/x?a=1")

    def test_trailingSlashOnBase(self) -> None:
        """A base URL's trailing slash does not double up."""
        from lmgate.config import settingsFrom

        settings = settingsFrom({"providers": {"vllm": {"upstream": "http://h:8000/api/", "format": "openai"}}}, "t", {})
        self.assertEqual(Provider(settings.providers["vllm"]).upstreamURL(b"/v1", None), b"http://h:8000/api/v1")

    def test_hostNeverChanges(self) -> None:
        """Whatever the path holds, the URL's scheme, host and port are the upstream's."""
        from urllib.parse import urlsplit

        for target in [b"/p/@x:1/y", b"/p/:80/y", b"/p/%40evil/y", b"/p//x", b"/p/x?http://evil/"]:
            parts = urlsplit(_join("https://up.example:8443/base", target).decode())
            self.assertEqual((parts.scheme, parts.hostname, parts.port), ("https", "up.example", 8443), target)
            self.assertTrue(parts.path.startswith("/base/"), target)


class RoutingPropertyTests(SynchronousTestCase):
    """Whatever bytes a request target holds, it is refused or stays under the base path."""

    def test_anyTargetStaysUnderTheBase(self) -> None:
        from urllib.parse import unquote, urlsplit

        from hypothesis import given, settings, strategies as st

        alphabet = st.sampled_from(
            [b"/", b".", b"..", b"%2e", b"%2E", b"%2f", b"%2F", b"%5c", b"\\", b"@", b":", b"?", b"#", b"%",
             b"%25", b"a", b"v1", b"%00", b" ", b"\x7f", b"//", b"http:", b"openai", b";", b"&", b"="]
        )

        @settings(max_examples=500, deadline=None)
        @given(st.lists(alphabet, max_size=12))
        def check(parts: list[bytes]) -> None:
            target = b"/openai" + b"".join(parts)
            try:
                name, rest, query = splitTarget(target)
            except RouteError:
                return
            if name != b"openai":
                return
            url = Provider(ProviderSettings("openai", "https://up.example:8443/base", "openai")).upstreamURL(rest, query)
            parts_ = urlsplit(url.decode("latin-1"))
            self.assertEqual((parts_.scheme, parts_.hostname, parts_.port), ("https", "up.example", 8443))
            path = parts_.path
            self.assertTrue(path == "/base" or path.startswith("/base/"), url)
            # no segment, even decoded (once or twice), climbs out of the base
            for decoded in (path, unquote(path), unquote(unquote(path))):
                segments = decoded.replace("\\", "/").split("/")
                self.assertNotIn("..", segments, url)

        check()
