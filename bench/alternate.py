"""One measurement run from this source tree and, optionally, a baseline tree, alternated
round by round in the same invocation (the machine is shared and noisy: only a ratio
measured side by side means anything)."""

from __future__ import annotations

import functools
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def extract_tree(ref: str, dest: str, paths: Sequence[str] = ("sidecar", "bench")) -> None:
    """Git commit `ref`'s `paths` of this repository, written under `dest` (a benchmark's
    baseline tree, run in a subprocess with `dest` first on its path)."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", ref, *paths], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)


def alternated(
    trees: dict[str, Path], runs: int, measure: Callable[[Path], dict[str, float]]
) -> dict[str, Any]:
    """The median of each figure per tree over `runs` runs, the trees' order reversed every
    other run, and the ratio of this tree's figures to the baseline's (`x_baseline`) when
    `trees` has a "baseline"."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for run in range(runs):
        order = list(trees.items()) if run % 2 == 0 else list(trees.items())[::-1]
        for name, tree in order:
            results[name].append(measure(tree))
    row: dict[str, Any] = {
        name: {key: statistics.median(r[key] for r in measured) for key in measured[0]}
        for name, measured in results.items()
    }
    if "baseline" in row:
        row["x_baseline"] = {key: row["this"][key] / row["baseline"][key] for key in row["this"]}
    return row


def print_row(label: str, row: dict[str, Any]) -> None:
    """One line per row on stderr: each tree's figures, then the ratios."""
    print(
        f"{label}: "
        + " | ".join(
            f"{name} "
            + ", ".join(
                f"{key} {value:.1f}" if name != "x_baseline" else f"{key} x{value:.2f}"
                for key, value in figures.items()
            )
            for name, figures in row.items()
        ),
        file=sys.stderr,
        flush=True,
    )


def worker_rows(
    script: Path,
    tag: str,
    baseline: Path | None,
    runs: int,
    values: Sequence[int],
    argv_for: Callable[[int], list[str]],
    label: str,
) -> dict[str, Any]:
    """For each of `values`: `script --worker argv_for(value)` run `runs` times on this tree
    (the one holding `script`) and on `baseline`, alternated; one row printed per value and
    the rows returned by value."""
    trees = {"this": script.parent.parent, **({"baseline": baseline.resolve()} if baseline else {})}
    summary: dict[str, Any] = {}
    for value in values:
        row = alternated(
            trees,
            runs,
            functools.partial(_figures_at, script, argv_for(value), tag),
        )
        summary[str(value)] = row
        print_row(f"{label} {value:3}", row)
    return summary


def _figures_at(script: Path, argv: list[str], tag: str, tree: Path) -> dict[str, float]:
    return worker_figures(script, tree, argv, tag)


def worker_figures(script: Path, tree: Path, argv: list[str], tag: str) -> dict[str, float]:
    """Run `script --worker argv` against `tree`'s sidecar (its PYTHONPATH and working
    directory) and return the figures it printed on its line starting with `tag`."""
    out = subprocess.run(
        [sys.executable, str(script), "--worker", *argv],
        env={**os.environ, "PYTHONPATH": str(tree)},
        cwd=tree,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith(f"{tag} "))
    return dict(json.loads(line.removeprefix(f"{tag} ")))
