"""The dashboard's HTML: one server-rendered page, inline CSS and SVG, no script at all.

Every figure is exact (µUSD shown as dollars with six decimals, like the usage API) and
carries its raw value in a `data-micros` attribute, so it can be checked against the API.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from sidecar.http.dashboard.charts import esc, series_of, stacked_bars
from sidecar.http.dashboard.data import CHART_DIMENSIONS, Bucket, Dashboard
from sidecar.money import micros_to_usd_str

STYLE = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 color:#1f2328;background:#f4f6f8}
header{background:#1f2937;color:#fff;padding:14px 28px;display:flex;align-items:baseline;
 gap:24px;flex-wrap:wrap}
header h1{font-size:20px;margin:0}
header .range{color:#cbd5e1;margin:0}
header nav a{color:#cbd5e1;margin-left:10px;text-decoration:none;padding:2px 8px;
 border-radius:10px}
header nav a.on{background:#fff;color:#1f2937;font-weight:600}
main{padding:18px 28px;max-width:1400px}
.kpis{display:grid;grid-template-columns:repeat(auto-fit,minmax(160px,1fr));gap:12px}
.kpi{background:#fff;border-radius:8px;padding:12px 14px;box-shadow:0 1px 2px #0001}
.kpi .k{display:block;color:#57606a;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.kpi .v{display:block;font-size:22px;font-weight:650;font-variant-numeric:tabular-nums}
.kpi.alert .v{color:#b42318}
section{margin-top:20px}
h2{font-size:15px;margin:0 0 8px}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:12px}
figure{margin:0;background:#fff;border-radius:8px;padding:12px 14px;box-shadow:0 1px 2px #0001}
svg.chart{width:100%;height:auto;display:block}
svg .grid{stroke:#e5e7eb;stroke-width:1}
svg .axis{font-size:11px;fill:#57606a}
.legend{list-style:none;margin:6px 0 0;padding:0;display:flex;flex-wrap:wrap;gap:4px 16px;
 font-size:12px}
.legend i{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:5px}
.legend b{font-weight:600;font-variant-numeric:tabular-nums;margin-left:4px}
.card{background:#fff;border-radius:8px;padding:12px 14px;box-shadow:0 1px 2px #0001}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eef0f2;vertical-align:middle}
th{font-size:12px;color:#57606a;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.bar{position:relative;height:12px;background:#eef0f2;border-radius:6px;min-width:160px}
.bar .fill{position:absolute;left:0;top:0;bottom:0;border-radius:6px;background:#2e7d32}
.bar .fill.warn{background:#e8a317}.bar .fill.over{background:#c62828}
.bar .fill.share{background:#0072B2}
.bar .tick{position:absolute;top:-3px;bottom:-3px;width:2px;background:#1f2328aa}
.pill{display:inline-block;padding:0 7px;border-radius:9px;font-size:12px;font-weight:600}
.pill.s429{background:#fde2e1;color:#b42318}.pill.fb{background:#fff1d6;color:#8a5300}
.muted{color:#57606a}
footer{padding:6px 28px 24px;color:#57606a;font-size:12px}
code{font-size:12px}
form.filters{display:flex;flex-wrap:wrap;gap:8px 14px;align-items:center;margin:0 0 6px}
form.filters input,form.filters select{font:inherit;padding:2px 6px}
"""


def usd(micros: int) -> str:
    return f"${micros_to_usd_str(micros)}"


def amount(unit: str, value: int) -> str:
    """A bucket amount in its rule's unit (µUSD shown as dollars)."""
    return usd(value) if unit == "usd" else f"{value:,} {unit}"


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _kpi(name: str, value: str, ident: str, micros: int | None = None, alert: bool = False) -> str:
    data = f' data-micros="{micros}"' if micros is not None else ""
    return (
        f'<div class="kpi{" alert" if alert else ""}"><span class="k">{esc(name)}</span>'
        f'<span class="v" id="{ident}"{data}>{esc(value)}</span></div>'
    )


def _chart(d: Dashboard, dimension: str) -> str:
    rows = d.series[dimension]
    series = series_of(rows, dimension)
    legend = "".join(
        f'<li data-dim="{esc(dimension)}" data-key="{esc(s.name)}" data-micros="{s.total}"'
        f'{" data-other" if i >= 5 else ""}><i style="background:{s.colour}"></i>'
        f"{esc(s.name or '(none)')}<b>{usd(s.total)}</b> "
        f'<span class="muted">{s.requests} req</span></li>'
        for i, s in enumerate(series)
    )
    body = (
        stacked_bars(rows, dimension, d.window, d.window_starts(), series)
        if rows
        else '<p class="muted">No spend in this range.</p>'
    )
    return (
        f'<figure id="chart-{esc(dimension)}"><h2>Spend per {d.window} by {esc(dimension)}'
        f'</h2>{body}<ul class="legend">{legend}</ul></figure>'
    )


