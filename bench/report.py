"""Turn the benchmark's trials into per-row numbers, ratios to the floor, and markdown."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from bench.open_loop import percentile
from bench.rows import RowSpec

FLOOR = "floor"
ENVOY = "envoy"


def rate_key(rate: float) -> str:
    return f"{rate:g}"


def _ratio_per_round(
    trials: Mapping[str, list[dict[str, Any]]], key: str, base: str
) -> float | None:
    """Median over rounds of this row's throughput over the base row's, same round."""
    if base not in trials or key not in trials:
        return None
    base_rps = {t["round"]: t["closed"]["rps"] for t in trials[base]}
    ratios = [
        t["closed"]["rps"] / base_rps[t["round"]] for t in trials[key] if base_rps.get(t["round"])
    ]
    return statistics.median(ratios) if ratios else None


def _pooled(trials: list[dict[str, Any]], rate: str) -> list[float]:
    return [x for t in trials for x in t.get("open", {}).get(rate, {}).get("latencies_ms", [])]


def _errors(trials: list[dict[str, Any]]) -> int:
    count = 0
    for t in trials:
        count += t["closed"]["errors"]
        for lat in t.get("open", {}).values():
            count += lat.get("errors", 0)
            count += sum(n for status, n in lat.get("statuses", {}).items() if status != "200")
    return count


def _latency(trials: Mapping[str, list[dict[str, Any]]], rate: str) -> dict[str, Any]:
    pooled = {key: _pooled(ts, rate) for key, ts in trials.items()}
    p50 = {key: percentile(v, 50) for key, v in pooled.items() if v}
    p99 = {key: percentile(v, 99) for key, v in pooled.items() if v}
    out: dict[str, Any] = {}
    for key in trials:
        if key not in p99:
            continue
        out[key] = {
            "p50_ms": p50[key],
            "p99_ms": p99[key],
            "p99_by_round": [
                round(t["open"][rate]["p99_ms"], 3)
                for t in trials[key]
                if rate in t.get("open", {})
            ],
            "p99_x_floor": p99[key] / p99[FLOOR] if p99.get(FLOOR) else None,
            "p50_added_ms": p50[key] - p50[ENVOY] if ENVOY in p50 else None,
            "p99_added_ms": p99[key] - p99[ENVOY] if ENVOY in p99 else None,
            "samples": len(pooled[key]),
        }
    return out


def summarize(
    specs: Sequence[RowSpec],
    trials: Mapping[str, list[dict[str, Any]]],
    rss: Mapping[str, float | None],
) -> list[dict[str, Any]]:
    rates = sorted(
        {r for ts in trials.values() for t in ts for r in t.get("open", {})},
        key=float,
        reverse=True,
    )
    latency = {rate: _latency(trials, rate) for rate in rates}
    rows = []
    for spec in specs:
        ts = trials[spec.key]
        row: dict[str, Any] = {
            "key": spec.key,
            "title": spec.title,
            "rps_median": statistics.median(t["closed"]["rps"] for t in ts),
            "rps_by_round": [round(t["closed"]["rps"], 1) for t in ts],
            "rps_x_floor": _ratio_per_round(trials, spec.key, FLOOR),
            "latency": {rate: latency[rate].get(spec.key) for rate in rates},
            "errors": _errors(ts),
            "sidecar_rss_mb": rss.get(spec.key),
        }
        if spec.workers > 1:
            row["rps_x_one_worker"] = _ratio_per_round(trials, spec.key, "sqlite")
        if spec.key == "metering":
            row["rps_x_floor_full"] = _ratio_per_round(trials, spec.key, "floor_full")
        if f"{spec.key}@base" in trials:
            # Against the same row run from the baseline tree (bench.run --baseline).
            row["rps_x_baseline"] = _ratio_per_round(trials, spec.key, f"{spec.key}@base")
        rows.append(row)
    return rows


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _target(label: str, value: float | None, op: str, bound: float) -> str:
    if value is None:
        return f"| {label} | not measured | |"
    met = value >= bound if op == ">=" else value <= bound
    return f"| {label} | {value:.2f} | {'met' if met else 'MISSED'} |"


def render_markdown(result: Mapping[str, Any]) -> str:
    m = result["machine"]
    s = result["settings"]
    rates = [rate_key(r) for r in s["open_loop_rates"]]
    lines = [
        "# Benchmark results",
        "",
        f"`{result['command'].strip()}` at {result['started_at']}, "
        f"{result['wall_seconds']:.0f} s wall.",
        "",
        f"Machine: {m['nproc']} cores, {m['cpu_model']}, Linux {m['kernel']}; Python "
        f"{m['python']}, Envoy {m['envoy']}, grpcio {m['grpcio']}, redis-server "
        f"{m['redis_server']}, {m['wrk'].split(' Copyright')[0]}. The load generators, every "
        "Envoy, Redis and the sidecars all share these cores.",
        "",
        f"Throughput: wrk, closed loop, {s['connections']} connections, "
        f"{s['closed_loop_seconds']:.0f} s per row and round; x floor is the median over "
        f"{s['rounds']} rounds of the ratio to the floor measured in the same round. Rows run "
        "in forward order on even rounds, reverse on odd ones.",
        "",
        "| row | rps | x floor | sidecar RSS MB | errors |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['title']} | {row['rps_median']:.0f} | "
            f"{_f(row['rps_x_floor'], '.2f')} | {_f(row['sidecar_rss_mb'], '.0f')} | "
            f"{row['errors']} |"
        )
    lines += [
        "",
        f"Latency: open loop (bench/open_loop.py) at {' and '.join(rates)} requests/s, "
        f"{s['open_loop_seconds']:.0f} s per row, rate and round, each request timed from "
        f"when it was due; percentiles pooled over the {s['rounds']} rounds. Added = this "
        "row minus Envoy alone.",
        "",
        "| row | rate | p50 ms | p99 ms | p99 x floor | p50 added ms | p99 added ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for rate in rates:
        for row in result["rows"]:
            lat = row["latency"].get(rate)
            if not lat:
                continue
            lines.append(
                f"| {row['title']} | {rate} | {lat['p50_ms']:.2f} | {lat['p99_ms']:.2f} | "
                f"{_f(lat['p99_x_floor'], '.2f')} | {_f(lat['p50_added_ms'], '.2f')} | "
                f"{_f(lat['p99_added_ms'], '.2f')} |"
            )
    rows = {r["key"]: r for r in result["rows"]}

    def added(key: str, rate: str) -> float | None:
        lat = rows.get(key, {}).get("latency", {}).get(rate)
        return None if not lat else lat["p99_added_ms"]

    top = rates[0] if rates else "500"
    lines += [
        "",
        "| target | measured | |",
        "|---|---:|---|",
        _target(
            "SQLite sidecar throughput >= 0.8 x floor",
            rows.get("sqlite", {}).get("rps_x_floor"),
            ">=",
            0.8,
        ),
        _target(
            "Redis sidecar throughput >= 0.7 x floor",
            rows.get("redis", {}).get("rps_x_floor"),
            ">=",
            0.7,
        ),
        # The latency targets: p99 added over Envoy alone <= 2 ms at 200/s and <= 5 ms at 500/s.
        *(
            _target(
                f"{name} sidecar p99 added over Envoy alone at {rate}/s <= {bound:g} ms",
                added(key, rate),
                "<=",
                bound,
            )
            for key, name in (("sqlite", "SQLite"), ("redis", "Redis"))
            for rate, bound in (("200", 2.0), ("500", 5.0))
            if rate in rates
        ),
        _target(
            f"2 workers: p99 added over Envoy alone at {top}/s <= 2 ms",
            added("sqlite_w2", top),
            "<=",
            2.0,
        ),
        _target(
            "--workers 2 throughput >= 1.6 x one worker",
            rows.get("sqlite_w2", {}).get("rps_x_one_worker"),
            ">=",
            1.6,
        ),
        _target(
            "metering row >= 0.8 x (no-op ext_authz, ext_proc, access log) (informative)",
            rows.get("metering", {}).get("rps_x_floor_full"),
            ">=",
            0.8,
        ),
    ]
    memory = result.get("memory")
    if memory:
        lines.append(
            f"| RSS of one worker after {memory['users']:,} distinct users <= 150 MB "
            f"(bench.memory at {memory.get('measured_at', '?')}; "
            f"{memory['rss_before_mb']:.0f} MB before) | "
            f"{memory['rss_after_mb']:.0f} MB | "
            f"{'met' if memory['rss_after_mb'] <= 150 else 'MISSED'} |"
        )
    lines.append("")
    return "\n".join(lines)
