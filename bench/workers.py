"""
`twistd lmgate --workers 2` against one worker: RPS under `wrk -t1 -c50`.

    python bench/workers.py [--pairs 5] [--duration 8] [--python .venv/bin/python]

Starts an nginx upstream (the canned chat completion of bench/run) and two LMGate
daemons, one with one worker and one with two, each with a one-key allow-list and
usage records on. Then runs PAIRS alternating load runs (the order flips every
pair) and prints the median RPS of each and their ratio. wrk and the upstream are
pinned to the last CPU; the workers are not pinned (the kernel spreads them), so
on a 2-core machine the second worker shares its core with the load generator.
Records are counted at the end as in bench/run. Uses bench/run's helpers.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import json
import os
import statistics
import subprocess
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
B = importlib.machinery.SourceFileLoader("bench_run", os.path.join(HERE, "run")).load_module()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--python", default=None)
    args = parser.parse_args()
    if not B.ensureTools(False, False):
        return 1
    python = B.ensurePython(args.python)
    loadCPU = str((os.cpu_count() or 1) - 1)
    directory = tempfile.mkdtemp(prefix="lmgate-workers-")
    procs = B.Processes(directory)
    try:
        upstream = B.freePort()
        body = B.CHAT_BODY.replace("'", "\\'")
        conf = B.nginxConfig(directory, "upstream", f"""server {{ listen 127.0.0.1:{upstream} backlog=4096;
    location / {{ default_type application/json; return 200 '{body}'; }} }}""")
        B.waitPort(upstream, 30, procs.start("upstream", [B.nginxBinary(), "-c", conf, "-p", directory], cpu=loadCPU))
        with open(os.path.join(directory, "allowlist.csv"), "w") as f:
            f.write(f"id,api_key,owner,added\nbench,{B.KEY},bench-team,2026-11-23\n")
        lua = os.path.join(directory, "post.lua")
        with open(lua, "w") as f:
            f.write(f'wrk.method = "POST"\nwrk.body = \'{B.REQUEST_BODY}\'\nwrk.headers["Content-Type"] = "application/json"\n'
                    f'wrk.headers["Authorization"] = "Bearer {B.KEY}"\n')
        gates = {}
        for workers in (1, 2):
            port = B.freePort()
            sub = os.path.join(directory, f"w{workers}")
            os.makedirs(sub)
            with open(os.path.join(sub, "lmgate.yaml"), "w") as f:
                f.write(f'listen: "tcp:{port}:interface=127.0.0.1:backlog=1024"\nallowlist: {{path: {directory}/allowlist.csv}}\n'
                        f"stats: {{path: {sub}/stats.jsonl}}\nprices: {{path: null}}\n"
                        f'providers:\n  openai: {{upstream: "http://127.0.0.1:{upstream}"}}\n')
            twistd = os.path.join(os.path.dirname(python), "twistd")
            proc = procs.start(f"lmgate-{workers}", [twistd, "-n", "--pidfile=", f"--logfile={sub}/lmgate.log", "lmgate",
                                                      "--config", f"{sub}/lmgate.yaml", "--workers", str(workers)],
                               cwd=sub, env=dict(os.environ, PYTHONPATH=ROOT))
            B.waitPort(port, 60, proc)
            gates[workers] = (port, proc, B.Records(os.path.join(sub, "stats.jsonl")))
        rps: dict[int, list[float]] = {1: [], 2: []}
        for pair in range(max(1, min(args.pairs, 50))):
            for workers in ((1, 2) if pair % 2 == 0 else (2, 1)):
                port, _, records = gates[workers]
                out = subprocess.run(B.pinned(["wrk", "-t1", "-c50", f"-d{args.duration}s", "-s", lua,
                                               f"http://127.0.0.1:{port}/openai/v1/chat/completions"], loadCPU),
                                     capture_output=True, text=True, timeout=args.duration + 60).stdout
                result = B.parseWrk(out)
                records.expected += int(result["requests"])
                records.slack += 50 + int(result.get("cut", 0))
                rps[workers].append(result["rps"])
                print(f"pair {pair + 1}: {workers} worker(s) {result['rps']:.0f} RPS", flush=True)
        ok = True
        for workers, (_, proc, records) in gates.items():
            code = procs.stop(proc)  # SIGTERM: every worker drains and writes its records
            folder = os.path.dirname(records.stats)
            lines = bad = 0
            for name in sorted(os.listdir(folder)):  # stats.jsonl or stats-wN.jsonl, and rotated ones
                if name.startswith("stats") and ".jsonl" in name:
                    with open(os.path.join(folder, name)) as f:
                        for line in f:
                            lines += 1
                            try:
                                json.loads(line)
                            except ValueError:
                                bad += 1
            good = code == 0 and not bad and records.expected <= lines <= records.expected + records.slack
            print(f"{workers} worker(s): {lines} records for {records.expected} completed calls, exit {code}: "
                  f"{'OK' if good else 'MISMATCH'}")
            ok = ok and good
        one, two = statistics.median(rps[1]), statistics.median(rps[2])
        print(f"median RPS: 1 worker {one:.0f}, 2 workers {two:.0f}: {two / one:.2f}x "
              f"(ranges {min(rps[1]):.0f}-{max(rps[1]):.0f} and {min(rps[2]):.0f}-{max(rps[2]):.0f})")
        return 0 if ok else 1
    finally:
        procs.stopAll()


if __name__ == "__main__":
    raise SystemExit(main())
