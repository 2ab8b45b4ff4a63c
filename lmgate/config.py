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
_RESERVED_NAMES = frozenset({"healthz"})


@dataclass(frozen=True)
class ProviderSettings:
    """
    One route: C{/<name>/...} is relayed to C{upstream} and read as C{format}.
    """

    name: str
    upstream: str
    format: str
    maxBody: int | None = None


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

PROVIDER_KEYS = ("upstream", "format", "max_body")


def _typeName(value: Any) -> str:
    return "a mapping" if isinstance(value, dict) else type(value).__name__


def _environmentKey(name: str) -> list[str] | None:
    """
    The configuration key an C{LMGATE_*} variable names (C{LMGATE_STATS__PATH}:
    C{["stats", "path"]}), or None when it names none: a section and key of the
    schema, a whole section, or C{providers.<name>[.<provider key>]}.
    """
    path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
    if not all(path):
        return None
    spec = SCHEMA.get(path[0])
    if path[0] == "providers":
        known = len(path) <= 2 or (len(path) == 3 and path[2] in PROVIDER_KEYS)
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
                source, key, "a provider name is lower-case letters, digits, '_', '-', '.' (not 'healthz')"
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
        providers[name] = ProviderSettings(name, upstream, fmt, maxBody)
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
        if key == "providers":
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
    values["providers"] = _providers(source, raw["providers"])
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
