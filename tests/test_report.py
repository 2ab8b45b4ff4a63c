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
from collections import Counter
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from lmgate.ops.export import main as export
from lmgate.ops.report import GROUPS, formatMoney, formatMs, main, parseWhen

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

    def test_percentilesAreExact(self) -> None:
        """p50/p95 are exact: linear between the two nearest latencies of the group (quantile_cont), as
        the sorted list gives them, rounded to 0.1 ms like every latency the report shows."""
        data = json.loads(self.run_("--format", "json", "--by", "provider"))
        groups = [(g, [r for r in self.records if r["provider"] == g["provider"]]) for g in data["groups"]]
        for group, mine in groups + [(data["total"], self.records)]:
            values = sorted(r["latency_ms"] for r in mine)
            self.assertEqual((group["p50_ms"], group["p95_ms"]),
                             (round(percentile(values, 50), 1), round(percentile(values, 95), 1)))

    def test_costsAreSummedExactly(self) -> None:
        """Each group's cost and the total equal math.fsum of the records' costs (the old exact sum)."""
        data = json.loads(self.run_("--format", "json", "--by", "owner,model"))
        self.assertEqual(data["total"]["cost_usd"], math.fsum(r["cost_usd"] or 0 for r in self.records))
        for group in data["groups"]:
            mine = [r for r in self.records if r["owner"] == group["owner"] and (r["model"] or "-") == group["model"]]
            self.assertEqual(group["cost_usd"], math.fsum(r["cost_usd"] or 0 for r in mine))

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




