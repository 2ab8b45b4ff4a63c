"""
The report as one self-contained HTML page: inline CSS and SVG charts drawn by
matplotlib, no scripts and no external assets, so it opens anywhere and can be
mailed.

matplotlib is imported only here, and this module only for C{--html}: the plain
report stays quick to start. Charts are drawn on a L{Figure} with the SVG canvas
attached, never through pyplot, so no GUI backend is ever chosen and no display
is touched. Each chart's SVG is inlined: its XML prolog and metadata dropped,
text kept as C{<text>} (selectable, and testable), its ids prefixed with the
chart's own so several charts share the page's id namespace without clashing,
and the same records always draw the same bytes.
"""

from __future__ import annotations

import argparse
import html
import io
import math
import re
from datetime import date
from typing import TYPE_CHECKING, Any, Callable, Sequence

import matplotlib
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, MaxNLocator

from lmgate.ops.report import COLUMNS, Report, _cell, formatMoney, formatMs, printable

if TYPE_CHECKING:
    from lmgate.ops.report_limits import LimitDay

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
#: What a chart's numbers are: whole counts, US dollars, or milliseconds.
COUNT, MONEY, MS = "count", "money", "ms"
#: The legend's name for calls refused before a key was known (their owner is null).
REFUSED = "refused"
#: The legend's name for the owners beyond the top ones, summed.
OTHERS = "others"
#: How many owners (or limit counters) a chart names; the rest are summed as L{OTHERS} (or left out).
TOP = 8
#: The settings every chart is drawn with: text as text, no mathtext (an owner may be called C{$x$}).
_RC: Any = {"svg.fonttype": "none", "text.parse_math": False, "font.size": 10, "axes.spines.top": False,
       "axes.spines.right": False, "axes.edgecolor": "#99a", "axes.grid": True, "axes.grid.axis": "y",
       "axes.axisbelow": True, "grid.color": "#e4e7ec", "xtick.color": "#556", "ytick.color": "#556"}
_ID = re.compile(r'(\bid="|url\(#|href="#)')


def axisLabels(values: Sequence[float], kind: str) -> list[str]:
    """
    The labels of a value axis's ticks, no two the same: money with the report's
    significant digits (C{$0.000277}, never C{$0.00}), latencies in milliseconds,
    counts as whole numbers (C{k}, C{M}, C{G} from ten of them, with the decimals
    the step needs). Should a rule still repeat a label, more decimals are shown.
    """
    if kind == MONEY:
        labels = ["$0" if v == 0 else "$" + formatMoney(v) for v in values]
    elif kind == MS and all(v == round(v) for v in values):
        labels = [f"{round(v):,}" for v in values]  # 400, not 400.0
    elif kind == MS:
        labels = ["0" if v == 0 else formatMs(v) for v in values]
    else:
        labels = _countLabels(values)
    for decimals in range(1, 13):
        if len(set(labels)) == len(labels):
            break
        labels = [f"{v:,.{decimals}f}" for v in values]
    return labels


def _countLabels(values: Sequence[float]) -> list[str]:
    top = max((abs(v) for v in values), default=0.0)
    unit, suffix = next(((u, x) for u, x in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if top >= 10 * u), (1.0, ""))
    labels = [f"{round(v):,}" for v in values]
    for decimals in range(0, 7 if unit > 1 else 0):
        labels = [f"{v / unit:,.{decimals}f}" for v in values]
        if all(math.isclose(float(label.replace(",", "")), v / unit, abs_tol=1e-9) for label, v in zip(labels, values)):
            break
    labels = [label.rstrip("0").rstrip(".") if "." in label else label for label in labels]  # 5.0k -> 5k
    return ["0" if v == 0 else label + suffix for label, v in zip(labels, values)]


