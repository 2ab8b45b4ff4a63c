"""C{lmgate report}: sums equal the records' sums across rotated and compressed files."""

from __future__ import annotations

import gzip
import io
import csv
import json
import math
import os
import random
import shutil
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from lmgate.ops.report import formatMoney, formatMs, main, parseWhen

OWNERS = ("team-a", "team-b", "team-c")


def makeRecords(n: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    records = []
    for i in range(n):
        day = 20 + i * 4 // n
        has = rng.random() > 0.15
        records.append({
            "timestamp": f"2026-11-{day:02d}T{rng.randrange(24):02d}:{rng.randrange(60):02d}:00.000Z",
            "request_id": f"r{i}", "lmgate_id": f"k{i % 4}", "owner": OWNERS[i % 3], "key": "sk-…x",
            "provider": rng.choice(["openai", "anthropic"]), "method": "POST", "endpoint": "/x",
            "model": rng.choice(["gpt-4o-mini", "claude-sonnet-4-5", None]), "status": rng.choice([200, 200, 200, 429, 502]),
            "streaming": False, "input_tokens": rng.randrange(1000) if has else None,
            "output_tokens": rng.randrange(500) if has else None, "cached_tokens": rng.randrange(50) if has else None,
            "cache_write_tokens": None, "reasoning_tokens": None, "total_tokens": None, "usage_source": "response",
            "latency_ms": rng.uniform(5, 2000), "ttfb_ms": 1.0, "request_bytes": 1, "response_bytes": 1,
            "upstream_request_id": None, "client": "127.0.0.1", "error": rng.choice([None, None, None, "upstream_reset"]),
            "cost_usd": round(rng.uniform(0, 0.01), 6) if has else None,
        })
    return records


class ReportTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.records = makeRecords(600)
        chunks = [self.records[:200], self.records[200:400], self.records[400:]]
        with open(os.path.join(self.dir, "stats.jsonl.2026-11-20"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in chunks[0])
        with gzip.open(os.path.join(self.dir, "stats.jsonl.2026-11-21.gz"), "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in chunks[1])
        with open(os.path.join(self.dir, "stats.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in chunks[2])
            f.write("{not json\n")
        self.path = os.path.join(self.dir, "stats.jsonl")

    def run_(self, *args: str) -> str:
        out = io.StringIO()
        with redirect_stdout(out):
            self.assertEqual(main([self.path, *args]), 0)
        return out.getvalue()

    def test_sumsEqualTheRecords(self) -> None:
        """JSON totals and per-owner sums equal the records' own sums (null counts as nothing)."""
        data = json.loads(self.run_("--format", "json"))
        total = data["total"]
        self.assertEqual(total["calls"], 600)
        self.assertEqual(total["input_tokens"], sum(r["input_tokens"] or 0 for r in self.records))
        self.assertEqual(total["output_tokens"], sum(r["output_tokens"] or 0 for r in self.records))
        self.assertEqual(total["errors"], sum(r["error"] is not None for r in self.records))
        self.assertAlmostEqual(total["cost_usd"], sum(r["cost_usd"] or 0 for r in self.records), places=5)
        self.assertEqual(data["unreadable_lines"], 1)
        for group in data["groups"]:
            mine = [r for r in self.records if r["owner"] == group["owner"]]
            self.assertEqual(group["calls"], len(mine))
            self.assertEqual(group["cached_tokens"], sum(r["cached_tokens"] or 0 for r in mine))

    def test_percentilesWithinOnePercent(self) -> None:
        """p50/p95 from the bounded buckets are within 1 % of the exact values."""
        data = json.loads(self.run_("--format", "json", "--by", "provider"))
        for group in data["groups"]:
            values = sorted(r["latency_ms"] for r in self.records if r["provider"] == group["provider"])
            for p, key in ((50, "p50_ms"), (95, "p95_ms")):
                exact = values[max(0, int(-(-p / 100 * len(values) // 1)) - 1)]
                self.assertLess(abs(group[key] - exact) / exact, 0.011, (p, group[key], exact))

    def test_filtersAndGroups(self) -> None:
        """Filters by time, owner, provider and status class; groups by several keys."""
        data = json.loads(self.run_("--format", "json", "--since", "2026-11-21", "--until", "2026-11-23",
                                    "--owner", "team-a,team-b", "--status", "2xx", "--by", "day,provider"))
        expected = [r for r in self.records if "2026-11-21" <= r["timestamp"] < "2026-11-23"
                    and r["owner"] in ("team-a", "team-b") and r["status"] == 200]
        self.assertEqual(data["total"]["calls"], len(expected))
        self.assertEqual({g["day"] for g in data["groups"]}, {"2026-11-21", "2026-11-22"})

    def test_tableAndCSV(self) -> None:
        """The table has a header, a row per group and a total; CSV has the same rows."""
        table = self.run_()
        self.assertIn("OWNER", table.splitlines()[0])
        self.assertTrue(table.splitlines()[-1].startswith("TOTAL"))
        csvText = self.run_("--format", "csv", "--by", "model")
        self.assertEqual(csvText.splitlines()[0].split(",")[:3], ["model", "calls", "errors"])
        self.assertEqual(len(csvText.splitlines()), 1 + 3)

    def test_relativeTimes(self) -> None:
        """Spans like 24h and 7d, and plain dates, become UTC timestamps."""
        self.assertEqual(parseWhen("2026-11-20"), "2026-11-20T00:00:00.000Z")
        self.assertTrue(parseWhen("7d").endswith("Z"))

    def test_htmlPage(self) -> None:
        """--html writes one self-contained page with four charts and the table."""
        page = os.path.join(self.dir, "report.html")
        self.run_("--html", page)
        with open(page) as f:
            text = f.read()
        self.assertEqual(text.count("<svg"), 4)
        self.assertNotIn("<script", text)
        self.assertNotIn("http://", text.replace('http://www.w3.org', ''))
        self.assertIn("team-a", text)

    def test_htmlInChromium(self) -> None:
        """The page renders in headless Chromium: the charts are drawn (non-blank screenshot), no console errors;
        with --config, the usage limits' charts and table too."""
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            raise self.skipTest("chromium is not installed (.ci/run installs Debian's chromium)")
        page = os.path.join(self.dir, "report.html")
        config = os.path.join(self.dir, "lmgate.yaml")
        with open(config, "w") as f:
            f.write("usage_limits: {rules: [{name: keys, per: key, tokens_per_day: 30000, usd_per_day: 0.5}]}\n")
        self.run_("--html", page, "--config", config)
        with open(page) as f:
            self.assertEqual(f.read().count("<svg"), 4 + 2)
        shot = os.path.join(self.dir, "shot.png")
        profile = os.path.join(self.dir, "chromium-profile")
        result = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--window-size=1200,1400",
             f"--screenshot={shot}", "file://" + page],
            capture_output=True, text=True, timeout=120,
        )
        self.assertTrue(os.path.exists(shot), result.stderr[-2000:])
        self.assertNotIn("Uncaught", result.stderr)
        self.assertNotRegex(result.stderr, r"CONSOLE\(\d+\).*[Ee]rror")
        with open(shot, "rb") as f:
            png = f.read()
        self.assertEqual(png[:8], b"\x89PNG\r\n\x1a\n")
        self.assertGreater(len(png), 30000)  # a blank page compresses to a few KB; drawn charts do not




def record(**fields: Any) -> dict[str, Any]:
    """A valid record for 2026-11-20 from team-a, with C{fields} changed."""
    base = makeRecords(1)[0]
    base.update({"timestamp": "2026-11-20T10:00:00.000Z", "owner": "team-a", "status": 200, "error": None,
                 "input_tokens": 10, "output_tokens": 5, "cached_tokens": 0, "cost_usd": 0.000100, "latency_ms": 12.6})
    base.update(fields)
    return base


class ReportShapeTests(SynchronousTestCase):
    """Valid JSON of the wrong shape is skipped and counted; output is safe to open."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "stats.jsonl")

    def write(self, lines: list[str]) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)

    def report(self, *args: str) -> tuple[str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            self.assertEqual(main([self.path, *args]), 0)
        return out.getvalue(), err.getvalue()

    def test_wrongShapesAreSkippedWithTheirLineNumbers(self) -> None:
        """Records of the wrong shape (a string count, NaN, a 400-digit integer, a list, missing fields,
        a wrong type in each field) are skipped, named with their line number on stderr and counted;
        every output format still renders the good records."""
        good = json.dumps(record())
        bad = [
            '{"timestamp": "2026-11-20T10:00:00.000Z", "status": 200, "input_tokens": "10"}',
            json.dumps(record(latency_ms=math.nan)),  # json.dumps writes NaN, as the issue saw
            json.dumps(record(cost_usd=math.inf)),
            json.dumps(record(output_tokens=10**400)),
            json.dumps(record(cached_tokens=-1)),
            json.dumps(record(input_tokens=True)),
            json.dumps(record(cost_usd=-0.5)),
            json.dumps([record()]),
            "null",
            '"text"',
            "{}",
            json.dumps({k: v for k, v in record().items() if k != "status"}),
            json.dumps({k: v for k, v in record().items() if k != "timestamp"}),
            "[" * 100000,  # nesting too deep to parse
        ]
        wrongTypes = {"timestamp": 20261120, "status": "200", "owner": ["team-a"], "lmgate_id": 3, "provider": {"x": 1},
                      "model": 4.5, "error": False, "streaming": "yes", "latency_ms": "12", "ttfb_ms": [1],
                      "cost_usd": "0.1", "request_bytes": 1.5, "total_tokens": "15", "key": 1, "endpoint": None}
        for name, value in wrongTypes.items():
            if value is not None:
                bad.append(json.dumps(record(**{name: value})))
        self.write([good] + bad + [good])
        for fmt in ("json", "csv", "table"):
            out, err = self.report("--format", fmt, "--html", os.path.join(self.dir, "page.html"))
            if fmt == "json":
                data = json.loads(out)
                self.assertEqual((data["total"]["calls"], data["total"]["input_tokens"]), (2, 20))
                self.assertEqual(data["unreadable_lines"], len(bad))
        problems = [line for line in err.splitlines() if ": line " in line]
        self.assertEqual(len(problems), 10)  # the first ten are shown, the rest counted
        self.assertIn(f"lmgate report: {self.path}: line 2: input_tokens: not a count ('10')", problems)
        self.assertIn(f"lmgate report: {self.path}: line 3: latency_ms: not a finite number (nan)", problems)
        self.assertIn(f"lmgate report: {self.path}: line 5: output_tokens: not a count (an integer of 401 digits)", problems)
        self.assertIn(f"lmgate report: {self.path}: line 9: not a JSON object (list)", problems)
        self.assertIn(f"{len(bad) - 10} more unreadable lines", err)

    def test_csvCellsCannotBeFormulas(self) -> None:
        """CSV text cells starting with = + - @, a tab or a line break are prefixed with ', so a
        spreadsheet shows them instead of running them; the - of a missing value stays."""
        owners = ["=HYPERLINK(\"x\")", "+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "plain", None]
        self.write([json.dumps(record(owner=owner)) for owner in owners])
        out, _ = self.report("--format", "csv")
        cells = sorted(row[0] for row in csv.reader(io.StringIO(out, newline="")))
        self.assertEqual(cells, sorted(["owner", "'=HYPERLINK(\"x\")", "'+1", "'-2+3", "'@SUM(A1)", "'\tx", "'\rx", "plain", "-"]))

    def test_controlCharactersAreEscapedInTheTable(self) -> None:
        """Control characters in a record's values are written out in the table (an escape sequence
        cannot recolour the terminal, a newline cannot break a row, a direction mark cannot reorder it)."""
        self.write([json.dumps(record(owner="a\x1b[2J\nb\u202ec\x9b"))])
        out, _ = self.report()
        self.assertEqual(len(out.splitlines()), 4)  # header, rule, the row, the total
        self.assertIn("a\\x1b[2J\\x0ab\\u202ec\\x9b", out)
        self.assertNotRegex(out, "[\x00-\x09\x0b-\x1f\x7f-\x9f\u202e]")

    def test_htmlIsEscaped(self) -> None:
        """Values from records are escaped in the page: markup shows as text, control characters are written out."""
        self.write([json.dumps(record(owner="<script>alert(1)</script>\x1b", model="<img src=x onerror=alert(1)>"))])
        page = os.path.join(self.dir, "page.html")
        self.report("--html", page, "--by", "owner,model")
        with open(page, encoding="utf-8") as f:
            text = f.read()
        self.assertNotIn("<script", text)
        self.assertNotIn("<img", text)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;\\x1b", text)
        self.assertNotIn("\x1b", text)

    def test_smallCostsKeepTheirDigits(self) -> None:
        """A total of $0.000277 shows as 0.000277 in the table, the page's card and its tooltips, never 0.00;
        CSV and JSON carry the sum at full precision (not rounded to 6 decimals)."""
        self.write([json.dumps(record(cost_usd=0.0001)), json.dumps(record(cost_usd=0.000177)),
                    json.dumps(record(owner="team-b", cost_usd=1.23456789e-7))])
        exact = math.fsum([0.0001, 0.000177, 1.23456789e-7])
        table, _ = self.report()
        self.assertIn(" 0.000277 ", table)
        self.assertIn(" 0.000000123 ", table)
        self.assertIn(" 0.000277 ", table.splitlines()[-1] + " ")
        data = json.loads(self.report("--format", "json")[0])
        self.assertEqual(data["total"]["cost_usd"], exact)
        self.assertEqual([g["cost_usd"] for g in data["groups"]], [math.fsum([0.0001, 0.000177]), 1.23456789e-7])
        rows = list(csv.DictReader(io.StringIO(self.report("--format", "csv")[0])))
        self.assertEqual([float(r["cost_usd"]) for r in rows], [math.fsum([0.0001, 0.000177]), 1.23456789e-7])
        page = os.path.join(self.dir, "page.html")
        self.report("--html", page)
        with open(page, encoding="utf-8") as f:
            text = f.read()
        self.assertIn("<b>0.000277</b><span>cost (USD)</span>", text)
        self.assertIn("team-a 2026-11-20: 0.000277</title>", text)

    def test_latencyWithSensiblePrecision(self) -> None:
        """Latencies show one decimal (12.6), not four (12.6000)."""
        self.write([json.dumps(record(latency_ms=12.6))])
        table, _ = self.report()
        total = table.splitlines()[-1].split()
        self.assertEqual(total[-2:], ["12.6", "12.6"])

    def test_moneyAndLatencyFormats(self) -> None:
        """Money: cents from a dollar up, three significant digits below, never 0.00 unless zero."""
        cases = {0: "0.00", 0.000277: "0.000277", 0.0123: "0.0123", 0.5: "0.50", 12.345: "12.35",
                 1234.5: "1,234.50", 0.0009999: "0.001", 1e-12: "1.00e-12", 0.1 + 0.2: "0.30"}
        self.assertEqual({v: formatMoney(v) for v in cases}, cases)
        self.assertEqual([formatMs(v) for v in (12.6, 0.4, 999.94, 999.96, 1234.4)], ["12.6", "0.4", "999.9", "1,000", "1,234"])