def percentile(values: list[float], p: float) -> float:
    """The C{p}th percentile of sorted C{values}, linear between the two nearest (numpy's default)."""
    position = p / 100 * (len(values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (position - low)


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


def writeLines(path: str, records: list[dict[str, Any]], extra: tuple[str, ...] = ()) -> None:
    """C{records} as JSON lines (gzip'd when C{path} ends in .gz), then the C{extra} lines."""
    opener: Any = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.writelines(line + "\n" for line in extra)


def capture(command: Any, argv: list[str]) -> tuple[int, str, str]:
    """Run a command's main; its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = command(argv)
    return code, out.getvalue(), err.getvalue()


class ManyFilesTests(SynchronousTestCase):
    """Totals equal the records' sums across rotated, gzip'd, per-worker files and several instances."""

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.first, self.second = os.path.join(base, "instance-1"), os.path.join(base, "instance-2")
        os.makedirs(self.first)
        os.makedirs(self.second)
        self.records = makeRecords(1200, seed=3)
        parts = [self.records[i * 150:(i + 1) * 150] for i in range(8)]
        writeLines(os.path.join(self.first, "stats.jsonl.2026-11-20.gz"), parts[0])
        writeLines(os.path.join(self.first, "stats.jsonl.1"), parts[1], ("{truncated",))
        writeLines(os.path.join(self.first, "stats.jsonl"), parts[2])
        writeLines(os.path.join(self.first, "stats-w1.jsonl"), parts[3])
        writeLines(os.path.join(self.first, "stats-w2.jsonl.2026-11-21.gz"), parts[4], (json.dumps(record(input_tokens="7")),))
        writeLines(os.path.join(self.first, "stats-w2.jsonl"), parts[5])
        writeLines(os.path.join(self.second, "stats.jsonl.gz"), parts[6])
        writeLines(os.path.join(self.second, "stats-w1.jsonl"), parts[7], ("",))  # a blank line is no record

    def test_totalsEqualTheRecordsSums(self) -> None:
        """Both directories' files, compressed or not, current, rotated, every worker's: every record once."""
        code, out, err = capture(main, [self.first, self.second, "--format", "json", "--by", "owner,provider"])
        self.assertEqual(code, 0)
        data = json.loads(out)
        total = data["total"]
        self.assertEqual(total["calls"], len(self.records))
        for name in ("input_tokens", "output_tokens", "cached_tokens"):
            self.assertEqual(total[name], sum(r[name] or 0 for r in self.records))
        self.assertEqual(total["errors"], sum(r["error"] is not None for r in self.records))
        self.assertEqual(total["cost_usd"], math.fsum(r["cost_usd"] or 0 for r in self.records))
        self.assertEqual(sum(g["calls"] for g in data["groups"]), len(self.records))
        self.assertEqual(data["unreadable_lines"], 2)
        self.assertIn(f"{os.path.join(self.first, 'stats.jsonl.1')}: line 151: not a JSON record", err)
        self.assertIn(f"{os.path.join(self.first, 'stats-w2.jsonl.2026-11-21.gz')}: line 151: input_tokens: not a count ('7')", err)
        values = sorted(r["latency_ms"] for r in self.records)
        self.assertEqual(total["p95_ms"], round(percentile(values, 95), 1))

    def test_aStatsFileBringsItsSiblings(self) -> None:
        """Naming the stats file reads its rotated, compressed and per-worker siblings, not the other instance."""
        data = json.loads(capture(main, [os.path.join(self.first, "stats.jsonl"), "--format", "json"])[1])
        self.assertEqual(data["total"]["calls"], 900)

    def test_allOptionsKeepTheirMeaning(self) -> None:
        """Every filter (time, owner, key id, provider, model incl. a missing one, status code and class) and
        every group give what the records give."""
        cases: list[tuple[list[str], Any]] = [
            (["--since", "2026-11-21", "--until", "2026-11-22"], lambda r: "2026-11-21" <= r["timestamp"] < "2026-11-22"),
            (["--owner", "team-b"], lambda r: r["owner"] == "team-b"),
            (["--key-id", "k1,k2"], lambda r: r["lmgate_id"] in ("k1", "k2")),
            (["--provider", "anthropic"], lambda r: r["provider"] == "anthropic"),
            (["--model", "None,gpt-4o-mini"], lambda r: r["model"] in (None, "gpt-4o-mini")),
            (["--status", "429,5xx"], lambda r: r["status"] == 429 or r["status"] >= 500),
        ]
        for options, keep in cases:
            for by in GROUPS:
                data = json.loads(capture(main, [self.first, self.second, "--format", "json", "--by", by, *options])[1])
                mine = [r for r in self.records if keep(r)]
                self.assertEqual(data["total"]["calls"], len(mine), options)
                self.assertEqual(data["total"]["input_tokens"], sum(r["input_tokens"] or 0 for r in mine), options)
                self.assertEqual(sorted(g["calls"] for g in data["groups"]),
                                 sorted(Counter(groupOf(r, by) for r in mine).values()), (options, by))

    def test_prices(self) -> None:
        """--prices prices the records written without cost_usd (and only those)."""
        prices = os.path.join(self.second, "prices.yaml")
        with open(prices, "w") as f:
            f.write("models:\n  gpt-4o-mini: {input: 0.15, cached_input: 0.075, output: 0.60}\n")
        from lmgate.ops.prices import PriceTable

        table = PriceTable.load(prices)
        unpriced = [dict(r, cost_usd=None, cache_write_tokens=r["cached_tokens"]) for r in makeRecords(300, seed=5)]
        writeLines(os.path.join(self.second, "stats-w3.jsonl"), unpriced)
        records = self.records + unpriced
        data = json.loads(capture(main, [self.first, self.second, "--format", "json", "--prices", prices])[1])
        costs = [r["cost_usd"] if r["cost_usd"] is not None else table.cost(
            r["model"], r["input_tokens"], r["output_tokens"], r["cached_tokens"], r["cache_write_tokens"])
                 for r in records]
        self.assertGreater(sum(c is not None for c in costs), sum(r["cost_usd"] is not None for r in records) + 50)
        self.assertEqual(data["total"]["cost_usd"], math.fsum(c or 0 for c in costs))

    def test_exportParquet(self) -> None:
        """lmgate export --format parquet writes one typed row per record; read back, the sums are the records'."""
        out = os.path.join(self.second, "records.parquet")
        code, _, err = capture(export, [self.first, self.second, "--output", out])
        self.assertEqual(code, 0)
        self.assertIn("wrote 1200 records", err)
        self.assertIn("stats.jsonl.1: line 151: not a JSON record", err)
        import duckdb

        with duckdb.connect() as db:
            types = dict(db.execute(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM '{out}')").fetchall())
            count, tokens, cost = db.execute(f"SELECT count(*), sum(input_tokens), fsum(cost_usd) FROM '{out}'").fetchone()
        self.assertEqual((count, tokens), (len(self.records), sum(r["input_tokens"] or 0 for r in self.records)))
        self.assertEqual(cost, math.fsum(r["cost_usd"] or 0 for r in self.records))
        self.assertEqual((types["timestamp"], types["status"], types["input_tokens"], types["cost_usd"], types["policy"],
                          types["streaming"]), ("TIMESTAMP", "INTEGER", "BIGINT", "DOUBLE", "VARCHAR[]", "BOOLEAN"))

    def test_exportCSV(self) -> None:
        """lmgate export --format csv: a header of the record's fields, a row per record, lists as JSON text."""
        path = os.path.join(self.second, "stats-w9.jsonl")
        writeLines(path, [record(policy=["cap", "audit"], tags=["pii"], attempts=2, audited=True)])
        out = os.path.join(self.second, "records.csv")
        code, _, _ = capture(export, [self.first, self.second, "--format", "csv", "--output", out, "--since", "2026-11-01"])
        self.assertEqual(code, 0)
        with open(out, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        self.assertEqual(len(rows), len(self.records) + 1)
        self.assertEqual(sum(int(r["output_tokens"] or 0) for r in rows),
                         sum(r["output_tokens"] or 0 for r in self.records) + 5)
        [mine] = [r for r in rows if r["policy"]]
        self.assertEqual((json.loads(mine["policy"]), json.loads(mine["tags"]), mine["attempts"], mine["audited"]),
                         (["cap", "audit"], ["pii"], "2", "true"))

    def test_sql(self) -> None:
        """--sql runs a SELECT over the view records (filters applied) and prints it as a table, CSV or JSON."""
        query = "SELECT owner, sum(cost_usd) AS cost, count(*) AS calls FROM records GROUP BY 1 ORDER BY 1"
        code, out, _ = capture(main, [self.first, self.second, "--format", "json", "--sql", query])
        self.assertEqual(code, 0)
        expected = [{"owner": o, "calls": sum(r["owner"] == o for r in self.records)} for o in OWNERS]
        self.assertEqual([{"owner": r["owner"], "calls": r["calls"]} for r in json.loads(out)], expected)
        code, out, _ = capture(main, [self.first, self.second, "--format", "csv", "--owner", "team-a", "--sql",
                                      "WITH x AS (SELECT day, input_tokens FROM records) SELECT day, sum(input_tokens) AS n FROM x GROUP BY 1 ORDER BY 1"])
        rows = list(csv.DictReader(io.StringIO(out)))
        self.assertEqual(sum(int(r["n"]) for r in rows), sum(r["input_tokens"] or 0 for r in self.records if r["owner"] == "team-a"))
        code, out, _ = capture(main, [self.first, self.second, "--sql", "SELECT count(*) AS calls FROM records"])
        self.assertEqual(out.splitlines()[-1].strip(), "1,200")

    def test_sqlIsReadOnly(self) -> None:
        """--sql refuses anything but one SELECT (writes, COPY, ATTACH, INSTALL, settings, two statements) and
        reading any file but the stats files: one line on stderr, exit status 2, nothing written."""
        target = os.path.join(self.second, "written.csv")
        refused = [f"COPY (SELECT 1) TO '{target}'", "CREATE TABLE t AS SELECT 1", "INSERT INTO records VALUES (1)",
                   f"ATTACH '{target}.db' AS x", "INSTALL httpfs", "LOAD httpfs", "SET enable_external_access = true",
                   "SELECT 1; SELECT 2", "DROP VIEW records", f"SELECT * FROM read_text('{__file__}')",
                   f"SELECT * FROM query('COPY (SELECT 1) TO ''{target}''')", "SELEC 1", "SELECT nothing FROM records"]
        for query in refused:
            code, out, err = capture(main, [self.first, "--sql", query])
            self.assertEqual((code, out, len(err.splitlines())), (2, "", 1), (query, err))
            self.assertTrue(err.startswith("lmgate report: --sql: "), err)
        self.assertEqual([n for n in os.listdir(self.second) if n.startswith("written")], [])


def groupOf(r: dict[str, Any], by: str) -> str:
    """The group a record falls in, as the report names it."""
    value = {"key_id": r["lmgate_id"], "day": r["timestamp"][:10], "hour": r["timestamp"][:13].replace("T", " ") + "h",
             "status": str(r["status"])}.get(by, r.get(by))
    return "-" if value is None else str(value)


class ExactSumTests(SynchronousTestCase):
    def test_aMillionDimes(self) -> None:
        """A million costs of 0.1 (gzip'd, as logrotate leaves them) sum to exactly 100000.0, as math.fsum says."""
        path = os.path.join(os.path.abspath(self.mktemp()) + "-stats.jsonl.gz")
        line = (json.dumps({"timestamp": "2026-11-20T10:00:00.000Z", "status": 200, "cost_usd": 0.1}) + "\n").encode()
        with gzip.open(path, "wb", compresslevel=1) as f:
            for _ in range(100):
                f.write(line * 10000)
        data = json.loads(capture(main, [path, "--format", "json"])[1])
        self.assertEqual((data["total"]["calls"], data["total"]["cost_usd"]), (1000000, 100000.0))
        self.assertEqual(math.fsum([0.1] * 1000000), 100000.0)


class EngineCheckTests(SynchronousTestCase):
    def test_theEngineRejectsWhatRecordProblemRejects(self) -> None:
        """Line by line, the engine's checks (the view lines' ok) agree with recordProblem on edge cases:
        floats or exponents where an integer belongs, bounds, booleans, empty strings, negative zero."""
        from lmgate.ops.report import close, connect, createViews, recordProblem

        base = '{"timestamp": "2026-11-20T10:00:00.000Z", "status": 200, %s}'
        fields = ['"latency_ms": true', '"input_tokens": 1e3', '"input_tokens": 1E3', '"unknown": [1]', '"cost_usd": -0.0',
                  '"latency_ms": 1e400', '"input_tokens": 9007199254740993', '"input_tokens": 9007199254740992',
                  '"ttfb_ms": -5', '"streaming": 1', '"error": ""', '"input_tokens": -0', '"cost_usd": 1e12',
                  '"cost_usd": 1.000001e12', '"status": 99', '"status": 1000', '"status": 200.0', '"owner": "\\u0041"',
                  '"timestamp": null', '"model": null', '"request_bytes": 0', '"ttfb_ms": "1"', '"lmgate_id": {}']
        lines = [base.replace(f.split(":")[0] + ": ", '"_": ') % f for f in fields]  # each key once
        path = os.path.join(os.path.abspath(self.mktemp()) + ".jsonl")
        with open(path, "w") as f:
            f.writelines(line + "\n" for line in lines)
        connection, temporary = connect()
        self.addCleanup(close, connection, temporary)
        createViews(connection, [path], None)
        engine = [ok for (ok,) in connection.execute("SELECT ok FROM lines").fetchall()]
        self.assertEqual(list(zip(lines, engine)), [(line, recordProblem(json.loads(line)) is None) for line in lines])

    #: Field values for L{test_theEngineAgreesOnEveryKind}: each goes into an otherwise good line.
    EDGES = [
        # text fields: a non-string the direct reader would write as text, and real strings that look like one
        '"owner": 3', '"owner": -0', '"owner": 1.5', '"owner": 1e400', '"owner": true', '"owner": false', '"owner": {}',
        '"owner": {"a": 1}', '"owner": [1]', '"owner": []', '"owner": NaN', '"owner": -Infinity', '"owner": "3"',
        '"owner": "true"', '"owner": "[x]"', '"owner": "{"', '"owner": "NaN"', '"owner": "inf"', '"owner": "-1"',
        '"owner": ""', '"owner": "\\u0041"', '"owner": "\\u0000x"', '"owner": "n"', '"owner": "Infinity!"',
        '"client": 127', '"client": "127.0.0.1"', '"client": "::1"', '"client": "10.5"', '"timestamp": 5',
        '"timestamp": "2026"', '"timestamp": true', '"timestamp": null', '"timestamp": ["x"]', '"model": null',
        '"error": ""', '"error": 0', '"lmgate_id": {}', '"request_id": "123"', '"key": "\\"quoted\\""',
        # counts, numbers, status and streaming
        '"input_tokens": "10"', '"input_tokens": 1.5', '"input_tokens": 1.0', '"input_tokens": 1e3',
        '"input_tokens": 1E3', '"input_tokens": -0', '"input_tokens": -1', '"input_tokens": true',
        '"input_tokens": 9007199254740992', '"input_tokens": 9007199254740993', '"input_tokens": 123456789012345678901',
        '"input_tokens": [1]', '"request_bytes": 0', '"latency_ms": "1.5"', '"latency_ms": true', '"latency_ms": 1e400',
        '"latency_ms": NaN', '"latency_ms": -5', '"latency_ms": 1e-7', '"ttfb_ms": "1"', '"cost_usd": -0.0',
        '"cost_usd": -0.01', '"cost_usd": 1e12', '"cost_usd": 1.000001e12', '"cost_usd": 5.3e-05', '"cost_usd": {}',
        '"status": "200"', '"status": 200.0', '"status": 2e2', '"status": 99', '"status": 1000', '"status": true',
        '"status": null', '"streaming": 1', '"streaming": "true"', '"streaming": null', '"streaming": true',
        '"unknown": [1]', '"\\u006fwner": 3', '"\\u006fwner": "a"',
    ]

    def test_theEngineAgreesOnEveryKind(self) -> None:
        """Line by line, on edge cases of every checked kind (a string, a count, a number, the status, a
        boolean), the engine's ok agrees with recordProblem: a value the typed reader would convert (3 into
        the text '3', "10" into the count 10, 1.5 or 1.0 into an integer, true into 1) is never taken as good,
        and the typed columns hold the line's own values."""
        from lmgate.ops.report import close, connect, createViews, recordProblem

        base = '{"timestamp": "2026-11-20T10:00:00.000Z", "status": 200, "owner": "o", %s}'
        lines = []
        for edge in self.EDGES:
            key = edge.split(":")[0]
            line = base.replace(f"{key}: ", '"_": ') if key in base else base
            lines.append(line.replace('"owner": "o", ', "") % edge if key == '"\\u006fwner"' else line % edge)
        path = os.path.abspath(self.mktemp()) + ".jsonl"
        with open(path, "w") as f:
            f.writelines(line + "\n" for line in lines)
        connection, temporary = connect()
        self.addCleanup(close, connection, temporary)
        createViews(connection, [path], None)
        engine = [ok for (ok,) in connection.execute("SELECT ok FROM typed").fetchall()]
        self.assertEqual(list(zip(lines, engine)), [(line, recordProblem(json.loads(line)) is None) for line in lines])
        rows = connection.execute("SELECT owner, status, input_tokens, latency_ms, cost_usd FROM records").fetchall()
        records = [json.loads(line) for line in lines if recordProblem(json.loads(line)) is None]
        self.assertEqual(rows, [(r.get("owner"), r["status"], r.get("input_tokens"), r.get("latency_ms"),
                                 r.get("cost_usd")) for r in records])

    def test_oneBadLineAmongGoodOnes(self) -> None:
        """A file of good records with one line of a wrong type (a count written as a string or as 1.0, an
        owner as a number, the status as 200.0) sums the good records only, and names the bad line."""
        good = makeRecords(300)
        for bad in ('"input_tokens": "10"', '"input_tokens": 1.0', '"owner": 3', '"status": 200.0', '"client": []'):
            key = bad.split(":")[0]
            broken = json.dumps(good[7]).replace(key + ": ", '"_": ', 1)[:-1] + ", " + bad + "}"
            path = os.path.join(os.path.abspath(self.mktemp()), "stats.jsonl")
            os.makedirs(os.path.dirname(path))
            with open(path, "w") as f:
                f.writelines(line + "\n" for line in [json.dumps(r) for r in good[:100]] + [broken]
                             + [json.dumps(r) for r in good[100:]])
            out, err = io.StringIO(), io.StringIO()
            with redirect_stdout(out), redirect_stderr(err):
                self.assertEqual(main([path, "--format", "json"]), 0)
            data = json.loads(out.getvalue())
            self.assertEqual((data["total"]["calls"], data["total"]["input_tokens"], data["unreadable_lines"]),
                             (300, sum(r["input_tokens"] or 0 for r in good), 1), bad)
            self.assertIn(f"{path}: line 101: ", err.getvalue())
