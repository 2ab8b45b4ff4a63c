#!/usr/bin/env python3
"""
The policy step on its own: microseconds per call for `bench/run`'s policy
(ten matching rules and the shipped RegexGuard, nothing refused), against an
empty policy, in this process, with no network. Compare with the CPU a whole
call costs LMGate (`bench/run`'s "CPU µs/req") to see the step's share.

    python bench/policy_cost.py [CALLS]
"""

from __future__ import annotations

import os
import sys
import timeit
from importlib.machinery import SourceFileLoader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    import yaml
    from twisted.internet.task import Clock
    from twisted.logger import Logger
    from twisted.web.http_headers import Headers

    from lmgate.config import ProviderSettings
    from lmgate.gate.admission import CallContext
    from lmgate.gate.providers import Provider
    from lmgate.ops.ratelog import RateLimitedLog
    from lmgate.policy.engine import Policy, loadPlugins
    from lmgate.policy.settings import parsePolicy
    from lmgate.records.record import KeyEntry

    run = SourceFileLoader("bench_run", os.path.join(ROOT, "bench", "run")).load_module()
    calls = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    clock = Clock()
    provider = Provider(ProviderSettings("openai", "http://upstream.invalid", "openai"))
    entry = KeyEntry("bench", "bench-team", "2026-12-01")
    body = run.REQUEST_BODY.encode()
    headers = Headers(
        {
            b"host": [b"127.0.0.1"],
            b"authorization": [b"Bearer " + run.KEY.encode()],
            b"content-type": [b"application/json"],
            b"content-length": [b"%d" % len(body)],
        }
    )

    def policyOf(raw: object) -> Policy:
        settings = parsePolicy(raw)
        return Policy(settings, loadPlugins("bench", settings), 4.0, clock, RateLimitedLog(Logger(), clock))

    for label, policy in (("no policy", policyOf(None)), ("10 rules + RegexGuard", policyOf(yaml.safe_load(run.POLICY_CONFIG)["policy"]))):

        def one() -> None:
            context = CallContext(b"POST", b"/openai/v1/chat/completions", headers)
            context.entry, context.provider, context.rest = entry, provider, b"/v1/chat/completions"
            context.body, context.bodySize = body, len(body)
            if policy.active and policy.admit(context) is not None:
                raise AssertionError("the bench's policy refused its call")

        best = min(timeit.repeat(one, number=calls, repeat=5)) / calls * 1e6
        print(f"{label}: {best:.1f} µs per call")


if __name__ == "__main__":
    main()
