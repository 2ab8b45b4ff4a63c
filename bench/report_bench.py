#!/usr/bin/env python3
"""
How fast `lmgate report` reads, against the report as it was: generates a stats
file of SIZE_MB megabytes (default 1024), then runs, on that same file and with
the same arguments (by owner, model and day; JSON), the old aggregation (the
Python loop, kept in bench/report_old.py) and `lmgate report` (DuckDB), each in
its own process, ROUNDS times interleaved (default 1). Prints each one's records
per second and memory peak (the child's maximum RSS), the ratio, and the load
average before and after (the machine may be shared).

    python bench/report_bench.py 1024 [ROUNDS]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARGS = ["--by", "owner,model,day", "--format", "json"]


def timed(command: list[str]) -> tuple[float, int, bytes]:
    """Run C{command}; its wall time, its maximum RSS in KiB (its own rusage, from wait4), its output."""
    with tempfile.TemporaryFile() as out:
        start = time.monotonic()
        child = subprocess.Popen(command, stdout=out, cwd=ROOT)
        _, status, usage = os.wait4(child.pid, 0)
        elapsed = time.monotonic() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise SystemExit(f"{command[1:3]} exited with {child.returncode}")
        out.seek(0)
        return elapsed, usage.ru_maxrss, out.read()


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    from tests.test_report import makeRecords

    lines = [json.dumps(r) + "\n" for r in makeRecords(5000)]
    directory = tempfile.mkdtemp(prefix="lmgate-report-bench-")
    path = os.path.join(directory, "stats.jsonl")
    written = records = 0
    with open(path, "w") as f:
        while written < size * 1024 * 1024:
            for line in lines:
                f.write(line)
                written += len(line)
                records += 1
    mb = written / 2**20
    print(f"{records} records, {mb:.0f} MB; load average before: {os.getloadavg()[0]:.2f}; {os.cpu_count()} cores")
    commands = {"new (DuckDB)": [sys.executable, "-m", "lmgate.cli", "report", path, *ARGS],
                "old (Python loop)": [sys.executable, os.path.join("bench", "report_old.py"), path, *ARGS]}
    times: dict[str, list[float]] = {name: [] for name in commands}
    peaks: dict[str, int] = {name: 0 for name in commands}
    outputs: dict[str, dict[str, dict[str, float]]] = {}
    try:
        for _ in range(rounds):
            for name, command in commands.items():
                elapsed, peak, out = timed(command)
                times[name].append(elapsed)
                peaks[name] = max(peaks[name], peak)
                outputs[name] = json.loads(out)
        for name in commands:
            elapsed = statistics.median(times[name])
            print(f"{name}: {elapsed:.2f} s, {records / elapsed:,.0f} records/s, {mb / elapsed:.0f} MB/s, "
                  f"memory peak {peaks[name] / 1024:.0f} MiB")
        old, new = (statistics.median(times[n]) for n in ("old (Python loop)", "new (DuckDB)"))
        print(f"ratio: {old / new:.1f}x; load average after: {os.getloadavg()[0]:.2f}")
        same = [outputs[n]["total"][k] for n in commands for k in ("calls", "input_tokens", "cost_usd")]
        print(f"totals (calls, input, cost) new {same[:3]} old {same[3:]}")
    finally:
        os.remove(path)
        os.rmdir(directory)


if __name__ == "__main__":
    main()
