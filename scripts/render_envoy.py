"""Write `sidecar envoy-config`'s pieces into deploy/envoy/envoy.yaml.

The deployed file keeps its own comments, listener, routes and provider clusters; between
each `# BEGIN sidecar envoy-config KEY` and `# END sidecar envoy-config KEY` marker it holds
exactly what `sidecar envoy-config` prints for the default listen address (KEY is
`http_filters`, `access_log` or `clusters`). `--check` exits 1 when the file is stale
(tests/unit/test_envoy_attach.py runs it). Run scripts/render_k8s_configmap.py after it.

    .venv/bin/python scripts/render_envoy.py [--check]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from sidecar.config.models import ListenConfig
from sidecar.envoy.attach import pieces_for_listen

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "deploy" / "envoy" / "envoy.yaml"
KEYS = ("http_filters", "access_log", "clusters")


def _block(key: str, indent: str, items: list[object]) -> str:
    body = yaml.safe_dump(items, sort_keys=False, width=100) if items else ""
    lines = [indent + line for line in body.splitlines()]
    return "\n".join(
        [
            f"{indent}# BEGIN sidecar envoy-config {key}",
            *lines,
            f"{indent}# END sidecar envoy-config {key}",
        ]
    )


def render(text: str) -> str:
    pieces = pieces_for_listen(ListenConfig())
    for key in KEYS:
        pattern = re.compile(
            rf"^( *)# BEGIN sidecar envoy-config {key}\n.*?^ *# END sidecar envoy-config {key}$",
            re.MULTILINE | re.DOTALL,
        )
        found = pattern.findall(text)
        if len(found) != 1:
            raise SystemExit(f"{TARGET}: expected one BEGIN/END pair for {key}")
        text = pattern.sub(lambda m, k=key: _block(k, m.group(1), pieces[k]), text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = parser.parse_args()
    current = TARGET.read_text(encoding="utf-8")
    text = render(current)
    if args.check:
        if current != text:
            print(f"{TARGET} is stale: run scripts/render_envoy.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
