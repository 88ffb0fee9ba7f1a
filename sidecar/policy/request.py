"""Read what a decision needs from the raw request: model, provider, metadata (pure)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from sidecar import untrusted_json
from sidecar.model import RequestAttrs

MAX_METADATA_KEYS = 5
MAX_METADATA_BYTES = 2048
MAX_MODEL_LENGTH = 256
# `run/@cf/...` (Workers AI), `models/<name>:<method>` (Gemini) or
# `model/<id>/<operation>` (Bedrock Runtime; the id may be an ARN, with `/` in it), as whole
# path segments.
_PATH_MODEL = re.compile(
    r"(?:^|/)run/(@[^?#]+)|(?:^|/)models/([^/:?#]+):[A-Za-z]+"
    r"|(?:^|/)model/([^?#]+)/(?:converse|converse-stream|invoke|invoke-with-response-stream)$",
    re.IGNORECASE,
)
# Azure OpenAI: `openai/deployments/<deployment>/...`; the deployment stands for a model.
_DEPLOYMENT = re.compile(r"(?:^|/)openai/deployments/([^/?#]+)/")


class BadRequest(Exception):
    """The request cannot be judged as sent; the message is shown to the client."""


def parse_body(body: bytes | None) -> Mapping[str, Any]:
    if not body:
        raise BadRequest("request body is required: a JSON object with a 'model' field")
    try:
        data = untrusted_json.loads(body, unique_keys=True)
    except untrusted_json.TooDeep:
        raise BadRequest("request body is nested too deeply") from None
    except untrusted_json.DuplicateKey as err:
        raise BadRequest(f"request body: {err}") from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def model_of(data: Mapping[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("request body has no 'model' string")
    if len(model) > MAX_MODEL_LENGTH:
        raise BadRequest("'model' is too long")
    return model.strip()


def model_in_path(path: str) -> str | None:
    """A model the API path itself names, after the provider prefix: Workers AI's native
    `run/@cf/meta/llama-...`, Gemini's `models/gemini-2.5-pro:generateContent`, Bedrock's
    `model/amazon.nova-pro-v1:0/converse`.

    Read from the percent-decoded path, as the provider reads it: `run/%40cf/...` is the
    same call as `run/@cf/...`.
    """
    decoded = unquote(path.split("?", 1)[0])
    found = _PATH_MODEL.search(decoded)
    if found is None:
        return None
    model = (found.group(1) or found.group(2) or found.group(3) or "").strip().rstrip("/")
    return _checked(model)


def deployment_in_path(path: str) -> str | None:
    """The Azure OpenAI deployment a path names (`openai/deployments/<name>/...`)."""
    found = _DEPLOYMENT.search(unquote(path.split("?", 1)[0]))
    return _checked(found.group(1).strip()) if found else None


def _checked(model: str) -> str | None:
    if len(model) > MAX_MODEL_LENGTH:
        raise BadRequest("the model named in the path is too long")
    if "/../" in f"/{model}/" or "/./" in f"/{model}/":
        # Only an encoded path (`%2F..`) gets here past Envoy's normalisation; a provider
        # that decodes it would run another path than the one judged.
        raise BadRequest("the model named in the path has dot segments")
    return model or None


def _agree(in_path: str | None, named: str | None, where: str) -> None:
    # Which name the provider obeys depends on the API; judging one while the provider
    # runs the other would be a way around the allowlist.
    if (
        in_path is not None
        and named is not None
        and named.strip()
        and named.strip().lower() != in_path.lower()
    ):
        raise BadRequest(f"the path names model {in_path!r} and {where} {named.strip()!r}")


def request_model(
    attrs: RequestAttrs, provider_prefix: str | None, deployments: Mapping[str, str] | None = None
) -> tuple[str, Mapping[str, Any]] | None:
    """(model, parsed body) of a request that names a model, whatever its method; None for
    one that names none (listing models, reading a file), which is identity only.

    Where the model comes from: the `x-sidecar-model` hint when there is no body to read
    (HTTP authorization mode), else the path when the API puts it there, else the JSON
    body's `model`. A POST to a provider must name one (400 otherwise). Any other method
    that sends a body to a provider has it read like a POST's: a PUT or PATCH naming a
    model is decided like a POST, not waved through on identity alone.
    """
    method = attrs.method.upper()
    on_provider = provider_prefix is not None
    rest = attrs.path[len(provider_prefix) :] if provider_prefix else ""
    in_path = model_in_path(rest) if provider_prefix else None
    deployment = deployment_in_path(rest) if provider_prefix and deployments is not None else None
    if deployment is not None:
        return _deployment_model(attrs, deployment, deployments or {})
    if deployments is not None and in_path is None:
        named_deployment = _named_deployment(attrs)
        if named_deployment is not None:
            return _deployment_model(attrs, named_deployment, deployments)
    if attrs.model_hint:
        _agree(in_path, attrs.model_hint, "x-sidecar-model")
        return attrs.model_hint.strip(), {}
    body: Mapping[str, Any] = {}
    if (attrs.body and (on_provider or method == "POST")) or (
        method == "POST" and on_provider and in_path is None
    ):
        body = parse_body(attrs.body)
    if in_path is not None:
        named = body.get("model")
        _agree(in_path, named if isinstance(named, str) else None, "the body")
        return in_path, body
    if "model" in body or (method == "POST" and (on_provider or attrs.body)):
        return model_of(body), body
    return None


def _named_deployment(attrs: RequestAttrs) -> str | None:
    """Azure's v1 API (`openai/v1/chat/completions`) names the deployment in `model`."""
    if attrs.model_hint:
        return attrs.model_hint.strip()
    data = parse_body(attrs.body) if attrs.body else {}
    if "model" in data or (attrs.method.upper() == "POST" and attrs.body):
        return model_of(data)
    return None


