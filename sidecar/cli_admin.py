"""Admin-side `sidecar` commands: spend limits, service tokens, the audit trail and the
dashboard link. Each is one or two admin API calls and a table or `--json`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from sidecar.client.connect import admin_client
from sidecar.client.login import LoginError
from sidecar.client.usage_report import dollars

CALENDAR = ("daily", "weekly", "monthly")


def emit(data: Any, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2) if as_json else text)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> str:
    if not rows:
        return empty
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [headers, *rows]
    )


def usd(value: Any) -> str:
    """`$5`, `$0.05`: an API amount (a JSON number) as typed, without float noise."""
    return f"${format(dollars(value).normalize(), 'f')}"


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(float(ts), UTC).strftime("%Y-%m-%d %H:%M UTC")


# -- spend limits ----------------------------------------------------------------------
def window_spec(text: str) -> dict[str, str]:
    return {"fixed": text} if text in CALENDAR else {"rolling": text}


def window_text(window: dict[str, Any]) -> str:
    return str(window.get("fixed") or f"rolling {window.get('rolling')}")


def parse_filters(items: Sequence[str]) -> dict[str, list[str]]:
    filters: dict[str, list[str]] = {}
    for item in items:
        dim, sep, values = item.partition("=")
        if not sep or not dim.strip() or not values.strip():
            raise LoginError(
                f"--filter {item!r}: expected DIMENSION=VALUE[,VALUE...], such "
                "as model=gpt-4o,gpt-4o-mini"
            )
        filters.setdefault(dim.strip(), []).extend(
            v.strip() for v in values.split(",") if v.strip()
        )
    return filters


def limit_body(args: argparse.Namespace, base: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in base.items() if k != "source"}
    body["name"] = args.name
    given = {
        k: v
        for k, v in (
            ("budget_usd", args.budget_usd),
            ("tokens", args.tokens),
            ("requests", args.requests),
        )
        if v is not None
    }
    if len(given) > 1:
        raise LoginError("give one of --budget-usd, --tokens or --requests")
    if given:
        # A rule has one unit: a new one replaces the old.
        for unit in ("budget_usd", "tokens", "requests"):
            body.pop(unit, None)
        body.update(given)
    if args.window is not None:
        body["window"] = window_spec(args.window)
    if args.filter:
        body["filter"] = parse_filters(args.filter)
    if args.split is not None:
        body["split"] = [d.strip() for d in args.split.split(",") if d.strip()]
    if args.action is not None:
        body["action"] = args.action
    if args.alerts is not None:
        body["alerts"] = [int(a) for a in args.alerts.split(",") if a.strip()]
    return body


def limit_text(rule: dict[str, Any]) -> str:
    """The rule's limit in its unit: `$25`, `200,000 tokens`, `in 10,000 / out 2,000
    tokens`, `5,000 requests`."""
    if rule.get("budget_usd") is not None:
        return usd(rule["budget_usd"])
    if rule.get("requests") is not None:
        return f"{int(rule['requests']):,} requests"
    tokens = rule.get("tokens")
    if isinstance(tokens, dict):
        parts = [
            f"{side} {int(tokens[side]):,}"
            for side in ("input", "output")
            if tokens.get(side) is not None
        ]
        return " / ".join(parts) + " tokens"
    return f"{int(tokens or 0):,} tokens"


def limit_row(rule: dict[str, Any]) -> list[str]:
    filters = "; ".join(f"{k}={','.join(v)}" for k, v in rule.get("filter", {}).items())
    return [
        str(rule["name"]),
        str(rule.get("source", "")),
        limit_text(rule),
        window_text(rule["window"]),
        filters or "-",
        ",".join(rule.get("split", [])) or "-",
        str(rule.get("action", "")),
    ]


LIMIT_HEADERS = ("NAME", "SOURCE", "LIMIT", "WINDOW", "FILTER", "SPLIT", "ACTION")


def _answer(
    args: argparse.Namespace,
    method: str,
    path: str,
    text: Callable[[Any], str],
    body: dict[str, Any] | None = None,
) -> int:
    """One admin call, its answer printed: as JSON with --json, else as `text` makes it."""
    result = admin_client(args.url).call(method, path, body)
    emit(result, args.json, text(result))
    return 0


def cmd_limits_list(args: argparse.Namespace) -> int:
    return _answer(
        args,
        "GET",
        "/v1/spend-limits",
        lambda rules: table(LIMIT_HEADERS, [limit_row(r) for r in rules], "No spend limits."),
    )


def _limit_path(args: argparse.Namespace) -> str:
    return f"/v1/spend-limits/{quote(args.name, safe='')}"


def _shown(rule: dict[str, Any]) -> str:
    return table(LIMIT_HEADERS, [limit_row(rule)], "")


def cmd_limits_show(args: argparse.Namespace) -> int:
    return _answer(args, "GET", _limit_path(args), _shown)


def cmd_limits_create(args: argparse.Namespace) -> int:
    if (
        args.budget_usd is None and args.tokens is None and args.requests is None
    ) or args.window is None:
        raise LoginError(
            "limits create needs --window and one of --budget-usd, --tokens or --requests"
        )
    return _answer(
        args,
        "POST",
        "/v1/spend-limits",
        lambda rule: f"Created spend limit {rule['name']}.\n{_shown(rule)}",
        limit_body(args, {}),
    )


def cmd_limits_update(args: argparse.Namespace) -> int:
    client = admin_client(args.url)
    path = _limit_path(args)
    rule = client.call("PUT", path, limit_body(args, client.call("GET", path)))
    emit(rule, args.json, f"Updated spend limit {rule['name']}.\n{_shown(rule)}")
    return 0


def cmd_limits_delete(args: argparse.Namespace) -> int:
    return _answer(args, "DELETE", _limit_path(args), lambda _: f"Deleted spend limit {args.name}.")


# -- service tokens --------------------------------------------------------------------
def _token_path(args: argparse.Namespace) -> str:
    return f"/v1/service-tokens/{quote(args.token, safe='')}"


def _secret_lines(result: dict[str, Any]) -> list[str]:
    return [
        f"  CF-Access-Client-Id:     {result['client_id']}",
        f"  CF-Access-Client-Secret: {result['client_secret']}",
        "The secret is shown only this once; store it now.",
    ]


def cmd_tokens_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "groups": args.group or []}
    if args.expires:
        body["expires"] = args.expires
    if args.budget_usd is not None:
        body["budget_usd"] = args.budget_usd
        body["window"] = args.window
    elif args.window != "daily":
        raise LoginError("--window needs --budget-usd")
    result = admin_client(args.url).call("POST", "/v1/service-tokens", body)
    if args.json:
        keys = ("id", "name", "client_id", "client_secret", "expires_at", "spend_limit")
        print(json.dumps({k: result[k] for k in keys if k in result}))
        return 0
    lines = [f"Created service token {result['name']} (id {result['id']})", *_secret_lines(result)]
    if result.get("expires_at"):
        lines.insert(1, f"  Expires:                 {when(result['expires_at'])}")
    limit = result.get("spend_limit")
    if limit:
        lines.insert(
            1,
            f"  Spend limit:             {usd(limit['budget_usd'])} "
            f"{window_text(limit['window'])} (rule {limit['name']})",
        )
    print("\n".join(lines))
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    tokens = admin_client(args.url).call("GET", "/v1/service-tokens")
    rows = [
        [
            t["name"],
            t["id"],
            ",".join(t["groups"]) or "-",
            "revoked" if t.get("revoked_at") else "active",
            when(t.get("expires_at")),
            when(t.get("last_used_at")),
        ]
        for t in tokens
    ]
    emit(
        tokens,
        args.json,
        table(
            ("NAME", "ID", "GROUPS", "STATE", "EXPIRES", "LAST USED"), rows, "No service tokens."
        ),
    )
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    return _answer(
        args,
        "DELETE",
        _token_path(args),
        lambda result: f"Revoked {result['name']} ({result['id']})",
    )


def cmd_tokens_rotate(args: argparse.Namespace) -> int:
    return _answer(
        args,
        "POST",
        f"{_token_path(args)}/rotate",
        lambda result: "\n".join(
            [
                f"New secret for {result['name']} (id {result['id']}); "
                "the old one no longer works.",
                *_secret_lines(result),
            ]
        ),
        {},
    )


# -- audit and dashboard ---------------------------------------------------------------
def cmd_audit(args: argparse.Namespace) -> int:
    params = {"limit": str(args.limit)}
    if args.action:
        params["action"] = args.action
    entries = admin_client(args.url).call("GET", "/v1/audit", params=params)
    rows = [[str(e["at"]), str(e["who"]), str(e["action"]), str(e["target"])] for e in entries]
    emit(
        entries,
        args.json,
        table(("WHEN", "WHO", "ACTION", "TARGET"), rows, "No admin writes recorded."),
    )
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    result = admin_client(args.url).call("POST", "/v1/dashboard/link", {})
    link = str(result["url"])
    if args.open:
        import webbrowser

        webbrowser.open(link)
    emit(result, args.json, f"{link}\nOpen it within {result['expires_in']} s; it works once.")
    return 0
