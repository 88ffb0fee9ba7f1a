"""`sidecar budgets` output: the caller's buckets as an aligned table with a utilisation bar
and how long until each window resets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from sidecar.client.usage_report import dollars

BAR_WIDTH = 10
HEADERS = (
    "RULE",
    "BUCKET",
    "WINDOW",
    "SPENT",
    "RESERVED",
    "LIMIT",
    "REMAINING",
    "USED",
    "RESETS IN",
)
NUMERIC_FROM = 3


def resets_in(resets_at: str, now: float) -> str:
    """`2026-05-01T00:00:00Z` → "3h 12m" (or "2d 4h", "12m", "45s", "now")."""
    seconds = int(datetime.fromisoformat(resets_at.replace("Z", "+00:00")).timestamp() - now)
    if seconds <= 0:
        return "now"
    days, rest = divmod(seconds, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m" if minutes else f"{secs}s"


def bar(used: Decimal, limit: Decimal) -> str:
    """`[######....]  62%`: spent plus reserved against the limit."""
    if limit <= 0:
        return "[" + "?" * BAR_WIDTH + "]     "
    share = used / limit
    filled = min(BAR_WIDTH, int(share * BAR_WIDTH))
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {share * 100:4.0f}%"


def amount(unit: str, value: Decimal) -> str:
    """Dollars to the µUSD; tokens and requests as whole numbers with their unit."""
    if unit == "usd":
        return f"${value:.6f}"
    return f"{int(value):,} {'req' if unit == 'requests' else 'tok'}"


def render_budgets(rows: Sequence[Mapping[str, Any]], now: float) -> str:
    if not rows:
        return "No budget applies to you (no spend limit matches your identity)."
    body = []
    for r in rows:
        # Rows of a server older than units are all dollars.
        unit = str(r.get("unit", "usd"))
        spent, reserved, limit = (dollars(r[k]) for k in ("spent", "reserved", "limit"))
        rule = str(r["rule"]) + (f" ({r['tokens']})" if r.get("tokens") else "")
        body.append(
            [
                rule,
                str(r["bucket"]),
                str(r["window"]),
                amount(unit, spent),
                amount(unit, reserved),
                amount(unit, limit),
                amount(unit, dollars(r["remaining"])),
                bar(spent + reserved, limit),
                resets_in(str(r["resets_at"]), now),
            ]
        )
    widths = [max(len(line[i]) for line in [list(HEADERS), *body]) for i in range(len(HEADERS))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if NUMERIC_FROM <= i < 7 else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(HEADERS), *(line(b) for b in body)])
