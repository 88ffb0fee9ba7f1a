"""The state every streamed-response tracker keeps, whatever its provider's framing."""

from __future__ import annotations

from sidecar.model import Iteration, TokenUsage, ToolFees


class StreamTally:
    """What a stream has reported so far: its usage (None until some arrives), whether
    that usage is final, the bytes of generated text that passed, iterations and fees."""

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None
        self.complete = False
        self.output_bytes = 0
        self.iterations: tuple[Iteration, ...] = ()
        self.fees = ToolFees()
