"""
The C{usage_limits:} section, checked and frozen (docs/limits.md lists every key).

Pure: no Twisted, no store. L{parseUsageLimits} raises L{LimitsConfigError}
naming the key; the configuration turns it into one start-up line naming the
file (C{ConfigError(source, e.where, e.problem)}).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit

from lmgate.sections import (
    SectionError,
    noUnknownKeys as _noUnknown,
    positiveNumber as _positiveNumber,
    typeName as _typeName,
    wholeNumber as _wholeNumber,
)

#: The figures a rule may set (usage_limits.rules[].<kind>), in docs order.
FIGURE_KEYS = (
    "requests_per_minute",
    "tokens_per_minute",
    "concurrent",
    "tokens_per_day",
    "tokens_per_month",
    "usd_per_day",
    "usd_per_month",
)
MATCH_KEYS = ("key", "owner", "provider", "model", "alias")
PER_VALUES = ("key", "owner", "rule")
STORE_ERROR_POLICIES = ("open", "closed")
SECTION_KEYS = ("store", "redis", "on_store_error", "estimate", "rules", "lease_seconds", "key_prefix")
RULE_KEYS = ("name", "match", "per", "on_store_error") + FIGURE_KEYS
_RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,62}$")

#: Nano-dollars per dollar (the stores count dollars in whole nano-dollars).
NANO = 1_000_000_000


#: A C{usage_limits} value is wrong (C{where}: the dotted key; C{problem}: one line).
LimitsConfigError = SectionError


@dataclass(frozen=True)
class RuleMatch:
    """
    Which calls a rule applies to: every given field must match (a field may
    list several values: any of them). None fields match everything; an empty
    match, every call.

    @ivar model: glob patterns (case-sensitive) on the model the call is sent with.
    """

    key: tuple[str, ...] | None = None
    owner: tuple[str, ...] | None = None
    provider: tuple[str, ...] | None = None
    model: tuple[str, ...] | None = None
    alias: tuple[str, ...] | None = None

    @cached_property
    def _tests(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The fields this match sets, with their values: what each call is tested on (worked out once)."""
        return tuple((field, values) for field in MATCH_KEYS if (values := getattr(self, field)) is not None)

    def matches(self, facts: Mapping[str, str | None]) -> bool:
        """
        Whether a call with these C{facts} (C{key}, C{owner}, C{provider},
        C{model}, C{alias}) is one the rule applies to. The limiter asks it of
        each call, the report of each record's fields: both count the same calls.
        """
        for field, values in self._tests:
            value = facts[field]
            if value is None:
                return False
            if field == "model":
                if not any(fnmatchcase(value, pattern) for pattern in values):
                    return False
            elif value not in values:
                return False
        return True


@dataclass(frozen=True)
class RuleSettings:
    """
    One rule: where it applies, what it counts per, and its figures.

    @ivar figures: (kind, limit) for every figure the rule sets, in
        L{FIGURE_KEYS} order; C{usd_*} limits in nano-dollars.
    @ivar onStoreError: the rule's own C{on_store_error}, or None for the section's.
    """

    name: str
    match: RuleMatch
    per: str
    figures: tuple[tuple[str, int], ...]
    onStoreError: str | None = None

    def counter(self, keyId: str, owner: str) -> str:
        """The identity of the counter a call of this key counts against (as C{lmgate limits show} prints it)."""
        if self.per == "key":
            return f"{self.name}|key={keyId}"
        if self.per == "owner":
            return f"{self.name}|owner={owner}"
        return f"{self.name}|rule"


