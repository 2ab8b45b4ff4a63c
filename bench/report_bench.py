#!/usr/bin/env python3
"""
How fast `lmgate report` reads: generates a stats file of SIZE_MB megabytes
(default 1024) and times a report over it, printing records per second.

    python bench/report_bench.py 1024
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
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
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "lmgate.cli", "report", path, "--by", "owner,model,day", "--format", "json"],
                   check=True, stdout=subprocess.DEVNULL, cwd=ROOT)
    elapsed = time.monotonic() - start
    print(f"{records} records, {written / 2**20:.0f} MB in {elapsed:.1f} s: {records / elapsed:,.0f} records/s, {written / 2**20 / elapsed:.1f} MB/s")
    os.remove(path)
    os.rmdir(directory)


if __name__ == "__main__":
    main()
