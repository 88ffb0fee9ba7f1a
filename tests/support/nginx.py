"""Run deploy/nginx/nginx.conf for real: copied to a temporary prefix, with only addresses,
ports, the ingress token and log/temp paths changed, as a foreground nginx owned by the
test."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devtools.config import DEMO_PROVIDER_KEYS
from devtools.procs import LOOPBACK, ManagedProcess, free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
NGINX_DIR = REPO / "deploy" / "nginx"
# The keys are the sidecar's (the demo config's); nginx only holds the ingress token.
OPENAI_KEY = DEMO_PROVIDER_KEYS["openai"]
ANTHROPIC_KEY = DEMO_PROVIDER_KEYS["anthropic"]
INGRESS_TOKEN = "nginx-ingress-token-for-tests-0123"


def nginx_binary() -> str:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        raise FileNotFoundError(
            "nginx not found: install it (Debian: apt-get install nginx); scripts/setup.sh does"
        )
    return found


def _replace(text: str, old: str, new: str) -> str:
    # Every substitution must hit: a reworded deploy file fails here, not silently.
    assert old in text, f"deploy/nginx/nginx.conf no longer contains {old!r}"
    return text.replace(old, new)


def render(prefix: Path, listen: int, sidecar_http: int, provider: int) -> Path:
    """Copy the deploy files into `prefix` and point them at loopback test servers."""
    prefix.mkdir(parents=True, exist_ok=True)
    for name in ("nginx.conf", "sidecar_auth.conf"):
        shutil.copy(NGINX_DIR / name, prefix / name)
    (prefix / "sidecar-ingress-token.conf").write_text(
        f'set $sidecar_ingress_token "{INGRESS_TOKEN}";\n'
    )
    conf = (prefix / "nginx.conf").read_text()
    conf = _replace(conf, "server 127.0.0.1:9002;", f"server {LOOPBACK}:{sidecar_http};")
    conf = _replace(conf, "listen 8080;", f"listen {LOOPBACK}:{listen};")
    for host in ("api.openai.com:443", "api.anthropic.com:443"):
        conf = _replace(conf, f"server {host};", f"server {LOOPBACK}:{provider};")
    for upstream in ("openai_api", "anthropic_api"):
        conf = _replace(conf, f"proxy_pass https://{upstream}/;", f"proxy_pass http://{upstream}/;")
    local = "\n".join(
        f"    {d} {prefix / p};"
        for d, p in (
            ("access_log", "access.log"),
            ("client_body_temp_path", "tmp/body"),
            ("proxy_temp_path", "tmp/proxy"),
            ("fastcgi_temp_path", "tmp/fastcgi"),
            ("uwsgi_temp_path", "tmp/uwsgi"),
            ("scgi_temp_path", "tmp/scgi"),
        )
    )
    conf = _replace(conf, "http {\n", "http {\n" + local + "\n")
    (prefix / "tmp").mkdir(exist_ok=True)
    path = prefix / "nginx.conf"
    path.write_text(conf)
    return path


def _argv(prefix: Path, conf: Path, *extra: str) -> list[str]:
    main = f"daemon off; pid {prefix / 'nginx.pid'};"
    if os.geteuid() == 0:
        # Workers would otherwise run as nobody, who cannot enter the test's private tmp dir.
        main += " user root;"
    return [
        nginx_binary(),
        "-p",
        f"{prefix}/",
        "-c",
        str(conf),
        "-e",
        str(prefix / "error.log"),
        "-g",
        main,
        *extra,
    ]


@contextmanager
def running_nginx(prefix: Path, sidecar_http: int, provider: int) -> Iterator[str]:
    """nginx in the foreground on a free loopback port; yields its base URL."""
    listen = free_port()
    conf = render(prefix, listen, sidecar_http, provider)
    with ManagedProcess("nginx", _argv(prefix, conf), prefix) as proc:
        wait_for_port(LOOPBACK, listen, 20, process=proc)
        yield f"http://{LOOPBACK}:{listen}"


def config_test_argv(prefix: Path, conf: Path) -> list[str]:
    """`nginx -t` on a rendered config."""
    return _argv(prefix, conf, "-t")
