"""Prometheus metrics from finished records, scraped through the admin resource."""

from __future__ import annotations


from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase

from lmgate.ops.metrics import Metrics, adminResource
from tests.test_jsonl import record


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    client = StubTreq(adminResource(metrics))
    response = SynchronousTestCase().successResultOf(client.get("http://admin/metrics"))
    text = SynchronousTestCase().successResultOf(response.text())
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


class MetricsTests(SynchronousTestCase):
    def test_countsFromRecords(self) -> None:
        """Calls by provider/status/error, tokens by model family and kind, durations, callbacks."""
        m = Metrics(models=["gpt-4o"], writerStats=lambda: (7, 2, 1), keyCount=lambda: 3, inFlight=lambda: 4, reloadErrors=lambda: 1)
        a = record(10)
        a.model, a.cached_tokens, a.cost_usd = "gpt-4o-mini-2024-07-18", 4, 0.5
        b = record(5)
        b.model, b.status, b.error = "llama-3", 200, "provider_error:overloaded_error"
        c = record(1)
        c.provider, c.status, c.error, c.input_tokens, c.output_tokens, c.total_tokens, c.ttfb_ms = None, 404, "not_found", None, None, None, None
        for r in (a, b, c):
            m.write(r)
        m.observeOverhead(0.0003)
        s = scrape(m)
        self.assertEqual(s[("lmgate_calls_total", (("error", "none"), ("provider", "openai"), ("status", "200")))], 1)
        self.assertEqual(s[("lmgate_calls_total", (("error", "provider_error"), ("provider", "openai"), ("status", "200")))], 1)
        self.assertEqual(s[("lmgate_calls_total", (("error", "not_found"), ("provider", "none"), ("status", "404")))], 1)
        self.assertEqual(s[("lmgate_tokens_total", (("kind", "input"), ("model", "gpt-4o"), ("provider", "openai")))], 10)
        self.assertEqual(s[("lmgate_tokens_total", (("kind", "cached"), ("model", "gpt-4o"), ("provider", "openai")))], 4)
        self.assertEqual(s[("lmgate_tokens_total", (("kind", "input"), ("model", "other"), ("provider", "openai")))], 5)
        self.assertEqual(s[("lmgate_cost_usd_total", (("model", "gpt-4o"), ("provider", "openai")))], 0.5)
        self.assertEqual(s[("lmgate_call_duration_seconds_count", (("provider", "openai"),))], 2)
        self.assertEqual(s[("lmgate_overhead_seconds_count", ())], 1)
        self.assertEqual(s[("lmgate_records_written_total", ())], 7)
        self.assertEqual(s[("lmgate_records_backlog", ())], 2)
        self.assertEqual(s[("lmgate_records_dropped_total", ())], 1)
        self.assertEqual(s[("lmgate_calls_in_flight", ())], 4)
        self.assertEqual(s[("lmgate_allowlist_keys", ())], 3)
        self.assertEqual(s[("lmgate_allowlist_reload_errors_total", ())], 1)

    def test_perKeyCapped(self) -> None:
        """Per-key labels only when enabled, folded into C{other} past the cap."""
        self.assertNotIn("lmgate_key_calls_total", {k[0] for k in scrape(Metrics())})
        m = Metrics(perKey=True, perKeyLimit=2)
        for ident in ("a", "b", "c", "d", "a"):
            r = record(1)
            r.lmgate_id = ident
            m.write(r)
        s = {k[1][0][1]: v for k, v in scrape(m).items() if k[0] == "lmgate_key_calls_total"}
        self.assertEqual(s, {"a": 2, "b": 1, "other": 2})