@dataclass(frozen=True)
class LimitsSettings:
    """
    The whole section. No rules: limits are off (the step costs one truth test).

    @ivar store: C{memory} or a C{redis://} / C{rediss://} URL.
    @ivar leaseSeconds: how long a concurrency lease lives unless renewed (the
        daemon renews its calls' leases every third of it).
    @ivar keyPrefix: the Redis key prefix (several gateways may share a db).
    """

    store: str = "memory"
    redisTimeout: float = 0.1
    onStoreError: str = "open"
    bytesPerToken: float = 4.0
    outputTokens: int = 1024
    rules: tuple[RuleSettings, ...] = ()
    leaseSeconds: float = 60.0
    keyPrefix: str = "lmgate:"

    @property
    def shared(self) -> bool:
        """Whether the store is Redis (shared by every worker and instance)."""
        return self.store != "memory"

    def __repr__(self) -> str:  # the URL may carry a password
        return f"<LimitsSettings store={'redis' if self.shared else 'memory'} rules={len(self.rules)}>"


def checkStoreUrl(where: str, value: Any) -> str:
    """C{memory}, or a Redis URL L{parseRedisUrl} takes."""
    if value == "memory":
        return "memory"
    if not isinstance(value, str) or not value.strip() or not value.startswith(("redis://", "rediss://")):
        shown = value if not isinstance(value, str) else value.split("://", 1)[0] + "://..."
        raise LimitsConfigError(where, f"must be memory or a redis:// or rediss:// URL, got {shown!r}")
    try:
        parseRedisUrl(value)
    except ValueError as e:
        raise LimitsConfigError(where, str(e)) from None
    return value


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """
    Where the Redis is, from C{usage_limits.store} (L{parseRedisUrl}).

    @ivar tls: C{rediss://}: the connection is TLS, the server's certificate
        checked against the system's trust roots and C{host}.
    """

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def parseRedisUrl(url: str) -> RedisSettings:
    """
    Parse C{redis://[user:password@]HOST[:PORT][/DB]} or C{rediss://...} (TLS).

    @raise ValueError: with a message saying what is wrong, for the start-up
        line that names the field.
    """
    shown = url.split("//", 1)[0] + "//***@" + url.rsplit("@", 1)[1] if "@" in url else url  # never a password in a message
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"{shown!r} is not a Redis URL: {e}") from None
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"{shown!r} is not a Redis URL: it must start with redis:// or rediss:// (TLS)")
    if not parts.hostname:
        raise ValueError(f"{shown!r} names no host: redis://HOST[:PORT][/DB]")
    if parts.query or parts.fragment:
        raise ValueError(f"{shown!r}: a Redis URL takes no ?query or #fragment")
    path = parts.path.strip("/")
    if path and not (path.isascii() and path.isdigit()):
        raise ValueError(f"{shown!r}: the database after the host must be a number, not {path!r}")
    if port == 0:
        raise ValueError(f"{shown!r}: the port must be 1-65535")
    return RedisSettings(
        host=parts.hostname,
        port=port if port is not None else 6379,
        db=int(path) if path else 0,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=parts.scheme == "rediss",
    )


def _match(where: str, raw: Any) -> RuleMatch:
    if raw is None:
        return RuleMatch()
    if not isinstance(raw, dict):
        raise LimitsConfigError(where, f"must be a mapping of {', '.join(MATCH_KEYS)}, got {_typeName(raw)}")
    _noUnknown(where, raw, MATCH_KEYS)
    values: dict[str, tuple[str, ...]] = {}
    for key, value in raw.items():
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) and v for v in items):
            raise LimitsConfigError(f"{where}.{key}", f"must be a non-empty string or list of them, got {value!r}")
        values[key] = tuple(items)
    return RuleMatch(**values)