def _spenders(d: Dashboard) -> str:
    if not d.top_spenders:
        return '<p class="muted">No spend in this range.</p>'
    top = max(r.totals.cost for r in d.top_spenders) or 1
    rows = []
    for rank, row in enumerate(d.top_spenders, 1):
        user = dict(row.keys)["user"]
        t = row.totals
        rows.append(
            f'<tr data-user="{esc(user)}" data-micros="{t.cost}"><td class="n">{rank}</td>'
            f'<td>{esc(user or "(none)")}</td><td class="n">{usd(t.cost)}</td>'
            f'<td><div class="bar"><div class="fill share" '
            f'style="width:{100 * t.cost / top:.1f}%"></div></div></td>'
            f'<td class="n">{t.requests}</td><td class="n">{t.input_tokens:,}</td>'
            f'<td class="n">{t.output_tokens:,}</td><td class="n">{t.errors}</td></tr>'
        )
    headers = ("#", "user", "spend", "", "requests", "input tokens", "output tokens", "errors")
    return _table("top-spenders", headers, rows)


def _utilization(b: Bucket) -> str:
    pct = b.percent
    first_alert = min(b.alerts) if b.alerts else 75
    level = "over" if pct >= 100 else "warn" if pct >= first_alert else ""
    ticks = "".join(
        f'<span class="tick" style="left:{min(a, 100)}%" title="alert at {a}%"></span>'
        for a in b.alerts
    )
    return (
        f'<div class="bar"><div class="fill {level}" style="width:{min(pct, 100):.1f}%">'
        f"</div>{ticks}</div>"
    )


def _buckets(d: Dashboard) -> str:
    if not d.buckets:
        return '<p class="muted">No budget bucket has spend in its current window.</p>'
    rows = []
    for b in d.buckets:
        v: dict[str, Any] = b.view
        alerts = ", ".join(f"{a}%" for a in b.alerts) or "—"
        unit = str(v["unit"])
        measured = (
            f'data-used-micros="{b.used}" data-limit-micros="{b.limit}"'
            if unit == "usd"
            else f'data-used="{b.used}" data-limit="{b.limit}"'
        )
        rows.append(
            f'<tr data-rule="{esc(v["rule"])}" data-bucket="{esc(v["bucket"])}" '
            f'data-unit="{esc(unit)}" {measured}>'
            f"<td>{esc(v['rule'])}</td><td>{esc(v['bucket'])}</td>"
            f'<td>{esc(v["action"])}</td><td class="muted">{esc(v["window"])}</td>'
            f'<td class="n">{amount(unit, b.used)} / {amount(unit, b.limit)}</td>'
            f'<td>{_utilization(b)}</td><td class="n">{b.percent:.0f}%</td>'
            f'<td class="muted">{esc(alerts)}</td><td class="muted">{esc(v["resets_at"])}</td>'
            f"</tr>"
        )
    more = (
        f'<p class="muted">{d.hidden_buckets} more buckets not shown.</p>'
        if d.hidden_buckets
        else ""
    )
    headers = (
        "rule",
        "bucket",
        "action",
        "window",
        "spent + reserved / limit",
        "utilization",
        "",
        "alerts",
        "resets",
    )
    return _table("buckets", headers, rows) + more


def _recent(d: Dashboard) -> str:
    if not d.recent:
        return '<p class="muted">No refusals or fallbacks in the last 7 days.</p>'
    rows = []
    for e in d.recent:
        if e.get("reason") == "fallback":
            what = '<span class="pill fb">fallback</span>'
            detail = f"{esc(str(e.get('model', '')))} → {esc(str(e.get('fallback_to', '')))}"
        else:
            what = f'<span class="pill s429">{esc(str(e.get("status", "")))}</span>'
            detail = (
                f"{esc(str(e.get('model', '')))} · rule "
                f"<b>{esc(str(e.get('rule', '')))}</b> · {esc(str(e.get('bucket', '')))}"
            )
        rows.append(
            f'<tr class="recent" data-reason="{esc(str(e.get("reason", "")))}">'
            f'<td class="muted">{esc(when(float(e.get("at", 0))))}</td><td>{what}</td>'
            f"<td>{esc(str(e.get('user', '')))}</td><td>{detail}</td></tr>"
        )
    return _table("recent", ("when", "", "who", "what"), rows)


