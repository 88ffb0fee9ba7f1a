"""`sidecar ...` commands: argument parsing and calls, nothing else."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.admin_client import AdminClient, AdminError
from sidecar.login import LoginError

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
        print(f"sidecar: config file {path} not found (use --config or $SIDECAR_CONFIG)",
              file=sys.stderr)
        return 1
    from sidecar.config.loader import ConfigError

    try:
        if args.workers > 1:
            from sidecar.workers import run_workers

            return int(run_workers(path, args.grpc, args.http, args.workers, args.log_level))
        run(path, args.grpc, args.http)
    except ConfigError as exc:
        print("\n".join(exc.errors), file=sys.stderr)
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
        print(f"{args.path}: OK (version {rs.version})")
        for key, value in summary.items():
            if key not in {"path", "version"}:
                print(f"  {key}: {value}")
    return 0


def _client(args: argparse.Namespace) -> AdminClient:
    return AdminClient(args.url, os.environ.get("SIDECAR_ADMIN_TOKEN", ""))


def _print(data: Any, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2) if as_json else text)


def cmd_tokens_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "groups": args.group or []}
    if args.expires:
        body["expires"] = args.expires
    result = _client(args).call("POST", "/v1/service-tokens", body)
    if args.json:
        print(json.dumps({k: result[k] for k in ("id", "name", "client_id", "client_secret")}))
        return 0
    print(f"Created service token {result['name']} (id {result['id']})")
    print(f"  CF-Access-Client-Id:     {result['client_id']}")
    print(f"  CF-Access-Client-Secret: {result['client_secret']}")
    print("The secret is shown only this once; store it now.")
    return 0


def cmd_tokens_list(args: argparse.Namespace) -> int:
    tokens = _client(args).call("GET", "/v1/service-tokens")
    lines = [f"{'ID':32}  {'NAME':20}  {'GROUPS':20}  STATE"]
    for t in tokens:
        state = "revoked" if t.get("revoked_at") else "active"
        lines.append(f"{t['id']:32}  {t['name']:20}  {','.join(t['groups']):20}  {state}")
    _print(tokens, args.json, "\n".join(lines))
    return 0


def cmd_tokens_revoke(args: argparse.Namespace) -> int:
    result = _client(args).call("DELETE", f"/v1/service-tokens/{args.id}")
    _print(result, args.json, f"Revoked {result['name']} ({result['id']})")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    import time

    from sidecar.usage_report import render_table, since_param, total

    by = [d.strip() for d in args.by.split(",") if d.strip()]
    params = {"group_by": ",".join(by)}
    if args.window:
        params["window"] = args.window
    if args.since:
        params["start"] = since_param(args.since, time.time())
    client = _client(args)
    rows = client.call("GET", "/v1/usage", params=params)
    grand = total(rows)
    if "group" in by:
        # A caller in several groups counts once per group: those rows overstate the total.
        everything = {k: v for k, v in params.items() if k not in ("group_by", "window")}
        grand = total(client.call("GET", "/v1/usage", params=everything))
    _print({"rows": rows, "total": {**grand, "cost_usd": float(grand["cost_usd"])}}, args.json,
           render_table(rows, by, grand))
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from sidecar.login import login

    try:
        login(args.url, as_json=args.json)
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from sidecar.login import valid_token

    credential = valid_token(args.url)
    view = {k: credential.get(k) for k in ("url", "access_token", "expires_at", "email")}
    _print(view, args.json, credential["access_token"])
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from sidecar.login import credentials_path, logout

    path = credentials_path()
    removed = logout(path=path)
    _print({"removed": removed, "path": str(path)}, args.json,
           f"Logged out; removed {path}." if removed else "Not logged in.")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.demo.run import main as demo_main

    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC and HTTP servers")
    serve.add_argument("--config")
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument("--grpc", help="gRPC listen address host:port (overrides config)")
    serve.add_argument("--http", help="HTTP listen address host:port (overrides config)")
    serve.add_argument("--log-level", default=os.environ.get("SIDECAR_LOG_LEVEL", "info"))
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file")
    check.add_argument("path", type=Path)
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=cmd_check_config)

    url_default = os.environ.get("SIDECAR_URL", "http://127.0.0.1:9002")
    tokens = sub.add_parser("tokens", help="manage service tokens")
    tsub = tokens.add_subparsers(dest="tokens_command", required=True)
    create = tsub.add_parser("create")
    create.add_argument("name")
    create.add_argument("--group", action="append")
    create.add_argument("--expires", help="duration such as 30d or 12h")
    listing = tsub.add_parser("list")
    revoke = tsub.add_parser("revoke")
    revoke.add_argument("id")
    for p, fn in ((create, cmd_tokens_create), (listing, cmd_tokens_list),
                  (revoke, cmd_tokens_revoke)):
        p.add_argument("--url", default=url_default)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=fn)

    usage = sub.add_parser("usage", help="spend table from the ledger")
    usage.add_argument("--by", default="user,model",
                       help="dimensions, comma-separated: user, group, token, kind, model, "
                            "provider (default: user,model; empty for the total only)")
    usage.add_argument("--window", choices=["hour", "day"], help="one row per hour or day")
    usage.add_argument("--since", help="24h, 7d, an ISO 8601 time or epoch seconds "
                                       "(default: the last 30 days; 48h with --window hour)")
    usage.add_argument("--url", default=url_default)
    usage.add_argument("--json", action="store_true")
    usage.set_defaults(func=cmd_usage)

    login = sub.add_parser("login", help="device-code login against a running sidecar")
    login.add_argument("url", help="the sidecar's public URL, such as https://gateway.example.com")
    login.set_defaults(func=cmd_login)
    token = sub.add_parser("token", help="print the stored, still-valid token")
    token.add_argument("url", nargs="?", help="refuse a token stored for another URL")
    token.set_defaults(func=cmd_token)
    logout = sub.add_parser("logout", help="forget the stored credential")
    logout.set_defaults(func=cmd_logout)
    for p in (login, token, logout):
        p.add_argument("--json", action="store_true")

    secret_key = sub.add_parser(
        "secret-key", help="print a new key for secrets.key_env / secrets.key_file")
    secret_key.set_defaults(func=cmd_secret_key)

    demo = sub.add_parser("demo", help="run sidecar + Envoy + a fake provider locally")
    demo.add_argument("--check", action="store_true",
                      help="send a few example requests through Envoy, print them, and exit")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (AdminError, LoginError) as exc:
        print(f"sidecar: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
