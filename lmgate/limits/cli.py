"""
C{lmgate limits show|reset}: the usage-limit counters, seen and forgotten by
operators.

The configuration says where the counters are: with a Redis store they are
read from Redis directly (any instance's, every worker's); with the memory
store from the running daemon's admin port (C{admin.listen}: C{GET /limits},
C{POST /limits/reset}). C{--key}, C{--owner} and C{--rule} become counter
identities by the rules' C{per} (the allow-list maps keys to owners).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Sequence, TextIO

from lmgate.config import Settings, loadSettings
from lmgate.errors import ConfigError
from lmgate.limits.settings import LimitsSettings

DEFAULT_CONFIG = "etc/lmgate.yaml"


def countersFor(
    limits: LimitsSettings, owners: dict[str, str], key: str | None, owner: str | None, rule: str | None
) -> list[str] | None:
    """
    The counter identities a selection names (None: every counter).

    @param owners: each allow-list id's owner.
    """
    if key is None and owner is None and rule is None:
        return None
    counters: list[str] = []
    for settings in limits.rules:
        if rule is not None and settings.name != rule:
            continue
        if settings.per == "rule":
            if key is None and owner is None or _ruleCouldCount(settings, owners, key, owner):
                counters.append(f"{settings.name}|rule")
        elif settings.per == "owner":
            owned = {owner} if owner is not None else {owners[key]} if key in owners else set()
            if key is None and owner is None:
                owned = set(owners.values())
            counters.extend(f"{settings.name}|owner={o}" for o in sorted(owned))
        else:
            if key is not None:
                keys = [key]
            elif owner is not None:
                keys = sorted(k for k, o in owners.items() if o == owner)
            else:
                keys = sorted(owners)
            counters.extend(f"{settings.name}|key={k}" for k in keys)
    return counters


def _ruleCouldCount(settings: Any, owners: dict[str, str], key: str | None, owner: str | None) -> bool:
    """Whether a C{per: rule} counter concerns the selected key or owner (its match does not exclude them)."""
    match = settings.match
    if key is not None:
        if match.key is not None and key not in match.key:
            return False
        owner = owners.get(key, owner)
    if owner is not None and match.owner is not None and owner not in match.owner:
        return False
    return True


def _owners(settings: Settings) -> dict[str, str]:
    from lmgate.access.allowlist import parseAllowList

    try:
        with open(settings.allowlistPath, "rb") as f:
            content = f.read()
    except OSError:
        return {}
    return {entry.id: entry.owner for entry in parseAllowList(settings.allowlistPath, content).values()}


def _adminURL(settings: Settings, override: str | None) -> str:
    if override:
        return override.rstrip("/")
    listen = settings.adminListen
    if listen is None:
        raise ConfigError(
            settings.source, "admin.listen", "the memory store's counters are in the running daemon: set admin.listen (or give --admin URL)"
        )
    parts = dict(p.split("=", 1) for p in listen.split(":")[2:] if "=" in p)
    port = listen.split(":")[1]
    host = parts.get("interface", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{host}:{port}"


def _fromAdmin(url: str, path: str, counters: Sequence[str] | None, method: str) -> Any:
    query = urllib.parse.urlencode([("counter", c) for c in counters or ()])
    request = urllib.request.Request(f"{url}{path}" + (f"?{query}" if query else ""), method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _fromRedis(limits: LimitsSettings, action: str, counters: Sequence[str] | None) -> Any:
    """Run one show or reset against the Redis store, under a reactor of its own."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    from lmgate.limits.redis import RedisStore
    from lmgate.limits.views import stateDict

    result: list[Any] = []

    async def run(reactor: Any) -> None:
        store = RedisStore.fromSettings(limits, reactor)
        store.startService()
        try:
            if action == "show":
                states = await store.show(counters)
                result.append({"states": [stateDict(s) for s in states]})
            else:
                named = counters
                if named is None:  # --all: every counter the store holds
                    named = sorted({state.figure.counter for state in await store.show(None)})
                result.append({"removed": await store.reset(named) if named else 0})
        finally:
            await store.stopService()

    try:
        react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    return result[0] if result else None


def _table(states: list[dict[str, Any]], stdout: TextIO) -> None:
    if not states:
        stdout.write("No counters (nothing counted yet, or every one idle and expired).\n")
        return
    columns = ("counter", "kind", "limit", "used", "reserved", "remaining", "resets_at")
    rows = [[_cell(state[c]) for c in columns] for state in sorted(states, key=lambda s: (s["counter"], s["kind"]))]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    stdout.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip() + "\n")
    for row in rows:
        stdout.write("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() + "\n")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return format(value, ".6g")
    return str(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmgate limits", description="Show or reset the usage-limit counters.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("show", "each counter: limit, used, reserved, remaining, reset time"), ("reset", "forget counters (their buckets full, windows empty)")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", default=os.environ.get("LMGATE_CONFIG", DEFAULT_CONFIG), help="the daemon's configuration file")
        sub.add_argument("--key", help="an allow-list id")
        sub.add_argument("--owner", help="an owner (every key of it, and its per-owner counters)")
        sub.add_argument("--rule", help="a rule's name")
        sub.add_argument("--counter", action="append", help="a counter identity as shown (repeatable)")
        sub.add_argument("--admin", help="the running daemon's admin URL (memory store; default: from admin.listen)")
        if name == "show":
            sub.add_argument("--json", action="store_true", help="JSON instead of a table")
        else:
            sub.add_argument("--all", action="store_true", help="every counter of every rule")
    return parser


def main(argv: list[str], stdout: TextIO | None = None) -> int:
    """Run C{lmgate limits ...}; returns the exit code."""
    stdout = stdout or sys.stdout
    args = _parser().parse_args(argv)
    try:
        settings = loadSettings(args.config)
        limits = settings.usageLimits
        if not limits.rules:
            sys.stderr.write(f"lmgate limits: {args.config}: usage_limits has no rules\n")
            return 1
        counters = list(args.counter) if args.counter else countersFor(limits, _owners(settings), args.key, args.owner, args.rule)
        if args.command == "reset" and counters is None:
            if not args.all:
                sys.stderr.write("lmgate limits reset: name what to reset (--key, --owner, --rule, --counter) or say --all\n")
                return 2
        if args.command == "reset" and counters is not None and not counters:
            stdout.write("No counter matches.\n")
            return 0
        answer = _ask(settings, args, args.command, counters)
    except ConfigError as e:
        sys.stderr.write(f"lmgate limits: {e}\n")
        return 1
    except (OSError, urllib.error.URLError) as e:
        sys.stderr.write(f"lmgate limits: the counters could not be reached: {e}\n")
        return 1
    if args.command == "reset":
        stdout.write(f"Reset {answer['removed']} counter state(s).\n")
        return 0
    if args.json:
        stdout.write(json.dumps(answer["states"], indent=2) + "\n")
    else:
        _table(answer["states"], stdout)
    return 0


def _ask(settings: Settings, args: argparse.Namespace, action: str, counters: Sequence[str] | None) -> Any:
    """Show or reset, from Redis (a shared store) or the running daemon's admin port (the memory store)."""
    if settings.usageLimits.shared:
        return _fromRedis(settings.usageLimits, action, counters)
    url = _adminURL(settings, args.admin)
    if action == "show":
        return _fromAdmin(url, "/limits", counters, "GET")
    if counters is None:  # --all: every counter the daemon holds
        counters = sorted({state["counter"] for state in _fromAdmin(url, "/limits", None, "GET")["states"]})
        if not counters:
            return {"removed": 0}
    return _fromAdmin(url, "/limits/reset", counters, "POST")
