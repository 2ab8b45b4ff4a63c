"""
C{lmgate export}: the usage records as a typed table for a warehouse.

Reads the same files as C{lmgate report} (rotated, compressed, every worker's and
instance's), checks each line the same way (unreadable lines are skipped, counted
and named on stderr), and writes one row per record with every documented field
(docs/records.md) as a typed column: Parquet (lists as C{LIST(VARCHAR)}) or CSV
(lists as JSON text).
"""

from __future__ import annotations

import argparse
import os
import sys

from lmgate.ops.report import FIELDS, addFilters, close, connect, createViews, locateProblems, statsFiles


def selectList(form: str) -> str:
    """The export's columns over the view C{records}: the fields in their documented order, the timestamp as a TIMESTAMP (UTC)."""
    columns = []
    for name, kind in FIELDS.items():
        if name == "timestamp":
            columns.append('TRY_CAST(replace(timestamp, \'Z\', \'\') AS TIMESTAMP) AS "timestamp"')
        elif kind == "list" and form == "csv":
            columns.append(f'CAST(to_json("{name}") AS VARCHAR) AS "{name}"')
        else:
            columns.append(f'"{name}"')
    return ", ".join(columns)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lmgate export", description="Write LMGate's usage records as Parquet or CSV.")
    parser.add_argument("paths", nargs="*", default=["var/stats/stats.jsonl"],
                        help="stats files or directories, as lmgate report takes them (default var/stats/stats.jsonl)")
    parser.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    parser.add_argument("--output", "-o", required=True, metavar="FILE", help="the file to write (replaced if it exists)")
    addFilters(parser)
    args = parser.parse_args(argv)
    files = statsFiles(args.paths)
    if not files:
        sys.stderr.write(f"lmgate export: no stats files at {', '.join(args.paths)}\n")
        return 1
    connection, temporary = connect()
    try:
        createViews(connection, files, args)
        options = "FORMAT parquet, COMPRESSION zstd" if args.format == "parquet" else "FORMAT csv, HEADER true"
        output = os.path.abspath(args.output)
        written = connection.execute(
            f"COPY (SELECT {selectList(args.format)} FROM records) TO '{output.replace(chr(39), chr(39) * 2)}' ({options})").fetchone()
        bad = dict(connection.execute("SELECT filename, count(*) FROM lines WHERE NOT ok GROUP BY filename").fetchall())
    finally:
        close(connection, temporary)
    problems: list[str] = []
    for path in files:
        if os.path.abspath(path) in bad:
            problems += locateProblems(path)
    for problem in problems[:10]:
        sys.stderr.write(f"lmgate export: {problem}\n")
    if len(problems) > 10:
        sys.stderr.write(f"lmgate export: {len(problems) - 10} more unreadable lines\n")
    rows = written[0] if written else 0
    sys.stderr.write(f"lmgate export: wrote {rows} records to {args.output}"
                     f"{f' ({len(problems)} unreadable lines skipped)' if problems else ''}\n")
    return 0
