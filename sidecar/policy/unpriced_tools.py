"""Server-side tools whose fees the sidecar cannot charge: refused unless the operator opts in.

Some tools a request can name run on the provider's side and are billed apart from the
tokens, where no response says what they cost: OpenAI's code interpreter (per container)
and image generation (per image), Anthropic's code execution (per container hour, past a
free daily allowance no single response can tell), Gemini's grounding with Google Search or
Maps (per grounded prompt or query), and OpenAI's chat search options (a per-request fee).
Admitted, each would be charged its tokens only, while the caller spends the organisation's
money past every budget. Tools whose fees are charged (web and file searches) or that cost
only tokens (functions, web fetch, Gemini's code execution) pass. `admission.unpriced_tools:
allow` admits them all, their fees uncharged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Tool types (compared lower-case): OpenAI's Responses API.
_TYPES = {"code_interpreter": "code interpreter", "image_generation": "image generation"}
# Type prefixes: Anthropic's versioned tools (`code_execution_20250825`).
_PREFIXES = {"code_execution_": "code execution"}
# Members of a Gemini tool object (its REST API takes both spellings).
_GEMINI = {
    "googlesearch": "grounding with Google Search",
    "google_search": "grounding with Google Search",
    "googlesearchretrieval": "grounding with Google Search",
    "google_search_retrieval": "grounding with Google Search",
    "googlemaps": "grounding with Google Maps",
    "google_maps": "grounding with Google Maps",
}


def _tool(tool: object) -> str | None:
    if not isinstance(tool, Mapping):
        return None
    kind = tool.get("type")
    if isinstance(kind, str):
        lowered = kind.lower()
        if lowered in _TYPES:
            return _TYPES[lowered]
        for prefix, what in _PREFIXES.items():
            if lowered.startswith(prefix):
                return what
    for key in tool:
        found = _GEMINI.get(key.lower()) if isinstance(key, str) else None
        if found is not None:
            return found
    return None


def unpriced_tool(body: Mapping[str, Any]) -> str | None:
    """Why a tool `body` asks for cannot be charged; None when every one can."""
    if body.get("web_search_options") is not None:
        return _refusal("web search options (a per-request fee)")
    tools = body.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            what = _tool(tool)
            if what is not None:
                return _refusal(what)
    return None


def _refusal(what: str) -> str:
    return (
        f"{what} is billed apart from tokens, at a price no response reports: the sidecar "
        "cannot charge it (admission.unpriced_tools: allow admits it uncharged)"
    )
