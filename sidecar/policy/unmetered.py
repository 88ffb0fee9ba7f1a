"""Calls whose cost never comes back through the gateway: refused unless the operator opts in.

The gateway meters what passes through it, and it sends these calls with the
organisation's provider key. Each starts work the provider bills later or elsewhere: a
realtime session minted here runs between the client and the provider directly (or over a
WebSocket no parser reads), a fine-tuning job or a batch runs for hours after its answer,
a background response (`background: true`) answers at once with no usage and is polled
for later, a context cache is billed for its storage for as long as it is kept, and speech
answered as audio (not as a stream of events) carries no usage at all. All
such a call could be charged is its reservation, the estimate, which bounds nothing here:
a caller would spend the organisation's money past every budget.
`admission.unmetered_calls: reserve` admits them anyway, each charged its reservation, as
any other success without usage.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from sidecar.metering.parse import api_for_path

# Path segments (after the provider prefix, percent-decoded, any case) under which work is
# started that reports its usage elsewhere, refused for any method but a read; Gemini's
# batch methods (`models/<model>:batchGenerateContent`) likewise.
_JOBS = {
    "fine_tuning": "fine-tuning jobs",
    "fine-tunes": "fine-tuning jobs",
    "batches": "batches",
    ":batchgeneratecontent": "batches",
    ":asyncbatchembedcontent": "batches",
    "async-invoke": "asynchronous invocations",
    "model-invocation-job": "batch inference jobs",
    # Vertex AI's batch prediction and tuning.
    "batchpredictionjobs": "batches",
    "tuningjobs": "fine-tuning jobs",
    # OpenAI's evaluation runs call models past the gateway; its video generations (and
    # Gemini's, `:predictLongRunning`) are billed by the second of video, answered later.
    "evals": "evaluation runs",
    "videos": "video generations",
    ":predictlongrunning": "long-running generations",
}
# Sessions that run past the gateway: refused whatever the method (a GET can upgrade to a
# WebSocket).
_SESSIONS = {"realtime": "realtime sessions"}
# What is billed for as long as it is kept, or for what is put in it, after the call that
# makes it (Gemini's explicit context caches: storage by the hour of their TTL): making,
# changing or adding to one are refused; reading one and deleting one (which ends its
# bill) are not.
_STORAGE = {
    "cachedcontents": ("context caches", "bill their storage by the hour"),
    # OpenAI's vector stores bill their storage by the day, its code interpreter containers
    # by the container; Gemini's file search stores bill embedding every file they index.
    "vector_stores": ("vector stores", "bill their storage by the day"),
    "containers": ("code interpreter containers", "are billed by the container"),
    "filesearchstores": ("file search stores", "bill the indexing of their files"),
}
# One search over the path, so that the usual call pays for nothing else.
_SUSPECT = re.compile(
    r"(?:^|/)(realtime|fine_tuning|fine-tunes|batches|async-invoke|model-invocation-job"
    r"|batchpredictionjobs|tuningjobs|cachedcontents|vector_stores|filesearchstores)(?=/|$)"
    # Words a deployment or a model may be named: only as the API's own first segment.
    r"|(?:^|/)(?:v1|openai)/(evals|videos|containers)(?=/|$)"
    r"|(:batchgeneratecontent|:asyncbatchembedcontent|:predictlongrunning)$"
)
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
# Headers by which a client asks a provider to take a request as another method (Google's
# API front ends honour the first): the call is judged by every method it names.
_METHOD_OVERRIDES = ("x-http-method-override", "x-http-method", "x-method-override")


def unmetered_call(
    path: str, method: str, headers: Mapping[str, str], body: Mapping[str, Any]
) -> str | None:
    """Why the call to `path` (after its provider's prefix) cannot be metered; None if it
    can. `headers`: lower-cased; `body`: the parsed JSON body ({} when none)."""
    decoded = unquote(path.split("?", 1)[0]).strip("/").lower()
    for found in _SUSPECT.finditer(decoded):
        segment = found.group(1) or found.group(2) or found.group(3)
        if segment in _SESSIONS:
            return f"{_SESSIONS[segment]} run past the gateway, which cannot meter them"
        methods = _methods(method, headers)
        if segment in _STORAGE:
            # Searching a vector store is a POST that stores nothing.
            searching = segment == "vector_stores" and decoded.endswith("/search")
            if not methods <= _READS | {"DELETE"} and not searching:
                what, billed = _STORAGE[segment]
                return f"{what} {billed}, past the gateway"
            continue
        if not methods <= _READS:
            return f"{_JOBS[segment]} report their cost after the call, past the gateway"
    # HTTP/2's cleartext upgrade (`h2c`) stays HTTP; any other protocol leaves the parsers.
    if {t.strip() for t in headers.get("upgrade", "").lower().split(",")} - {"", "h2c"}:
        return "a connection upgraded past HTTP runs past the gateway's metering"
    # `api_for_path` decodes the path itself: given `decoded` it would decode it twice.
    if body.get("background") not in (None, False) and api_for_path(f"/{path.lower()}") == (
        "openai_responses"
    ):
        return "a background response reports its usage only when polled, past the gateway"
    if (
        "voice" in body  # every speech call names one; few other calls do
        and body.get("stream_format") != "sse"
        and api_for_path(f"/{path.lower()}") == "openai_speech"
    ):
        # Only the event stream reports what was spoken (`speech.audio.done`); an audio
        # file's length in tokens is the provider's to say.
        return 'speech answered as audio reports no usage: ask for stream_format "sse"'
    return None


def _methods(method: str, headers: Mapping[str, str]) -> set[str]:
    """The request's method and every method an override header names, upper-case."""
    named = {method.upper()}
    for name in _METHOD_OVERRIDES:
        override = headers.get(name)
        if override:
            named.add(override.strip().upper())
    return named
