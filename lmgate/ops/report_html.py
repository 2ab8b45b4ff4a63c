"""
The report as one self-contained HTML page: inline CSS and SVG charts drawn
here, no scripts and no external assets, so it opens anywhere and can be mailed.
"""

from __future__ import annotations

import argparse
import html
import math
from typing import Any, Callable, Sequence

from lmgate.ops.report import COLUMNS, Report, _cell, formatMoney, formatMs, printable

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac")
W, H, LEFT, BOTTOM, TOP = 760, 260, 64, 36, 16


#: What a chart's numbers are: whole counts, US dollars, or milliseconds.
COUNT, MONEY, MS = "count", "money", "ms"
#: The legend's name for calls refused before a key was known (their owner is null).
REFUSED = "refused"


def niceScale(maximum: float, kind: str) -> tuple[float, list[float], float]:
    """
    The top of a value axis and its ticks for values up to C{maximum}: 0 and
    equal steps of 1, 2, 2.5 or 5 times a power of ten (at most four), whole steps
    for counts, so no two ticks are the same number.

    @return: the top, the tick values from 0 up, the step.
    """
    if not maximum > 0:
        return 1.0, [0.0, 1.0], 1.0
    raw = maximum / 4
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = 10 * magnitude
    for factor in (1, 2, 2.5, 5):
        if factor * magnitude >= raw * (1 - 1e-9):
            step = factor * magnitude
            break
    if kind == COUNT and step < 1:
        step = 1.0
    elif kind == COUNT and step == 2.5:
        step = 5.0  # 2.5 calls is not a count
    intervals = max(1, math.ceil(maximum / step - 1e-9))
    return step * intervals, [step * i for i in range(intervals + 1)], step


def tickLabels(ticks: Sequence[float], step: float) -> list[str]:
    """
    Labels for ticks C{step} apart, each distinct: thousands as C{k}, millions as
    C{M}, billions as C{G} once the top reaches ten of them, and as many decimals
    as the step needs (C{0.0001}, C{0.00015}, C{2.5k}).
    """
    top = ticks[-1]
    unit, suffix = next(((u, x) for u, x in ((1e9, "G"), (1e6, "M"), (1e3, "k")) if top >= 10 * u), (1.0, ""))
    for decimals in range(13):
        labels = [f"{t / unit:,.{decimals}f}" for t in ticks]
        if all(abs(float(label.replace(",", "")) - t / unit) <= step / unit * 1e-6 for label, t in zip(labels, ticks)):
            break
    trimmed = [label.rstrip("0").rstrip(".") if "." in label else label for label in labels]  # 5.0k -> 5k
    return ["0" if t == 0 else label + suffix for label, t in zip(trimmed, ticks)]


def _valueText(kind: str) -> Callable[[float], str]:
    """How a chart shows one value in its tooltip."""
    if kind == MONEY:
        return formatMoney
    if kind == MS:
        return formatMs
    return lambda value: f"{round(value):,}"


def _axes(maximum: float, kind: str, labels: Sequence[str]) -> tuple[float, list[str]]:
    """The grid, the value ticks and the day labels; returns the axis top that the marks scale to."""
    top, ticks, step = niceScale(maximum, kind)
    parts = []
    for value, text in zip(ticks, tickLabels(ticks, step)):
        y = TOP + (H - TOP - BOTTOM) * (1 - value / top)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{W - 8}" y2="{y:.1f}" class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" class="tick" text-anchor="end">{text}</text>')
    every = max(1, len(labels) // 8)
    width = (W - LEFT - 8) / max(1, len(labels))
    for i, label in enumerate(labels):
        if i % every == 0:
            x = LEFT + width * (i + 0.5)
            parts.append(f'<text x="{x:.1f}" y="{H - BOTTOM + 16}" class="tick" text-anchor="middle">{_text(label[5:] if len(label) == 10 else label)}</text>')
    return top, parts


def _text(value: str) -> str:
    """Text from a record for the page: control characters written out, markup escaped."""
    return html.escape(printable(value))


def stackedBars(title: str, days: Sequence[str], series: dict[str, list[float]], kind: str = COUNT) -> str:
    """Stacked bars per day, one colour per series (owner)."""
    totals = [sum(values[i] for values in series.values()) for i in range(len(days))]
    plotH = H - TOP - BOTTOM
    width = (W - LEFT - 8) / max(1, len(days))
    maximum, parts = _axes(max(totals + [0]), kind, days)
    show = _valueText(kind)
    for i in range(len(days)):
        base = 0.0
        for j, (name, values) in enumerate(series.items()):
            value = values[i]
            if not value:
                continue
            h = plotH * value / maximum
            y = TOP + plotH - plotH * (base + value) / maximum
            parts.append(f'<rect x="{LEFT + width * i + width * 0.15:.1f}" y="{y:.1f}" width="{width * 0.7:.1f}" height="{h:.1f}" '
                         f'fill="{PALETTE[j % len(PALETTE)]}"><title>{_text(name)} {_text(days[i])}: {show(value)}</title></rect>')
            base += value
    legend = "".join(f'<span class="key"><i style="background:{PALETTE[j % len(PALETTE)]}"></i>{_text(name)}</span>'
                     for j, name in enumerate(series))
    return _figure(title, parts, legend)


def lines(title: str, labels: Sequence[str], series: dict[str, list[float | None]], kind: str = COUNT) -> str:
    """A line per series across the days; gaps where a series has no value."""
    values = [v for vs in series.values() for v in vs if v is not None]
    plotH = H - TOP - BOTTOM
    width = (W - LEFT - 8) / max(1, len(labels))
    maximum, parts = _axes(max(values + [0]), kind, labels)
    show = _valueText(kind)
    for j, (name, vs) in enumerate(series.items()):
        points = [(LEFT + width * (i + 0.5), TOP + plotH - plotH * v / maximum) for i, v in enumerate(vs) if v is not None]
        colour = PALETTE[j % len(PALETTE)]
        if len(points) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2.5"/>')
        for (x, y), v in zip(points, [v for v in vs if v is not None]):
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}"><title>{_text(name)}: {show(v)}</title></circle>')
    legend = "".join(f'<span class="key"><i style="background:{PALETTE[j % len(PALETTE)]}"></i>{_text(name)}</span>'
                     for j, name in enumerate(series))
    return _figure(title, parts, legend)


