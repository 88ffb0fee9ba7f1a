"""Open-loop arrivals of streamed LLM calls: request i starts at `i / rate` whatever happened
before, and is read to its end. Runs as its own process (its event loop shares nothing with
the server's), and prints one JSON object: how many were served (200 with the whole stream),
refused with a retryable 503 (Retry-After and the JSON envelope), or neither.

    python -m bench.stream_load --url http://127.0.0.1:10000/openai/v1/chat/completions \
        --rate 100 --seconds 10 --body-file body.json --token-file tokens.txt
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import httpx


def _is_envelope(data: bytes) -> bool:
    try:
        answer = json.loads(data)
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("success") is False


async def _one(client: httpx.AsyncClient, url: str, body: bytes, token: str,
               extra: dict[str, str]) -> str:
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json", **extra}
    try:
        async with client.stream("POST", url, content=body, headers=headers) as response:
            data = await response.aread()
    except httpx.HTTPError:
        return "error"
    if response.status_code == 200:
        return "served" if data.rstrip().endswith(b"[DONE]") else "cut"
    if response.status_code == 503 and response.headers.get("retry-after") \
            and _is_envelope(data):
        return "refused"
    if len(SAMPLES) < 5:
        SAMPLES.append({"status": response.status_code, "headers": dict(response.headers),
                        "body": data[:300].decode("utf-8", "replace")})
    return f"status_{response.status_code}"


# A few answers that were neither served nor a proper refusal, to show what they were.
SAMPLES: list[dict[str, object]] = []


async def run(url: str, rate: float, seconds: float, body: bytes, tokens: list[str],
              extra: dict[str, str]) -> dict[str, object]:
    limits = httpx.Limits(max_connections=20_000, max_keepalive_connections=2_000)
    outcomes: Counter[str] = Counter()
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        total = int(rate * seconds)
        for i in range(total):
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(loop.create_task(_one(client, url, body, tokens[i % len(tokens)],
                                               extra)))
        sent_for = loop.time() - start
        for outcome in await asyncio.gather(*tasks):
            outcomes[outcome] += 1
        took = loop.time() - start
    return {"offered": total, "offered_rate": rate, "seconds": seconds,
            "send_seconds": round(sent_for, 3), "total_seconds": round(took, 3),
            "outcomes": dict(outcomes), "odd_samples": SAMPLES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--body-file", type=Path, required=True)
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--header", action="append", default=[])
    args = parser.parse_args()
    extra = dict(h.split(": ", 1) for h in args.header)
    tokens = args.token_file.read_text().split()
    started = time.time()
    result = asyncio.run(run(args.url, args.rate, args.seconds, args.body_file.read_bytes(),
                             tokens, extra))
    result["started"] = started
    print(json.dumps(result))


if __name__ == "__main__":
    main()
