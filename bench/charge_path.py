"""CPU per metering record on the charge path, in process: access log message → records →
charges → SQLite, against another source tree's sidecar in alternating processes.

Each round reserves `--batch` requests through the engine (not measured), then hands the
access log servicer one message holding their records (finished SSE streams of `--chunks`
chunks with final usage) and waits for every charge: the CPU of that, per record, of the
whole process and of its event loop thread (the rest is the SQLite store's thread). The
ledger is checked to hold every charge. With `--baseline DIR` (say `git archive main | tar
-x -C DIR`), the same measurement runs with DIR's `sidecar` package, process after process
alternately, and the ratios of this tree's figures to the baseline's are printed.

    .venv/bin/python -m bench.charge_path [--batch 30] [--rounds 40] [--chunks 1 16 64]
        [--runs 2] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _body(chunks: int) -> list[bytes]:
    token = _event(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "model": "bench-model",
            "choices": [{"index": 0, "delta": {"content": "tok "}}],
        }
    )
    usage = _event(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "model": "bench-model",
            "choices": [],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": chunks,
                "total_tokens": 12 + chunks,
            },
        }
    )
    return [token] * chunks + [usage, b"data: [DONE]\n\n"]


def _entry(request_id: str, body: list[bytes]) -> Any:
    """An access log entry as `sidecar envoy-config`'s Lua filter leaves it for a finished
    stream (every chunk, its first event as head, its end)."""
    from envoy.data.accesslog.v3 import accesslog_pb2

    out = accesslog_pb2.HTTPAccessLogEntry()
    meta = out.common_properties.metadata.filter_metadata["sidecar.metering"]
    whole = b"".join(body)
    for key, value in {
        "rid": request_id,
        "path": "/openai/v1/chat/completions",
        "route": "",
        "provider": "openai",
        "model": "bench-model",
        "content_type": "text/event-stream",
        "content_encoding": "",
        "head": body[0].decode(),
        "end": whole[-4096:].decode(),
    }.items():
        meta.fields[key].string_value = value
    for i, chunk in enumerate(body, 1):
        meta.fields[f"c{i}"].string_value = chunk.decode()
    meta.fields["chunks"].number_value = len(body)
    meta.fields["bytes"].number_value = len(whole)
    meta.fields["end_offset"].number_value = max(len(whole) - 4096, 0)
    meta.fields["done"].bool_value = True
    out.response.response_code.value = 200
    out.common_properties.time_to_last_upstream_tx_byte.nanos = 1000
    return out


class _FixedIdentity:
    async def identify(self, headers: Mapping[str, str]) -> Any:
        from sidecar.model import Identity

        return Identity(kind="user", subject="u", email="bench@example.com", groups=("ml",)), ()


async def _measure(batch: int, rounds: int, chunks: int) -> dict[str, float]:
    from envoy.service.accesslog.v3 import als_pb2

    from sidecar import log
    from sidecar.config.loader import parse_config
    from sidecar.config.ruleset import RuleSetHolder, build_ruleset
    from sidecar.engine import Engine
    from sidecar.envoy.access_log import AccessLogServicer
    from sidecar.metering.exchange import drain_charges
    from sidecar.model import RequestAttrs
    from sidecar.store.sqlite_store import SQLiteStore

    log.configure("info")
    rs = build_ruleset(
        parse_config(
            {
                "providers": [{"id": "openai", "path_prefix": "/openai/"}],
                "pricing": {
                    "unknown_model": "reject",
                    "overrides": [
                        {
                            "provider": "openai",
                            "model": "bench-*",
                            "input_per_mtok": 1,
                            "output_per_mtok": 2,
                        }
                    ],
                },
                "spend_limits": [
                    {
                        "name": "b",
                        "budget_usd": 1e6,
                        "window": {"fixed": "daily"},
                        "filter": {"model": ["bench-*"]},
                        "action": "block",
                    }
                ],
            }
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(f"sqlite:///{tmp}/bench.db")
        auth = _FixedIdentity()
        engine = Engine(RuleSetHolder(rs), store, lambda _: auth)
        servicer = AccessLogServicer(engine)
        request = json.dumps(
            {
                "model": "bench-model",
                "max_tokens": 64,
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            }
        ).encode()
        body = _body(chunks)
        per_record: list[float] = []
        loop_per_record: list[float] = []
        admitted = 0
        for rnd in range(rounds):
            message = als_pb2.StreamAccessLogsMessage()
            for i in range(batch):
                decision = await engine.check(
                    RequestAttrs("POST", "/openai/v1/chat/completions", {}, request, f"r{rnd}-{i}")
                )
                assert decision.allowed and decision.request_id
                admitted += 1
                message.http_logs.log_entry.append(_entry(decision.request_id, body))
            wire = message.SerializeToString()

            async def messages(wire: bytes = wire) -> AsyncIterator[Any]:
                yield als_pb2.StreamAccessLogsMessage.FromString(wire)

            process, thread = time.process_time(), time.thread_time()
            await servicer.StreamAccessLogs(messages(), None)
            await drain_charges()
            per_record.append((time.process_time() - process) / batch * 1e6)
            loop_per_record.append((time.thread_time() - thread) / batch * 1e6)
        rows = await store.ledger_rows(0, 2**40)
        charged = sum(row.requests for row in rows)
        await store.close()
    if charged != admitted:
        raise RuntimeError(f"the ledger holds {charged} charges of {admitted}")
    process_us = statistics.median(per_record)
    loop_us = statistics.median(loop_per_record)
    return {
        "process_us": process_us,
        "event_loop_us": loop_us,
        "other_threads_us": process_us - loop_us,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=30, help="records per access log message")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--chunks", type=int, nargs="*", default=[1, 16, 64])
    parser.add_argument("--runs", type=int, default=2, help="processes per tree and chunks")
    parser.add_argument("--baseline", type=Path, help="a source tree to compare against")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import uvloop

        result = uvloop.run(_measure(args.batch, args.rounds, args.chunks[0]))
        print("CHARGE_PATH " + json.dumps(result), flush=True)
        return 0
    # Imported here, not at the top: the worker runs this file against a baseline tree
    # (PYTHONPATH), whose bench package may predate this module.
    from bench.alternate import worker_rows

    summary = worker_rows(
        HERE,
        "CHARGE_PATH",
        args.baseline,
        args.runs,
        args.chunks,
        lambda chunks: [
            *("--batch", str(args.batch), "--rounds", str(args.rounds)),
            *("--chunks", str(chunks)),
        ],
        "chunks",
    )
    print(json.dumps({"batch": args.batch, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
