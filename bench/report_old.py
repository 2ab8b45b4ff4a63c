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
import csv
import gzip
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import IO, Any, Iterator, Sequence

GROUPS = ("owner", "key_id", "provider", "model", "day", "hour", "status")
_RELATIVE = re.compile(r"^(\d+)([mhdw])$")
_STEP = math.log(1.01)  # latency buckets 1 % apart


def parseWhen(text: str, now: datetime | None = None) -> str:
    """An ISO date/datetime or a relative span (30m, 24h, 7d, 2w) as an ISO UTC timestamp prefix."""
    now = now or datetime.now(timezone.utc)
    match = _RELATIVE.match(text.strip())
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        delta = {"m": timedelta(minutes=amount), "h": timedelta(hours=amount), "d": timedelta(days=amount), "w": timedelta(weeks=amount)}[unit]
        return (now - delta).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date, a datetime or a span like 24h / 7d: {text!r}") from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def statsFiles(paths: Sequence[str]) -> list[str]:
    """
    The files to read: a directory gives every C{*.jsonl*} file in it; a stats
    file gives itself and its rotated and per-worker siblings.
    """
    found: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found += [os.path.join(path, n) for n in sorted(os.listdir(path)) if ".jsonl" in n]
            continue
        directory, name = os.path.split(path)
        stem = name.split(".jsonl")[0]
        if os.path.isdir(directory or "."):
            siblings = [n for n in sorted(os.listdir(directory or ".")) if n.startswith(stem) and ".jsonl" in n]
            found += [os.path.join(directory, n) for n in siblings]
        if not found and os.path.exists(path):
            found.append(path)
    return list(dict.fromkeys(found))


#: The largest count a record may carry: beyond it a number is not a real count (and
#: 2**53 is where JSON readers that use doubles stop being exact).
MAX_COUNT = 2**53
#: The largest magnitude of a cost or a latency; anything past it is not a call's.
MAX_NUMBER = 1e12

_TEXT = ("request_id", "lmgate_id", "owner", "key", "provider", "method", "endpoint", "model", "usage_source",
         "upstream_request_id", "client", "error")
_COUNTS = ("input_tokens", "output_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens", "total_tokens",
           "request_bytes", "response_bytes")
_NUMBERS = ("latency_ms", "ttfb_ms", "cost_usd")


def _shown(value: Any) -> str:
    """A value for a problem line: its JSON-ish repr, control characters escaped, cut short."""
    text = printable(repr(value)) if not isinstance(value, int) or abs(value) < 10**40 else f"an integer of {len(str(abs(value)))} digits"
    return text if len(text) <= 40 else text[:37] + "..."


