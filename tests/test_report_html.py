"""C{lmgate report --html}: charts drawn with matplotlib, inlined as SVG, readable and self-contained."""

from __future__ import annotations

import io
import json
import os
import random
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

from matplotlib.ticker import MaxNLocator
from twisted.trial.unittest import SynchronousTestCase

from lmgate.ops.report import main
from lmgate.ops.report_html import COUNT, MONEY, MS, axisLabels
from tests.test_report import record

_TEXT = re.compile(r"<text\b[^>]*>([^<]*)</text>")


def charts(page: str) -> list[str]:
    """Each inline SVG of the page, in order."""
    return re.findall(r"<svg\b.*?</svg>", page, flags=re.S)


def ticksOf(svg: str, axis: str = "y") -> list[str]:
    """The tick labels of one axis of a chart (matplotlib groups each tick as C{<g id="...-ytick_N">})."""
    return re.findall(rf'id="[^"]*-{axis}tick_\d+">.*?<text\b[^>]*>([^<]*)</text>', svg, flags=re.S)


def legendOf(svg: str) -> list[str]:
    """The names in a chart's legend."""
    start = svg.find('-legend_1"')
    return _TEXT.findall(svg[start:]) if start >= 0 else []


def number(label: str) -> float:
    """A count label as a number (C{2.5k} is 2500)."""
    scale = {"k": 1e3, "M": 1e6, "G": 1e9}.get(label[-1:], 1)
    return float(label.rstrip("kMG").replace(",", "")) * scale


class AxisLabelTests(SynchronousTestCase):
    """The value axes' labels, on the ticks matplotlib's locator chooses."""

    def test_ticksNeverRepeatCountsAreWholeMoneyKeepsItsDigits(self) -> None:
        """For any data maximum, the labels of an axis are distinct; count ticks are whole numbers
        (and labelled exactly); money labels are dollars with their significant digits, never $0.00."""
        rng = random.Random(11)
        maxima = [1, 2, 3, 4.25, 7, 10, 0.000277, 0.0001, 0.0003, 1e-9, 999, 1000, 9999, 123456, 3e9, 1.02, 12_345_678]
        maxima += [10 ** rng.uniform(-8, 10) for _ in range(1500)]
        for kind in (COUNT, MONEY, MS):
            locator = MaxNLocator(nbins=6, integer=kind == COUNT, min_n_ticks=2)
            for maximum in maxima:
                if kind == COUNT and maximum < 1:
                    continue  # counts are whole: a count axis reaches 1 at least (an empty chart is drawn 0 to 1)
                ticks = [t for t in locator.tick_values(0, maximum) if t >= 0]
                labels = axisLabels(ticks, kind)
                self.assertEqual(len(set(labels)), len(labels), (kind, maximum, labels))
                if kind == COUNT:
                    self.assertTrue(all(t == int(t) for t in ticks), (maximum, ticks))
                    for label, tick in zip(labels, ticks):
                        self.assertAlmostEqual(number(label), tick, delta=tick * 1e-9, msg=(maximum, labels))
                if kind == MONEY:
                    self.assertTrue(all(label.startswith("$") for label in labels), labels)
                    self.assertNotIn("$0.00", labels)
        self.assertEqual(axisLabels([0, 0.0001, 0.0002, 0.0003], MONEY), ["$0", "$0.0001", "$0.0002", "$0.0003"])
        self.assertEqual(axisLabels([0, 0.000125, 0.00025], MONEY), ["$0", "$0.000125", "$0.00025"])
        self.assertEqual(axisLabels([0, 2500, 5000, 7500, 10000], COUNT), ["0", "2.5k", "5k", "7.5k", "10k"])
        self.assertEqual(axisLabels([0, 1, 2, 3], COUNT), ["0", "1", "2", "3"])
        self.assertEqual(axisLabels([0, 400, 800, 1200], MS), ["0", "400", "800", "1,200"])


