"""Calls the providers do not bill: counting a prompt's tokens.

Anthropic's `v1/messages/count_tokens`, OpenAI's `v1/responses/input_tokens`, Gemini's and
Vertex AI's `models/{model}:countTokens` and Bedrock's `model/{id}/count-tokens` take a
whole prompt and answer with its size, free of charge. Read as generations, they were
admitted with a reservation and, answering with no usage, charged it: every count a client
made (some coding agents count before each turn) drew a whole call's estimate from its
budgets. They are admitted on identity alone, as calls naming no model are: nothing is
reserved, nothing charged, the provider's key added as for any call.

Judged on the raw path, without percent-decoding: a path whose encoding a provider might
read as another operation is not taken for a free one (it is then judged as any call).
"""

from __future__ import annotations

import re

# How each counting path ends: looked at before the path is matched whole, so that the
# usual call pays for one comparison.
_ENDINGS = ("/count_tokens", "/input_tokens", ":countTokens", "/count-tokens")
_COUNTING = re.compile(
    r"(?:^|/)(?:v1/messages/count_tokens|v1/responses/input_tokens"
    r"|models/[^/:]+:countTokens|model/[^/]+/count-tokens)$"
)


def free_call(path: str, method: str) -> bool:
    """Whether `path` (after its provider's prefix) and `method` count tokens, unbilled."""
    raw = path.split("?", 1)[0]
    return (
        raw.endswith(_ENDINGS)
        and method == "POST"
        and "%" not in raw
        and _COUNTING.search(raw) is not None
    )
