"""Inline SVG for the dashboard: stacked spend bars over time. No script, no external asset.

Every user-supplied string (emails, model names) is escaped; hovering a bar segment shows its
exact amount through the SVG `<title>` element, which needs no JavaScript.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sidecar.metering.ledger import UsageRow, Window
from sidecar.money import micros_to_usd_str

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00")
OTHER_COLOUR = "#9AA0A6"
SERIES = 5
WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 64, 8, 10, 26


@dataclass(frozen=True)
class Series:
    name: str
    colour: str
    total: int  # µUSD over the whole range
    requests: int


def esc(text: str) -> str:
    return html.escape(text, quote=True)


def label(ts: int, window: Window) -> str:
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.strftime("%H:%M" if window == "hour" else "%b %d")


def nice_ceiling(micros: int) -> int:
    """A round axis maximum (1, 2 or 5 times a power of ten, in µUSD) at or above `micros`."""
    if micros <= 0:
        return 10_000  # a one-cent axis for an empty chart
    step = 1
    while True:
        for factor in (1, 2, 5):
            if factor * step >= micros:
                return factor * step
        step *= 10


def money(micros: int) -> str:
    """Axis labels: short, but never rounding a non-zero amount to $0."""
    return "$" + micros_to_usd_str(micros).rstrip("0").rstrip(".")


def series_of(rows: Sequence[UsageRow], dimension: str) -> list[Series]:
    """The top SERIES values by spend, then one 'other' for the rest."""
    totals: dict[str, list[int]] = {}
    for row in rows:
        key = dict(row.keys)[dimension]
        slot = totals.setdefault(key, [0, 0])
        slot[0] += row.totals.cost
        slot[1] += row.totals.requests
    ranked = sorted(totals.items(), key=lambda item: (-item[1][0], item[0]))
    out = [
        Series(name, PALETTE[i], cost, requests)
        for i, (name, (cost, requests)) in enumerate(ranked[:SERIES])
    ]
    rest = ranked[SERIES:]
    if rest:
        out.append(
            Series(
                f"{len(rest)} other",
                OTHER_COLOUR,
                sum(c for _, (c, _r) in rest),
                sum(r for _, (_c, r) in rest),
            )
        )
    return out


def stacked_bars(
    rows: Sequence[UsageRow],
    dimension: str,
    window: Window,
    starts: Sequence[int],
    series: Sequence[Series],
) -> str:
    has_other = bool(series) and series[-1].colour == OTHER_COLOUR
    index_of = {s.name: i for i, s in enumerate(series[:-1] if has_other else series)}
    fallback = len(series) - 1 if has_other else None
    # Per window start: µUSD per series index.
    stacks: dict[int, dict[int, int]] = {start: {} for start in starts}
    for row in rows:
        target = index_of.get(dict(row.keys)[dimension], fallback)
        if target is None or row.window_start not in stacks:
            continue
        stack = stacks[row.window_start]
        stack[target] = stack.get(target, 0) + row.totals.cost
    top = nice_ceiling(max((sum(s.values()) for s in stacks.values()), default=0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot_w = plot_w / max(len(starts), 1)
    bar_w = max(slot_w * 0.72, 1.0)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="spend per {window} by {esc(dimension)}">'
    ]
    for i in range(5):
        y = TOP + plot_h - plot_h * i / 4
        parts.append(
            f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
            f'class="grid"/><text x="{LEFT - 6}" y="{y + 4:.1f}" '
            f'class="axis" text-anchor="end">{esc(money(top * i // 4))}</text>'
        )
    every = max(1, len(starts) // 8)
    for index, start in enumerate(starts):
        x = LEFT + index * slot_w + (slot_w - bar_w) / 2
        y = TOP + plot_h
        for target, cost in sorted(stacks[start].items()):
            s = series[target]
            h = plot_h * cost / top
            y -= h
            tip = f"{s.name or '(none)'} · {label(start, window)} · ${micros_to_usd_str(cost)}"
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" '
                f'height="{max(h, 0.5):.1f}" fill="{s.colour}">'
                f"<title>{esc(tip)}</title></rect>"
            )
        if index % every == 0:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{HEIGHT - 8}" class="axis" '
                f'text-anchor="middle">{esc(label(start, window))}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)