def _figure(title: str, parts: list[str], legend: str) -> str:
    return (f'<figure><figcaption>{html.escape(title)}</figcaption>'
            f'<svg viewBox="0 0 {W} {H}" role="img" aria-label="{html.escape(title)}">{"".join(parts)}</svg>'
            f'<div class="legend">{legend}</div></figure>')


def renderHTML(report: Report, args: argparse.Namespace) -> str:
    days = sorted(report.days)
    owners = sorted({owner for _, owner in report.daily}, key=lambda o: -sum(t.input + t.output for (d, ow), t in report.daily.items() if ow == o))
    top, rest = owners[:8], owners[8:]
    refused = REFUSED if REFUSED not in owners else f"({REFUSED})"  # an owner may be called "refused"

    def perOwner(metric: Any) -> dict[str, list[float]]:
        series: dict[str, list[float]] = {}
        for owner in top:
            series[refused if owner is None else owner] = [metric(report.daily.get((day, owner))) for day in days]
        if rest:
            series["others"] = [sum(metric(report.daily.get((day, o))) for o in rest) for day in days]
        return series

    tokens = perOwner(lambda t: (t.input + t.output) if t else 0)
    cost = perOwner(lambda t: t.cost if t else 0.0)
    calls = {"calls": [float(report.days[d].calls) for d in days], "errors": [float(report.days[d].errors) for d in days]}
    latency: dict[str, list[float | None]] = {
        "p50 ms": [report.days[d].latency.percentile(50) for d in days],
        "p95 ms": [report.days[d].latency.percentile(95) for d in days],
    }
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
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>LMGate usage report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font:15px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}}
header{{background:#1d2330;color:#fff;padding:22px 32px}} header h1{{margin:0;font-size:22px}} header p{{margin:4px 0 0;color:#b8c0cc}}
main{{max-width:1120px;margin:0 auto;padding:24px 32px}}
.cards{{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:18px}} .card{{background:#fff;border-radius:10px;padding:14px 18px;box-shadow:0 1px 3px #0001;min-width:140px}}
.card b{{display:block;font-size:22px}} .card span{{color:#667}}
.charts{{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:16px}}
figure{{background:#fff;border-radius:10px;margin:0;padding:14px 16px;box-shadow:0 1px 3px #0001}} figcaption{{font-weight:600;margin-bottom:6px}}
svg{{width:100%;height:auto}} .grid{{stroke:#e4e7ec}} .tick{{font-size:11px;fill:#667}}
.legend{{display:flex;flex-wrap:wrap;gap:10px;font-size:12px;color:#445}} .key i{{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px}}
table{{border-collapse:collapse;width:100%;background:#fff;border-radius:10px;overflow:hidden;box-shadow:0 1px 3px #0001;margin-top:18px}}
th,td{{padding:7px 10px;text-align:right;border-bottom:1px solid #eef0f3;font-variant-numeric:tabular-nums}} th{{background:#eef1f6;font-size:12px;text-transform:uppercase;letter-spacing:.03em}}
td:first-child,th:first-child,td.g{{text-align:left}} tr.total td{{font-weight:700;background:#fafbfc}}
</style></head><body>
<header><h1>LMGate usage report</h1><p>{_text(span)}{' · ' + _text(filters) if filters else ''} · grouped by {html.escape(', '.join(report.by))}</p></header>
<main>
<div class="cards">{cards}</div>
<div class="charts">
{stackedBars("Tokens per day by owner (input + output)", days, tokens)}
{stackedBars("Cost per day by owner (USD)", days, cost, MONEY)}
{lines("Calls and errors per day", days, {k: list[float | None](v) for k, v in calls.items()})}
{lines("Latency per day (ms)", days, latency, MS)}
</div>
<table><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in header)}</tr></thead><tbody>{rows}</tbody></table>
</main></body></html>
"""
