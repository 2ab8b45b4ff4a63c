"""C{lmgate report --config}: each usage-limit rule's use per counter and UTC day, against hand-computed sums."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

import duckdb
from twisted.trial.unittest import SynchronousTestCase

from lmgate.ops.report import main
from lmgate.ops.report_limits import LimitDay, limitDays, limitMonths
from tests.test_report import record
from tests.test_report_html import charts, legendOf

CONFIG = """
providers: {openai: {base_url: "http://127.0.0.1:1"}}
usage_limits:
  rules:
    - name: keys
      per: key
      tokens_per_day: 1000
    - name: owners
      per: owner
      match: {provider: openai}
      usd_per_day: 0.5
      tokens_per_day: 5000
    - name: minis
      per: rule
      match: {model: ["gpt-4o*", "*-mini"]}
      tokens_per_day: 2000
    - name: aliased
      per: rule
      match: {alias: fast, owner: [team-a]}
      usd_per_day: 1
    - name: rate
      requests_per_minute: 5
    - name: monthly
      per: owner
      match: {owner: team-b}
      tokens_per_month: 100000
      usd_per_month: 10
"""

D20, D21 = "2026-11-20T10:00:00.000Z", "2026-11-21T10:00:00.000Z"


def use(timestamp: str, key: str | None, owner: str | None, provider: str | None, model: str | None,
        total: int | None, cost: float | None, **more: Any) -> dict[str, Any]:
    return record(timestamp=timestamp, lmgate_id=key, owner=owner, provider=provider, model=model, total_tokens=total,
                  cost_usd=cost, alias=more.pop("alias", None), limited_by=more.pop("limited_by", None), **more)


RECORDS = [
    use(D20, "k1", "team-a", "openai", "gpt-4o", 100, 0.01),
    use(D20, "k1", "team-a", "openai", "gpt-4o-2024-08-06", 200, 0.02),
    use(D20, "k2", "team-a", "anthropic", "claude-haiku-mini", 300, 0.03, alias="fast"),
    use(D20, "k3", "team-b", "openai", "GPT-4O", 400, 0.04),  # globs are case-sensitive, as the gateway's
    use(D20, None, None, "openai", "gpt-4o", None, None, status=403, error="forbidden"),  # no key: never counted
    use(D21, "k1", "team-a", "openai", "gpt-4o", None, None, status=429, error="quota_exceeded", limited_by="keys"),
    use(D21, "k3", "team-b", "openai", "o1", 50, 0.005),
    use(D21, "k2", "team-a", "anthropic", None, 70, 0.007),  # no model: a model match does not apply
]

#: (rule, counter, day, tokens, tokens limit, usd, usd limit, refusals), worked out by hand from RECORDS.
EXPECTED = [
    ("keys", "keys|key=k1", "2026-11-20", 300, 1000, 0.03, None, 0),
    ("keys", "keys|key=k1", "2026-11-21", 0, 1000, 0.0, None, 1),
    ("keys", "keys|key=k2", "2026-11-20", 300, 1000, 0.03, None, 0),
    ("keys", "keys|key=k2", "2026-11-21", 70, 1000, 0.007, None, 0),
    ("keys", "keys|key=k3", "2026-11-20", 400, 1000, 0.04, None, 0),
    ("keys", "keys|key=k3", "2026-11-21", 50, 1000, 0.005, None, 0),
    ("owners", "owners|owner=team-a", "2026-11-20", 300, 5000, 0.03, 0.5, 0),
    ("owners", "owners|owner=team-a", "2026-11-21", 0, 5000, 0.0, 0.5, 0),
    ("owners", "owners|owner=team-b", "2026-11-20", 400, 5000, 0.04, 0.5, 0),
    ("owners", "owners|owner=team-b", "2026-11-21", 50, 5000, 0.005, 0.5, 0),
    ("minis", "minis|rule", "2026-11-20", 600, 2000, 0.06, None, 0),
    ("minis", "minis|rule", "2026-11-21", 0, 2000, 0.0, None, 0),
    ("aliased", "aliased|rule", "2026-11-20", 0 + 300, None, 0.03, 1.0, 0),
]
MONTHLY = [("monthly", "monthly|owner=team-b", "2026-11", 450, 100000, 0.045, 10.0, 0)]

_COLUMNS = ("{'timestamp': 'VARCHAR', 'lmgate_id': 'VARCHAR', 'owner': 'VARCHAR', 'provider': 'VARCHAR', "
            "'model': 'VARCHAR', 'alias': 'VARCHAR', 'status': 'BIGINT', 'total_tokens': 'BIGINT', "
            "'cost_usd': 'DOUBLE', 'limited_by': 'VARCHAR', 'error': 'VARCHAR'}")


def flat(days: list[LimitDay]) -> list[tuple[Any, ...]]:
    return [(d.rule, d.counter, d.day, d.tokens, d.tokensLimit, round(d.usd, 9), d.usdLimit, d.refusals) for d in days]


class LimitDaysTests(SynchronousTestCase):
    """L{limitDays} over a C{records} view made here, as the report's connection provides it."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "lmgate.yaml")
        with open(self.config, "w") as f:
            f.write(CONFIG)
        self.path = os.path.join(self.dir, "stats.jsonl")
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in RECORDS)
        self.connection = duckdb.connect()
        self.connection.execute(f"CREATE VIEW records AS SELECT * FROM read_json('{self.path}', "
                                f"format='newline_delimited', columns={_COLUMNS})")

    def test_perKeyOwnerAndRuleWithGlobs(self) -> None:
        """Tokens (total_tokens) and dollars (cost_usd) per counter and day equal the hand-computed sums: per key,
        per owner, per rule; model globs case-sensitive; alias and owner matched together; refusals counted
        on the refusing rule's counter; a record without a key (refused before one was known) counts nowhere;
        a rule without a daily figure is not shown."""
        self.assertEqual(flat(limitDays(self.connection, self.config)), EXPECTED)

    def test_perMonth(self) -> None:
        """Rules with monthly figures: the use per counter and UTC month, against tokens_per_month and usd_per_month."""
        self.assertEqual(flat(limitMonths(self.connection, self.config)), MONTHLY)

    def test_noDailyRule(self) -> None:
        """A configuration whose rules have no daily figure (or no usage_limits at all) shows nothing."""
        for text in ("usage_limits: {rules: [{name: r, requests_per_minute: 3}]}\n", "listen: 'tcp:0'\n", ""):
            with open(self.config, "w") as f:
                f.write(text)
            self.assertEqual(limitDays(self.connection, self.config), [])


