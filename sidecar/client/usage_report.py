"""`sidecar usage` output: the `--since` parser and the aligned spend table with its total.

Rows come from `GET /v1/usage` as JSON; dollars are turned back into exact decimals (the API
writes at most six decimal places, which a float's shortest repr preserves) so the total line
is an exact sum, not a float sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from sidecar.policy.windows import parse_duration

MEASURES = ("requests", "input_tokens", "output_tokens", "errors")


def since_param(text: str, now: float) -> str:
    """`24h` / `7d` / `90m` → epoch seconds that long before `now`; anything else (an ISO
    time or epoch seconds) is passed through for the server to validate."""
    text = text.strip()
    try:
        seconds = parse_duration(text)
    except ValueError:
        return text
    return str(max(0, int(now) - seconds))


def dollars(value: Any) -> Decimal:
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))


def total(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"cost_usd": sum((dollars(r["cost_usd"]) for r in rows), Decimal(0))}
    for measure in MEASURES:
        # `errors` is absent from the rows of a server older than this client.
        out[measure] = sum(int(r.get(measure, 0)) for r in rows)
    return out


def _cell(value: Any) -> str:
    return "-" if value in ("", None) else str(value)


def render_table(
    rows: Sequence[Mapping[str, Any]], by: Sequence[str], grand_total: Mapping[str, Any]
) -> str:
    """Key columns left-aligned, numbers right-aligned, a rule, then the TOTAL line."""
    windowed = any("window_start" in r for r in rows)
    keys = (["window_start"] if windowed else []) + list(by)
    headers = [k.upper() for k in keys] + ["COST_USD", "REQUESTS", "INPUT", "OUTPUT", "ERRORS"]
    body = [
        [_cell(r.get(k)) for k in keys]
        + [f"{dollars(r['cost_usd']):.6f}"]
        + [str(r.get(m, 0)) for m in MEASURES]
        for r in rows
    ]
    label = ["TOTAL"] + [""] * (len(keys) - 1) if keys else []
    footer = (
        label
        + [f"{dollars(grand_total['cost_usd']):.6f}"]
        + [str(grand_total[m]) for m in MEASURES]
    )
    widths = [max(len(line[i]) for line in [headers, *body, footer]) for i in range(len(headers))]
    numeric_from = len(keys)

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i >= numeric_from else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), *(line(b) for b in body)]
    if not rows:
        out.append("(no usage in this range)")
    out += ["  ".join("-" * w for w in widths), line(footer)]
    return "\n".join(out)