def recordProblem(record: Any) -> str | None:
    """
    Why a parsed JSON line cannot be summed as a usage record, or None when it can.

    A record is an object with a C{timestamp} (string) and a C{status} (an HTTP status
    code); every other documented field it carries is null or of its documented type
    (docs/records.md): counts are integers from 0 to 2**53, costs and latencies finite
    numbers (costs not negative). Fields the report does not know are ignored, so
    records can grow new fields.
    """
    if not isinstance(record, dict):
        return f"not a JSON object ({type(record).__name__})"
    stamp = record.get("timestamp")
    if not isinstance(stamp, str):
        return "timestamp: missing" if stamp is None else f"timestamp: not a string ({_shown(stamp)})"
    status = record.get("status")
    if status is None:
        return "status: missing"
    if type(status) is not int or not 100 <= status <= 999:
        return f"status: not an HTTP status ({_shown(status)})"
    for name in _TEXT:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            return f"{name}: not a string ({_shown(value)})"
    streaming = record.get("streaming")
    if streaming is not None and not isinstance(streaming, bool):
        return f"streaming: not true or false ({_shown(streaming)})"
    for name in _COUNTS:
        value = record.get(name)
        if value is not None and (type(value) is not int or not 0 <= value <= MAX_COUNT):
            return f"{name}: not a count ({_shown(value)})"
    for name in _NUMBERS:
        value = record.get(name)
        if value is None:
            continue
        if type(value) not in (int, float) or not math.isfinite(value) or abs(value) > MAX_NUMBER:
            return f"{name}: not a finite number ({_shown(value)})"
        if name == "cost_usd" and value < 0:
            return f"cost_usd: negative ({_shown(value)})"
    return None


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def printable(text: str) -> str:
    """
    C{text} with control characters (C0, C1, line separators and the invisible
    direction marks) written as C{\\xNN} / C{\\uNNNN}: a value from a record cannot
    move the cursor, recolour the terminal, break a table row or reorder what it shows.
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text)


def formatMoney(value: float) -> str:
    """
    US dollars with the digits that matter: cents from a dollar up (C{12.35},
    C{1,234.50}), three significant digits below (C{0.0123}, C{0.000277}); never
    C{0.00} for a cost that is not zero.
    """
    if value == 0:
        return "0.00"
    if abs(value) >= 1:
        return f"{value:,.2f}"
    if abs(value) < 1e-9:
        return f"{value:.2e}"
    decimals = 2 - math.floor(math.log10(abs(value)))
    text = f"{value:.{decimals}f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"{whole}.{fraction:0<2}"


def formatMs(value: float) -> str:
    """A latency in milliseconds: one decimal under a second (C{12.6}), whole milliseconds above (C{1,235})."""
    return f"{value:,.1f}" if abs(round(value, 1)) < 1000 else f"{value:,.0f}"


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


COLUMNS = ("calls", "errors", "input_tokens", "output_tokens", "cached_tokens", "cost_usd", "p50_ms", "p95_ms")


def _cell(value: Any, column: str = "") -> str:
    """One value as the table and the page show it: money and latency by their own rules, text printable."""
    if value is None:
        return "-"
    if column == "cost_usd":
        return formatMoney(value)
    if column in ("p50_ms", "p95_ms"):
        return formatMs(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.6g}"
    return printable(str(value))


_FORMULA = ("=", "+", "-", "@", "\t", "\r", "\n")


def csvSafe(value: Any) -> Any:
    """
    A CSV cell that a spreadsheet will not run: text starting with C{= + - @}, a
    tab or a line break gets a leading C{'} (a group named C{=HYPERLINK(...)} stays
    text). Numbers, and the lone C{-} that stands for a missing value, stay as they are.
    """
    if isinstance(value, str) and value.startswith(_FORMULA) and value != "-":
        return "'" + value
    return value


def renderTable(report: Report) -> str:
    header = list(report.by) + list(COLUMNS)
    rows = [[_cell(r.get(c), c) for c in header] for r in report.rows()]
    total = report.total.row()
    rows.append(["TOTAL"] + [""] * (len(report.by) - 1) + [_cell(total[c], c) for c in COLUMNS])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.upper().ljust(w) if i < len(report.by) else h.upper().rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i < len(report.by) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines) + "\n"


def renderCSV(report: Report) -> str:
    """
    The rows as CSV: RFC 4180 line endings (CRLF), so that a value holding a bare
    carriage return is quoted rather than splitting its row; text cells made safe by
    L{csvSafe}.
    """
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(report.by) + list(COLUMNS), lineterminator="\r\n")
    writer.writeheader()
    for row in report.rows():
        writer.writerow({name: csvSafe(value) for name, value in row.items()})
    return out.getvalue()


def renderJSON(report: Report) -> str:
    return json.dumps({"by": list(report.by), "groups": report.rows(), "total": report.total.row(),
                       "unreadable_lines": len(report.problems)}, indent=2) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmgate report", description="Summarise LMGate's usage records.")
    parser.add_argument("paths", nargs="*", default=["var/stats/stats.jsonl"],
                        help="stats files or directories (default var/stats/stats.jsonl and its rotated files)")
    parser.add_argument("--since", type=parseWhen, help="from this time: 2026-11-01, 2026-11-01T08:00, or 24h / 7d ago")
    parser.add_argument("--until", type=parseWhen, help="before this time (same forms)")
    parser.add_argument("--owner", help="only these owners (comma-separated)")
    parser.add_argument("--key-id", help="only these allow-list ids")
    parser.add_argument("--provider", help="only these providers")
    parser.add_argument("--model", help="only these models")
    parser.add_argument("--status", help="only these statuses: codes or classes (200,4xx)")
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
