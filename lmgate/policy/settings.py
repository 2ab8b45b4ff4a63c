"""
The C{policy:}, C{audit:} and C{telemetry:} sections, checked and frozen
(docs/policy.md lists every key).

Pure: no Twisted. L{parsePolicy}, L{parseAudit} and L{parseTelemetry} raise
L{PolicyConfigError} naming the key; the configuration turns it into one
start-up line naming the file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit

from lmgate.sections import (
    SectionError,
    flag as _flag,
    mapping as _mapping,
    noUnknownKeys as _noUnknown,
    strings as _strings,
    typeName as _typeName,
    wholeNumber as _wholeNumber,
)

MATCH_KEYS = ("key", "owner", "provider", "method", "path", "model", "alias")
RULE_KEYS = ("name", "match", "allow_models", "deny", "max_input_tokens", "max_output_tokens", "audit", "tags")
POLICY_KEYS = ("rules", "stream_usage", "plugins", "plugin_timeout")
PLUGIN_KEYS = ("factory", "options")
AUDIT_KEYS = ("path", "max_body", "backlog")
TELEMETRY_KEYS = ("otlp",)
OTLP_KEYS = ("endpoint", "headers", "service_name")
_RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,62}$")
_FACTORY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


#: A C{policy}, C{audit} or C{telemetry} value is wrong (C{where}: the dotted key; C{problem}: one line).
PolicyConfigError = SectionError


@dataclass(frozen=True)
class PolicyMatch:
    """
    Which calls a rule applies to: every given field must match; a field may
    list several values (any of them). C{path} and C{model} are globs
    (case-sensitive); C{method} is compared upper-case; the rest exactly.
    None fields match everything.

    @ivar path: globs on the path after the route's prefix (C{/v1/batches*}).
    @ivar model: globs on the model the client asked for (an alias, or a model).
    """

    key: tuple[str, ...] | None = None
    owner: tuple[str, ...] | None = None
    provider: tuple[str, ...] | None = None
    method: tuple[str, ...] | None = None
    path: tuple[str, ...] | None = None
    model: tuple[str, ...] | None = None
    alias: tuple[str, ...] | None = None


@dataclass(frozen=True)
class PolicyRule:
    """
    One rule of C{policy.rules}.

    @ivar allowModels: globs of the models (or aliases) a matching call may
        ask for; anything else is refused 403. None: no such check.
    @ivar deny: the message a matching call is refused with (403), or None.
    @ivar maxInputTokens: a matching call's estimated input (body bytes ÷
        C{usage_limits.estimate.bytes_per_token}) past which it is refused 400.
    @ivar maxOutputTokens: the most output a matching call may ask for (its
        C{max_tokens} and the like) before it is refused 400.
    @ivar audit: matching calls' bodies go to the audit log.
    @ivar tags: labels matching calls carry into their records.
    """

    name: str
    match: PolicyMatch = field(default_factory=PolicyMatch)
    allowModels: tuple[str, ...] | None = None
    deny: str | None = None
    maxInputTokens: int | None = None
    maxOutputTokens: int | None = None
    audit: bool = False
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class PluginSettings:
    """C{policy.plugins[]}: a factory named C{module:attribute}, called with C{options} as keyword arguments."""

    factory: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PolicySettings:
    """
    The C{policy:} section. No rules and no plugins: the policy step costs one truth test.

    @ivar streamUsage: OpenAI-format streaming requests get
        C{stream_options.include_usage} added, and the extra usage chunk is
        removed from what the client receives.
    @ivar pluginTimeout: seconds a plugin may take to decide; past it the
        call is refused 503.
    """

    rules: tuple[PolicyRule, ...] = ()
    streamUsage: bool = False
    plugins: tuple[PluginSettings, ...] = ()
    pluginTimeout: float = 1.0

    @property
    def active(self) -> bool:
        return bool(self.rules or self.plugins)


@dataclass(frozen=True)
class AuditSettings:
    """
    The C{audit:} section.

    @ivar path: the audit log (rotated like the records, mode 0600).
    @ivar maxBody: bytes of each body kept; the rest is cut and said so.
    @ivar backlog: audit lines held in memory while the disk cannot take them
        (a line can hold two bodies of C{maxBody}: far fewer than the records'
        C{stats.backlog}); past it lines are dropped and the record's
        C{audited} is false.
    """

    path: str = "var/audit/audit.jsonl"
    maxBody: int = 1048576
    backlog: int = 1000


@dataclass(frozen=True)
class TelemetrySettings:
    """
    The C{telemetry:} section.

    @ivar otlpEndpoint: the OTLP/HTTP collector's base URL
        (C{http://127.0.0.1:4318}; spans go to C{<endpoint>/v1/traces}), or
        None: no traces, no cost.
    @ivar otlpHeaders: extra headers for the collector (an API key).
    @ivar serviceName: the traces' C{service.name}.
    """

    otlpEndpoint: str | None = None
    otlpHeaders: Mapping[str, str] = field(default_factory=dict)
    serviceName: str = "lmgate"

    def __repr__(self) -> str:  # headers may carry a collector's key
        return f"<TelemetrySettings otlp={self.otlpEndpoint!r}>"


def _match(where: str, raw: Any) -> PolicyMatch:
    if raw is None:
        return PolicyMatch()
    raw = _mapping(where, raw)
    _noUnknown(where, raw, MATCH_KEYS)
    values = {key: _strings(f"{where}.{key}", value) for key, value in raw.items()}
    if "method" in values:
        values["method"] = tuple(m.upper() for m in values["method"])
    if "path" in values:
        for path in values["path"]:
            if not path.startswith("/") and not path.startswith("*"):
                raise PolicyConfigError(f"{where}.path", f"a path glob starts with / (the path after the route's prefix), got {path!r}")
    return PolicyMatch(**values)


def _rule(where: str, raw: Any, names: set[str]) -> PolicyRule:
    raw = _mapping(where, raw)
    _noUnknown(where, raw, RULE_KEYS)
    name = raw.get("name")
    if not isinstance(name, str) or not _RULE_NAME.match(name):
        raise PolicyConfigError(f"{where}.name", f"must be a name of letters, digits, '_', '.', ':', '-', got {name!r}")
    if name in names:
        raise PolicyConfigError(f"{where}.name", f"{name!r} names two rules")
    names.add(name)
    values: dict[str, Any] = {"name": name, "match": _match(f"{where}.match", raw.get("match"))}
    if raw.get("allow_models") is not None:
        values["allowModels"] = _strings(f"{where}.allow_models", raw["allow_models"])
    if raw.get("deny") is not None:
        deny = raw["deny"]
        if not isinstance(deny, str) or not deny.strip():
            raise PolicyConfigError(f"{where}.deny", f"must be the message refused calls get, got {deny!r}")
        values["deny"] = deny.strip()
    for key, attribute in (("max_input_tokens", "maxInputTokens"), ("max_output_tokens", "maxOutputTokens")):
        if raw.get(key) is not None:
            values[attribute] = _wholeNumber(f"{where}.{key}", raw[key])
    if "audit" in raw:
        values["audit"] = _flag(f"{where}.audit", raw["audit"])
    if raw.get("tags") is not None:
        values["tags"] = _strings(f"{where}.tags", raw["tags"], _TAG, "tags (letters, digits, '_', '.', ':', '/', '-')")
    if not any(k in values for k in ("allowModels", "deny", "maxInputTokens", "maxOutputTokens", "audit", "tags")):
        raise PolicyConfigError(where, f"rule {name!r} does nothing (give allow_models, deny, max_input_tokens, max_output_tokens, audit or tags)")
    return PolicyRule(**values)


def _plugin(where: str, raw: Any) -> PluginSettings:
    raw = _mapping(where, raw)
    _noUnknown(where, raw, PLUGIN_KEYS)
    factory = raw.get("factory")
    if not isinstance(factory, str) or not _FACTORY.match(factory):
        raise PolicyConfigError(f"{where}.factory", f"must be module:attribute (a dotted module, a colon, a name), got {factory!r}")
    options = raw.get("options") or {}
    if not isinstance(options, dict) or not all(isinstance(k, str) and k.isidentifier() for k in options):
        raise PolicyConfigError(f"{where}.options", f"must be a mapping of keyword names to values, got {options!r}")
    return PluginSettings(factory, dict(options))


def parsePolicy(raw: Any) -> PolicySettings:
    """Check the C{policy:} section. @raise PolicyConfigError: naming the first wrong key."""
    if raw is None:
        return PolicySettings()
    raw = _mapping("policy", raw)
    _noUnknown("policy", raw, POLICY_KEYS)
    values: dict[str, Any] = {}
    rules = raw.get("rules")
    if rules is not None:
        if not isinstance(rules, list):
            raise PolicyConfigError("policy.rules", f"must be a list of rules, got {_typeName(rules)}")
        names: set[str] = set()
        values["rules"] = tuple(_rule(f"policy.rules[{i}]", rule, names) for i, rule in enumerate(rules))
    if "stream_usage" in raw:
        values["streamUsage"] = _flag("policy.stream_usage", raw["stream_usage"])
    plugins = raw.get("plugins")
    if plugins is not None:
        if not isinstance(plugins, list):
            raise PolicyConfigError("policy.plugins", f"must be a list of {{factory, options}}, got {_typeName(plugins)}")
        values["plugins"] = tuple(_plugin(f"policy.plugins[{i}]", p) for i, p in enumerate(plugins))
    if "plugin_timeout" in raw:
        timeout = raw["plugin_timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise PolicyConfigError("policy.plugin_timeout", f"must be a number of seconds > 0, got {timeout!r}")
        values["pluginTimeout"] = float(timeout)
    return PolicySettings(**values)


def parseAudit(raw: Any) -> AuditSettings:
    """Check the C{audit:} section. @raise PolicyConfigError: naming the first wrong key."""
    if raw is None:
        return AuditSettings()
    raw = _mapping("audit", raw)
    _noUnknown("audit", raw, AUDIT_KEYS)
    values: dict[str, Any] = {}
    if "path" in raw:
        path = raw["path"]
        if not isinstance(path, str) or not path.strip():
            raise PolicyConfigError("audit.path", f"must be a file path, got {path!r}")
        values["path"] = path
    if "max_body" in raw:
        values["maxBody"] = _wholeNumber("audit.max_body", raw["max_body"], 0)
    if "backlog" in raw:
        values["backlog"] = _wholeNumber("audit.backlog", raw["backlog"], 1)
    return AuditSettings(**values)


def parseTelemetry(raw: Any) -> TelemetrySettings:
    """Check the C{telemetry:} section. @raise PolicyConfigError: naming the first wrong key."""
    if raw is None:
        return TelemetrySettings()
    raw = _mapping("telemetry", raw)
    _noUnknown("telemetry", raw, TELEMETRY_KEYS)
    otlp = raw.get("otlp")
    if otlp is None:
        return TelemetrySettings()
    otlp = _mapping("telemetry.otlp", otlp)
    _noUnknown("telemetry.otlp", otlp, OTLP_KEYS)
    values: dict[str, Any] = {}
    endpoint = otlp.get("endpoint")
    if endpoint is not None:
        if not isinstance(endpoint, str):
            raise PolicyConfigError("telemetry.otlp.endpoint", f"must be an http:// or https:// URL or null, got {endpoint!r}")
        try:
            parts = urlsplit(endpoint)
            parts.port
        except ValueError as e:
            raise PolicyConfigError("telemetry.otlp.endpoint", f"not a valid URL ({e})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PolicyConfigError("telemetry.otlp.endpoint", f"must be an http:// or https:// URL or null, got {endpoint!r}")
        values["otlpEndpoint"] = endpoint.rstrip("/")
    headers = otlp.get("headers")
    if headers is not None:
        if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise PolicyConfigError("telemetry.otlp.headers", "must be a mapping of header names to strings")
        values["otlpHeaders"] = dict(headers)
    if otlp.get("service_name") is not None:
        name = otlp["service_name"]
        if not isinstance(name, str) or not name.strip():
            raise PolicyConfigError("telemetry.otlp.service_name", f"must be a non-empty string, got {name!r}")
        values["serviceName"] = name
    return TelemetrySettings(**values)
