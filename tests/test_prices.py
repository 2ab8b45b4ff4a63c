"""The price table: matching rules and cost_usd."""

from __future__ import annotations

import json
import os

from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lmgate.errors import ConfigError
from lmgate.ops.prices import Price, PriceTable
from tests.helpers import FakeUpstream, call, jsonAnswer, startGateway

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "prices.yaml")


class PriceTests(SynchronousTestCase):
    def table(self, text: str) -> PriceTable:
        path = FilePath(self.mktemp())
        path.setContent(text.encode())
        return PriceTable.load(path.path)

    def test_exampleLoads(self) -> None:
        """etc/prices.yaml is valid and dated."""
        table = PriceTable.load(EXAMPLE)
        self.assertEqual(table.asOf, "2026-11-01")
        self.assertIsNotNone(table.priceFor("gpt-4o-mini"))

    def test_matching(self) -> None:
        """Exact id, then the longest prefix; Bedrock ids without region prefix and version suffix."""
        table = self.table("models:\n  gpt-4o: {input: 2, output: 8}\n  gpt-4o-mini: {input: 1, output: 4}\n"
                           "  anthropic.claude-3-haiku: {input: 0.25, output: 1.25}\n")
        self.assertEqual(table.priceFor("gpt-4o-mini-2024-07-18"), table.priceFor("gpt-4o-mini"))
        self.assertEqual(table.priceFor("gpt-4o-2024-08-06"), table.priceFor("gpt-4o"))
        self.assertEqual(table.priceFor("us.anthropic.claude-3-haiku-20240307-v1:0"), table.priceFor("anthropic.claude-3-haiku"))
        self.assertIsNone(table.priceFor("llama-3"))
        self.assertIsNone(table.priceFor(None))

    def test_cost(self) -> None:
        """Uncached input, cached input, cache writes and output at their own prices, per million."""
        table = self.table("models:\n  m: {input: 3, cached_input: 0.3, cache_write: 3.75, output: 15}\n")
        # 1532 input = 3 plain + 1111 read + 418 written; 33 output
        self.assertAlmostEqual(table.cost("m", 1532, 33, 1111, 418) or 0, (3 * 3 + 1111 * 0.3 + 418 * 3.75 + 33 * 15) / 1e6)
        self.assertEqual(table.cost("m", 10, 0, None, None), 30 / 1e6)

    def test_unknownIsNull(self) -> None:
        """An unknown model or a missing input count gives None, never a guess."""
        table = self.table("models:\n  m: {input: 1, output: 1}\n")
        self.assertIsNone(table.cost("other", 1, 1, 0, 0))
        self.assertIsNone(table.cost("m", None, 1, 0, 0))

    def test_badFiles(self) -> None:
        """A bad entry names the file, the model key and the problem."""
        for text, where in [
            ("models: 3\n", "models"),
            ("models:\n  m: {input: -1, output: 1}\n", "models.m.input"),
            ("models:\n  m: {input: 1}\n", "models.m.output"),
            ("models:\n  m: {input: 1, output: 1, extra: 2}\n", "models.m.extra"),
        ]:
            with self.assertRaises(ConfigError) as e:
                self.table(text)
            self.assertEqual(e.exception.where, where, text)


class RecordCostTests(TestCase):
    async def test_embeddingsCost(self) -> None:
        """An embeddings call reports no output tokens: its record is priced from its input
        (OpenAI embeddings response, text-embedding-3-small at $0.02 per million)."""
        from tests.test_usage import CASES

        [body] = [case[2] for case in CASES if case[0] == "openai embeddings"]
        upstream = FakeUpstream()
        upstream.handler = jsonAnswer(json.loads(body))
        gate = startGateway(self, upstream)
        gate.gateway.prices = PriceTable.load(EXAMPLE)
        response, _, _ = await call(self, gate.url + "/openai/v1/embeddings", body=b'{"model":"text-embedding-3-small","input":"a"}')
        self.assertEqual(response.code, 200)
        [record] = await gate.sink.waitFor(1)
        self.assertEqual((record.model, record.input_tokens, record.output_tokens, record.total_tokens), ("text-embedding-3-small", 8, None, 8))
        self.assertEqual(record.cost_usd, round(8 * 0.02 / 1e6, 9))

    def test_noOutputIsZeroOutput(self) -> None:
        """An unreported output count prices as no output; an unknown input still gives None."""
        table = PriceTable({"m": Price(2.0, 8.0, 1.0, 2.5)})
        self.assertEqual(table.cost("m", 10, None, None, None), 20 / 1e6)
        self.assertIsNone(table.cost("m", None, None, None, None))
