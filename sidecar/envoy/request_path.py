"""The request-path change a fallback needs when the API names the model in the path. Pure.

Gemini (`models/<model>:<method>`), Bedrock Runtime (`model/<modelId>/<operation>`) and
Azure OpenAI (`openai/deployments/<deployment>/...`) are told the model by the path, so a
fallback to another model of the same provider rewrites the path; the body is left as it
is, except an Azure body's `model`, which names the deployment and must name the new one
(on Azure's v1 API, `openai/v1/...`, that is the only change).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import quote

_GEMINI = re.compile(r"(/models/)([^/:?#]+)(:[A-Za-z]+)")
_BEDROCK = re.compile(
    r"(/model/)([^?#]+)(/(?:converse|converse-stream|invoke|invoke-with-response-stream))"
    r"(?=$|\?)"
)
_AZURE = re.compile(r"(/openai/deployments/)([^/?#]+)(/)")


@dataclass(frozen=True, slots=True)
class PathChange:
    path: str
    # What the body's `model` must say, if it has one (Azure: the deployment); None: leave
    # the body alone.
    body_model: str | None = None


class NoDeployment(ValueError):
    """No configured Azure deployment runs the fallback model."""


def fallback_path(
    path: str, model: str, deployments: Mapping[str, str] | None
) -> PathChange | None:
    """The path naming `model` instead of the model it names; None when it names none.

    `deployments` are the provider's Azure deployments (name -> model); the first one
    running `model` is taken.
    """
    if deployments is not None:
        names = [
            name
            for name, runs in deployments.items()
            if runs.strip().lower() == model.strip().lower()
        ]
        if not names:
            raise NoDeployment(model)
        found = _AZURE.search(path)
        if found is None:
            # Azure's v1 API: the body's `model` names the deployment.
            return PathChange(path, names[0])
        return PathChange(_replace(path, found, quote(names[0], safe="")), names[0])
    found = _GEMINI.search(path)
    if found is not None:
        return PathChange(_replace(path, found, quote(model, safe="@.-_")))
    found = _BEDROCK.search(path)
    if found is not None:
        # Bedrock wants the id percent-encoded (an ARN holds `/` and `:`).
        return PathChange(_replace(path, found, quote(model, safe="")))
    return None


def _replace(path: str, found: re.Match[str], name: str) -> str:
    return path[: found.start(2)] + name + path[found.end(2) :]
