"""
The report's aggregation as it was before it ran on DuckDB (build 8f7a827), kept
for bench/report_bench.py alone: the baseline the DuckDB engine is measured
against. Not part of the product; run as C{python bench/report_old.py ARGS}.

C{lmgate report}: usage summed from the stats files, for whoever pays the bill.

Reads the current and rotated stats files (C{.gz} too) line by line in bounded
memory: sums are exact, latency percentiles come from log-spaced buckets
(within 1 %). Filters by time, owner, key id, provider, model and status; groups
by any of owner, key_id, provider, model, day, hour, status; prints a table, CSV
or JSON, and with C{--html FILE} writes a self-contained page with charts.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import IO, Any, Iterator, Sequence

# What did not change with the engine is the product's own code, imported, not copied.
from lmgate.ops.report import (  # noqa: E402
    GROUPS,
    addFilters,
    recordProblem,
    renderCSV,
    renderJSON,
    renderTable,
    statsFiles,
)

_STEP = math.log(1.01)  # latency buckets 1 % apart


class ExactSum:
    """
    A running sum of floats without rounding drift (Shewchuk's partials, as
    C{math.fsum} does): a million costs of 0.1 sum to 100000.0, not 100000.00000133288.
    Memory stays a handful of floats.
    """

    def __init__(self) -> None:
        self._partials: list[float] = []

    def add(self, x: float) -> None:
        kept = 0
        for y in self._partials:
            if abs(x) < abs(y):
                x, y = y, x
            high = x + y
            low = y - (high - x)
            if low:
                self._partials[kept] = low
                kept += 1
            x = high
        self._partials[kept:] = [x]

    @property
    def value(self) -> float:
        return math.fsum(self._partials)


class Latency:
    """Latency percentiles from log-spaced buckets (1 % apart): bounded memory, exact count."""

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0

    def add(self, ms: float) -> None:
        index = int(math.log(max(ms, 0.001)) / _STEP)
        self.buckets[index] = self.buckets.get(index, 0) + 1
        self.count += 1

    def percentile(self, p: float) -> float | None:
        if not self.count:
            return None
        target = p / 100 * self.count
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= target:
                return math.exp((index + 0.5) * _STEP)
        return None  # pragma: no cover


@dataclass
class Totals:
    calls: int = 0
    errors: int = 0
    input: int = 0
    output: int = 0
    cached: int = 0
    costSum: ExactSum = field(default_factory=ExactSum)
    costKnown: int = 0
    latency: Latency = field(default_factory=Latency)

    def add(self, r: dict[str, Any], cost: float | None) -> None:
        self.calls += 1
        self.errors += r.get("error") is not None
        self.input += r.get("input_tokens") or 0
        self.output += r.get("output_tokens") or 0
        self.cached += r.get("cached_tokens") or 0
        if cost is not None:
            self.costSum.add(cost)
            self.costKnown += 1
        latency = r.get("latency_ms")
        if isinstance(latency, (int, float)):
            self.latency.add(float(latency))

    @property
    def cost(self) -> float:
        """The sum of the known costs, in US dollars."""
        return self.costSum.value

    def row(self) -> dict[str, Any]:
        """The figures for output; the cost at full precision (CSV and JSON are read by programs)."""
        p50, p95 = self.latency.percentile(50), self.latency.percentile(95)
        return {"calls": self.calls, "errors": self.errors, "input_tokens": self.input, "output_tokens": self.output,
                "cached_tokens": self.cached, "cost_usd": self.cost,
                "p50_ms": None if p50 is None else round(p50, 1), "p95_ms": None if p95 is None else round(p95, 1)}


def keyOf(r: dict[str, Any], name: str) -> str:
    if name == "key_id":
        value = r.get("lmgate_id")
    elif name == "day":
        value = (r.get("timestamp") or "")[:10]
    elif name == "hour":
        value = (r.get("timestamp") or "")[:13].replace("T", " ") + "h"
    else:
        value = r.get(name)
    return "-" if value is None else str(value)


class Filter:
    def __init__(self, args: argparse.Namespace) -> None:
        self.since, self.until = args.since, args.until
        self.values = {name: set(v.split(",")) for name, v in
                       (("owner", args.owner), ("lmgate_id", args.key_id), ("provider", args.provider), ("model", args.model)) if v}
        self.statuses = set(args.status.split(",")) if args.status else None

    def __call__(self, r: dict[str, Any]) -> bool:
        stamp = r.get("timestamp") or ""
        if (self.since and stamp < self.since) or (self.until and stamp >= self.until):
            return False
        for name, allowed in self.values.items():
            if str(r.get(name)) not in allowed:
                return False
        if self.statuses is not None:
            status = str(r.get("status"))
            if status not in self.statuses and status[:1] + "xx" not in self.statuses:
                return False
        return True


def readRecords(files: Sequence[str], progress: IO[str] | None, problems: list[str]) -> Iterator[dict[str, Any]]:
    """
    The usable records of C{files}, in order. A line that is not JSON, or whose
    record has the wrong shape (L{recordProblem}), is skipped and named in
    C{problems} with its file and line number.
    """
    total = sum(os.path.getsize(f) for f in files) or 1
    done = 0
    shown = -1
    for path in files:
        opener: Any = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as raw:
            for number, line in enumerate(raw, 1):
                try:
                    record = json.loads(line)
                except (ValueError, RecursionError):  # RecursionError: nesting too deep to parse
                    problems.append(f"{path}: line {number}: not a JSON record")
                    continue
                problem = recordProblem(record)
                if problem is not None:
                    problems.append(f"{path}: line {number}: {problem}")
                    continue
                yield record
            done += os.path.getsize(path)
        if progress is not None:
            percent = int(100 * done / total)
            if percent != shown:
                shown = percent
                bar = "#" * (percent // 4)
                progress.write(f"\rreading {len(files)} files [{bar:<25}] {percent:3d}%")
                progress.flush()
    if progress is not None:
        progress.write("\n")


@dataclass
class Report:
    by: tuple[str, ...]
    groups: dict[tuple[str, ...], Totals] = field(default_factory=dict)
    total: Totals = field(default_factory=Totals)
    # for the page's charts: (day, owner; None for calls refused before a key was known) and day
    daily: dict[tuple[str, str | None], Totals] = field(default_factory=dict)
    days: dict[str, Totals] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(self, r: dict[str, Any], cost: float | None, charts: bool) -> None:
        key = tuple(keyOf(r, name) for name in self.by)
        self.groups.setdefault(key, Totals()).add(r, cost)
        self.total.add(r, cost)
        if charts:
            day = keyOf(r, "day")
            self.daily.setdefault((day, r.get("owner")), Totals()).add(r, cost)
            self.days.setdefault(day, Totals()).add(r, cost)

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for key in sorted(self.groups):
            row = dict(zip(self.by, key))
            row.update(self.groups[key].row())
            out.append(row)
        return out


def build(args: argparse.Namespace, progress: IO[str] | None = None) -> Report:
    files = statsFiles(args.paths)
    report = Report(tuple(args.by))
    keep = Filter(args)
    prices = None
    if args.prices:
        from lmgate.ops.prices import PriceTable

        prices = PriceTable.load(args.prices)
    charts = bool(args.html)
    for record in readRecords(files, progress, report.problems):
        if not keep(record):
            continue
        cost = record.get("cost_usd")
        if cost is None and prices is not None:
            cost = prices.cost(record.get("model"), record.get("input_tokens"), record.get("output_tokens"),
                               record.get("cached_tokens"), record.get("cache_write_tokens"))
        report.add(record, cost if isinstance(cost, (int, float)) else None, charts)
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmgate report", description="Summarise LMGate's usage records.")
    parser.add_argument("paths", nargs="*", default=["var/stats/stats.jsonl"],
                        help="stats files or directories (default var/stats/stats.jsonl and its rotated files)")
    addFilters(parser)
    parser.add_argument("--by", default="owner", help=f"group by any of {', '.join(GROUPS)} (comma-separated; default owner)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained page with charts")
    parser.add_argument("--prices", metavar="FILE", help="a price table for records written without cost_usd")
    args = parser.parse_args(argv)
    args.by = [b.strip() for b in args.by.split(",") if b.strip()]
    bad = [b for b in args.by if b not in GROUPS]
    if bad or not args.by:
        parser.error(f"--by takes {', '.join(GROUPS)}; got {', '.join(bad) or 'nothing'}")
    files = statsFiles(args.paths)
    if not files:
        sys.stderr.write(f"lmgate report: no stats files at {', '.join(args.paths)}\n")
        return 1
    large = sum(os.path.getsize(f) for f in files) > 50 * 1024 * 1024
    progress = sys.stderr if sys.stderr.isatty() and large else None
    report = build(args, progress)
    for problem in report.problems[:10]:
        sys.stderr.write(f"lmgate report: {problem}\n")
    if len(report.problems) > 10:
        sys.stderr.write(f"lmgate report: {len(report.problems) - 10} more unreadable lines\n")
    render = {"table": renderTable, "csv": renderCSV, "json": renderJSON}[args.format]
    sys.stdout.write(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
