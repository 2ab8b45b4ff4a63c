"""
C{lmgate report --config FILE}: each usage-limit rule's use against its daily
and monthly limits, from the records.

The rules are read with the gateway's own parser (L{parseUsageLimits}) and
matched with the limiter's own matcher and counter identities
(C{RuleMatch.matches}, L{RuleSettings.counter}: the globs on C{model}
included), so a record counts where the gateway counted its call. The records
are summed in SQL on a C{records} view (DuckDB) per UTC day (month) and per the
fields a rule can match on; each of those few groups is then matched in Python.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

import yaml

from lmgate.limits.settings import NANO, LimitsConfigError, LimitsSettings, RuleSettings, parseUsageLimits

#: The figures this report shows use against: per period, the timestamp's prefix that names it, its token and dollar figures.
PERIODS = {"day": (10, "tokens_per_day", "usd_per_day"), "month": (7, "tokens_per_month", "usd_per_month")}


class LimitsFileError(Exception):
    """The configuration cannot be used: its text is one line naming the file, the key and the problem."""


@dataclass(frozen=True)
class LimitDay:
    """
    One counter's use on one UTC day (or month).

    @ivar day: the UTC day (C{2026-11-20}), or the month (C{2026-11}) when
        C{period} is C{month}.
    @ivar tokensLimit: the rule's C{tokens_per_day} (C{tokens_per_month}), or None.
    @ivar usdLimit: the rule's C{usd_per_day} (C{usd_per_month}) in dollars, or None.
    @ivar counter: the counter's identity as C{lmgate limits show} prints it
        (C{team-a|key=k1}, C{team-a|owner=team-a}, C{all|rule}).
    @ivar tokens: the sum of the matching records' C{total_tokens}.
    @ivar usd: the sum of their C{cost_usd}.
    @ivar refusals: the records this rule refused (C{limited_by}) on this counter.
    """

    rule: str
    per: str
    counter: str
    day: str
    tokens: int
    tokensLimit: int | None
    usd: float
    usdLimit: float | None
    refusals: int
    period: str = "day"

    def row(self) -> dict[str, Any]:
        """The figures for JSON and CSV (C{day}, C{tokens_per_day}...; C{month}, C{tokens_per_month}... for months)."""
        _, tokensKind, usdKind = PERIODS[self.period]
        return {"rule": self.rule, "per": self.per, "counter": self.counter, self.period: self.day, "tokens": self.tokens,
                tokensKind: self.tokensLimit, "usd": self.usd, usdKind: self.usdLimit, "refusals": self.refusals}


def limitRules(configPath: str) -> LimitsSettings:
    """
    The C{usage_limits} section of the gateway's configuration file, checked
    by the gateway's own parser.

    @raise LimitsFileError: the file cannot be read or parsed, or a key is wrong.
    """
    try:
        with open(configPath, "rb") as f:
            raw = yaml.safe_load(f.read())
    except OSError as e:
        raise LimitsFileError(f"{configPath}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise LimitsFileError(f"{configPath}: {where}not valid YAML: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError:
        raise LimitsFileError(f"{configPath}: not UTF-8 text") from None
    if raw is not None and not isinstance(raw, dict):
        raise LimitsFileError(f"{configPath}: must be a mapping of sections")
    try:
        return parseUsageLimits((raw or {}).get("usage_limits"))
    except LimitsConfigError as e:
        raise LimitsFileError(f"{configPath}: {e.where}: {e.problem}") from None


_GROUPS = """
    SELECT substr(timestamp, 1, {width}) AS period, lmgate_id, owner, provider, model, alias, limited_by,
           sum(total_tokens) AS tokens, fsum(cost_usd) AS usd, count(*) AS calls
    FROM records GROUP BY ALL ORDER BY ALL
