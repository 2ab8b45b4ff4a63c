"""C{lmgate report}: sums equal the records' sums across rotated and compressed files."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import shutil
import subprocess
from contextlib import redirect_stdout
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from lmgate.report import main, parseWhen

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
        """The page renders in headless Chromium: the charts are drawn (non-blank screenshot), no console errors."""
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            raise self.skipTest("chromium is not installed (.ci/run installs Debian's chromium)")
        page = os.path.join(self.dir, "report.html")
        self.run_("--html", page)
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


