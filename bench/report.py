"""Turn the benchmark's trials into per-row numbers, ratios to the floor, and markdown."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from bench.open_loop import percentile
from bench.rows import RowSpec

FLOOR = "floor"
ENVOY = "envoy"


def _ratio_per_round(trials: Mapping[str, list[dict[str, Any]]], key: str,
                     base: str) -> float | None:
    """Median over rounds of this row's throughput over the base row's, same round."""
    if base not in trials or key not in trials:
        return None
    base_rps = {t["round"]: t["closed"]["rps"] for t in trials[base]}
    ratios = [t["closed"]["rps"] / base_rps[t["round"]] for t in trials[key]
              if base_rps.get(t["round"])]
    return statistics.median(ratios) if ratios else None


def _pooled(trials: list[dict[str, Any]]) -> list[float]:
    return [x for t in trials for x in t.get("open", {}).get("latencies_ms", [])]


def _errors(trials: list[dict[str, Any]]) -> int:
    count = 0
    for t in trials:
        count += t["closed"]["errors"]
        lat = t.get("open", {})
        count += lat.get("errors", 0)
        count += sum(n for status, n in lat.get("statuses", {}).items() if status != "200")
    return count


def summarize(specs: Sequence[RowSpec], trials: Mapping[str, list[dict[str, Any]]],
              rss: Mapping[str, float | None]) -> list[dict[str, Any]]:
    pooled = {key: _pooled(ts) for key, ts in trials.items()}
    p99 = {key: percentile(v, 99) for key, v in pooled.items() if v}
    p50 = {key: percentile(v, 50) for key, v in pooled.items() if v}
    rows = []
    for spec in specs:
        ts = trials[spec.key]
        row: dict[str, Any] = {
            "key": spec.key,
            "title": spec.title,
            "rps_median": statistics.median(t["closed"]["rps"] for t in ts),
            "rps_by_round": [round(t["closed"]["rps"], 1) for t in ts],
            "rps_x_floor": _ratio_per_round(trials, spec.key, FLOOR),
            "p50_ms": p50.get(spec.key),
            "p99_ms": p99.get(spec.key),
            "p99_by_round": [round(t["open"]["p99_ms"], 3) for t in ts if "open" in t],
            "p99_x_floor": (p99[spec.key] / p99[FLOOR]
                            if spec.key in p99 and p99.get(FLOOR) else None),
            "p50_added_ms": (p50[spec.key] - p50[ENVOY]
                             if spec.key in p50 and ENVOY in p50 else None),
            "p99_added_ms": (p99[spec.key] - p99[ENVOY]
                             if spec.key in p99 and ENVOY in p99 else None),
            "samples": len(pooled.get(spec.key, [])),
            "errors": _errors(ts),
            "sidecar_rss_mb": rss.get(spec.key),
        }
        if spec.workers > 1:
            row["rps_x_one_worker"] = _ratio_per_round(trials, spec.key, "sqlite")
        if spec.key == "metering":
            row["rps_x_floor_full"] = _ratio_per_round(trials, spec.key, "floor_full")
        rows.append(row)
    return rows


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _target(rows: Mapping[str, Mapping[str, Any]], key: str, field: str, op: str,
            bound: float, label: str) -> str:
    value = rows.get(key, {}).get(field)
    if value is None:
        return f"| {label} | not measured | |"
    met = value >= bound if op == ">=" else value <= bound
    return f"| {label} | {value:.2f} | {'met' if met else 'MISSED'} |"


def render_markdown(result: Mapping[str, Any]) -> str:
    m = result["machine"]
    s = result["settings"]
    lines = [
        "# Benchmark results",
        "",
        f"`{result['command'].strip()}` — {result['started_at']}, "
        f"{result['wall_seconds']:.0f} s wall.",
        "",
        f"Machine: {m['nproc']} cores, {m['cpu_model']}, Linux {m['kernel']}; Python "
        f"{m['python']}, Envoy {m['envoy']}, grpcio {m['grpcio']}, redis-server "
        f"{m['redis_server']}, {m['wrk']}. Load generators, Envoy, Redis and the sidecar all "
        "share these cores.",
        "",
        f"Throughput: wrk, closed loop, {s['connections']} connections, "
        f"{s['closed_loop_seconds']:.0f} s per row and round. Latency: open loop "
        f"(bench/open_loop.py) at {s['open_loop_rate']:.0f} requests/s for "
        f"{s['open_loop_seconds']:.0f} s per row and round, measured from each request's "
        f"due time; percentiles pooled over {s['rounds']} rounds. Rows alternate forward and "
        "reverse order each round; xfloor ratios are medians of same-round ratios.",
        "",
        "| row | rps | rps xfloor | p50 ms | p99 ms | p99 xfloor | p99 added over Envoy "
        "alone, ms | sidecar RSS MB | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['title']} | {row['rps_median']:.0f} | {_f(row['rps_x_floor'], '.2f')} | "
            f"{_f(row['p50_ms'], '.2f')} | {_f(row['p99_ms'], '.2f')} | "
            f"{_f(row['p99_x_floor'], '.2f')} | {_f(row['p99_added_ms'], '.2f')} | "
            f"{_f(row['sidecar_rss_mb'], '.0f')} | {row['errors']} |")
    rows = {r["key"]: r for r in result["rows"]}
    lines += [
        "",
        "| target | measured | |",
        "|---|---:|---|",
        _target(rows, "sqlite", "rps_x_floor", ">=", 0.8,
                "SQLite sidecar throughput >= 0.8 x floor"),
        _target(rows, "redis", "rps_x_floor", ">=", 0.7,
                "Redis sidecar throughput >= 0.7 x floor"),
        _target(rows, "sqlite", "p99_added_ms", "<=", 2.0,
                "SQLite sidecar p99 added over Envoy alone <= 2 ms"),
        _target(rows, "redis", "p99_added_ms", "<=", 2.0,
                "Redis sidecar p99 added over Envoy alone <= 2 ms"),
        _target(rows, "sqlite_w2", "rps_x_one_worker", ">=", 1.6,
                "--workers 2 throughput >= 1.6 x one worker"),
        _target(rows, "metering", "rps_x_floor_full", ">=", 0.8,
                "metering row >= 0.8 x no-op ext_authz + ext_proc floor (informative)"),
    ]
    memory = result.get("memory")
    if memory:
        lines.append(f"| RSS of one worker after {memory['users']:,} distinct users <= 150 MB "
                     f"(bench.memory, {memory.get('measured_at', '?')}; "
                     f"{memory['rss_before_mb']:.0f} MB before) | "
                     f"{memory['rss_after_mb']:.0f} MB | "
                     f"{'met' if memory['rss_after_mb'] <= 150 else 'MISSED'} |")
    lines.append("")
    return "\n".join(lines)
