"""
C{lmgate report}: usage summed from the stats files, for whoever pays the bill.

Reads the current and rotated stats files (C{.gz} too), of any number of
workers and instances, with DuckDB (embedded, in-process, bounded memory): the
record's columns are declared, each line checked as L{recordProblem} checks it
(unreadable lines skipped, counted and named), sums exact, percentiles exact.
Filters by time, owner, key id, provider, model and status; groups by any of
owner, key_id, provider, model, day, hour, status; prints a table, CSV or JSON,
and with C{--html FILE} writes a self-contained page with charts. C{--sql}
runs one read-only query over the view C{records}.
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
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

GROUPS = ("owner", "key_id", "provider", "model", "day", "hour", "status")
_RELATIVE = re.compile(r"^(\d+)([mhdw])$")


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


#: Every documented record field (docs/records.md) and its kind. The kinds of the first
#: part are checked line by line as L{recordProblem} checks them (a line that breaks one
#: is unreadable); the later fields are typed leniently (a wrong type reads as null).
FIELDS: dict[str, str] = {
    "timestamp": "timestamp", "status": "status", "streaming": "bool",
    **{name: "text" for name in _TEXT}, **{name: "count" for name in _COUNTS}, **{name: "number" for name in _NUMBERS},
    "alias": "lenient text", "attempts": "lenient int", "auth": "lenient text", "limited_by": "lenient text",
    "reserved_tokens": "lenient int", "limits": "lenient text", "policy": "list", "tags": "list", "audited": "lenient bool",
}
#: The SQL type of each kind in the C{records} view (and the export).
SQL_TYPES = {"timestamp": "VARCHAR", "status": "INTEGER", "bool": "BOOLEAN", "text": "VARCHAR", "count": "BIGINT",
             "number": "DOUBLE", "lenient text": "VARCHAR", "lenient int": "BIGINT", "lenient bool": "BOOLEAN",
             "list": "VARCHAR[]"}

#: DuckDB's memory budget for one report: aggregation state beyond it spills to a
#: temporary directory (exact percentiles keep each latency: 8 bytes per record).
MEMORY_LIMIT = os.environ.get("LMGATE_REPORT_MEMORY", "1GB")


def _raw(name: str) -> str:
    """The field's JSON text as written (JSON null and a missing field are SQL NULL)."""
    return f'(CAST("{name}" AS VARCHAR))'


def _integral(raw: str) -> str:
    """SQL: the JSON number text C{raw} is an integer as written (no fraction, no exponent)."""
    return f"(NOT contains({raw}, '.') AND NOT contains({raw}, 'e') AND NOT contains({raw}, 'E'))"


def _quoted(raw: str) -> str:
    """SQL: the JSON text C{raw} is a string (its first byte is C{"}), by comparison: no function call per line."""
    return f"({raw} >= '\"' AND {raw} < '#')"


#: The kinds whose value is cast once per line (C{"_t_name"} in the view C{lines}): the
#: check and the typed column both use it.
_CAST = ("status", "count", "number")


def _valid(name: str, kind: str) -> str | None:
    """
    SQL true when the field passes L{recordProblem}'s check for its kind (None: not checked).

    This runs on every field of every line, so it compares rather than calls: a
    string is JSON text starting with C{"}; an integer is a value (cast once) that
    is written back as the same text (the reader writes JSON numbers canonically:
    C{1.0}, C{1e3} and C{"7"} are not their integer's text); a number is a value
    within its bounds (a string, C{true}, C{NaN} or an infinity casts to null or
    falls outside).
    """
    raw, value = _raw(name), f'"_t_{name}"'
    if kind == "timestamp":
        return f"coalesce({_quoted(raw)}, false)"
    if kind == "status":
        return f"coalesce({value} BETWEEN 100 AND 999 AND CAST({value} AS VARCHAR) = {raw}, false)"
    if kind == "text":
        return f"({raw} IS NULL OR {_quoted(raw)})"
    if kind == "bool":
        return f"coalesce({raw} IN ('true', 'false'), true)"
    if kind == "count":
        return f"({raw} IS NULL OR coalesce({value} BETWEEN 0 AND {MAX_COUNT} AND CAST({value} AS VARCHAR) = {raw}, false))"
    if kind == "number":
        low = "0" if name == "cost_usd" else f"-{MAX_NUMBER:.0f}"
        return f"({raw} IS NULL OR coalesce({value} BETWEEN {low} AND {MAX_NUMBER:.0f}, false))"
    return None


