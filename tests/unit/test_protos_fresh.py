"""The committed code under sidecar/proto_gen is what scripts/gen_protos.sh makes from protos/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "sidecar" / "proto_gen"


def _files(base: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(base)): path.read_bytes()
        for path in sorted(base.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen_protos.sh"), str(tmp_path)],
        check=True,
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable},
        timeout=120,
    )
    fresh = _files(tmp_path / "sidecar" / "proto_gen")
    committed = _files(GENERATED)
    assert fresh, "gen_protos.sh produced nothing"
    stale = sorted(
        name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name)
    )
    assert not stale, (
        f"sidecar/proto_gen is stale ({', '.join(stale)}): "
        "run scripts/gen_protos.sh and commit the result"
    )


def test_generated_service_is_importable() -> None:
    from sidecar.proto_gen.sidecar.v1 import sidecar_pb2, sidecar_pb2_grpc

    service = sidecar_pb2.DESCRIPTOR.services_by_name["Sidecar"]
    assert service.full_name == "sidecar.v1.Sidecar"
    assert {m.name for m in service.methods} == {"ReportUsage", "GetBudgets"}
    assert hasattr(sidecar_pb2_grpc, "add_SidecarServicer_to_server")
