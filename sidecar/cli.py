"""`sidecar ...` commands: argument parsing and calls, nothing else (the admin-side ones are
in `sidecar.cli_admin`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar import cli_admin
from sidecar.client.admin_client import AdminError
from sidecar.client.connect import URL_HELP, admin_client, caller_client, server_url
from sidecar.client.login import LoginError

if TYPE_CHECKING:
    from sidecar.config.models import ProviderConfig, SecretSource


def _config_path(value: str | None) -> Path:
    return Path(value or os.environ.get("SIDECAR_CONFIG") or "sidecar.yaml")


def cmd_serve(args: argparse.Namespace) -> int:
    from sidecar.log import configure
    from sidecar.server import run

    configure(args.log_level)
    path = _config_path(args.config)
    if not path.exists():
        print(
            f"sidecar: config file {path} not found (use --config or $SIDECAR_CONFIG)",
            file=sys.stderr,
        )
        return 1
    from sidecar.config.loader import ConfigError
    from sidecar.event_loop import loop_name
    from sidecar.store.base import StoreUnavailable

    try:
        loop_name()
    except ValueError as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 1
    try:
        if args.workers > 1:
            from sidecar.workers import run_workers

            return int(run_workers(path, args.grpc, args.http, args.workers, args.log_level))
        run(path, args.grpc, args.http)
    except ConfigError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
        return 1
    except StoreUnavailable as exc:
        # At start: the store cannot be opened (unreachable, or a file another process owns).
        print(f"sidecar: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_secret_key(args: argparse.Namespace) -> int:
    from sidecar.identity.secret_box import new_key

    print(new_key())
    return 0


def _key_sources(provider: ProviderConfig) -> str:
    creds = provider.credentials
    if creds is None:
        return "bring your own key"

    def where(source: SecretSource) -> str:
        return f"env {source.env}" if source.env else f"file {source.file}"

    parts = [f"default: {where(creds.default)}"] if creds.default else []
    parts += [f"{group}: {where(s)}" for group, s in creds.by_group.items()]
    return "; ".join(parts)


def cmd_check_config(args: argparse.Namespace) -> int:
    from sidecar.config.loader import ConfigError, load_config, redact_url
    from sidecar.config.ruleset import build_ruleset

    try:
        config = load_config(args.path)
        rs = build_ruleset(config, source=str(args.path))
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        print(f"{len(exc.errors)} error(s) in {args.path}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"{args.path}: {exc}", file=sys.stderr)
        return 1
    summary = {
        "path": str(args.path),
        "version": rs.version,
        "account_id": config.account_id,
        "store": redact_url(config.store.url),
        "listen": {"grpc": config.listen.grpc, "http": config.listen.http},
        "issuers": [i.issuer for i in config.identity.jwt.issuers],
        "providers": [p.id for p in config.providers],
        # Where each key comes from, never the key: "bring your own" means pass-through.
        "provider_keys": {p.id: _key_sources(p) for p in config.providers},
        "model_rules": len(config.models.rules),
        "spend_limits": [r.name for r in config.spend_limits],
        "fallbacks": {k: [t.model for t in v] for k, v in config.fallbacks.items()},
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        import yaml

        shown = {k: v for k, v in summary.items() if k not in {"path", "version"}}
        text = yaml.safe_dump(shown, sort_keys=False, default_flow_style=False, allow_unicode=True)
        print(f"{args.path}: OK (version {rs.version})")
        print("\n".join(f"  {line}" for line in text.rstrip().splitlines()))
    return 0


def _print(data: Any, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2) if as_json else text)


def cmd_budgets(args: argparse.Namespace) -> int:
    import time

    from sidecar.client.budgets_report import render_budgets

    params = {"model": args.model} if args.model else None
    rows = caller_client(args.url).call("GET", "/v1/budgets/me", params=params)
    _print(rows, args.json, render_budgets(rows, time.time()))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    import time

    from sidecar.client.usage_report import render_table, since_param, total

    by = [d.strip() for d in args.by.split(",") if d.strip()]
    params = {"group_by": ",".join(by)}
    if args.window:
        params["window"] = args.window
    if args.since:
        params["start"] = since_param(args.since, time.time())
    client = caller_client(args.url) if args.me else admin_client(args.url)
    path = "/v1/usage/me" if args.me else "/v1/usage"
    rows = client.call("GET", path, params=params)
    grand = total(rows)
    if "group" in by:
        # A caller in several groups counts once per group: those rows overstate the total.
        everything = {k: v for k, v in params.items() if k not in ("group_by", "window")}
        grand = total(client.call("GET", path, params=everything))
    _print(
        {"rows": rows, "total": {**grand, "cost_usd": float(grand["cost_usd"])}},
        args.json,
        render_table(rows, by, grand),
    )
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from sidecar.client.login import login

    try:
        login(server_url(args.url), admin=args.admin, as_json=args.json)
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from sidecar.client.login import admin_credentials_path, credentials_path, valid_token

    path = admin_credentials_path() if args.admin else credentials_path()
    credential = valid_token(args.url, path=path)
    view = {k: credential.get(k) for k in ("url", "access_token", "expires_at", "email")}
    _print(view, args.json, credential["access_token"])
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from sidecar.client.login import admin_credentials_path, credentials_path, logout

    paths = [credentials_path(), admin_credentials_path()]
    removed = [str(p) for p in paths if logout(path=p)]
    _print(
        {"removed": bool(removed), "paths": removed},
        args.json,
        f"Logged out; ended the session and removed {', '.join(removed)}."
        if removed
        else "Not logged in.",
    )
    return 0


def cmd_envoy_config(args: argparse.Namespace) -> int:
    import yaml

    from sidecar.config.loader import ConfigError, load_config
    from sidecar.config.models import ListenConfig, OverloadConfig
    from sidecar.envoy.attach import pieces_for_listen

    path = _config_path(args.path)
    listen, max_inflight = ListenConfig(), OverloadConfig().max_inflight
    if args.path or path.exists():
        try:
            config = load_config(path)
        except ConfigError as exc:
            print("\n".join(exc.errors), file=sys.stderr)
            return 1
        listen, max_inflight = config.listen, config.overload.max_inflight
    if args.workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    # Envoy bounds the Checks in flight to what the sidecar processes admit in all.
    pieces = pieces_for_listen(listen, grpc=args.grpc, max_checks=max_inflight * args.workers)
    if args.format == "json":
        print(json.dumps(pieces, indent=2))
    else:
        print(yaml.safe_dump(pieces, sort_keys=False), end="")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llm-spend-sidecar")
    except PackageNotFoundError:
        return "unknown"


DESCRIPTION = """\
Spend limits and identity for LLM calls.

  Developers: `sidecar login URL` once (the URL is remembered), then
  `sidecar budgets` for what you may still spend, `sidecar usage --me` for what you spent,
  and `OPENAI_API_KEY=$(sidecar token)` for your tools.
  Admins: `sidecar login --admin URL` (or $SIDECAR_ADMIN_TOKEN), then `sidecar limits`,
  `sidecar tokens`, `sidecar audit` and `sidecar dashboard`.
  Operators: `sidecar serve --config sidecar.yaml`, `sidecar check-config FILE`.

