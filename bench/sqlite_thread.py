"""CPU of the SQLite store's own thread per reservation and per charge, in process, against
another source tree's store in alternating processes.

The store runs every statement on one thread ("sqlite-store"); this reads that thread's
CPU clock around `--ops` reservations, then around as many charges of them, each batch of
`--concurrency` operations in flight at once (1: a transaction each; more: they share
group commits, as under load). Each reservation holds in the 7 buckets the benchmark
policy's caller reserves in (4 fixed windows, 2 rolling, 1 monitor). Before measuring,
`--preload` requests are reserved and charged, so the tables have the size of a few
minutes of traffic and every rolling bucket has spend in its slots. The ledger is checked
to hold every charge. With `--baseline DIR` (say `git archive main | tar -x -C DIR`) the
same measurement runs with DIR's `sidecar` package, process after process alternately,
and the ratios of this tree's figures to the baseline's are printed.

    .venv/bin/python -m bench.sqlite_thread [--ops 3000] [--concurrency 1 16]
        [--preload 20000] [--runs 3] [--owned] [--many] [--baseline DIR]

Request ids are minted by each tree's own `new_request_id`, as its engine mints them.
`--owned` measures the store `sidecar serve` opens by default (the file owned by the
process: reservations decided in memory and written behind in batches).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
NOW = 1_800_003_600.0
COST = 1_500  # µUSD charged per request
LIMIT = 10**15


def _request(request_id: str, now: float) -> Any:
    from sidecar.store.budget_types import BucketView, LedgerDims, ReserveRequest

    day, week, month = 1_799_971_200, 1_799_539_200, 1_798_761_600
    hour_slot, day_slot = int(now) // 60 * 60, int(now) // 1440 * 1440
    user = "user=bench@example.com"
    buckets = (
        BucketView(f"per-user-daily|fixed:daily:UTC|{user}", day, day, 93_600, LIMIT),
        BucketView("per-group-monthly|fixed:monthly:UTC|group=eng", month, month, 2_685_600, LIMIT),
        BucketView("per-group-monthly|fixed:monthly:UTC|group=ml", month, month, 2_685_600, LIMIT),
        BucketView(f"openai-weekly-per-user|fixed:weekly:UTC|{user}", week, week, 612_000, LIMIT),
        BucketView(
            "mini-models-rolling|rolling:3600", hour_slot, hour_slot - 59 * 60, 7_200, LIMIT
        ),
        BucketView(
            f"user-model-24h|rolling:86400|{user}|model=gpt-4o-mini",
            day_slot,
            day_slot - 59 * 1440,
            90_000,
            LIMIT,
        ),
        BucketView(
            "org-monitor|fixed:daily:Europe/Paris", day - 3600, day - 3600, 93_600, LIMIT, False
        ),
    )
    dims = LedgerDims("bench@example.com", ("eng", "ml"), "", "user", "gpt-4o-mini", "openai")
    return ReserveRequest(
        request_id, buckets, 42, "reserve", now, now + 3600, dims, "b" * 32, (23, 64)
    )


async def _measure(
    ops: int, concurrency: int, preload: int, owned: bool, many: bool = False
) -> dict[str, float]:
    from sidecar.engine import new_request_id
    from sidecar.model import TokenUsage
    from sidecar.store.budget_types import Charge, Reservation
    from sidecar.store.sqlite_store import SQLiteStore

    store_class: Any = SQLiteStore
    if owned:
        from sidecar.store.sqlite_owned import OwnedSQLiteStore

        store_class = OwnedSQLiteStore

    def price(record: Reservation) -> Charge:
        return Charge(COST, TokenUsage(20, 40))

    async def reserve_all(ids: list[str], now: float) -> None:
        for start in range(0, len(ids), concurrency):
            results = await asyncio.gather(
                *(store.reserve(_request(i, now)) for i in ids[start : start + concurrency])
            )
            assert all(r.admitted for r in results)

    async def charge_all(ids: list[str], now: float) -> None:
        for start in range(0, len(ids), concurrency):
            if many:
                chunk = ids[start : start + concurrency]
                answers = await store.charge_many([(i, price) for i in chunk], now)
                assert all(getattr(a, "status", a) == "committed" for a in answers)
                continue
            results = await asyncio.gather(
                *(store.charge(i, price, now) for i in ids[start : start + concurrency])
            )
            assert all(r.status == "committed" for r in results)

    with tempfile.TemporaryDirectory() as tmp:
        store = store_class(f"sqlite:///{tmp}/bench.db")
        await store.open()
        (thread,) = [t for t in threading.enumerate() if t.name == "sqlite-store"]
        assert thread.ident is not None
        clock = time.pthread_getcpuclockid(thread.ident)
        # A day of traffic before, in groups of 50 requests: spend in every rolling slot.
        groups = [
            [new_request_id() for _ in range(s, min(s + 50, preload))]
            for s in range(0, preload, 50)
        ]
        for n, group in enumerate(groups):
            at = NOW - 86_400 + n * 86_400 / len(groups)
            await reserve_all(group, at)
            await charge_all(group, at)
        ids = [new_request_id() for _ in range(ops)]
        before = time.clock_gettime(clock)
        await reserve_all(ids, NOW)
        reserved = time.clock_gettime(clock)
        await charge_all(ids, NOW + 1)
        charged = time.clock_gettime(clock)
        rows = await store.ledger_rows(0, 2**40)
        await store.close()
    if sum(row.requests for row in rows) != ops + preload:
        raise RuntimeError("the ledger does not hold every charge")
    return {
        "reserve_us": (reserved - before) / ops * 1e6,
        "charge_us": (charged - reserved) / ops * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 16])
    parser.add_argument("--preload", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3, help="processes per tree and setting")
    parser.add_argument("--baseline", type=Path, help="a source tree to compare against")
    parser.add_argument(
        "--owned",
        action="store_true",
        help="the store `sidecar serve` opens (the file owned by the process, reservations "
        "written behind in batches) instead of the shared one",
    )
    parser.add_argument(
        "--many",
        action="store_true",
        help="charge `--concurrency` at a time in one `charge_many`, as a batch of metering "
        "records is charged, instead of that many `charge` calls at once",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import uvloop

        result = uvloop.run(
            _measure(args.ops, args.concurrency[0], args.preload, args.owned, args.many)
        )
        print("SQLITE_THREAD " + json.dumps(result), flush=True)
        return 0
    # Imported here, not at the top: the worker runs this file against a baseline tree
    # (PYTHONPATH), whose bench package may predate this module.
    from bench.alternate import worker_rows

    summary = worker_rows(
        HERE,
        "SQLITE_THREAD",
        args.baseline,
        args.runs,
        args.concurrency,
        lambda concurrency: [
            *("--ops", str(args.ops), "--concurrency", str(concurrency)),
            *("--preload", str(args.preload)),
            *(["--owned"] if args.owned else []),
            *(["--many"] if args.many else []),
        ],
        "concurrency",
    )
    print(
        json.dumps(
            {
                "ops": args.ops,
                "preload": args.preload,
                "owned": args.owned,
                "many": args.many,
                "summary": summary,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