def _rule(where: str, raw: Any, names: set[str]) -> RuleSettings:
    if not isinstance(raw, dict):
        raise LimitsConfigError(where, f"must be a mapping, got {_typeName(raw)}")
    _noUnknown(where, raw, RULE_KEYS)
    name = raw.get("name")
    if not isinstance(name, str) or not _RULE_NAME.match(name):
        raise LimitsConfigError(f"{where}.name", f"must be a name of letters, digits, '_', '.', ':', '-', got {name!r}")
    if name in names:
        raise LimitsConfigError(f"{where}.name", f"{name!r} names two rules")
    names.add(name)
    per = raw.get("per", "key")
    if per not in PER_VALUES:
        raise LimitsConfigError(f"{where}.per", f"must be one of {', '.join(PER_VALUES)}, got {per!r}")
    onStoreError = raw.get("on_store_error")
    if onStoreError is not None and onStoreError not in STORE_ERROR_POLICIES:
        raise LimitsConfigError(f"{where}.on_store_error", f"must be open or closed, got {onStoreError!r}")
    figures = []
    for kind in FIGURE_KEYS:
        if kind not in raw or raw[kind] is None:
            continue
        value = raw[kind]
        if kind.startswith("usd_"):
            dollars = _positiveNumber(f"{where}.{kind}", value)
            figures.append((kind, max(1, round(dollars * NANO))))
        else:
            figures.append((kind, _wholeNumber(f"{where}.{kind}", value)))
    if not figures:
        raise LimitsConfigError(where, f"rule {name!r} sets no figure (one or more of {', '.join(FIGURE_KEYS)})")
    return RuleSettings(name, _match(f"{where}.match", raw.get("match")), per, tuple(figures), onStoreError)


def parseUsageLimits(raw: Any) -> LimitsSettings:
    """
    Check the C{usage_limits:} section; absent keys keep their defaults. (The
    daemon refuses the memory store with C{--workers} > 1 at start-up, where
    it knows the count.)

    @raise LimitsConfigError: naming the first wrong key.
    """
    if raw is None:
        return LimitsSettings()
    if not isinstance(raw, dict):
        raise LimitsConfigError("usage_limits", f"must be a mapping, got {_typeName(raw)}")
    _noUnknown("usage_limits", raw, SECTION_KEYS)
    values: dict[str, Any] = {}
    if "store" in raw:
        values["store"] = checkStoreUrl("usage_limits.store", raw["store"])
    redis = raw.get("redis")
    if redis is not None:
        if not isinstance(redis, dict):
            raise LimitsConfigError("usage_limits.redis", f"must be a mapping, got {_typeName(redis)}")
        _noUnknown("usage_limits.redis", redis, ("timeout",))
        if "timeout" in redis:
            values["redisTimeout"] = _positiveNumber("usage_limits.redis.timeout", redis["timeout"])
    if "on_store_error" in raw:
        policy = raw["on_store_error"]
        if policy not in STORE_ERROR_POLICIES:
            raise LimitsConfigError("usage_limits.on_store_error", f"must be open or closed, got {policy!r}")
        values["onStoreError"] = policy
    estimate = raw.get("estimate")
    if estimate is not None:
        if not isinstance(estimate, dict):
            raise LimitsConfigError("usage_limits.estimate", f"must be a mapping, got {_typeName(estimate)}")
        _noUnknown("usage_limits.estimate", estimate, ("bytes_per_token", "output_tokens"))
        if "bytes_per_token" in estimate:
            values["bytesPerToken"] = _positiveNumber("usage_limits.estimate.bytes_per_token", estimate["bytes_per_token"])
        if "output_tokens" in estimate:
            values["outputTokens"] = _wholeNumber("usage_limits.estimate.output_tokens", estimate["output_tokens"], 0)
    if "lease_seconds" in raw:
        values["leaseSeconds"] = _positiveNumber("usage_limits.lease_seconds", raw["lease_seconds"])
    if "key_prefix" in raw:
        prefix = raw["key_prefix"]
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise LimitsConfigError("usage_limits.key_prefix", f"must be a non-empty string without spaces, got {prefix!r}")
        values["keyPrefix"] = prefix
    rules = raw.get("rules")
    if rules is not None:
        if not isinstance(rules, list):
            raise LimitsConfigError("usage_limits.rules", f"must be a list of rules, got {_typeName(rules)}")
        names: set[str] = set()
        values["rules"] = tuple(_rule(f"usage_limits.rules[{i}]", rule, names) for i, rule in enumerate(rules))
    return LimitsSettings(**values)
