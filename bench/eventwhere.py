#!/usr/bin/env python3
"""
Where the per-event relay delay of bench/run's stream test goes.

    python3 bench/eventwhere.py [--runs 3] [--streams 200] [--events 20]
                                [--interval-ms 50] [--phase random|lockstep]
                                [--relay lmgate|bare] [--gc-off] [--python PY]

Starts bench/tsupstream.py and a relay on loopback, pinned as bench/run pins
them (the relay on CPU 0, the upstream and the client on CPU 1): LMGate with a
one-key allow-list (access log and records on), or bench/bare_agent_relay.py.
The relay runs under a tracer (this script with --traced) that records

- every reactor turn: when it ended, and how long its handlers and timed
  calls ran (the time spent waiting in epoll is left out), and each handler
  (which transport and protocol, read or write) with its time;
- every garbage collection that took over 1 ms (C{gc.callbacks});
- with LMGate, when its Tee saw each event (the upstream → LMGate part).

Each run is bench/streams.py against the upstream directly (the baseline) and
then through the relay, with --dump (every event's send stamp and arrival).
For each run it prints: the event p99 direct and through the relay; when the
events over the relay's p99 arrived (ms before the run's last event); for
those, how much of their delay was before LMGate read them and how much after;
the reactor's busy time per 100 ms (median over the run, and the last 100 ms), and which
handlers took it in the last 100 ms against the middle of the run;
and the collections over 1 ms while events flowed. --gc-off disables automatic
collection in the relay (what is left is not the collector).

Only the processes started here are stopped (by PID).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
KEY = "bench-key-000000000000000000000001"
STAMP = re.compile(rb'"t": ?(\d+)')
RELAY_CPU, LOAD_CPU = "0", "1"


# -- the tracer, inside the relay's process ------------------------------------


def traced(out: str, gcOff: bool, argv: list[str]) -> None:
    """Run ARGV (C{twistd ...} or a script and its arguments) with the tracer installed."""
    import atexit
    import gc

    turns: list[tuple[int, int]] = []  # (end, busy ns)
    handlers: list[tuple[int, str, int]] = []  # (end, what ran, ns)
    collections: list[tuple[int, int, float]] = []  # (end, generation, ms)
    seen: list[tuple[int, int]] = []  # (send stamp, when the Tee saw it)
    started = [0]

    def onCollection(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter_ns()
            return
        took = time.perf_counter_ns() - started[0]
        if took > 1_000_000:
            collections.append((time.monotonic_ns(), info["generation"], took / 1e6))

    gc.callbacks.append(onCollection)
    if gcOff:
        gc.disable()

    from twisted.internet import epollreactor

    reactorClass: Any = epollreactor.EPollReactor
    busy = [0]
    readOrWrite, poll, runTimed = reactorClass._doReadOrWrite, reactorClass.doPoll, reactorClass.runUntilCurrent

    def tracedReadOrWrite(self: Any, selectable: Any, fd: int, event: int) -> Any:
        t = time.perf_counter_ns()
        try:
            return readOrWrite(self, selectable, fd, event)
        finally:
            took = time.perf_counter_ns() - t
            busy[0] += took
            side = "read" if event & 1 else "write" if event & 4 else "other"  # EPOLLIN, EPOLLOUT
            what = f"{type(selectable).__name__}/{type(getattr(selectable, 'protocol', None)).__name__} {side}"
            handlers.append((time.monotonic_ns(), what, took))

    def tracedPoll(self: Any, timeout: Any) -> Any:
        busy[0] = 0
        try:
            return poll(self, timeout)
        finally:
            turns.append((time.monotonic_ns(), busy[0]))

    def tracedRunTimed(self: Any) -> Any:
        t = time.perf_counter_ns()
        try:
            return runTimed(self)
        finally:
            took = time.perf_counter_ns() - t
            if took > 20_000:
                turns.append((time.monotonic_ns(), took))

    reactorClass._doReadOrWrite = tracedReadOrWrite
    reactorClass.doPoll = reactorClass.doIteration = tracedPoll
    reactorClass.runUntilCurrent = tracedRunTimed

    try:
        from lmgate.relay import tee
    except ImportError:
        tee = None  # type: ignore[assignment]
    if tee is not None:
        received = tee.Tee.dataReceived

        def tracedReceived(self: Any, data: bytes) -> None:
            now = time.monotonic_ns()
            for match in STAMP.finditer(data):
                seen.append((int(match.group(1)), now))
            received(self, data)

        tee.Tee.dataReceived = tracedReceived  # type: ignore[method-assign]

    def dump() -> None:
        with open(out, "w") as f:
            json.dump({"turns": turns, "handlers": handlers, "collections": collections, "seen": seen}, f)

    atexit.register(dump)
    if argv[0] == "twistd":
        from twisted.scripts.twistd import run

        sys.argv = argv
        run()  # type: ignore[no-untyped-call]
    else:
        import runpy

        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


# -- the harness ---------------------------------------------------------------


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def waitPort(port: int, proc: subprocess.Popen[bytes], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"eventwhere: {proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"eventwhere: nothing listens on {port} after {seconds} s")


def pinned(cpu: str, args: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", cpu, *args]
    return args


def readDump(path: str) -> list[tuple[int, int]]:
    with open(path) as f:
        return [(int(a), int(b)) for a, b in (line.split() for line in f)]


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def analyse(direct: list[tuple[int, int]], relayed: list[tuple[int, int]], trace: dict[str, Any]) -> list[str]:
    delays = [(b - a) / 1e6 for a, b in relayed]
    limit = p99(delays)
    first, last = min(a for a, _ in relayed), max(b for _, b in relayed)
    slow = [(a, b) for a, b in relayed if (b - a) / 1e6 >= limit]
    before = sorted((last - b) / 1e6 for _, b in slow)
    lines = [
        f"event p99: direct {p99([(b - a) / 1e6 for a, b in direct]):.2f} ms, through the relay {limit:.2f} ms "
        f"({len(relayed)} events)",
        f"  the {len(slow)} events at or over it arrived {before[0]:.0f}-{before[-1]:.0f} ms before the last event "
        f"(median {statistics.median(before):.0f} ms)",
    ]
    seen = dict(trace["seen"])
    parts = [((seen[a] - a) / 1e6, (b - seen[a]) / 1e6) for a, b in slow if a in seen]
    if parts:
        lines.append(
            f"  of their delay: upstream → relay median {statistics.median(p[0] for p in parts):.2f} ms "
            f"(max {max(p[0] for p in parts):.2f}), relay → client median {statistics.median(p[1] for p in parts):.2f} ms "
            f"(max {max(p[1] for p in parts):.2f})"
        )
    windows: dict[int, float] = {}
    for end, busy in trace["turns"]:
        if first <= end <= last:
            windows[(last - end) // 100_000_000] = windows.get((last - end) // 100_000_000, 0.0) + busy / 1e6
    if windows:
        earlier = [windows.get(k, 0.0) for k in range(1, (last - first) // 100_000_000)]
        lines.append(
            f"  reactor busy per 100 ms: median {statistics.median(earlier) if earlier else 0:.1f} ms over the run, "
            f"{windows.get(0, 0.0):.1f} ms in the last 100 ms; longest turn in the last 100 ms "
            f"{max((busy / 1e6 for end, busy in trace['turns'] if last - 100_000_000 <= end <= last), default=0):.1f} ms"
        )
    def byHandler(start: int, end: int) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        for at, what, took in trace["handlers"]:
            if start <= at <= end:
                found.setdefault(what, []).append(took)
        return found

    lastWindow = byHandler(last - 100_000_000, last)
    middle = (first + last) // 2
    middleWindow = byHandler(middle - 50_000_000, middle + 50_000_000)
    for what, took in sorted(lastWindow.items(), key=lambda item: -sum(item[1]))[:3]:
        midRun = middleWindow.get(what, [])
        lines.append(
            f"  {what}: last 100 ms {len(took)} × {statistics.mean(took) / 1e3:.0f} µs = {sum(took) / 1e6:.1f} ms; "
            + (f"middle 100 ms {len(midRun)} × {statistics.mean(midRun) / 1e3:.0f} µs" if midRun else "none mid-run")
        )
    gcs = [(round((last - end) / 1e6), g, round(ms, 1)) for end, g, ms in trace["collections"] if first <= end <= last]
    lines.append(
        "  collections over 1 ms while events flowed: "
        + (", ".join(f"gen {g} {ms} ms ({ago} ms before the end)" for ago, g, ms in gcs) if gcs else "none")
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--interval-ms", type=int, default=50)
    parser.add_argument("--phase", choices=["random", "lockstep"], default="random")
    parser.add_argument("--relay", choices=["lmgate", "bare"], default="lmgate")
    parser.add_argument("--gc-off", action="store_true", help="no automatic garbage collection in the relay")
    parser.add_argument("--python", default=None, help="the Python with LMGate installed (default: the project's .venv)")
    parser.add_argument("--traced", default=None, help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.traced:
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        traced(args.traced, args.gc_off, command)
        return 0
    python = args.python or os.path.join(ROOT, ".venv", "bin", "python")
    if not os.path.exists(python):
        python = sys.executable
    runs = max(1, min(args.runs, 20))
    streams, events = max(1, min(args.streams, 2000)), max(1, min(args.events, 1000))
    directory = tempfile.mkdtemp(prefix="lmgate-eventwhere-")
    procs: list[subprocess.Popen[bytes]] = []

    def start(argv: list[str], cpu: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(pinned(cpu, argv), stdin=subprocess.DEVNULL, **kwargs)
        procs.append(proc)
        return proc

    try:
        ts, port = freePort(), freePort()
        upstream = start([python, os.path.join(BENCH, "tsupstream.py"), str(ts)], LOAD_CPU)
        waitPort(ts, upstream)
        trace = os.path.join(directory, "trace.json")
        tracer = [python, os.path.abspath(__file__), "--traced", trace] + (["--gc-off"] if args.gc_off else []) + ["--"]
        env = dict(os.environ, PYTHONPATH=ROOT)
        if args.relay == "lmgate":
            with open(os.path.join(directory, "allowlist.csv"), "w") as f:
                f.write(f"id,api_key,owner,added\nbench,{KEY},bench-team,2026-11-23\n")
            with open(os.path.join(directory, "lmgate.yaml"), "w") as f:
                f.write(f'listen: "tcp:{port}:interface=127.0.0.1:backlog=1024"\naccess_log: true\n'
                        f"allowlist: {{path: {directory}/allowlist.csv}}\nstats: {{path: {directory}/stats.jsonl}}\n"
                        f"prices: {{path: null}}\nproviders:\n  ts: {{upstream: \"http://127.0.0.1:{ts}\", format: openai}}\n")
            relayArgs = ["twistd", "-n", "--pidfile=", f"--logfile={directory}/lmgate.log", "lmgate",
                         "--config", f"{directory}/lmgate.yaml"]
        else:
            relayArgs = [os.path.join(BENCH, "bare_agent_relay.py"), str(port), f"ts=http://127.0.0.1:{ts}"]
        relay = start(tracer + relayArgs, RELAY_CPU, cwd=directory, env=env)
        waitPort(port, relay)
        client = [python, os.path.join(BENCH, "streams.py")]
        shape = ["--events", str(events), "--interval-ms", str(args.interval_ms), "--phase", args.phase, "--key", KEY]
        relayURL, directURL = f"http://127.0.0.1:{port}/ts/v1/chat/completions", f"http://127.0.0.1:{ts}/v1/chat/completions"
        # A warm pool first, as bench/run does.
        subprocess.run(pinned(LOAD_CPU, client + [relayURL, str(streams), "--events", "1", "--interval-ms", "0", "--key", KEY]),
                       check=True, stdout=subprocess.DEVNULL, timeout=120)
        dumps = []
        for run in range(runs):
            pair = []
            for name, url in (("direct", directURL), ("relay", relayURL)):
                path = os.path.join(directory, f"{name}-{run}.txt")
                subprocess.run(pinned(LOAD_CPU, client + [url, str(streams), *shape, "--dump", path]),
                               check=True, stdout=subprocess.DEVNULL, timeout=events * args.interval_ms / 1000 + 120)
                pair.append(readDump(path))
            dumps.append(pair)
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=60)
        with open(trace) as f:
            traceData = json.load(f)
        print(f"eventwhere: {args.relay}{' (GC off)' if args.gc_off else ''}, {streams} streams of {events} events "
              f"{args.interval_ms} ms apart, {args.phase} phase; {runs} runs")
        for run, (direct, relayed) in enumerate(dumps, 1):
            print(f"run {run}: " + "\n".join(analyse(direct, relayed, traceData)))
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