def _filters_form(d: Dashboard) -> str:
    def field(name: str) -> str:
        return (
            f'<label>{name} <input type="text" name="{name}" id="filter-{name}" '
            f'value="{esc(d.filters.get(name, ""))}" size="18"></label>'
        )

    options = "".join(
        f'<option value="{w}"{" selected" if w == d.window else ""}>{w}</option>'
        for w in ("hour", "day")
    )
    return (
        '<form id="filters" method="get" action="/dashboard" class="filters">'
        f'<label>window <select name="window" id="filter-window">{options}</select></label>'
        f"{field('user')}{field('group')}{field('model')}"
        '<button type="submit" id="apply">Apply</button>'
        '<a href="/dashboard">clear</a></form>'
    )


def _query(d: Dashboard, **extra: str) -> str:
    params = {"window": d.window, **d.filters, **extra}
    return "&amp;".join(f"{esc(k)}={quote(v, safe='')}" for k, v in params.items() if v)


def _audit(d: Dashboard) -> str:
    if not d.audit:
        return '<p class="muted">No admin writes recorded.</p>'
    rows = [
        f'<tr class="audit" data-action="{esc(str(e.get("action", "")))}">'
        f'<td class="muted">{esc(when(float(e.get("at", 0))))}</td>'
        f"<td>{esc(str(e.get('who', '')))}</td><td>{esc(str(e.get('action', '')))}</td>"
        f"<td>{esc(str(e.get('target', '')))}</td></tr>"
        for e in d.audit
    ]
    return _table("audit", ("when", "who", "what", "target"), rows)


def _table(table_id: str, headers: Sequence[str], rows: Sequence[str]) -> str:
    """A table of pre-rendered rows under a header row (headers are literal HTML)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    return f'<table id="{table_id}"><tr>{head}</tr>' + "".join(rows) + "</table>"


def render(d: Dashboard) -> str:
    t = d.totals
    denied = sum(1 for e in d.recent if e.get("status") == 429)
    fallbacks = sum(1 for e in d.recent if e.get("reason") == "fallback")
    hot = sum(1 for b in d.buckets if b.percent >= 90)
    nav = "".join(
        f'<a href="?{_query(d, window=w)}" class="{"on" if w == d.window else ""}">{name}</a>'
        for w, name in (("hour", "Hourly, 48 h"), ("day", "Daily, 30 d"))
    )
    csv_link = f"/dashboard.csv?{_query(d, start=str(d.start), end=str(d.end))}"
    api = f"/v1/usage?start={d.start}&amp;end={d.end}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>LLM spend</title><link rel="icon" href="data:,"><style>{STYLE}</style></head>
<body>
<header><h1>LLM spend</h1>
<p class="range" id="range" data-start="{d.start}" data-end="{d.end}">
{esc(when(d.start))} → {esc(when(d.end))}</p>
<nav>{nav}</nav></header>
<main>
<section class="card">{_filters_form(d)}
<a id="csv" href="{csv_link}" download>Download CSV</a></section>
<section class="kpis">
{_kpi("Spend", usd(t.cost), "total-cost", t.cost)}
{_kpi("Requests", f"{t.requests:,}", "total-requests")}
{_kpi("Input tokens", f"{t.input_tokens:,}", "total-input")}
{_kpi("Output tokens", f"{t.output_tokens:,}", "total-output")}
{_kpi("Provider errors ($0)", f"{t.errors:,}", "total-errors", alert=t.errors > 0)}
{_kpi("Recent 429s", str(denied), "recent-429", alert=denied > 0)}
{_kpi("Recent fallbacks", str(fallbacks), "recent-fallbacks")}
{_kpi("Buckets ≥ 90%", str(hot), "hot-buckets", alert=hot > 0)}
</section>
<section class="charts">{"".join(_chart(d, dim) for dim in CHART_DIMENSIONS)}</section>
<section class="card"><h2>Top spenders</h2>{_spenders(d)}</section>
<section class="card"><h2>Budgets: current windows</h2>{_buckets(d)}</section>
<section class="card"><h2>Recent 429s and fallbacks (all replicas)</h2>{_recent(d)}</section>
<section class="card"><h2>Latest admin changes</h2>{_audit(d)}</section>
</main>
<footer>Spend: the hourly ledger (UTC), the same figures as <code>{api}</code>.
Budgets: every bucket with spend or reservations in its current window, fullest first
(rules on <code>metadata.*</code> are not listed). Refusals: the latest 200 across replicas,
kept 7 days. Rendered {esc(when(d.now))}.</footer>
</body></html>
"""