Which server: --url, else $SIDECAR_URL, else the URL of your last `sidecar login`,
else http://127.0.0.1:9002."""


def _dollars(text: str) -> int | float:
    """An amount as a JSON number that prints as typed: 5 stays 5, 0.02 stays 0.02."""
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not an amount in dollars: {text!r}") from None
    if not amount.is_finite() or amount < 0:
        raise argparse.ArgumentTypeError(f"not an amount in dollars: {text!r}")
    return int(amount) if amount == amount.to_integral_value() else float(text)


def _count(text: str) -> int:
    """A whole, non-negative number of tokens or requests."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(text)


def _server_command(p: argparse.ArgumentParser, func: Callable[[argparse.Namespace], int]) -> None:
    """A command that talks to a sidecar: --url, --json, and what runs it."""
    p.add_argument("--url", help=URL_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=func)


def _limit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the spend limit's name")
    p.add_argument("--budget-usd", type=_dollars, help="the limit in US dollars, such as 25")
    p.add_argument(
        "--tokens", type=_count, help="the limit in tokens (input + output), such as 200000"
    )
    p.add_argument("--requests", type=_count, help="the limit in requests, such as 5000")
    p.add_argument(
        "--window",
        help="daily, weekly, monthly (calendar, UTC) or a rolling "
        "duration such as 24h, 7d, 1m or 10s",
    )
    p.add_argument(
        "--filter",
        action="append",
        metavar="DIM=V1,V2",
        help="only requests whose DIM (user, group, token, kind, model, provider, "
        "metadata.KEY) matches one of the values (globs allowed); repeatable",
    )
    p.add_argument(
        "--split", metavar="DIM,...", help="one bucket per value of these dimensions, such as user"
    )
    p.add_argument(
        "--action",
        choices=["block", "fallback", "monitor"],
        help="what happens when the limit is reached (default block)",
    )
    p.add_argument("--alerts", metavar="PCT,...", help="alert thresholds in percent, e.g. 50,90")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"sidecar {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gRPC and HTTP servers")
    serve.add_argument(
        "--config", help="the config file (default: $SIDECAR_CONFIG, else ./sidecar.yaml)"
    )
    serve.add_argument(
        "--workers", type=int, default=1, help="processes sharing the listen ports (default 1)"
    )
    serve.add_argument("--grpc", help="gRPC listen address host:port (overrides config)")
    serve.add_argument("--http", help="HTTP listen address host:port (overrides config)")
    serve.add_argument(
        "--log-level",
        default=os.environ.get("SIDECAR_LOG_LEVEL", "info"),
        help="debug, info, warning or error (default: $SIDECAR_LOG_LEVEL, else info)",
    )
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("path", type=Path, help="the config file")
    check.add_argument("--json", action="store_true", help="print the summary as JSON")
    check.set_defaults(func=cmd_check_config)

    login = sub.add_parser(
        "login",
        help="sign in from this terminal (device code); "
        "remembers the server for the other commands",
    )
    login.add_argument(
        "url",
        nargs="?",
        help="the sidecar's public URL, such as https://gateway.example.com (default: as --url)",
    )
    login.add_argument("--url", dest="url_flag", help=argparse.SUPPRESS)
    login.add_argument(
        "--admin",
        action="store_true",
        help="ask for a short-lived (1 hour) admin token; an administrator must approve it",
    )
    login.add_argument("--json", action="store_true", help="print JSON instead of text")
    login.set_defaults(func=cmd_login)
    token = sub.add_parser("token", help="print your stored token, renewed if close to expiry")
    token.add_argument("url", nargs="?", help="refuse a token stored for another URL")
    token.add_argument("--admin", action="store_true", help="the admin login's token")
    token.add_argument("--json", action="store_true", help="print JSON instead of text")
    token.set_defaults(func=cmd_token)
    logout = sub.add_parser(
        "logout", help="end the session on the server and forget the stored credentials"
    )
    logout.add_argument("--json", action="store_true", help="print JSON instead of text")
    logout.set_defaults(func=cmd_logout)

    budgets = sub.add_parser(
        "budgets", help="your budgets: spent, reserved, limit, remaining, when each resets"
    )
    budgets.add_argument("--model", help="only the buckets a request for this model uses")
    _server_command(budgets, cmd_budgets)

    usage = sub.add_parser("usage", help="spend table from the ledger (admin, or --me)")
    usage.add_argument(
        "--me", action="store_true", help="your own usage only; needs no admin rights"
    )
    usage.add_argument(
        "--by",
        default="user,model",
        help="dimensions, comma-separated: user, group, token, kind, model, "
        "provider (default: user,model; empty for the total only)",
    )
    usage.add_argument("--window", choices=["hour", "day"], help="one row per hour or day")
    usage.add_argument(
        "--since",
        help="24h, 7d, an ISO 8601 time or epoch seconds "
        "(default: the last 30 days; 48h with --window hour)",
    )
    _server_command(usage, cmd_usage)

    limits = sub.add_parser("limits", help="runtime spend limits (admin)")
    lsub = limits.add_subparsers(dest="limits_command", required=True, metavar="ACTION")
    lsub_list = lsub.add_parser("list", help="every spend limit, from the file and runtime")
    lsub_show = lsub.add_parser("show", help="one spend limit")
    lsub_show.add_argument("name", help="the spend limit's name")
    lsub_create = lsub.add_parser("create", help="a new runtime spend limit")
    _limit_options(lsub_create)
    lsub_update = lsub.add_parser(
        "update", help="change a runtime spend limit (options not given keep their value)"
    )
    _limit_options(lsub_update)
    lsub_delete = lsub.add_parser("delete", help="remove a runtime spend limit")
    lsub_delete.add_argument("name", help="the spend limit's name")
    for p, fn in (
        (lsub_list, cli_admin.cmd_limits_list),
        (lsub_show, cli_admin.cmd_limits_show),
        (lsub_create, cli_admin.cmd_limits_create),
        (lsub_update, cli_admin.cmd_limits_update),
        (lsub_delete, cli_admin.cmd_limits_delete),
    ):
        _server_command(p, fn)

    tokens = sub.add_parser("tokens", help="service tokens for agents and pipelines (admin)")
    tsub = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    create = tsub.add_parser("create", help="a new token; its secret is printed once")
    create.add_argument("name", help="a unique name (letters, digits, '_', '.', '-')")
    create.add_argument("--group", action="append", help="a group the token belongs to; repeatable")
    create.add_argument("--expires", help="lifetime such as 30d or 12h (default: none)")
    create.add_argument(
        "--budget-usd",
        type=_dollars,
        help="also create the token's own spend limit of this many dollars",
    )
    create.add_argument(
        "--window",
        default="daily",
        help="that limit's window: daily, weekly, monthly or a rolling "
        "duration such as 24h (default daily)",
    )
    listing = tsub.add_parser("list", help="every token, with expiry and last use")
    revoke = tsub.add_parser("revoke", help="stop a token working, at once")
    revoke.add_argument("token", help="the token's name or id")
    rotate = tsub.add_parser("rotate", help="a new secret for a token; the old one stops working")
    rotate.add_argument("token", help="the token's name or id")
    for p, fn in (
        (create, cli_admin.cmd_tokens_create),
        (listing, cli_admin.cmd_tokens_list),
        (revoke, cli_admin.cmd_tokens_revoke),
        (rotate, cli_admin.cmd_tokens_rotate),
    ):
        _server_command(p, fn)

    audit = sub.add_parser("audit", help="who changed what: the admin audit trail (admin)")
    audit.add_argument("--limit", type=int, default=50, help="how many entries (default 50)")
    audit.add_argument("--action", help="only this action, such as spend_limit.update")
    _server_command(audit, cli_admin.cmd_audit)

    dashboard = sub.add_parser(
        "dashboard", help="print a one-time link that opens the dashboard in a browser (admin)"
    )
    dashboard.add_argument("--open", action="store_true", help="also open it in a browser")
    _server_command(dashboard, cli_admin.cmd_dashboard)

    secret_key = sub.add_parser(
        "secret-key", help="print a new key for secrets.key_env / secrets.key_file"
    )
    secret_key.set_defaults(func=cmd_secret_key)

    envoy_config = sub.add_parser(
        "envoy-config", help="print the Envoy http_filters, access_log and clusters to add"
    )
    envoy_config.add_argument(
        "path",
        nargs="?",
        help="sidecar config (default: $SIDECAR_CONFIG, else "
        "./sidecar.yaml; built-in listen defaults when absent)",
    )
    envoy_config.add_argument(
        "--format", choices=["yaml", "json"], default="yaml", help="output format (default: yaml)"
    )
    envoy_config.add_argument(
        "--grpc", help="the sidecar's gRPC address host:port (overrides the config)"
    )
    envoy_config.add_argument(
        "--workers",
        type=int,
        default=1,
        help="sidecar processes behind that address (`serve --workers`):"
        " Envoy lets overload.max_inflight Checks per process be in"
        " flight and refuses more at once (default: 1)",
    )
    envoy_config.set_defaults(func=cmd_envoy_config)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "login":
        args.url = args.url or args.url_flag
    try:
        return int(args.func(args))
    except (AdminError, LoginError) as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
