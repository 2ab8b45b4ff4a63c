"""
Routing: the raw request target picks a provider, and nothing in it can send a
request anywhere but under the configured upstream's base path.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from lmgate.config import ProviderSettings
from lmgate.gate.routing import RouteError, splitTarget
from lmgate.gate.providers import Provider


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


def _provider(upstream: str) -> Provider:
    """A route as the configuration builds it (trailing slashes dropped by the config check)."""
    from lmgate.config import settingsFrom

    settings = settingsFrom({"providers": {"p": {"upstream": upstream, "format": "openai"}}}, "t", {})
    return Provider(settings.providers["p"])


class QueryStaysTheQueryTests(SynchronousTestCase):
    """A query on a route's bare prefix is the upstream's query, never its path."""

    def test_bareRouteBareUpstream(self) -> None:
        """On an upstream with no base path, C{/openai?...} goes to C{/?...}."""
        for upstream in ("https://api.openai.com", "https://api.openai.com/"):
            provider = _provider(upstream)
            for target, url in [
                (b"/openai?/../../etc/passwd", b"https://api.openai.com/?/../../etc/passwd"),
                (b"/openai?x=1", b"https://api.openai.com/?x=1"),
                (b"/openai", b"https://api.openai.com/"),
                (b"/openai/?x", b"https://api.openai.com/?x"),
            ]:
                self.assertEqual(provider.upstreamURL(*splitTarget(target)[1:]), url, (upstream, target))

    def test_everyRouteShape(self) -> None:
        """Each upstream shape and each request shape gives the request line the upstream sees."""
        from lmgate.relay.upstream import originAndTarget

        expected = {
            "http://h:8000": [b"/", b"/", b"/?x", b"/?x", b"/v1/x?y"],
            "http://h:8000/": [b"/", b"/", b"/?x", b"/?x", b"/v1/x?y"],
            "http://h:8000/base": [b"/base", b"/base/", b"/base?x", b"/base/?x", b"/base/v1/x?y"],
            "http://h:8000/base/": [b"/base", b"/base/", b"/base?x", b"/base/?x", b"/base/v1/x?y"],
        }
        targets = [b"/p", b"/p/", b"/p?x", b"/p/?x", b"/p/v1/x?y"]
        for upstream, lines in expected.items():
            provider = _provider(upstream)
            for target, line in zip(targets, lines):
                name, rest, query = splitTarget(target)
                self.assertEqual(originAndTarget(provider.upstreamURL(rest, query)), (b"http://h:8000", line), (upstream, target))


class OriginAndTargetTests(SynchronousTestCase):
    def test_authorityEndsAtQueryOrFragment(self) -> None:
        """The relay's split ends the authority at C{/}, C{?} or C{#}, as RFC 3986 does: a
        slash inside a query right after the host is never taken for the path."""
        from lmgate.relay.upstream import originAndTarget

        self.assertEqual(originAndTarget(b"http://h:1?/../../etc/passwd"), (b"http://h:1", b"/?/../../etc/passwd"))
        self.assertEqual(originAndTarget(b"http://h:1?x=1"), (b"http://h:1", b"/?x=1"))
        self.assertEqual(originAndTarget(b"http://h:1"), (b"http://h:1", b"/"))
        self.assertEqual(originAndTarget(b"https://h/a/b?c/d"), (b"https://h", b"/a/b?c/d"))
        self.assertEqual(originAndTarget(b"https://[::1]:8/a"), (b"https://[::1]:8", b"/a"))


class UpstreamURLPropertyTests(SynchronousTestCase):
    """
    For any upstream shape and any request target the router accepts, the upstream
    URL, read the way Twisted's Agent reads it (C{URI.fromBytes}) and the way the
    relay splits it, has the upstream's scheme, host and port, the base path followed
    by the rest (never above the base), and exactly the client's raw query.
    """

    def test_joinedURL(self) -> None:
        from hypothesis import given, settings, strategies as st
        from twisted.web.client import URI

        from lmgate.relay.upstream import originAndTarget

        hosts = st.sampled_from(["api.example", "127.0.0.1", "[::1]", "h-1.example"])
        ports = st.sampled_from(["", ":8443", ":1"])
        basePaths = st.sampled_from(["", "/", "/base", "/base/", "/a/b", "/a/b/", "/v1%2Fx", "/@x:1"])
        segment = st.sampled_from([b"", b"v1", b"x", b"a.b", b"..x", b"%41", b"@h", b":80", b"c;d", b"~", b"models", b"%3A"])
        queryChars = st.sampled_from([b"", b"x", b"=", b"&", b"/", b"..", b"?", b"%2F", b"@", b":", b"http://evil/", b";", b"key"])

        @settings(max_examples=600, deadline=None)
        @given(
            st.sampled_from(["http", "https"]), hosts, ports, basePaths,
            st.lists(segment, max_size=5), st.booleans(), st.one_of(st.none(), st.lists(queryChars, max_size=8)),
        )
        def check(
            scheme: str, host: str, port: str, basePath: str, segments: list[bytes], slashAfter: bool,
            queryParts: list[bytes] | None,
        ) -> None:
            base = f"{scheme}://{host}{port}{basePath}"
            path = b"/p" + b"".join(b"/" + s for s in segments) + (b"/" if slashAfter else b"")
            query = None if queryParts is None else b"".join(queryParts)
            target = path if query is None else path + b"?" + query
            try:
                name, rest, gotQuery = splitTarget(target)
            except RouteError:
                return
            self.assertEqual(gotQuery, query)
            url = _provider(base).upstreamURL(rest, gotQuery)
            baseURI = URI.fromBytes(base.encode())
            parsed = URI.fromBytes(url)
            self.assertEqual((parsed.scheme, parsed.host, parsed.port), (baseURI.scheme, baseURI.host, baseURI.port), url)
            basePrefix = basePath.rstrip("/").encode()
            fullPath = parsed.path + (b";" + parsed.params if parsed.params else b"")
            self.assertEqual(fullPath, (basePrefix + rest) or b"/", url)
            self.assertEqual(parsed.query, query or b"", url)
            self.assertNotIn(b"..", fullPath.split(b"/"))
            expectedTarget = fullPath + (b"" if query is None else b"?" + query)
            if query != b"":  # Agent's urlunparse drops an empty query's "?"; the relay keeps it
                self.assertEqual(parsed.originForm, expectedTarget, url)
            origin, requestTarget = originAndTarget(url)
            self.assertEqual(origin, f"{scheme}://{host}{port}".encode(), url)
            self.assertEqual(requestTarget, expectedTarget, url)

        check()
