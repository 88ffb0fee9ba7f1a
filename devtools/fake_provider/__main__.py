"""`python -m devtools.fake_provider --port 8000 [--key openai=sk-...] [--replay-dir DIR]`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from devtools.fake_provider.app import create_app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.fake_provider",
        description="A deterministic fake LLM provider (OpenAI, Anthropic, Gemini, Azure "
        "OpenAI, Bedrock, OpenAI-compatible).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--key",
        action="append",
        default=[],
        metavar="PROVIDER=KEY",
        help="a key PROVIDER (openai, anthropic, workers-ai, gemini, azure, "
        "groq) accepts; "
        "repeatable. Without any, every call is accepted.",
    )
    parser.add_argument(
        "--replay-dir",
        type=Path,
        default=None,
        help="directory of recorded responses for x-fake-replay",
    )
    args = parser.parse_args(argv)
    keys: dict[str, list[str]] = {}
    for item in args.key:
        name, sep, key = item.partition("=")
        if not sep or not key:
            parser.error(f"--key wants PROVIDER=KEY, not {item!r}")
        keys.setdefault(name, []).append(key)
    try:
        app = create_app(keys, args.replay_dir)
    except ValueError as exc:
        parser.error(str(exc))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