class ConfigOptionTests(SynchronousTestCase):
    """C{lmgate report --config}: through the command, over rotated and compressed files."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.config = os.path.join(self.dir, "lmgate.yaml")
        with open(self.config, "w") as f:
            f.write(CONFIG)
        with gzip.open(os.path.join(self.dir, "stats.jsonl.2026-11-20.gz"), "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in RECORDS[:5])
        with open(os.path.join(self.dir, "stats.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in RECORDS[5:])
            f.write("{not json\n")
        self.path = os.path.join(self.dir, "stats.jsonl")

    def run_(self, *args: str, code: int = 0) -> tuple[str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            self.assertEqual(main([self.path, *args]), code)
        return out.getvalue(), err.getvalue()

    def test_jsonHasALimitsMember(self) -> None:
        """--format json with --config adds "limits": a row per rule, counter and day, the same sums; the
        report's own figures are unchanged."""
        plain = json.loads(self.run_("--format", "json")[0])
        data = json.loads(self.run_("--format", "json", "--config", self.config)[0])
        self.assertEqual({k: v for k, v in data.items() if k not in ("limits", "limits_monthly")}, plain)
        rows = [(r["rule"], r["counter"], r["day"], r["tokens"], r["tokens_per_day"], round(r["usd"], 9), r["usd_per_day"],
                 r["refusals"]) for r in data["limits"]]
        self.assertEqual(rows, EXPECTED)
        self.assertEqual({r["per"] for r in data["limits"]}, {"key", "owner", "rule"})
        self.assertEqual(data["limits_monthly"], [{"rule": "monthly", "per": "owner", "counter": "monthly|owner=team-b", "month": "2026-11",
                                                   "tokens": 450, "tokens_per_month": 100000, "usd": 0.045, "usd_per_month": 10.0, "refusals": 0}])

    def test_filtersApply(self) -> None:
        """Limit use is computed over the records the report's filters keep (--since, --owner...)."""
        data = json.loads(self.run_("--format", "json", "--config", self.config, "--since", "2026-11-21", "--owner", "team-b")[0])
        self.assertEqual([(r["counter"], r["day"], r["tokens"]) for r in data["limits"]],
                         [("keys|key=k3", "2026-11-21", 50), ("owners|owner=team-b", "2026-11-21", 50)])
        data = json.loads(self.run_("--format", "json", "--config", self.config, "--status", "4xx")[0])
        self.assertEqual([(r["counter"], r["refusals"]) for r in data["limits"]],
                         [("keys|key=k1", 1), ("owners|owner=team-a", 0), ("minis|rule", 0)])

    def test_tableAndCSVHaveASecondTable(self) -> None:
        """The table and CSV outputs carry the limits as a second table after the main one."""
        table = self.run_("--config", self.config)[0]
        main_, limits = table.split("\nUSAGE LIMITS PER UTC DAY\n")
        limits, monthly = limits.split("\nUSAGE LIMITS PER UTC MONTH\n")
        self.assertEqual(monthly.splitlines()[2].split(), ["monthly", "owner=team-b", "2026-11", "450", "100,000", "0.045", "10.00", "0"])
        self.assertTrue(main_.splitlines()[-1].startswith("TOTAL"))
        self.assertEqual(limits.splitlines()[0].split(), ["RULE", "COUNTER", "DAY", "TOKENS", "TOKENS/DAY", "USD", "USD/DAY", "REFUSALS"])
        self.assertIn("\nminis    rule          2026-11-20     600       2,000   0.06        -         0\n", limits)
        self.assertEqual(len(limits.splitlines()), 2 + len(EXPECTED))
        text = self.run_("--format", "csv", "--config", self.config)[0]
        first, second, third = text.split("\r\n\r\n")
        self.assertEqual(third.split("\r\n")[:2], ["rule,per,counter,month,tokens,tokens_per_month,usd,usd_per_month,refusals",
                                                   "monthly,owner,monthly|owner=team-b,2026-11,450,100000,0.045,10.0,0"])
        self.assertEqual(first.split("\r\n")[0].split(",")[:2], ["owner", "calls"])
        rows = list(csv.DictReader(io.StringIO(second)))
        self.assertEqual([(r["counter"], int(r["tokens"])) for r in rows], [(e[1], e[3]) for e in EXPECTED])

    def test_htmlShowsEachRuleAgainstItsLimit(self) -> None:
        """The page has, after the usage charts, a chart per rule and daily figure (each counter's use and
        the limit line) and the table of use per counter and day."""
        page = os.path.join(self.dir, "page.html")
        self.run_("--html", page, "--config", self.config)
        with open(page, encoding="utf-8") as f:
            text = f.read()
        svgs = charts(text)
        self.assertEqual(len(svgs), 4 + 5 + 2)  # keys tokens; owners tokens and usd; minis tokens; aliased usd; monthly both
        self.assertEqual(legendOf(svgs[4]), ["key=k3", "key=k1", "key=k2", "limit 1,000"])
        self.assertEqual(legendOf(svgs[6]), ["owner=team-b", "owner=team-a", "limit $0.50"])
        captions = re.findall(r"<figcaption>([^<]*)</figcaption>", text)[4:]
        self.assertEqual(captions, ["Rule keys: tokens per day against its limit", "Rule owners: tokens per day against its limit",
                                    "Rule owners: USD per day against its limit", "Rule minis: tokens per day against its limit",
                                    "Rule aliased: USD per day against its limit",
                                    "Rule monthly: tokens per month against its limit", "Rule monthly: USD per month against its limit"])
        self.assertIn("<h2>Usage limits per UTC month</h2>", text)
        self.assertIn("<td class=g>minis</td><td class=g>rule</td><td class=g>2026-11-20</td><td>600</td><td>2,000</td>", text)

    def test_aBadConfigIsOneLineAndExitTwo(self) -> None:
        """A wrong configuration is named in one line (file, key, problem) and the report exits 2, writing nothing."""
        cases = {
            "usage_limits: {rules: [{name: r, per: team, tokens_per_day: 5}]}\n":
                f"lmgate report: {self.config}: usage_limits.rules[0].per: must be one of key, owner, rule, got 'team'",
            "usage_limits: {rules: [{name: r, tokens_per_day: -5}]}\n": f"lmgate report: {self.config}: usage_limits.rules[0].tokens_per_day: ",
            "usage_limits: [\n": f"lmgate report: {self.config}: line 2: not valid YAML",
            "- just a list\n": f"lmgate report: {self.config}: must be a mapping of sections",
        }
        for text, line in cases.items():
            with open(self.config, "w") as f:
                f.write(text)
            out, err = self.run_("--config", self.config, code=2)
            self.assertEqual(out, "")
            self.assertEqual(len(err.splitlines()), 1, err)
            self.assertTrue(err.startswith(line), (err, line))
        missing = os.path.join(self.dir, "nope.yaml")
        out, err = self.run_("--config", missing, code=2)
        self.assertEqual(err, f"lmgate report: {missing}: cannot read: No such file or directory\n")