class TickText(Formatter):
    """A matplotlib tick formatter that labels a whole axis at once with L{axisLabels}."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._labels: dict[float, str] = {}

    def set_locs(self, locs: Sequence[float]) -> None:
        self.locs = list(locs)
        self._labels = dict(zip(self.locs, axisLabels(self.locs, self.kind)))

    def __call__(self, x: float, pos: int | None = None) -> str:
        label = self._labels.get(x)
        return label if label is not None else axisLabels([x], self.kind)[0]


def _dayAxis(days: Sequence[str]) -> tuple[list[float], list[float], list[str]]:
    """
    The x position of each day (days apart: a day without records leaves a gap),
    and at most ten ticks with their labels (C{11-20}; the year too when the days
    span more than one). Days that are not dates are placed one after another.
    """
    try:
        ordinals = [date.fromisoformat(d).toordinal() for d in days]
    except ValueError:
        ordinals = []
    if ordinals:
        positions = [float(o - ordinals[0]) for o in ordinals]
        sameYear = len({d[:4] for d in days}) == 1
        names = [d[5:] if sameYear else d for d in days]
    else:
        positions = [float(i) for i in range(len(days))]
        names = [printable(d) for d in days]
    every = max(1, math.ceil(len(days) / 10))
    chosen = range(0, len(days), every)
    return positions, [positions[i] for i in chosen], [names[i] for i in chosen]


class _Chart:
    """One figure being drawn; L{svg} gives its inline SVG (ids prefixed with C{chartId}, tooltips added)."""

    def __init__(self, chartId: str, days: Sequence[str], kind: str) -> None:
        self.chartId, self.days, self.kind = chartId, list(days), kind
        self.tooltips: dict[str, str] = {}
        self.legend: list[tuple[Any, str]] = []  # kept here: matplotlib leaves out labels starting with "_"
        with matplotlib.rc_context(_RC):
            self.figure = Figure(figsize=(7.6, 2.9))
            FigureCanvasSVG(self.figure)
            self.axes = self.figure.add_subplot()
        self.positions, ticks, labels = _dayAxis(self.days)
        self.axes.set_xticks(ticks, labels)
        if self.positions:
            self.axes.set_xlim(self.positions[0] - 0.6, self.positions[-1] + 0.6)
        locator = MaxNLocator(nbins=6, integer=kind == COUNT, min_n_ticks=2)
        self.axes.yaxis.set_major_locator(locator)
        self.axes.yaxis.set_major_formatter(TickText(kind))

    def svg(self) -> str:
        with matplotlib.rc_context(_RC | {"svg.hashsalt": f"lmgate-{self.chartId}"}):
            if self.legend:
                handles, labels = zip(*self.legend)
                self.axes.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
            top = self.axes.get_ylim()[1]  # autoscaled to the data
            self.axes.set_ylim(0, top if top > 0 else 1)
            out = io.StringIO()
            self.figure.savefig(out, format="svg", bbox_inches="tight", metadata={"Date": None})
        text = out.getvalue()
        text = text[text.index("<svg"):]  # no XML prolog nor DOCTYPE inside HTML
        text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
        text = re.sub(r'<svg ([^>]*?)width="[^"]*" height="[^"]*" ', r"<svg \1", text, count=1)  # the page sizes it
        text = _ID.sub(lambda m: f"{m.group(1)}{self.chartId}-", text)
        for gid, tip in self.tooltips.items():
            text = text.replace(f'<g id="{self.chartId}-{gid}">', f'<g id="{self.chartId}-{gid}"><title>{tip}</title>', 1)
        return text

    def stacked(self, series: dict[str, list[float]], show: Callable[[float], str]) -> None:
        """Stacked bars per day, one colour per series, each bar's value in its tooltip."""
        base = [0.0] * len(self.days)
        for j, (name, values) in enumerate(series.items()):
            bars = self.axes.bar(self.positions, values, bottom=base, width=0.8, color=PALETTE[j % len(PALETTE)])
            self.legend.append((bars, name))
            for i, (bar, value) in enumerate(zip(bars.patches, values)):
                if value:
                    bar.set_gid(f"bar-{j}-{i}")
                    self.tooltips[f"bar-{j}-{i}"] = _text(f"{name} {self.days[i]}: {show(value)}")
            base = [b + v for b, v in zip(base, values)]

    def lines(self, series: dict[str, list[float | None]], colours: Sequence[str] = PALETTE) -> None:
        """A line with markers per series; a day without a value leaves a gap."""
        for j, (name, values) in enumerate(series.items()):
            ys = [math.nan if v is None else v for v in values]
            line, = self.axes.plot(self.positions, ys, marker="o", markersize=4, linewidth=2, color=colours[j % len(colours)])
            self.legend.append((line, name))


def _text(value: str) -> str:
    """Text from a record for the page: control characters written out, markup escaped."""
    return html.escape(printable(value))


def _figure(title: str, chart: _Chart) -> str:
    return f'<figure><figcaption>{html.escape(title)}</figcaption>{chart.svg()}</figure>'


def _seriesName(owner: str | None, owners: Sequence[str | None]) -> str:
    """An owner as a legend names it: null is L{REFUSED} (in brackets should an owner be called that)."""
    if owner is None:
        return REFUSED if REFUSED not in owners else f"({REFUSED})"
    return printable(owner)


