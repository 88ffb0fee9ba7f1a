"""Development harness, not shipped with the sidecar: the fake provider, the local stack
(Envoy, Redis, sidecar processes), a dev identity issuer and the demo.

Used by the tests, `bench/` and `scripts/demo.sh`, all run from the repository root (pytest
puts the root on `sys.path` through `pythonpath` in pyproject.toml; the scripts run
`python -m` from it). Processes started from here that import the harness themselves get
the root on PYTHONPATH through `harness_env`, so they work from any working directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

# The checkout that holds this package (and `sidecar/` beside it).
ROOT = Path(__file__).resolve().parent.parent


def harness_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's environment) with ROOT first on PYTHONPATH, for a
    child process that runs `python -m devtools...`."""
    base = dict(os.environ if env is None else env)
    paths = [p for p in base.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        base["PYTHONPATH"] = os.pathsep.join([str(ROOT), *paths])
    return base