def _deployment_model(
    attrs: RequestAttrs, deployment: str, deployments: Mapping[str, str]
) -> tuple[str, Mapping[str, Any]]:
    model = deployments.get(deployment)
    if model is None:
        raise BadRequest(
            f"deployment {deployment!r} is not configured for this provider "
            "(providers[].deployments)"
        )
    body: Mapping[str, Any] = parse_body(attrs.body) if attrs.body else {}
    # Azure clients send the deployment name as `model`, or the model itself.
    named = body.get("model")
    if isinstance(named, str) and named.strip().lower() not in (deployment.lower(), model.lower()):
        raise BadRequest(f"the path names deployment {deployment!r} and the body {named.strip()!r}")
    if attrs.model_hint and attrs.model_hint.strip().lower() not in (
        deployment.lower(),
        model.lower(),
    ):
        raise BadRequest(
            f"the path names deployment {deployment!r} and x-sidecar-model "
            f"{attrs.model_hint.strip()!r}"
        )
    return model, body


def split_provider(model: str, known: Mapping[str, object]) -> tuple[str | None, str]:
    """`openai/gpt-4o` names its provider when `openai` is a configured provider id."""
    head, sep, tail = model.partition("/")
    if sep and head in known and tail:
        return head, tail
    return None, model


def parse_metadata(headers: Mapping[str, str]) -> dict[str, str]:
    """`cf-aig-metadata`: a JSON object of at most 5 scalar values (client-supplied)."""
    raw = headers.get("cf-aig-metadata")
    if raw is None:
        return {}
    if len(raw) > MAX_METADATA_BYTES:
        raise BadRequest("cf-aig-metadata is too large")
    try:
        data = untrusted_json.loads(raw, unique_keys=True)
    except untrusted_json.DuplicateKey as err:
        raise BadRequest(f"cf-aig-metadata: {err}") from None
    except ValueError:
        raise BadRequest("cf-aig-metadata is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("cf-aig-metadata must be a JSON object")
    if len(data) > MAX_METADATA_KEYS:
        raise BadRequest(f"cf-aig-metadata has more than {MAX_METADATA_KEYS} keys")
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            out[key] = str(value)
        else:
            raise BadRequest(f"cf-aig-metadata value for {key!r} must be a string, number or bool")
    return out