def usageCharts(report: Report) -> list[str]:
    """The page's four charts: tokens and cost per day by owner, calls and errors per day, latency per day."""
    days = sorted(report.days)
    daily = {key: totals.row() for key, totals in report.daily.items()}
    perDay = {day: report.days[day].row() for day in days}
    used: dict[str | None, int] = {}
    for (_, owner), row in daily.items():
        used[owner] = used.get(owner, 0) + row["input_tokens"] + row["output_tokens"]
    owners = sorted(used, key=lambda o: (-used[o], o is None, o or ""))
    top, rest = owners[:TOP], owners[TOP:]

    def perOwner(column: Callable[[dict[str, Any]], float]) -> dict[str, list[float]]:
        series: dict[str, list[float]] = {}
        for owner in top:
            series[_seriesName(owner, owners)] = [column(daily[(d, owner)]) if (d, owner) in daily else 0.0 for d in days]
        if rest:
            name = OTHERS if OTHERS not in owners else f"({OTHERS})"
            series[name] = [sum(column(daily[(d, o)]) for o in rest if (d, o) in daily) for d in days]
        return series

    tokens = _Chart("tokens", days, COUNT)
    tokens.stacked(perOwner(lambda r: r["input_tokens"] + r["output_tokens"]), lambda v: f"{round(v):,}")
    cost = _Chart("cost", days, MONEY)
    cost.stacked(perOwner(lambda r: r["cost_usd"]), formatMoney)
    calls = _Chart("calls", days, COUNT)
    calls.lines({"calls": [perDay[d]["calls"] for d in days], "errors": [perDay[d]["errors"] for d in days]})
    latency = _Chart("latency", days, MS)
    latency.lines({"p50": [perDay[d]["p50_ms"] for d in days], "p95": [perDay[d]["p95_ms"] for d in days]})
    return [_figure("Tokens per day by owner (input + output)", tokens), _figure("Cost per day by owner (USD)", cost),
            _figure("Calls and errors per day", calls), _figure("Latency per day (ms)", latency)]


_LIMIT_KINDS = (("tokensLimit", "tokens", COUNT, "tokens"), ("usdLimit", "usd", MONEY, "USD"))


def limitCharts(limits: Sequence[LimitDay]) -> list[str]:
    """
    A chart per rule and figure (daily, monthly): each counter's use per day or
    month (the counters nearest their limit first, at most L{TOP}) and the limit
    as a dashed line.
    """
    charts = []
    rules = list(dict.fromkeys((use.period, use.rule) for use in limits))
    for n, (period, rule) in enumerate(rules):
        mine = [use for use in limits if (use.period, use.rule) == (period, rule)]
        days = sorted({use.day for use in mine})
        for attribute, used, kind, unit in _LIMIT_KINDS:
            limit = getattr(mine[0], attribute)
            if limit is None:
                continue
            counters: dict[str, dict[str, float]] = {}
            for use in mine:
                counters.setdefault(use.counter, {})[use.day] = getattr(use, used)
            nearest = sorted(counters, key=lambda c: (-max(counters[c].values()), c))
            chart = _Chart(f"limit{n}-{used}", days, kind)
            chart.lines({printable(c.split("|", 1)[1]): [counters[c].get(d) for d in days] for c in nearest[:TOP]})
            line = chart.axes.axhline(limit, color="#c0392b", linestyle="--", linewidth=1.5)
            chart.legend.append((line, f"limit {axisLabels([limit], kind)[0]}"))
            chart.axes.set_ylim(0, max([limit] + [v for c in counters.values() for v in c.values()]) * 1.08)
            more = f", {len(nearest) - TOP} more counters in the table" if len(nearest) > TOP else ""
            charts.append(_figure(f"Rule {printable(rule)}: {unit} per {period} against its limit{more}", chart))
    return charts


def limitTable(limits: Sequence[LimitDay], period: str = "day") -> str:
    """The limits' use as a table: a row per rule, counter and day (or month)."""
    header = ("rule", "counter", period, "tokens", f"tokens/{period}", "USD", f"USD/{period}", "refusals")
    rows = "".join(
        "<tr>" + "".join(f"<td{' class=g' if i < 3 else ''}>{_text(v)}</td>" for i, v in enumerate((
            use.rule, use.counter.split("|", 1)[1], use.day, f"{use.tokens:,}",
            "-" if use.tokensLimit is None else f"{use.tokensLimit:,}", formatMoney(use.usd),
            "-" if use.usdLimit is None else formatMoney(use.usdLimit), f"{use.refusals:,}"))) + "</tr>"
        for use in limits)
    heads = "".join(f"<th{' class=g' if i < 3 else ''}>{html.escape(h)}</th>" for i, h in enumerate(header))
    return f"<table><thead><tr>{heads}</tr></thead><tbody>{rows}</tbody></table>"


