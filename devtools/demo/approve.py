"""`scripts/demo.sh --approve CODE`: approve a device-login code on the running demo as its
signed-in test person, standing in for a browser behind Access (which the demo has not)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from devtools.keys import DevIssuer

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
STATE = "demo.json"
PERSON = ("alice@example.com", ["ml"])
ADMIN = ("root@example.com", ["platform-admins"])


def save_state(workdir: Path, admin_url: str) -> None:
    (workdir / STATE).write_text(json.dumps({"admin_url": admin_url}))


def clear_state(workdir: Path) -> None:
    (workdir / STATE).unlink(missing_ok=True)


def approve(workdir: Path, code: str, as_admin: bool) -> int:
    try:
        url = json.loads((workdir / STATE).read_text())["admin_url"]
    except (OSError, ValueError, KeyError):
        print("sidecar: the demo is not running here; start it with ./scripts/demo.sh")
        return 1
    email, groups = ADMIN if as_admin else PERSON
    issuer = DevIssuer.load_or_create(workdir)
    cookie = {"cookie": f"CF_Authorization={issuer.mint(email, groups)}"}
    page = httpx.get(f"{url}/device", params={"user_code": code}, headers=cookie, timeout=10)
    match = CSRF.search(page.text)
    if page.status_code != 200 or match is None:
        reason = re.sub(r"<[^>]+>", " ", page.text.split("<main>")[-1]).split()
        print(f"sidecar: cannot approve {code}: HTTP {page.status_code}: {' '.join(reason)[:200]}")
        return 1
    done = httpx.post(
        f"{url}/device/approve",
        headers=cookie,
        timeout=10,
        data={"user_code": code, "action": "approve", "csrf_token": match.group(1)},
    )
    if done.status_code != 200:
        print(f"sidecar: the approval was refused: HTTP {done.status_code}")
        return 1
    print(f"Approved {code} as {email}; the terminal that asked is now signed in.")
    return 0