def _typed(name: str, kind: str) -> str:
    """SQL: the field as its view column (checked fields are valid here; lenient ones null when mistyped)."""
    raw = _raw(name)
    if kind in ("timestamp", "text", "lenient text"):
        return f"CASE WHEN {_quoted(raw)} THEN json_extract_string({raw}, '$') END"
    if kind in _CAST:  # cast in the view lines (TRY_: the view also types the lines it drops)
        return f'"_t_{name}"'
    if kind in ("bool", "lenient bool"):
        return f"CASE {raw} WHEN 'true' THEN true WHEN 'false' THEN false END"
    if kind == "lenient int":
        return f"CASE WHEN {_integral(raw)} THEN try_cast({raw} AS BIGINT) END"
    return f"CASE WHEN left({raw}, 1) = '[' THEN try_cast(CAST({raw} AS JSON) AS VARCHAR[]) END"


def _quote(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _filters(args: argparse.Namespace) -> list[str]:
    """SQL conditions on the typed columns for the report's filters (as the report always read them)."""
    where: list[str] = []
    if getattr(args, "since", None):
        where.append(f"timestamp >= {_quote(args.since)}")
    if getattr(args, "until", None):
        where.append(f"timestamp < {_quote(args.until)}")
    for option, column in (("owner", "owner"), ("key_id", "lmgate_id"), ("provider", "provider"), ("model", "model")):
        value = getattr(args, option, None)
        if value:  # a null value reads as "None", as str(None) did
            where.append(f"coalesce({column}, 'None') IN ({', '.join(_quote(v) for v in value.split(','))})")
    if getattr(args, "status", None):
        wanted = ", ".join(_quote(v) for v in args.status.split(","))
        where.append(f"(CAST(status AS VARCHAR) IN ({wanted}) OR left(CAST(status AS VARCHAR), 1) || 'xx' IN ({wanted}))")
    return where


def connect() -> tuple[Any, str]:
    """
    An in-process DuckDB database for one report: all cores, a bounded memory
    budget with a temporary directory to spill to, no progress bar; extensions are
    never fetched (the JSON reader is built in). Returns the connection and its
    temporary directory, for L{close}.
    """
    import duckdb

    temporary = tempfile.mkdtemp(prefix="lmgate-report-")
    connection = duckdb.connect(":memory:", config={
        "threads": os.cpu_count() or 1, "memory_limit": MEMORY_LIMIT, "temp_directory": temporary,
        "autoinstall_known_extensions": False,
    })
    connection.execute("SET enable_progress_bar = false")
    return connection, temporary


def close(connection: Any, temporary: str) -> None:
    """Close a connection from L{connect} and remove its temporary directory."""
    connection.close()
    shutil.rmtree(temporary, ignore_errors=True)


def createViews(connection: Any, files: Sequence[str], args: argparse.Namespace | None = None) -> None:
    """
    Define, over C{files}, the view C{lines} (every line that is a record or is
    meant as one: each field's JSON text, C{filename}, each count, number and the
    status cast once as C{_t_<field>}, and C{ok}: the line passes
    L{recordProblem}'s checks), the view C{typed} (the same lines, the documented
    fields typed) and the view C{records} (the readable records that pass C{args}'
    filters, plus C{day} and C{hour}). Nothing is read until a query runs. The
    paths are DuckDB file patterns: a name holding C{*}, C{?} or C{[} would be
    taken as one (the names logrotate and the gateway give never hold one).
    """
    columns = "{" + ", ".join(f"{_quote(name)}: 'JSON'" for name in FIELDS) + "}"
    paths = "[" + ", ".join(_quote(os.path.abspath(f)) for f in files) + "]"
    checks = [check for check in (_valid(name, kind) for name, kind in FIELDS.items()) if check is not None]
    casts = ", ".join(f'TRY_CAST({_raw(name)} AS {SQL_TYPES[kind]}) AS "_t_{name}"'
                      for name, kind in FIELDS.items() if kind in _CAST)
    connection.execute(
        f"CREATE VIEW lines AS SELECT *, ({' AND '.join(checks)}) AS ok FROM (SELECT *, {casts}"
        f" FROM read_json({paths}, columns={columns}, format='newline_delimited', ignore_errors=true, filename=true,"
        " compression='auto'))")
    typed = ", ".join(f'{_typed(name, kind)} AS "{name}"' for name, kind in FIELDS.items())
    where = " AND ".join(_filters(args) if args is not None else []) or "true"
    connection.execute(
        f"CREATE VIEW typed AS SELECT {typed}, filename, ok FROM lines")
    connection.execute(
        "CREATE VIEW records AS SELECT * EXCLUDE (filename, ok), left(timestamp, 10) AS day,"
        f" replace(left(timestamp, 13), 'T', ' ') || 'h' AS hour FROM typed WHERE ok AND {where}")


def locateProblems(path: str) -> list[str]:
    """
    The unreadable lines of one file, each named with its line number and what is
    wrong (L{recordProblem}): read line by line, only for files where the engine
    counted some. Blank lines are no records and no problems (the engine skips them).
    """
    problems: list[str] = []
    opener: Any = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as raw:
        for number, line in enumerate(raw, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: nesting too deep to parse
                problems.append(f"{path}: line {number}: not a JSON record")
                continue
            problem = recordProblem(record)
            if problem is not None:
                problems.append(f"{path}: line {number}: {problem}")
    return problems


class Percentiles:
    """The exact latency percentiles of a group, for the page (C{percentile(50)}, C{percentile(95)})."""

    def __init__(self, p50: float | None, p95: float | None) -> None:
        self._values = {50: p50, 95: p95}

    def percentile(self, p: float) -> float | None:
        return self._values[int(p)]


@dataclass
class Totals:
    """The figures of one group (or of all records)."""

    calls: int = 0
    errors: int = 0
    input: int = 0
    output: int = 0
    cached: int = 0
    cost: float = 0.0
    latency: Percentiles = field(default_factory=lambda: Percentiles(None, None))

    def row(self) -> dict[str, Any]:
        """The figures for output; the cost at full precision (CSV and JSON are read by programs)."""
        p50, p95 = self.latency.percentile(50), self.latency.percentile(95)
        return {"calls": self.calls, "errors": self.errors, "input_tokens": self.input, "output_tokens": self.output,
                "cached_tokens": self.cached, "cost_usd": self.cost,
                "p50_ms": None if p50 is None else round(p50, 1), "p95_ms": None if p95 is None else round(p95, 1)}


@dataclass
class Report:
    by: tuple[str, ...]
    groups: dict[tuple[str, ...], Totals] = field(default_factory=dict)
    total: Totals = field(default_factory=Totals)
    # for the page's charts: (day, owner; None for calls refused before a key was known) and day
    daily: dict[tuple[str, str | None], Totals] = field(default_factory=dict)
    days: dict[str, Totals] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: the DuckDB connection, with the view C{records} over the same files and filters;
    #: open until L{close} (main closes it when done)
    connection: Any = None
    temporary: str = ""

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for key in sorted(self.groups):
            row = dict(zip(self.by, key))
            row.update(self.groups[key].row())
            out.append(row)
        return out

    def close(self) -> None:
        if self.connection is not None:
            close(self.connection, self.temporary)
            self.connection = None


#: SQL for each group name, over the view C{records}: missing values read "-".
_GROUP_SQL = {"owner": "owner", "key_id": "lmgate_id", "provider": "provider", "model": "model", "day": "day",
              "hour": "hour", "status": "CAST(status AS VARCHAR)"}


def _costSQL(prices: bool) -> str:
    """
    The call's cost: its own, else (with C{--prices}) the price table's, computed as
    L{PriceTable.cost} does from the prices joined in as C{p} (null when the model or
    the input count is unknown).
    """
    if not prices:
        return "cost_usd"
    cached, written = "coalesce(cached_tokens, 0)", "coalesce(cache_write_tokens, 0)"
    return (f"coalesce(cost_usd, round((greatest(0, input_tokens - {cached} - {written}) * p.input + {cached} * p.cached"
            f" + {written} * p.cache_write + coalesce(output_tokens, 0) * p.output) / 1e6, 9))")


def loadPrices(connection: Any, path: str) -> None:
    """
    The table C{lmgate_prices} (model, input, cached, cache_write, output: dollars
    per million tokens) for the models of the records written without a cost, each
    looked up as the gateway looks it up (L{PriceTable.priceFor}: exact, longest
    prefix, Bedrock region and version).
    """
    from lmgate.ops.prices import PriceTable

    table = PriceTable.load(path)
    models = [m for (m,) in connection.execute("SELECT DISTINCT model FROM typed WHERE ok AND cost_usd IS NULL AND model IS NOT NULL").fetchall()]
    connection.execute("CREATE TEMPORARY TABLE lmgate_prices (model VARCHAR, input DOUBLE, cached DOUBLE, cache_write DOUBLE, output DOUBLE)")
    rows = [(m, price.input, price.cachedInput, price.cacheWrite, price.output) for m in models
            for price in [table.priceFor(m)] if price is not None]
    if rows:
        connection.executemany("INSERT INTO lmgate_prices VALUES (?, ?, ?, ?, ?)", rows)


def build(args: argparse.Namespace) -> Report:
    """
    The report of C{args} in one scan of the files: the groups (with the unreadable
    lines per file among them: their group keys are null, their file is not), the
    total (and for C{--html} the figures per day and owner) are grouping sets of one
    query. Percentiles are exact: C{quantile_cont} (linear
    between the two nearest latencies). Costs are summed with C{fsum} (compensated).
    """
    files = statsFiles(args.paths)
    report = Report(tuple(args.by))
    connection, report.temporary = connect()
    report.connection = connection
    if not files:
        return report
    createViews(connection, files, args)
    hasPrices = bool(getattr(args, "prices", None))
    if hasPrices:  # one more scan, for the models without costs
        loadPrices(connection, args.prices)
    where = " AND ".join(_filters(args)) or "true"
    keys = [f"CASE WHEN ok THEN coalesce({_GROUP_SQL[name]}, '-') END AS g{i}" for i, name in enumerate(report.by)]
    # the files' unreadable lines are counted in the groups' own set (their keys are
    # null, their file is not): a set of their own would aggregate every readable
    # line once more, exact percentiles included
    sets = ["(" + ", ".join(f"g{i}" for i in range(len(report.by))) + ", bad_file)", "()"]
    if args.html:
        sets += ["(chart_day, chart_owner)", "(chart_day)"]
    query = f"""
        WITH scanned AS (
            SELECT *, left(timestamp, 10) AS day, replace(left(timestamp, 13), 'T', ' ') || 'h' AS hour,
                   {_costSQL(hasPrices)} AS cost
            FROM typed {"LEFT JOIN lmgate_prices p USING (model)" if hasPrices else ""} WHERE NOT ok OR ({where}))
        SELECT grouping({', '.join(f'g{i}' for i in range(len(report.by)))}) AS notGroups,
               {'grouping(chart_day), grouping(chart_owner),' if args.html else '0, 0,'}
               {', '.join(f'g{i}' for i in range(len(report.by)))}, bad_file,
               {'chart_day, chart_owner,' if args.html else 'NULL, NULL,'}
               count(*) FILTER (WHERE ok), count(error) FILTER (WHERE ok),
               coalesce(sum(input_tokens) FILTER (WHERE ok), 0), coalesce(sum(output_tokens) FILTER (WHERE ok), 0),
               coalesce(sum(cached_tokens) FILTER (WHERE ok), 0), coalesce(fsum(cost) FILTER (WHERE ok), 0.0),
               quantile_cont(latency_ms, [0.5, 0.95]) FILTER (WHERE ok), count(*) FILTER (WHERE NOT ok)
        FROM (SELECT *, {', '.join(keys)}, CASE WHEN NOT ok THEN filename END AS bad_file,
                     CASE WHEN ok THEN day END AS chart_day, CASE WHEN ok THEN owner END AS chart_owner FROM scanned)
        GROUP BY GROUPING SETS ({', '.join(sets)})"""
    badFiles: dict[str, int] = {}
    cursor = connection.execute(query)
    width = len(report.by)
    while True:
        batch = cursor.fetchmany(10000)
        if not batch:
            break
        for row in batch:
            notGroups, notDay, notOwner = row[0], row[1], row[2]
            key, badFile, day, owner = tuple(row[3:3 + width]), row[3 + width], row[4 + width], row[5 + width]
            calls, errors, inTokens, outTokens, cached, cost, quantiles, bad = row[6 + width:]
            p50, p95 = quantiles if quantiles is not None else (None, None)
            totals = Totals(calls, errors, int(inTokens), int(outTokens), int(cached), float(cost), Percentiles(p50, p95))
            if notGroups == 0:
                if badFile is not None:
                    badFiles[badFile] = bad
                elif calls:
                    report.groups[key] = totals
            elif args.html and notDay == 0 and notOwner == 0:
                if day is not None:
                    report.daily[(day, owner)] = totals
            elif args.html and notDay == 0:
                if day is not None:
                    report.days[day] = totals
            else:
                report.total = totals
    for path in files:
        if os.path.abspath(path) in badFiles:
            report.problems += locateProblems(path)
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


def readOnly(connection: Any, files: Sequence[str]) -> None:
    """
    Close the database to everything but reading C{files}: no other file can be
    read or written (C{COPY}, C{ATTACH}, table functions on other paths), no
    extension installed or loaded, and no setting changed back (locked).
    """
    paths = "[" + ", ".join(_quote(os.path.abspath(f)) for f in files) + "]"
    connection.execute(f"SET allowed_paths = {paths}")
    connection.execute("SET enable_external_access = false")
    connection.execute("SET lock_configuration = true")


class QueryError(Exception):
    """An C{--sql} query that is refused or fails: the message names the problem."""


def runQuery(connection: Any, files: Sequence[str], sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """
    Run one read-only query over the view C{records}: a single C{SELECT} (or
    C{WITH ... SELECT}); anything else is refused before it runs.

    @raise QueryError: the query is not a single SELECT, or DuckDB rejects it.
    """
    import duckdb

    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(_firstLine(e)) from None
    if len(statements) != 1:
        raise QueryError(f"one SELECT query, not {len(statements)} statements")
    if statements[0].type != duckdb.StatementType.SELECT:
        raise QueryError(f"only a SELECT query is run, not {statements[0].type.name}")
    readOnly(connection, files)
    try:
        cursor = connection.execute(sql)
        names = [d[0] for d in cursor.description or []]
        return names, cursor.fetchall()
    except duckdb.Error as e:
        raise QueryError(_firstLine(e)) from None


def _firstLine(error: BaseException) -> str:
    """DuckDB's message on one line."""
    return " ".join(str(error).split())


def _plain(value: Any) -> Any:
    """A query result's value as JSON can carry it (dates, decimals and others as text)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def renderQuery(names: list[str], rows: list[tuple[Any, ...]], form: str) -> str:
    """An C{--sql} result as an aligned table, CSV (made safe like the report's) or JSON (a list of objects)."""
    if form == "json":
        return json.dumps([{n: _plain(v) for n, v in zip(names, row)} for row in rows], indent=2) + "\n"
    if form == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(names)
        for row in rows:
            writer.writerow([csvSafe(_plain(v) if not isinstance(v, (list, dict)) else json.dumps(_plain(v))) for v in row])
        return out.getvalue()
    cells = [[_cell(v if not isinstance(v, (list, tuple, dict)) else json.dumps(_plain(v))) for v in row] for row in rows]
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]
    numeric = [all(isinstance(row[i], (int, float)) or row[i] is None for row in rows) and bool(rows) for i in range(len(names))]
    def line(values: list[str]) -> str:
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths))).rstrip()
    return "\n".join([line([printable(n).upper() for n in names]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells]) + "\n"


def addFilters(parser: argparse.ArgumentParser) -> None:
    """The options that choose records (C{lmgate report} and C{lmgate export} take the same)."""
    parser.add_argument("--since", type=parseWhen, help="from this time: 2026-11-01, 2026-11-01T08:00, or 24h / 7d ago")
    parser.add_argument("--until", type=parseWhen, help="before this time (same forms)")
    parser.add_argument("--owner", help="only these owners (comma-separated)")
    parser.add_argument("--key-id", help="only these allow-list ids")
    parser.add_argument("--provider", help="only these providers")
    parser.add_argument("--model", help="only these models")
    parser.add_argument("--status", help="only these statuses: codes or classes (200,4xx)")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmgate report", description="Summarise LMGate's usage records.")
    parser.add_argument("paths", nargs="*", default=["var/stats/stats.jsonl"],
                        help="stats files or directories (default var/stats/stats.jsonl and its rotated files)")
    addFilters(parser)
    parser.add_argument("--by", default="owner", help=f"group by any of {', '.join(GROUPS)} (comma-separated; default owner)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--html", metavar="FILE", help="also write a self-contained page with charts")
    parser.add_argument("--prices", metavar="FILE", help="a price table for records written without cost_usd")
    parser.add_argument("--config", metavar="FILE", help="the gateway's lmgate.yaml: also each usage-limit rule's use per day and month")
    parser.add_argument("--sql", metavar="QUERY", help="run one read-only SELECT over the view records and print its result")
    args = parser.parse_args(argv)
    args.by = [b.strip() for b in args.by.split(",") if b.strip()]
    bad = [b for b in args.by if b not in GROUPS]
    if bad or not args.by:
        parser.error(f"--by takes {', '.join(GROUPS)}; got {', '.join(bad) or 'nothing'}")
    files = statsFiles(args.paths)
    if not files:
        sys.stderr.write(f"lmgate report: no stats files at {', '.join(args.paths)}\n")
        return 1
    if args.sql is not None:
        connection, temporary = connect()
        try:
            createViews(connection, files, args)
            names, rows = runQuery(connection, files, args.sql)
        except QueryError as e:
            sys.stderr.write(f"lmgate report: --sql: {e}\n")
            return 2
        finally:
            close(connection, temporary)
        sys.stdout.write(renderQuery(names, rows, args.format))
        return 0
    if args.config:
        from lmgate.ops.report_limits import LimitsFileError, limitRules

        try:
            limitRules(args.config)  # a wrong file is named before the records are read
        except LimitsFileError as e:
            sys.stderr.write(f"lmgate report: {e}\n")
            return 2
    report = build(args)
    try:
        for problem in report.problems[:10]:
            sys.stderr.write(f"lmgate report: {problem}\n")
        if len(report.problems) > 10:
            sys.stderr.write(f"lmgate report: {len(report.problems) - 10} more unreadable lines\n")
        limits = None
        if args.config:
            from lmgate.ops.report_limits import limitUse

            limits = limitUse(report.connection, args.config)
        render = {"table": renderTable, "csv": renderCSV, "json": renderJSON}[args.format]
        text = render(report)
        if limits is not None:
            from lmgate.ops.report_limits import withLimits

            text = withLimits(text, args.format, limits)
        sys.stdout.write(text)
        if args.html:
            from lmgate.ops.report_html import renderHTML

            with open(args.html, "w", encoding="utf-8") as f:
                f.write(renderHTML(report, args, limits))
            sys.stderr.write(f"lmgate report: wrote {args.html}\n")
    finally:
        report.close()
    return 0

