"""Which API answers an admitted call through Envoy, which decides how its usage is read."""

from __future__ import annotations

from sidecar.config.ruleset import RuleSet
from sidecar.metering.parse import Api, api_for_path


def upstream_api(rs: RuleSet, path: str, *, fallback: bool, provider: str) -> Api | None:
    """The API the upstream answers with for a request to `path`.

    A fallback to another model of the same provider keeps the request's path; one to
    another provider goes to that provider's OpenAI-compatible chat completions endpoint,
    whatever the client called (the fallback routes of deploy/envoy/envoy.yaml).
    """
    api = api_for_path(path)
    if not fallback:
        return api
    origin = rs.provider_for_path(path)
    return api if origin is not None and origin.id == provider else "openai_chat"
