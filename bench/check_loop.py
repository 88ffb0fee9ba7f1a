"""The event loop's CPU per Check, in process: what the sidecar does between gRPC handing over
a CheckRequest and the answer's bytes, without gRPC, Envoy or a load generator around it.

    .venv/bin/python -m bench.check_loop [--store admit|sqlite|redis] [--checks 500]
        [--rounds 15] [--reserve-only] [--baseline DIR] [--runs 3]

Builds the production services (`build_services`) on the benchmark policy and runs
`AuthorizationServicer.check` (parse and answer included) on a CheckRequest shaped as the
benchmark's Envoy sends it, one after another on uvloop, with the decision line written to
/dev/null through the configured logger. Prints the main thread's CPU per Check (thread
time), the minimum over `--rounds` rounds: the least disturbed figure on a shared machine.
`--store admit` answers every reservation at once (the engine's own cost); `sqlite` uses
the real store, its thread included in the hand-off but not in the figure; `redis` a
redis-server of its own (its CPU is another process's, so not in the figure: what is, is
the client's work on the event loop). `--reserve-only` times the store's `reserve` alone,
on the request one Check makes, under fresh ids (the figure is then per reserve).

With `--baseline DIR` (say `git archive main | tar -x -C DIR`), this tree and DIR are run
alternately, `--runs` times each, each in a process of its own. `--answer-to FILE` writes
the serialized CheckResponse of one admitted Check and stops (the `floor_answer` row of
bench.rows answers every Check with it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

TREE = Path(__file__).resolve().parent.parent


def check_request(token: str) -> Any:
    """A CheckRequest as the benchmark's Envoy sends one (captured, addresses aside)."""
    from envoy.service.auth.v3 import external_auth_pb2

    from bench.policy import BODY, PATH

    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.id, http.method, http.path = "3517726037311578667", "POST", PATH
    http.host, http.scheme, http.protocol, http.size = "127.0.0.1:8000", "http", "HTTP/1.1", 148
    http.raw_body = BODY
    # When Envoy started the call (its access log names the call by it too).
    request.attributes.request.time.GetCurrentTime()
    http.headers.update(
        {
            "x-request-id": "09e581d2-fcbe-412b-aae3-221a645288b1",
            "x-forwarded-proto": "http",
            "x-forwarded-for": "192.0.2.2",
            "x-envoy-external-address": "127.0.0.1",
            "x-envoy-auth-partial-body": "false",
            "user-agent": "wrk",
            "content-type": "application/json",
            "content-length": str(len(BODY)),
            "cf-access-jwt-assertion": token,
            "accept": "*/*",
            ":scheme": "http",
            ":path": PATH,
            ":method": "POST",
            ":authority": "127.0.0.1:8000",
        }
    )
    return request


class _Context:
    """What the servicer reads of a gRPC context: Envoy's 2 s deadline, no metadata."""

    def time_remaining(self) -> float:
        return 1.99

    def invocation_metadata(self) -> tuple[()]:
        return ()


async def _reserve_alone(engine: Any, check: Callable[[], Awaitable[bytes]]) -> Callable[[], Any]:
    """The store's `reserve` alone, repeated under fresh ids with the request one Check
    makes (the benchmark caller's 13 buckets)."""
    real, seen = engine.store, []

    class Capture:
        async def reserve(self, request: Any) -> Any:
            seen.append(request)
            return await real.reserve(request)

        def __getattr__(self, name: str) -> Any:
            value = getattr(real, name)
            if name != "reserve_ready":
                return value

            # A store deciding in memory answers the engine here, without `reserve`.
            def ready(request: Any) -> Any:
                seen.append(request)
                return value(request)

            return ready

    engine.store = Capture()
    await check()
    engine.store = real
    request = seen[0]

    def one() -> Any:
        return real.reserve(dataclasses.replace(request, request_id=uuid.uuid4().hex))

    return one


async def _measure(
    store: str, checks: int, rounds: int, reserve_only: bool, answer_to: Path | None = None
) -> list[float]:
    from devtools.keys import DevIssuer

    workdir = Path(tempfile.mkdtemp(prefix="check-loop-"))
    issuer = DevIssuer.generate()
    jwks = issuer.write_jwks(workdir / "jwks.json")
    url = f"sqlite:///{workdir}/sidecar.db"
    if store == "redis":
        from devtools.procs import LOOPBACK, start_redis

        redis, port = start_redis(workdir / "redis")
        url = f"redis://{LOOPBACK}:{port}/0"
    try:
        return await _measure_on(
            store, url, workdir, issuer, jwks, checks, rounds, reserve_only, answer_to
        )
    finally:
        if store == "redis":
            redis.stop()


