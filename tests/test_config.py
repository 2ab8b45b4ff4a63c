"""Configuration: defaults, validation with one clear line, and environment overrides."""

from __future__ import annotations

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from lmgate.config import DEFAULT_PROVIDERS, Settings, loadSettings, settingsFrom
from lmgate.errors import ConfigError


class ConfigTests(SynchronousTestCase):
    def load(self, text: str, environ: dict[str, str] | None = None) -> Settings:
        path = FilePath(self.mktemp())
        path.setContent(text.encode())
        return loadSettings(path.path, environ or {})

    def problem(self, text: str, environ: dict[str, str] | None = None) -> str:
        with self.assertRaises(ConfigError) as e:
            self.load(text, environ)
        message = str(e.exception)
        self.assertNotIn("\n", message)
        return message.split(": ", 1)[1]

    def test_emptyFileIsAllDefaults(self) -> None:
        """An empty file gives every default, and the five built-in providers."""
        settings = self.load("")
        self.assertEqual(settings.listen, "tcp:8080:interface=0.0.0.0")
        self.assertEqual(settings.responseTimeout, 600.0)
        self.assertEqual(sorted(settings.providers), sorted(DEFAULT_PROVIDERS))
        self.assertEqual(settings.providers["gemini"].format, "google")

    def test_subsetKeepsOtherDefaults(self) -> None:
        """C{timeouts: {response: 3}} alone is valid; the other timeouts keep their defaults."""
        settings = self.load("timeouts: {response: 3}\n")
        self.assertEqual((settings.responseTimeout, settings.connectTimeout, settings.idleTimeout), (3.0, 10.0, 300.0))

    def test_exampleFileLoads(self) -> None:
        """The shipped etc/lmgate.yaml is valid."""
        example = FilePath(__file__).parent().parent().child("etc").child("lmgate.yaml")
        settings = loadSettings(example.path, {})
        self.assertEqual(settings.providers["openai"].upstream, "https://api.openai.com")

    def test_providersSectionReplacesDefaults(self) -> None:
        """A providers section lists exactly the routes served; custom names need a format."""
        settings = self.load(
            "providers:\n"
            "  azure: {upstream: 'https://r.openai.azure.com'}\n"
            "  vllm: {upstream: 'http://10.0.0.5:8000/', format: openai}\n"
        )
        self.assertEqual(sorted(settings.providers), ["azure", "vllm"])
        self.assertEqual(settings.providers["azure"].format, "openai")
        self.assertEqual(settings.providers["vllm"].upstream, "http://10.0.0.5:8000")

    def test_environmentOverrides(self) -> None:
        """C{LMGATE_A__B} overrides C{a.b}; values are YAML scalars; new providers can be added."""
        settings = self.load(
            "listen: 'tcp:1'\n",
            {
                "LMGATE_LISTEN": "tcp:9000",
                "LMGATE_STATS__PATH": "/tmp/x.jsonl",
                "LMGATE_TIMEOUTS__RESPONSE": "2.5",
                "LMGATE_ACCESS_LOG": "false",
                "LMGATE_PROVIDERS__OPENAI__UPSTREAM": "https://proxy.internal",
                "LMGATE_PROVIDERS__VLLM__UPSTREAM": "http://127.0.0.1:8000",
                "LMGATE_PROVIDERS__VLLM__FORMAT": "openai",
                "LMGATE_CONFIG": "ignored.yaml",
                "OTHER": "x",
            },
        )
        self.assertEqual(settings.listen, "tcp:9000")
        self.assertEqual(settings.statsPath, "/tmp/x.jsonl")
        self.assertEqual(settings.responseTimeout, 2.5)
        self.assertFalse(settings.accessLog)
        self.assertEqual(settings.providers["openai"].upstream, "https://proxy.internal")
        self.assertEqual(settings.providers["vllm"].format, "openai")
        self.assertIn("anthropic", settings.providers)  # the defaults are amended, not replaced

    def test_accessLogPath(self) -> None:
        """C{access_log: true} is C{access.log} beside the records; a string names the file; false is off."""
        from lmgate.config import accessLogPath

        stats = "stats: {path: /srv/lmgate/stats/stats.jsonl}\n"
        self.assertEqual(accessLogPath(self.load(stats)), "/srv/lmgate/stats/access.log")
        self.assertEqual(accessLogPath(self.load(stats + "access_log: true\n")), "/srv/lmgate/stats/access.log")
        self.assertEqual(accessLogPath(self.load(stats + "access_log: /var/log/lmgate/access.log\n")), "/var/log/lmgate/access.log")
        self.assertIsNone(accessLogPath(self.load(stats + "access_log: false\n")))
        self.assertIsNone(accessLogPath(self.load(stats, {"LMGATE_ACCESS_LOG": "false"})))

    def test_errorsNameFileKeyAndProblem(self) -> None:
        """Unknown keys, wrong types and bad values give one line: file, key, problem."""
        cases = {
            "lissen: x\n": "lissen: unknown key",
            "timeouts: {connect: fast}\n": "timeouts.connect: must be a number > 0, got 'fast'",
            "timeouts: {connect: 0}\n": "timeouts.connect: must be a number > 0, got 0",
            "timeouts: {nap: 1}\n": "timeouts.nap: unknown key",
            "timeouts: 5\n": "timeouts: must be a mapping, got int",
            "stats: {max_bytes: true}\n": "stats.max_bytes: must be a whole number >= 4096, got True",
            "access_log: 1\n": "access_log: must be true, false or a file path, got 1",
            "access_log: ''\n": "access_log: must be true, false or a file path, got ''",
            "providers: {x: {upstream: 'http://h'}}\n": "providers.x.format: required for a custom provider name",
            "providers: {openai: {upstream: 'ftp://h'}}\n": "providers.openai.upstream: must be an http:// or https:// URL",
            "providers: {openai: {upstream: 'http://u:p@h'}}\n": "providers.openai.upstream: must not carry credentials",
            "providers: {openai: {upstream: 'http://h/?a=1'}}\n": "providers.openai.upstream: must not have a query",
            "providers: {openai: {}}\n": "providers.openai.upstream: missing",
            "providers: {openai: {upstream: 'http://h', fmt: x}}\n": "providers.openai.fmt: unknown key",
            "providers: {openai: {upstream: 'http://h', format: cohere}}\n": "providers.openai.format: must be one of",
            "providers: {Open AI: {upstream: 'http://h'}}\n": "providers.Open AI: a provider name is",
            "providers: {healthz: {upstream: 'http://h', format: openai}}\n": "providers.healthz: a provider name is",
            "providers: {v1: {upstream: 'http://h', format: openai}}\n": "providers.v1: a provider name is",
            "models: {fast: {targets: [{provider: nope, model: m}]}}\n": "models.fast.targets[0].provider: unknown provider 'nope'",
            "models: {fast: {targets: []}}\n": "models.fast.targets: must be a non-empty list",
            "models: [a]\n": "models: must be a mapping of alias names",
            "fallback: {on: [200]}\n": "fallback.on[0]: must be an HTTP status 400-599",
            "fallback: {cooldown: {failures: 0}}\n": "fallback.cooldown.failures: must be a whole number >= 1",
            "fallback: {retry: 1}\n": "fallback.retry: unknown key",
            "- a\n- b\n": "must be a YAML mapping, got list",
            "listen: [\n": "line 2: not valid YAML",
        }
        for text, expected in cases.items():
            self.assertTrue(self.problem(text).startswith(expected), (text, self.problem(text)))

    def test_modelsAndFallback(self) -> None:
        """The top-level C{models:} and C{fallback:} sections become the settings'
        aliases (configuration order) and fallback values; absent, no aliases and
        the default fallback."""
        settings = self.load(
            "providers: {openai: {upstream: 'http://h'}, anthropic: {upstream: 'http://a'}}\n"
            "models:\n"
            "  default-chat: {targets: [{provider: openai, model: gpt-4o-mini}, {provider: anthropic, model: claude}]}\n"
            "  embed: {targets: [{provider: openai, model: text-embedding-3-small}]}\n"
        )
        self.assertEqual(list(settings.models), ["default-chat", "embed"])
        self.assertEqual([t.provider for t in settings.models["default-chat"].targets], ["openai", "anthropic"])
        fallback = self.load("fallback: {on: [429, connect], cooldown: {failures: 2, window: 10, seconds: 5}}\n").fallback
        self.assertEqual(fallback.on, (429, "connect"))
        self.assertEqual((fallback.failures, fallback.window, fallback.seconds), (2, 10.0, 5.0))
        plain = self.load("listen: tcp:1\n")
        self.assertEqual((dict(plain.models), plain.fallback.on), ({}, (429, 500, 502, 503, 504, "connect", "timeout")))

    def test_environmentErrorsNameTheVariable(self) -> None:
        """A bad override names the variable."""
        with self.assertRaises(ConfigError) as e:
            settingsFrom({}, "f.yaml", {"LMGATE_TIMEOUTS__RESPONSE": "soon"})
        self.assertEqual(
            str(e.exception), "LMGATE_TIMEOUTS__RESPONSE (environment): timeouts.response: must be a number > 0, got 'soon'"
        )

    def test_environmentNamesThatAreNoKeyAreIgnored(self) -> None:
        """
        Variables that name no configuration key (what a Kubernetes Service named
        C{lmgate} injects, a key under a plain value, an unknown key) are left
        out and listed by L{ignoredEnvironment}; real keys still apply.
        """
        from lmgate.config import ignoredEnvironment

        environ = {
            "LMGATE_PORT": "tcp://10.0.0.1:8080",
            "LMGATE_PORT_8080_TCP": "tcp://10.0.0.1:8080",
            "LMGATE_PORT_8080_TCP_ADDR": "10.0.0.1",
            "LMGATE_PORT_8080_TCP_PORT": "8080",
            "LMGATE_PORT_8080_TCP_PROTO": "tcp",
            "LMGATE_SERVICE_HOST": "10.0.0.1",
            "LMGATE_SERVICE_PORT": "8080",
            "LMGATE_LISTEN__PORT": "1",
            "LMGATE_TIMEOUTS__NAP": "1",
            "LMGATE_PROVIDERS__OPENAI__FMT": "x",
            "LMGATE_STATS____PATH": "x",
            "LMGATE_TIMEOUTS__RESPONSE": "7",
            "LMGATE_PROVIDERS__VLLM__UPSTREAM": "http://127.0.0.1:8000",
            "LMGATE_PROVIDERS__VLLM__FORMAT": "openai",
            "LMGATE_CONFIG": "x.yaml",
        }
        settings = settingsFrom({"listen": "tcp:1"}, "f.yaml", environ)
        self.assertEqual((settings.listen, settings.responseTimeout), ("tcp:1", 7.0))
        self.assertEqual(settings.providers["vllm"].format, "openai")
        self.assertEqual(
            ignoredEnvironment(environ),
            ["LMGATE_LISTEN__PORT", "LMGATE_PORT", "LMGATE_PORT_8080_TCP", "LMGATE_PORT_8080_TCP_ADDR",
             "LMGATE_PORT_8080_TCP_PORT", "LMGATE_PORT_8080_TCP_PROTO", "LMGATE_PROVIDERS__OPENAI__FMT",
             "LMGATE_SERVICE_HOST", "LMGATE_SERVICE_PORT", "LMGATE_STATS____PATH", "LMGATE_TIMEOUTS__NAP"],
        )

    def test_unreadableFile(self) -> None:
        """A missing file is one line naming it."""
        with self.assertRaises(ConfigError) as e:
            loadSettings("/nonexistent/lmgate.yaml", {})
        self.assertEqual(str(e.exception), "/nonexistent/lmgate.yaml: cannot read: No such file or directory")