class PageChartTests(SynchronousTestCase):
    """The page's charts, read back from the SVG text."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "stats.jsonl")

    def write(self, records: list[dict[str, object]]) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def page(self, *args: str) -> str:
        page = os.path.join(self.dir, "page.html")
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            self.assertEqual(main([self.path, "--html", page, *args]), 0)
        with open(page, encoding="utf-8") as f:
            return f.read()

    def smallDays(self) -> None:
        self.write([record(cost_usd=0.0001), record(cost_usd=0.000177, status=429),
                    record(owner=None, lmgate_id=None, status=403, error="forbidden", cost_usd=None,
                           input_tokens=None, output_tokens=None),
                    record(timestamp="2026-11-21T10:00:00.000Z", error="upstream_reset")])

    def test_ticksLegendsAndTooltips(self) -> None:
        """Four charts; no chart repeats a tick; calls are whole numbers; costs are dollars with their
        digits; days are labelled once each; calls refused before a key was known are "refused" in the
        legends (never a bare "-"); each bar's tooltip says its owner, day and value."""
        self.smallDays()
        text = self.page()
        tokens, cost, calls, latency = charts(text)
        for svg in (tokens, cost, calls, latency):
            ticks = ticksOf(svg)
            self.assertEqual(len(set(ticks)), len(ticks), ticks)
            self.assertGreaterEqual(len(ticks), 2)
            self.assertEqual(ticksOf(svg, "x"), ["11-20", "11-21"])
        self.assertEqual(ticksOf(calls), ["0", "1", "2", "3"])
        self.assertEqual(ticksOf(cost)[0], "$0")
        self.assertTrue(all(re.fullmatch(r"\$0\.0+[1-9]\d{0,2}", t) for t in ticksOf(cost)[1:]), ticksOf(cost))
        self.assertEqual(legendOf(tokens), ["team-a", "refused"])
        self.assertEqual(legendOf(cost), ["team-a", "refused"])
        self.assertEqual(legendOf(calls), ["calls", "errors"])
        self.assertEqual(legendOf(latency), ["p50", "p95"])
        self.assertNotIn(">-</text>", text)
        self.assertIn("<title>team-a 2026-11-20: 0.000277</title>", cost)
        self.assertIn("<title>team-a 2026-11-20: 30</title>", tokens)

    def test_othersBeyondTheTopOwners(self) -> None:
        """The eight owners with the most tokens are named; the rest are summed as "others"."""
        self.write([record(owner=f"team-{n:02d}", input_tokens=100 * n, output_tokens=0) for n in range(1, 12)])
        tokens = charts(self.page())[0]
        self.assertEqual(legendOf(tokens), [f"team-{n:02d}" for n in range(11, 3, -1)] + ["others"])
        self.assertIn("<title>others 2026-11-20: 600</title>", tokens)

    def test_selfContainedWithUniqueIds(self) -> None:
        """No script, nothing fetched (no http(s) src or href, no XML prolog or DOCTYPE inside the page),
        text kept as text; every id on the page is unique and every reference points to one of them."""
        self.smallDays()
        text = self.page()
        self.assertNotIn("<script", text)
        self.assertNotIn("<?xml", text)
        self.assertNotIn("<!DOCTYPE svg", text)
        self.assertNotIn("<metadata", text)
        self.assertNotRegex(text, r"""(src|href)=["']?(https?:)?//""")
        self.assertNotRegex(text, r"url\(\s*['\"]?(https?:)?//")
        self.assertEqual(re.findall(r"https?://[^\"'\s]*", text).count("http://www.w3.org/2000/svg"), 4)
        self.assertEqual({u for u in re.findall(r"https?://[^\"'\s]*", text)}, {"http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"})
        ids = re.findall(r'\bid="([^"]*)"', text)
        self.assertEqual(len(ids), len(set(ids)))
        references = re.findall(r'url\(#([^)]*)\)|href="#([^"]*)"', text)
        self.assertTrue(references)
        for reference in references:
            self.assertIn("".join(reference), ids)
        self.assertIn(">team-a</text>", text)

    def test_sameRecordsSamePage(self) -> None:
        """Rendering is deterministic: the same records draw the same bytes (no date, fixed id salts)."""
        self.smallDays()
        self.assertEqual(self.page(), self.page())

    def test_namesAreEscapedAndNeverMath(self) -> None:
        """Owner names are text in the charts: markup escaped, control characters written out,
        a dollar sign not read as mathematics, a leading underscore still in the legend."""
        self.write([record(owner="<b>x</b>\x1b", input_tokens=30), record(owner="$a$ & b", input_tokens=20), record(owner="_c")])
        tokens = charts(self.page())[0]
        self.assertEqual(legendOf(tokens), ["&lt;b&gt;x&lt;/b&gt;\\x1b", "$a$ &amp; b", "_c"])
        self.assertIn("&lt;b&gt;x&lt;/b&gt;\\x1b", tokens)
        self.assertIn("$a$ &amp; b", tokens)
        self.assertNotIn("<b>", tokens)

    def test_plainReportImportsNoPlottingLibrary(self) -> None:
        """Without --html, the report never imports matplotlib (it stays quick to start)."""
        self.smallDays()
        code = ("import sys, io, contextlib\nfrom lmgate.ops.report import main\n"
                f"with contextlib.redirect_stdout(io.StringIO()): main([{self.path!r}])\n"
                "print('matplotlib' in sys.modules)\n")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        self.assertEqual(result.stdout.strip(), "False", result.stderr)