async def _measure_on(
    store: str,
    url: str,
    workdir: Path,
    issuer: Any,
    jwks: Path,
    checks: int,
    rounds: int,
    reserve_only: bool,
    answer_to: Path | None = None,
) -> list[float]:
    from envoy.service.auth.v3 import external_auth_pb2

    from bench.policy import bench_config, token
    from sidecar.envoy.authz import AuthorizationServicer
    from sidecar.services import build_services
    from sidecar.store.budget_types import BucketState, ReserveRequest, ReserveResult

    config = bench_config(issuer, str(jwks), url)
    (workdir / "sidecar.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    try:
        # As `sidecar serve` opens it: a SQLite file owned by the one process.
        services = await build_services(workdir / "sidecar.yaml", store_owner=True)
    except TypeError:  # a tree from before stores had owners
        services = await build_services(workdir / "sidecar.yaml")
    if store == "admit":
        real = services.engine.store

        class AdmitAll:
            async def reserve(self, request: ReserveRequest) -> ReserveResult:
                states = tuple(BucketState(0, request.amount) for _ in request.buckets)
                return ReserveResult(True, (), states)

            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

        services.engine.store = AdmitAll()
    servicer = AuthorizationServicer(services.engine)
    raw = check_request(token(issuer)).SerializeToString()
    parse = external_auth_pb2.CheckRequest.FromString
    context = _Context()
    answer = getattr(servicer, "check", None)  # the bytes; older trees answer a message

    async def one() -> bytes:
        if answer is not None:
            written: bytes = await answer(parse(raw), context)
            return written
        return bytes((await servicer.Check(parse(raw), context)).SerializeToString())

    first = await one()
    if b"x-sidecar-request-id" not in first:
        raise RuntimeError("the benchmark request was not admitted")
    if answer_to is not None:
        answer_to.write_bytes(first)
        await services.close()
        return []
    for _ in range(300):  # the caches a running sidecar has warm
        await one()
    if reserve_only:
        one = await _reserve_alone(services.engine, one)
        for _ in range(300):
            await one()
    gc.collect()
    gc.freeze()
    per_check = []
    for _ in range(rounds):
        started = time.thread_time()
        for _ in range(checks):
            await one()
        per_check.append((time.thread_time() - started) / checks * 1e6)
    await services.close()
    return per_check


def _one_run(
    store: str, checks: int, rounds: int, reserve_only: bool, answer_to: Path | None = None
) -> list[float]:
    import uvloop

    from devtools.config import demo_key_env
    from sidecar.log import configure

    # The policy injects the demo provider keys, read from the environment at load.
    os.environ.update(demo_key_env())

    # The decision line goes through the configured writer, into /dev/null.
    real, sys.stderr = sys.stderr, open(os.devnull, "w")  # noqa: SIM115
    configure("info")
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_measure(store, checks, rounds, reserve_only, answer_to))
    finally:
        sys.stderr = real  # a failure's traceback is seen


def _in_process(tree: Path, args: argparse.Namespace) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    argv = [sys.executable, str(Path(__file__).resolve()), "--one-run"]
    argv += ["--store", args.store, "--checks", str(args.checks), "--rounds", str(args.rounds)]
    if args.reserve_only:
        argv.append("--reserve-only")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"the run in {tree} failed:\n{done.stderr}")
    per_check: list[float] = json.loads(done.stdout)
    return min(per_check)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("admit", "sqlite", "redis"), default="admit")
    parser.add_argument("--checks", type=int, default=500, help="Checks per round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--reserve-only",
        action="store_true",
        help="time the store's reserve alone (the request a Check makes, under fresh ids)",
    )
    parser.add_argument("--runs", type=int, default=3, help="processes per tree")
    parser.add_argument("--baseline", type=Path, help="another source tree, run alternately")
    parser.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--answer-to",
        type=Path,
        help="write the CheckResponse one admitted Check answers to this file and stop",
    )
    args = parser.parse_args(argv)
    if args.answer_to is not None:
        _one_run(args.store, 1, 1, False, args.answer_to)
        return 0
    if args.one_run:
        print(json.dumps(_one_run(args.store, args.checks, args.rounds, args.reserve_only)))
        return 0
    trees = {"this": TREE, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
    results: dict[str, list[float]] = {name: [] for name in trees}
    for run in range(args.runs):
        for name, tree in trees.items() if run % 2 == 0 else reversed(trees.items()):
            results[name].append(_in_process(tree, args))
            print(f"run {run} {name:8} {results[name][-1]:6.1f} us", file=sys.stderr)
    summary: dict[str, Any] = {
        name: {"us_per_check_min_by_run": [round(v, 1) for v in values]}
        for name, values in results.items()
    }
    if "baseline" in results:
        summary["this_over_baseline"] = round(min(results["this"]) / min(results["baseline"]), 3)
    what = "reserve" if args.reserve_only else "check"
    print(json.dumps({"store": args.store, "timed": what, **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