def renderHTML(report: Report, args: argparse.Namespace, limits: Sequence[LimitDay] | None = None) -> str:
    """
    The page: summary cards, the usage charts, the table; with C{limits} (from
    C{--config}) a section showing each rule's use against its daily limits.
    """
    days = sorted(report.days)
    total = report.total.row()
    header = list(report.by) + list(COLUMNS)
    groupCount = len(report.by)
    rows = "".join("<tr>" + "".join(f'<td{" class=g" if i < groupCount else ""}>{html.escape(_cell(r.get(c), c))}</td>'
                                    for i, c in enumerate(header)) + "</tr>" for r in report.rows())
    totalCells = [("TOTAL", "")] + [("", "")] * (len(report.by) - 1) + [(total[c], c) for c in COLUMNS]
    rows += "<tr class=total>" + "".join(f"<td>{html.escape(_cell(v, c))}</td>" for v, c in totalCells) + "</tr>"
    span = f"{days[0]} to {days[-1]}" if days else "no records"
    filters = ", ".join(f"{k}={v}" for k, v in vars(args).items() if k in ("since", "until", "owner", "key_id", "provider", "model", "status") and v)
    cards = "".join(f'<div class="card"><b>{html.escape(v)}</b><span>{html.escape(k)}</span></div>' for k, v in [
        ("calls", _cell(total["calls"])), ("errors", _cell(total["errors"])), ("input tokens", _cell(total["input_tokens"])),
        ("output tokens", _cell(total["output_tokens"])), ("cost (USD)", _cell(total["cost_usd"], "cost_usd")),
        ("p95 latency (ms)", _cell(total["p95_ms"], "p95_ms"))])
    charts = "\n".join(usageCharts(report))
    section = ""
    for period in ("day", "month") if limits is not None else ():
        uses = [use for use in limits or () if use.period == period]
        if uses:
            section += (f'<h2>Usage limits per UTC {period}</h2><div class="charts">{"".join(limitCharts(uses))}</div>'
                        f"{limitTable(uses, period)}")
        elif period == "day":
            section += "<h2>Usage limits per UTC day</h2><p>No record matches a rule with a daily figure (tokens_per_day, usd_per_day).</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>LMGate usage report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}}
header{{background:#1d2330;color:#fff;padding:22px 32px}} header h1{{margin:0;font-size:22px}} header p{{margin:4px 0 0;color:#b8c0cc}}
main{{max-width:1120px;margin:0 auto;padding:24px 32px}} h2{{font-size:18px;margin:28px 0 12px}}
.cards{{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:18px}} .card{{background:#fff;border-radius:10px;padding:14px 18px;box-shadow:0 1px 3px #0001;min-width:140px}}
.card b{{display:block;font-size:22px}} .card span{{color:#667}}
.charts{{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:16px}}
figure{{background:#fff;border-radius:10px;margin:0;padding:14px 16px;box-shadow:0 1px 3px #0001}} figcaption{{font-weight:600;margin-bottom:6px}}
svg{{width:100%;height:auto}}
table{{border-collapse:collapse;width:100%;background:#fff;border-radius:10px;overflow:hidden;box-shadow:0 1px 3px #0001;margin-top:18px}}
th,td{{padding:7px 10px;text-align:right;border-bottom:1px solid #eef0f3;font-variant-numeric:tabular-nums}} th{{background:#eef1f6;font-size:12px;text-transform:uppercase;letter-spacing:.03em}}
td:first-child,th:first-child,td.g,th.g{{text-align:left}} tr.total td{{font-weight:700;background:#fafbfc}}
</style></head><body>
<header><h1>LMGate usage report</h1><p>{_text(span)}{' · ' + _text(filters) if filters else ''} · grouped by {html.escape(', '.join(report.by))}</p></header>
<main>
<div class="cards">{cards}</div>
<div class="charts">
{charts}
</div>
<table><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in header)}</tr></thead><tbody>{rows}</tbody></table>
{section}
</main></body></html>
"""
