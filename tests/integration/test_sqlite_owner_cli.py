"""`sidecar serve` owns its SQLite file unless `store.shared: true`: a second process on the
same file is refused at start with what to do, and with `shared: true` both serve."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from devtools.config import demo_config
from devtools.keys import DevIssuer
from devtools.procs import free_port
from devtools.stack import serve_argv, sidecar_process, wait_ready


def write_config(tmp_path: Path, issuer: DevIssuer, store: Any, name: str) -> Path:
    jwks = str(issuer.write_jwks(tmp_path / "jwks.json"))
    path = tmp_path / name
    path.write_text(json.dumps(demo_config(issuer, jwks, store)))
    return path


def test_a_second_serve_on_an_owned_file_is_refused_and_shared_files_serve_both(
    tmp_path: Path, issuer: DevIssuer
) -> None:
    db = f"sqlite:///{tmp_path}/s.db"
    owned = write_config(tmp_path, issuer, db, "owned.yaml")
    first_http = free_port()
    first = sidecar_process(tmp_path, "first", owned, free_port(), first_http).start()
    with first:
        wait_ready(f"http://127.0.0.1:{first_http}", first)
        second = subprocess.run(
            serve_argv(owned, free_port(), free_port()),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert "is in use by another process" in second.stderr
        assert "store.shared: true" in second.stderr
        assert "Traceback" not in second.stderr
        assert first.is_running()

    shared = write_config(tmp_path, issuer, {"url": db, "shared": True}, "shared.yaml")
    ports = [(free_port(), free_port()) for _ in range(2)]
    procs = [
        sidecar_process(tmp_path, f"shared{i}", shared, grpc, http).start()
        for i, (grpc, http) in enumerate(ports)
    ]
    try:
        for proc, (_, http) in zip(procs, ports, strict=True):
            wait_ready(f"http://127.0.0.1:{http}", proc)
    finally:
        for proc in procs:
            proc.stop()