"""


def limitDays(connection: Any, configPath: str) -> list[LimitDay]:
    """
    Each rule's use per counter and UTC day, for the rules with a daily figure.

    A record counts for a rule as the gateway counted its call: it was
    identified (an C{lmgate_id}) and routed (a C{provider}), and its key, owner,
    provider, model (glob) and alias match the rule's C{match}; its counter
    follows the rule's C{per}. The record's C{model} is matched: for most calls
    the model sent; where the provider's response names a dated variant
    (C{gpt-4o-2024-08-06}), a glob (C{gpt-4o*}) matches both.

    @param connection: a DuckDB connection with a C{records} view of the
        records' fields (the report's filters already applied).
    @return: sorted by rule (in the configuration's order), counter and day.
    @raise LimitsFileError: the configuration is wrong.
    """
    return _use(connection, limitRules(configPath), "day")


def limitMonths(connection: Any, configPath: str) -> list[LimitDay]:
    """Each rule's use per counter and UTC month, for the rules with a monthly figure (as L{limitDays})."""
    return _use(connection, limitRules(configPath), "month")


def limitUse(connection: Any, configPath: str) -> list[LimitDay]:
    """L{limitDays}, then L{limitMonths}."""
    settings = limitRules(configPath)
    return _use(connection, settings, "day") + _use(connection, settings, "month")


def _use(connection: Any, settings: LimitsSettings, period: str) -> list[LimitDay]:
    width, tokensKind, usdKind = PERIODS[period]
    rules: list[RuleSettings] = [rule for rule in settings.rules if any(kind in (tokensKind, usdKind) for kind, _ in rule.figures)]
    if not rules:
        return []
    sums: dict[tuple[int, str, str], tuple[list[int], list[float], list[int]]] = {}
    for day, keyId, owner, provider, model, alias, limitedBy, tokens, usd, calls in connection.execute(_GROUPS.format(width=width)).fetchall():
        facts = {"key": keyId, "owner": owner, "provider": provider, "model": model, "alias": alias}
        for n, rule in enumerate(rules):
            refused = limitedBy == rule.name
            if not refused and (keyId is None or provider is None or not rule.match.matches(facts)):
                continue
            tokenParts, usdParts, refusals = sums.setdefault((n, rule.counter(keyId or "", owner or ""), day), ([], [], []))
            tokenParts.append(int(tokens or 0))
            usdParts.append(float(usd or 0.0))
            refusals.append(calls if refused else 0)
    out = []
    for (n, counter, day), (tokenParts, usdParts, refusals) in sorted(sums.items()):
        rule = rules[n]
        figures = dict(rule.figures)
        usdLimit = figures.get(usdKind)
        out.append(LimitDay(rule.name, rule.per, counter, day, sum(tokenParts), figures.get(tokensKind),
                            math.fsum(usdParts), None if usdLimit is None else usdLimit / NANO, sum(refusals), period))
    return out


def withLimits(text: str, form: str, limits: Sequence[LimitDay]) -> str:
    """
    The report's output with the limits' use added: in JSON a C{limits} member
    (per day) and a C{limits_monthly} one; after the main table (or CSV) a table
    per day, then one per month when a rule has a monthly figure.
    """
    days = [use for use in limits if use.period == "day"]
    months = [use for use in limits if use.period == "month"]
    if form == "json":
        document = json.loads(text)
        document["limits"] = [use.row() for use in days]
        document["limits_monthly"] = [use.row() for use in months]
        return json.dumps(document, indent=2) + "\n"
    tables = [(days, "day")] + ([(months, "month")] if months else [])
    if form == "csv":
        for uses, period in tables:
            text += "\r\n" + _csv(uses, period)
        return text
    for uses, period in tables:
        text += f"\nUSAGE LIMITS PER UTC {period.upper()}\n" + _table(uses, period)
    return text


def _csv(uses: Sequence[LimitDay], period: str) -> str:
    import csv
    import io

    from lmgate.ops.report import csvSafe

    _, tokensKind, usdKind = PERIODS[period]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["rule", "per", "counter", period, "tokens", tokensKind, "usd", usdKind, "refusals"],
                            lineterminator="\r\n")
    writer.writeheader()
    for use in uses:
        writer.writerow({name: csvSafe(value) for name, value in use.row().items()})
    return out.getvalue()


def _table(uses: Sequence[LimitDay], period: str) -> str:
    from lmgate.ops.report import formatMoney, printable

    cells = [[printable(u.rule), printable(u.counter.split("|", 1)[1]), printable(u.day), f"{u.tokens:,}",
              "-" if u.tokensLimit is None else f"{u.tokensLimit:,}", formatMoney(u.usd),
              "-" if u.usdLimit is None else formatMoney(u.usdLimit), f"{u.refusals:,}"] for u in uses]
    unit = period.upper()
    header = ["RULE", "COUNTER", unit, "TOKENS", f"TOKENS/{unit}", "USD", f"USD/{unit}", "REFUSALS"]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i < 3 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    if not cells:
        lines.append(f"(no record matches a rule with tokens_per_{period} or usd_per_{period})")
    return "\n".join(lines) + "\n"
