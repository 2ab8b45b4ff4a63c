"""
Settings: a YAML file, overridden by C{LMGATE_*} environment variables, checked
whole at start-up and frozen.

Every key has a default, so a file may give any subset. Key names are a
contract with operators (extend, never rename); docs/configuration.md lists them.
A problem becomes one L{ConfigError} line naming the file, the key and what is
wrong, e.g. C{etc/lmgate.yaml: timeouts.connect: must be a number > 0, got 'x'}.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import yaml

from lmgate.errors import ConfigError
from lmgate.governance.aliases import (
    Alias,
    AliasConfigError,
    FallbackSettings,
    parseFallback,
    parseModels,
    parseOpenAIPath,
)
from lmgate.limits.settings import LimitsConfigError, LimitsSettings, parseUsageLimits
from lmgate.policy.settings import (
    AuditSettings,
    PolicyConfigError,
    PolicySettings,
    TelemetrySettings,
    parseAudit,
    parsePolicy,
    parseTelemetry,
)

#: The response formats LMGate reads usage from.
FORMATS = ("openai", "anthropic", "google", "bedrock")

#: Provider names with a built-in format; any other name needs C{format}.
BUILTIN_FORMATS: Mapping[str, str] = {
    "openai": "openai",
    "azure": "openai",
    "anthropic": "anthropic",
    "gemini": "google",
    "google": "google",
    "vertex": "google",
    "bedrock": "bedrock",
}

#: The providers served when the configuration has no C{providers} section.
DEFAULT_PROVIDERS: Mapping[str, Mapping[str, Any]] = {
    "openai": {"upstream": "https://api.openai.com"},
    "anthropic": {"upstream": "https://api.anthropic.com"},
    "gemini": {"upstream": "https://generativelanguage.googleapis.com"},
    "google": {"upstream": "https://aiplatform.googleapis.com"},
    "bedrock": {"upstream": "https://bedrock-runtime.us-east-1.amazonaws.com"},
}

ENV_PREFIX = "LMGATE_"
#: Environment variables that are not configuration keys.
ENV_NOT_KEYS = frozenset({"LMGATE_CONFIG", "LMGATE_DEFAULTS"})  # the tac's config path; the init script's defaults file

_PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
#: Path prefixes that are not routes: the health check and the unified OpenAI-format endpoint.
_RESERVED_NAMES = frozenset({"healthz", "v1"})


#: What C{credentials.missing} may say: refuse to start, or serve the route from the stub.
MISSING_POLICIES = ("refuse", "stub")


@dataclass(frozen=True)
class AwsCredentialSettings:
    """
    C{credentials.aws}: Bedrock requests signed with SigV4 by LMGate.

    @ivar region: the signing region (default: from the upstream host
        C{bedrock-runtime.<region>.amazonaws.com}).
    @ivar profile: the shared-config profile to take credentials from, or None.
    """

    region: str
    profile: str | None = None


@dataclass(frozen=True)
class GoogleCredentialSettings:
    """
    C{credentials.google}: Vertex AI OAuth access tokens fetched by LMGate.

    @ivar serviceAccountFile: a service account's JSON key file, or None for
        the application default credentials.
    @ivar scopes: the OAuth scopes asked for (empty: the library's default).
    """

    serviceAccountFile: str | None = None
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True)
class CredentialSettings:
    """
    C{providers.<name>.credentials}: the provider credential LMGate holds for a
    managed route (the client's own credential is then never relayed).

    Exactly one of C{env}, C{file}, C{aws}, C{google} is set.

    @ivar env: the environment variable holding the key.
    @ivar file: the file whose first line is the key (re-read on SIGHUP).
    @ivar missing: C{refuse} (a missing key stops start-up) or C{stub} (the
        route is served by the embedded stub upstream).
    @ivar header: the request header the key goes in (C{env}/C{file} only).
    @ivar scheme: the word before the key in that header (C{Bearer}), or None.
    """

    env: str | None = None
    file: str | None = None
    missing: str = "refuse"
    header: str | None = None
    scheme: str | None = None
    aws: AwsCredentialSettings | None = None
    google: GoogleCredentialSettings | None = None

    @property
    def kind(self) -> str:
        """Which source: C{env}, C{file}, C{aws} or C{google}."""
        for kind in ("env", "file", "aws", "google"):
            if getattr(self, kind) is not None:
                return kind
        raise AssertionError("a credential with no source")  # the schema requires one

    def __repr__(self) -> str:  # names where the key is, never the key: there is none here anyway
        return f"<CredentialSettings {self.kind} missing={self.missing}>"


@dataclass(frozen=True)
class HealthSettings:
    """
    C{providers.<name>.health}: an active probe of the route's upstream
    (L{lmgate.governance.health.HealthProbes}).

    @ivar path: appended to the route's upstream URL as given (its path and
        query, plain ASCII): C{GET <upstream><path>}.
    @ivar interval: seconds between probes (the first at start and on reload).
    @ivar timeout: seconds a probe may take to get a response head, or None
        for C{min(interval, timeouts.response)}.
    """

    path: str
    interval: float = 10.0
    timeout: float | None = None


@dataclass(frozen=True)
class ProviderSettings:
    """
    One route: C{/<name>/...} is relayed to C{upstream} and read as C{format}.

    @ivar credentials: the provider credential LMGate adds (a managed route),
        or None (a pass-through route: the client's key is relayed).
    @ivar openaiPath: the base path of the route's OpenAI-compatible API.
    @ivar health: the route's active health probe, or None.
    """

    name: str
    upstream: str
    format: str
    maxBody: int | None = None
    credentials: CredentialSettings | None = None
    openaiPath: str = "/v1"
    health: HealthSettings | None = None


@dataclass(frozen=True)
class Settings:
    """Everything the daemon needs, checked and frozen."""

    source: str = "<defaults>"
    listen: str = "tcp:8080:interface=0.0.0.0"
    accessLog: bool | str = True
    allowlistPath: str = "etc/allowlist.csv"
    allowlistReloadInterval: float = 30.0
    statsPath: str = "var/stats/stats.jsonl"
    statsFlushInterval: float = 1.0
    statsMaxBytes: int = 104857600
    statsCaptureLimit: int = 2097152
    statsBacklog: int = 100000
    connectTimeout: float = 10.0
    responseTimeout: float = 600.0
    idleTimeout: float = 300.0
    poolIdleTimeout: float = 30.0
    poolMaxPerHost: int = 256
    tlsCABundle: str | None = None
    stubListen: str | None = None
    drainTimeout: float = 30.0
    headerBytes: int = 65536
    headerCount: int = 100
    headerTimeout: float = 10.0
    clientTimeout: float = 60.0
    maxBody: int = 33554432
    pricesPath: str | None = "etc/prices.yaml"
    adminListen: str | None = None
    metricsModels: tuple[str, ...] = ()
    metricsPerKey: bool = False
    metricsPerKeyLimit: int = 100
    providers: Mapping[str, ProviderSettings] = field(default_factory=dict)
    #: The C{models:} section: each alias by name, in configuration order.
    models: Mapping[str, Alias] = field(default_factory=dict)
    #: The C{fallback:} section.
    fallback: FallbackSettings = field(default_factory=FallbackSettings)
    #: The C{usage_limits:} section.
    usageLimits: LimitsSettings = field(default_factory=LimitsSettings)
    #: The C{policy:} section.
    policy: PolicySettings = field(default_factory=PolicySettings)
    #: The C{audit:} section.
    audit: AuditSettings = field(default_factory=AuditSettings)
    #: The C{telemetry:} section.
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)


def accessLogPath(settings: Settings) -> str | None:
    """
    Where the access log goes: C{access_log: true} puts it beside the usage
    records (C{access.log} in C{stats.path}'s directory), a string names the
    file, C{false} turns it off (None).
    """
    if settings.accessLog is False:
        return None
    if settings.accessLog is True:
        return os.path.join(os.path.dirname(settings.statsPath), "access.log")
    return settings.accessLog


# --- the schema: one validator per leaf key ---------------------------------

Check = Callable[[Any], Any]


class _Invalid(Exception):
    """A value is wrong; the message says how."""


def _number(minimum: float = 0.0) -> Check:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= minimum:
            raise _Invalid(f"must be a number > {minimum:g}, got {value!r}")
        return float(value)

    return check


def _integer(minimum: int = 1) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _Invalid(f"must be a whole number >= {minimum}, got {value!r}")
        return value

    return check


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"must be a non-empty string, got {value!r}")
    return value


def _optionalText(value: Any) -> str | None:
    return None if value is None else _text(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {value!r}")
    return value


def _accessLog(value: Any) -> bool | str:
    if isinstance(value, bool) or (isinstance(value, str) and value.strip()):
        return value
    raise _Invalid(f"must be true, false or a file path, got {value!r}")


def _textList(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Invalid(f"must be a list of non-empty strings, got {value!r}")
    return tuple(value)


def _upstream(value: Any) -> str:
    url = _text(value)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise _Invalid(f"not a valid URL ({e}): {url!r}") from None
    if parts.scheme not in ("http", "https"):
        raise _Invalid(f"must be an http:// or https:// URL, got {url!r}")
    if not parts.hostname:
        raise _Invalid(f"has no host: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise _Invalid("must not carry credentials (user:password@)")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise _Invalid(f"must not have a query or fragment: {url!r}")
    if port == 0:
        raise _Invalid(f"port must not be 0: {url!r}")
    if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in url):
        raise _Invalid(f"must be plain ASCII without spaces: {url!r}")
    return url.rstrip("/")


def _format(value: Any) -> str:
    if value not in FORMATS:
        raise _Invalid(f"must be one of {', '.join(FORMATS)}, got {value!r}")
    return str(value)


#: section -> key -> (Settings attribute, check)
SCHEMA: Mapping[str, Any] = {
    "listen": ("listen", _text),
    "access_log": ("accessLog", _accessLog),
    "allowlist": {
        "path": ("allowlistPath", _text),
        "reload_interval": ("allowlistReloadInterval", _number()),
    },
    "stats": {
        "path": ("statsPath", _text),
        "flush_interval": ("statsFlushInterval", _number()),
        "max_bytes": ("statsMaxBytes", _integer(4096)),
        "capture_limit": ("statsCaptureLimit", _integer(1024)),
        "backlog": ("statsBacklog", _integer(1)),
    },
    "timeouts": {
        "connect": ("connectTimeout", _number()),
        "response": ("responseTimeout", _number()),
        "idle": ("idleTimeout", _number()),
        "pool_idle": ("poolIdleTimeout", _number()),
    },
    "pool": {"max_per_host": ("poolMaxPerHost", _integer(1))},
    "tls": {"ca_bundle": ("tlsCABundle", _optionalText)},
    "stub": {"listen": ("stubListen", _optionalText)},
    "shutdown": {"drain_timeout": ("drainTimeout", _number())},
    "prices": {"path": ("pricesPath", _optionalText)},
    "admin": {"listen": ("adminListen", _optionalText)},
    "metrics": {
        "models": ("metricsModels", _textList),
        "per_key": ("metricsPerKey", _flag),
        "per_key_limit": ("metricsPerKeyLimit", _integer(1)),
    },
    "limits": {
        "header_bytes": ("headerBytes", _integer(1024)),
        "header_count": ("headerCount", _integer(1)),
        "header_timeout": ("headerTimeout", _number()),
        "client_timeout": ("clientTimeout", _number()),
        "max_body": ("maxBody", _integer(0)),
    },
}

PROVIDER_KEYS = ("upstream", "format", "max_body", "credentials", "openai_path", "health")
CREDENTIAL_SOURCES = ("env", "file", "aws", "google")
CREDENTIAL_KEYS = (*CREDENTIAL_SOURCES, "missing", "header", "scheme")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_BEDROCK_HOST = re.compile(r"^bedrock-runtime(?:-fips)?\.([a-z0-9-]+)\.amazonaws\.com$")


def defaultKeyHeader(name: str, fmt: str, upstream: str) -> tuple[str, str | None]:
    """
    Where a provider takes an API key by default: C{(header, scheme)}.
    OpenAI and OpenAI-compatible APIs (and Bedrock API keys) take
    C{Authorization: Bearer}; Azure OpenAI C{api-key}; Anthropic C{x-api-key};
    the Gemini API and Vertex AI C{x-goog-api-key}.
    """
    host = (urlsplit(upstream).hostname or "").lower()
    if fmt == "anthropic":
        return "x-api-key", None
    if fmt == "google":
        return "x-goog-api-key", None
    if fmt == "openai" and (name == "azure" or host.endswith(".openai.azure.com") or host.endswith(".cognitiveservices.azure.com")):
        return "api-key", None
    return "Authorization", "Bearer"


def _credentials(source: str, key: str, name: str, fmt: str, upstream: str, raw: Any) -> CredentialSettings:
    """Check C{providers.<name>.credentials}."""
    if not isinstance(raw, dict):
        raise ConfigError(source, key, f"must be a mapping (env, file, aws or google), got {_typeName(raw)}")
    for unknown in sorted(set(raw) - set(CREDENTIAL_KEYS), key=str):
        raise ConfigError(source, f"{key}.{unknown}", "unknown key")
    given = [kind for kind in CREDENTIAL_SOURCES if kind in raw]
    if len(given) != 1:
        raise ConfigError(source, key, "needs exactly one of env, file, aws, google")
    kind = given[0]
    values: dict[str, Any] = {}
    where = key
    try:
        if kind == "env":
            where = f"{key}.env"
            value = _text(raw["env"])
            if not _ENV_NAME.match(value):
                raise _Invalid(f"must be an environment variable's name, got {value!r}")
            values["env"] = value
        elif kind == "file":
            where = f"{key}.file"
            values["file"] = _text(raw["file"])
        elif kind == "aws":
            values["aws"] = _aws(source, f"{key}.aws", upstream, raw["aws"])
        else:
            values["google"] = _google(source, f"{key}.google", raw["google"])
        where = f"{key}.missing"
        missing = raw.get("missing", "refuse")
        if missing not in MISSING_POLICIES:
            raise _Invalid(f"must be one of {', '.join(MISSING_POLICIES)}, got {missing!r}")
        values["missing"] = missing
        for option in ("header", "scheme"):
            if option in raw and kind in ("aws", "google"):
                raise ConfigError(source, f"{key}.{option}", f"only with env or file (credentials.{kind} sets its own)")
        if kind in ("env", "file"):
            header, scheme = defaultKeyHeader(name, fmt, upstream)
            if "header" in raw:
                where = f"{key}.header"
                header = _text(raw["header"])
                if not _HEADER_NAME.match(header):
                    raise _Invalid(f"must be an HTTP header name, got {header!r}")
                scheme = "Bearer" if header.lower() == "authorization" else None
            if "scheme" in raw:
                where = f"{key}.scheme"
                scheme = _optionalText(raw["scheme"])
                if scheme is not None and not _HEADER_NAME.match(scheme):
                    raise _Invalid(f"must be one word (Bearer, Token ...) or null, got {scheme!r}")
            values["header"], values["scheme"] = header, scheme
    except _Invalid as e:
        raise ConfigError(source, where, str(e)) from None
    return CredentialSettings(**values)


def _subsection(source: str, key: str, raw: Any, allowed: tuple[str, ...]) -> dict[str, Any]:
    """A mapping of optional keys (null: all defaults); anything else, or an unknown key, is refused."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(source, key, f"must be a mapping ({', '.join(allowed)}), got {_typeName(raw)}")
    for unknown in sorted(set(raw) - set(allowed), key=str):
        raise ConfigError(source, f"{key}.{unknown}", "unknown key")
    return raw


def _aws(source: str, key: str, upstream: str, raw: Any) -> AwsCredentialSettings:
    """Check C{credentials.aws}: region (default from the upstream host), profile."""
    raw = _subsection(source, key, raw, ("region", "profile"))
    try:
        region = _optionalText(raw.get("region"))
    except _Invalid as e:
        raise ConfigError(source, f"{key}.region", str(e)) from None
    if region is None:
        match = _BEDROCK_HOST.match((urlsplit(upstream).hostname or "").lower())
        if match is None:
            raise ConfigError(source, f"{key}.region", "required: the upstream host names no region (bedrock-runtime.<region>.amazonaws.com)")
        region = match.group(1)
    try:
        profile = _optionalText(raw.get("profile"))
    except _Invalid as e:
        raise ConfigError(source, f"{key}.profile", str(e)) from None
    return AwsCredentialSettings(region, profile)


def _google(source: str, key: str, raw: Any) -> GoogleCredentialSettings:
    """Check C{credentials.google}: service_account_file, scopes (both optional)."""
    raw = _subsection(source, key, raw, ("service_account_file", "scopes"))
    try:
        path = _optionalText(raw.get("service_account_file"))
    except _Invalid as e:
        raise ConfigError(source, f"{key}.service_account_file", str(e)) from None
    scopes: tuple[str, ...] = ()
    if raw.get("scopes") is not None:
        try:
            scopes = _textList(raw["scopes"])
        except _Invalid as e:
            raise ConfigError(source, f"{key}.scopes", str(e)) from None
    return GoogleCredentialSettings(path, scopes)


HEALTH_KEYS = ("path", "interval", "timeout")


def _health(source: str, key: str, raw: Any) -> HealthSettings:
    """Check C{providers.<name>.health}: path (required), interval, timeout."""
    if not isinstance(raw, dict):
        raise ConfigError(source, key, f"must be a mapping ({', '.join(HEALTH_KEYS)}), got {_typeName(raw)}")
    for unknown in sorted(set(raw) - set(HEALTH_KEYS), key=str):
        raise ConfigError(source, f"{key}.{unknown}", "unknown key")
    if "path" not in raw:
        raise ConfigError(source, f"{key}.path", "missing (the path probed, e.g. /v1/models)")
    try:
        path = _text(raw["path"])
        if not path.startswith("/"):
            raise _Invalid(f"must start with '/', got {path!r}")
        if any(ord(c) <= 0x20 or ord(c) >= 0x7F for c in path) or "#" in path:
            raise _Invalid(f"must be plain ASCII without spaces or fragment, got {path!r}")
    except _Invalid as e:
        raise ConfigError(source, f"{key}.path", str(e)) from None
    values: dict[str, float] = {}
    for option in ("interval", "timeout"):
        if raw.get(option) is not None:
            try:
                values[option] = _number()(raw[option])
            except _Invalid as e:
                raise ConfigError(source, f"{key}.{option}", str(e)) from None
    return HealthSettings(path, **values)


def _typeName(value: Any) -> str:
    return "a mapping" if isinstance(value, dict) else type(value).__name__


def _environmentKey(name: str) -> list[str] | None:
    """
    The configuration key an C{LMGATE_*} variable names (C{LMGATE_STATS__PATH}:
    C{["stats", "path"]}), or None when it names none: a section and key of the
    schema, a whole section, C{providers.<name>[.<provider key>]}, or one of
    C{usage_limits}' plain keys (C{LMGATE_USAGE_LIMITS__STORE}).
    """
    path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
    if not all(path):
        return None
    spec = SCHEMA.get(path[0])
    if path[0] == "providers":
        known = len(path) <= 2 or (len(path) == 3 and path[2] in PROVIDER_KEYS)
    elif path[0] == "usage_limits":  # the store's URL (it may carry a password) and the plain values
        known = len(path) == 2 and path[1] in ("store", "on_store_error", "lease_seconds", "key_prefix")
    elif path[0] == "policy":
        known = path[1:] in (["stream_usage"], ["plugin_timeout"])
    elif path[0] == "audit":
        known = path[1:] in (["path"], ["max_body"], ["backlog"])
    elif path[0] == "telemetry":
        known = path[1:] in (["otlp", "endpoint"], ["otlp", "service_name"])
    elif isinstance(spec, tuple):
        known = len(path) == 1
    elif spec is not None:
        known = len(path) == 1 or (len(path) == 2 and path[1] in spec)
    else:
        known = False
    return path if known else None


def ignoredEnvironment(environ: Mapping[str, str]) -> list[str]:
    """
    The C{LMGATE_*} variables that name no configuration key, sorted. They are
    ignored rather than refused: a Kubernetes Service named C{lmgate} puts
    C{LMGATE_PORT=tcp://...}, C{LMGATE_SERVICE_HOST} and the like into every
    pod's environment. The daemon names them in one warning at start-up.
    """
    return sorted(
        name
        for name in environ
        if name.startswith(ENV_PREFIX) and name not in ENV_NOT_KEYS and _environmentKey(name) is None
    )


def _applyEnvironment(raw: dict[str, Any], environ: Mapping[str, str]) -> dict[str, str]:
    """
    Fold C{LMGATE_A__B=value} into C{raw["a"]["b"]}, the value read as a YAML scalar.
    Variables that name no configuration key are left out (L{ignoredEnvironment}).

    @return: which dotted key came from which variable, so errors can name it.
    """
    origins: dict[str, str] = {}
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_KEYS:
            continue
        path = _environmentKey(name)
        if path is None:
            continue
        where = f"{name} (environment)"
        try:
            value = yaml.safe_load(environ[name]) if environ[name] != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(where, None, f"not a YAML scalar: {e}") from None
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(where, ".".join(path[: i + 1]), "is not a section")
            node = child
        node[path[-1]] = value
        origins[".".join(path)] = name
    return origins


def _providers(source: str, raw: Any) -> dict[str, ProviderSettings]:
    if not isinstance(raw, dict):
        raise ConfigError(source, "providers", f"must be a mapping, got {_typeName(raw)}")
    providers = {}
    for name, entry in raw.items():
        key = f"providers.{name}"
        if not isinstance(name, str) or not _PROVIDER_NAME.match(name) or name in _RESERVED_NAMES:
            raise ConfigError(
                source, key, "a provider name is lower-case letters, digits, '_', '-', '.' (not 'healthz' or 'v1')"
            )
        if not isinstance(entry, dict):
            raise ConfigError(source, key, f"must be a mapping, got {_typeName(entry)}")
        for unknown in sorted(set(entry) - set(PROVIDER_KEYS), key=str):
            raise ConfigError(source, f"{key}.{unknown}", "unknown key")
        if "upstream" not in entry:
            raise ConfigError(source, f"{key}.upstream", "missing (the provider's base URL)")
        try:
            upstream = _upstream(entry["upstream"])
        except _Invalid as e:
            raise ConfigError(source, f"{key}.upstream", str(e)) from None
        if "format" in entry:
            try:
                fmt = _format(entry["format"])
            except _Invalid as e:
                raise ConfigError(source, f"{key}.format", str(e)) from None
        elif name in BUILTIN_FORMATS:
            fmt = BUILTIN_FORMATS[name]
        else:
            raise ConfigError(
                source, f"{key}.format", f"required for a custom provider name: one of {', '.join(FORMATS)}"
            )
        maxBody = None
        if entry.get("max_body") is not None:
            try:
                maxBody = _integer(0)(entry["max_body"])
            except _Invalid as e:
                raise ConfigError(source, f"{key}.max_body", str(e)) from None
        credentials = None
        if entry.get("credentials") is not None:
            credentials = _credentials(source, f"{key}.credentials", name, fmt, upstream, entry["credentials"])
        try:
            openaiPath = parseOpenAIPath(entry.get("openai_path"), f"{key}.openai_path")
        except AliasConfigError as e:
            raise ConfigError(source, e.where, e.problem) from None
        health = None
        if entry.get("health") is not None:
            health = _health(source, f"{key}.health", entry["health"])
        providers[name] = ProviderSettings(name, upstream, fmt, maxBody, credentials, openaiPath, health)
    return providers


def settingsFrom(
    raw: Any, source: str, environ: Mapping[str, str] | None = None
) -> Settings:
    """
    Check a parsed configuration (with the environment folded in) and freeze it.

    @param raw: the parsed YAML document (L{None} for an empty file).
    @param source: the file name, for error lines.
    @raise ConfigError: naming the first wrong key.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, None, f"must be a YAML mapping, got {_typeName(raw)}")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    if raw.get("providers") is None:
        # no providers section: the built-in ones, which the environment may amend
        raw["providers"] = {name: dict(entry) for name, entry in DEFAULT_PROVIDERS.items()}
    elif isinstance(raw["providers"], dict):
        raw["providers"] = {
            name: (dict(entry) if isinstance(entry, dict) else entry)
            for name, entry in raw["providers"].items()
        }
    origins = _applyEnvironment(raw, os.environ if environ is None else environ)
    try:
        return _check(raw, source)
    except ConfigError as e:
        if e.where in origins:  # the value came from the environment: name the variable
            raise ConfigError(f"{origins[e.where]} (environment)", e.where, e.problem) from None
        raise


def _check(raw: dict[str, Any], source: str) -> Settings:
    values: dict[str, Any] = {"source": source}
    for key, value in raw.items():
        if key in ("providers", "models", "fallback", "usage_limits", "policy", "audit", "telemetry"):
            continue
        spec = SCHEMA.get(key) if isinstance(key, str) else None
        if spec is None:
            raise ConfigError(source, str(key), "unknown key")
        if isinstance(spec, tuple):
            attribute, check = spec
            try:
                values[attribute] = check(value)
            except _Invalid as e:
                raise ConfigError(source, key, str(e)) from None
            continue
        if value is None:
            continue  # an empty section keeps its defaults
        if not isinstance(value, dict):
            raise ConfigError(source, key, f"must be a mapping, got {_typeName(value)}")
        for subkey, subvalue in value.items():
            where = f"{key}.{subkey}"
            if subkey not in spec:
                raise ConfigError(source, where, "unknown key")
            attribute, check = spec[subkey]
            try:
                values[attribute] = check(subvalue)
            except _Invalid as e:
                raise ConfigError(source, where, str(e)) from None
    providers = values["providers"] = _providers(source, raw["providers"])
    try:
        values["models"] = parseModels(raw.get("models"), {name: p.format for name, p in providers.items()})
        values["fallback"] = parseFallback(raw.get("fallback"))
    except AliasConfigError as e:
        raise ConfigError(source, e.where, e.problem) from None
    try:
        values["usageLimits"] = parseUsageLimits(raw.get("usage_limits"))
    except LimitsConfigError as e:
        raise ConfigError(source, e.where, e.problem) from None
    try:
        values["policy"] = parsePolicy(raw.get("policy"))
        values["audit"] = parseAudit(raw.get("audit"))
        values["telemetry"] = parseTelemetry(raw.get("telemetry"))
    except PolicyConfigError as e:
        raise ConfigError(source, e.where, e.problem) from None
    return Settings(**values)


def loadSettings(path: str, environ: Mapping[str, str] | None = None) -> Settings:
    """
    Read, override and check the configuration file at C{path}.

    @raise ConfigError: the file cannot be read or parsed, or a key is wrong.
    """
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(path, None, f"cannot read: {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else None
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(path, where, f"not valid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(path, None, "not UTF-8 text") from None
    return settingsFrom(raw, path, environ)
