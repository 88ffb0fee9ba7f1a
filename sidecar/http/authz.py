"""HTTP authorization for ingresses that cannot send a body: Envoy's `http_service`
ext_authz, nginx `auth_request` and Traefik ForwardAuth. Translation only, like envoy/authz.

Where the original request is described:

- `/authz/<original path>`: Envoy `http_service` with `path_prefix: /authz`; the method is
  the request's own.
- `/authz` with `X-Original-URI` / `X-Original-Method`: nginx `auth_request`.
- `/authz` with `X-Forwarded-Uri` / `X-Forwarded-Method`: Traefik ForwardAuth (its
  `X-Forwarded-Host` is not needed: providers are told apart by path prefix).

The provider key the sidecar holds for the call goes into the answer only for an ingress
that proves itself with `x-sidecar-ingress-token` (the value of the variable named by
`admin.ingress_token_env`): this endpoint shares a port with APIs every caller may use, and
a caller must never be able to read the organisation's key out of a decision.

There is no body, so the model comes from the `x-sidecar-model` header and the estimate
uses `admission.default_max_output_tokens`. The answer is the engine's decision: 200 with
the identity headers as response headers (for the ingress to copy upstream), or the same
401/403/429 bodies and headers as the gRPC path.

nginx only understands 2xx, 401 and 403 from an auth subrequest (anything else becomes a
500, and the subrequest's body is dropped), so for nginx every other refusal answers 403,
and every refusal carries its real status in `x-sidecar-status` and its JSON body in
`x-sidecar-error`; deploy/nginx/nginx.conf turns them back into the real answer with
`auth_request_set` and a named location.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sidecar.decisions import deny
from sidecar.headers import UNSAFE, clean
from sidecar.http.auth import request_headers
from sidecar.model import Decision, RequestAttrs
from sidecar.policy.request import BadRequest, model_in_path
from sidecar.services import Services

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_TOKEN = re.compile(r"^[A-Za-z]{1,16}$")
MAX_URI = 8192
MAX_MODEL = 256
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
# Methods whose body names the model; an ingress sends none here, so they need the header.
BODY_METHODS = ("POST", "PUT", "PATCH")
# Statuses nginx's auth_request passes on itself; every other refusal is sent as 403.
NGINX_NATIVE = (401, 403)


class BadOriginal(ValueError):
    """The ingress described the original request in a way that cannot be used."""


def original_request(
    path_param: str | None, method: str, headers: Mapping[str, str]
) -> tuple[str, str, bool]:
    """(method, path, is_nginx) of the request being authorized."""
    if path_param is not None:
        return method, "/" + path_param.lstrip("/"), False
    nginx_uri = headers.get("x-original-uri")
    traefik_uri = headers.get("x-forwarded-uri")
    if nginx_uri is not None and traefik_uri is not None and nginx_uri != traefik_uri:
        # Each ingress overwrites only its own header; two that disagree mean a client
        # supplied one of them, so neither can be trusted.
        raise BadOriginal("x-original-uri and x-forwarded-uri disagree")
    uri = nginx_uri if nginx_uri is not None else traefik_uri
    if uri is None:
        raise BadOriginal(
            "the original request is unknown: call /authz/<path> (Envoy "
            "http_service) or send X-Original-URI (nginx auth_request) or "
            "X-Forwarded-Uri (Traefik ForwardAuth)"
        )
    if nginx_uri is not None:
        original_method = headers.get("x-original-method", "")
    else:
        original_method = headers.get("x-forwarded-method", "")
    if not uri.startswith("/") or len(uri) > MAX_URI or UNSAFE.search(uri):
        raise BadOriginal(
            f"the original URI must be an absolute path of at most {MAX_URI} characters"
        )
    if not _TOKEN.match(original_method):
        raise BadOriginal(
            "the original method (X-Original-Method or X-Forwarded-Method) is missing or malformed"
        )
    return original_method.upper(), uri, nginx_uri is not None


def _path_names_model(path: str) -> bool:
    try:
        return model_in_path(path) is not None
    except BadRequest:
        return True  # it does, badly: the engine refuses it with its own message


INGRESS_TOKEN_HEADER = "x-sidecar-ingress-token"


def is_ingress(headers: Mapping[str, str], expected: str) -> bool:
    presented = headers.get(INGRESS_TOKEN_HEADER, "")
    return bool(expected) and hmac.compare_digest(presented.encode(), expected.encode())


def render(decision: Decision, nginx: bool, with_keys: bool = False) -> Response:
    if decision.allowed:
        # x-sidecar-request-id, among the decision's headers when something was reserved, is
        # the sidecar's own id: the ingress passes it on, and usage is reported against it.
        headers = {
            **decision.headers,
            **decision.response_headers,
            **(decision.upstream_secrets if with_keys else {}),
        }
        remove = set(decision.remove_headers)
        if not with_keys:
            # The key that would have replaced the caller's header (its JWT in
            # Authorization, say) is withheld from a caller that is not the ingress: the
            # header goes instead, so the caller's credential never travels upstream.
            remove.update(decision.upstream_secrets)
        if remove:
            # Envoy's http_service ext_authz removes these from the upstream request; other
            # ingresses drop the credential headers themselves (deploy/nginx).
            headers[REMOVE_HEADER] = ",".join(sorted(remove))
        return Response(status_code=200, headers={k: clean(v) for k, v in headers.items()})
    headers = {k: clean(v) for k, v in decision.headers.items()}
    status = decision.http_status
    if nginx:
        headers["x-sidecar-status"] = str(status)
        if status not in NGINX_NATIVE:
            status = 403
        # The deny bodies are ASCII JSON on one line (json.dumps escapes the rest), so
        # they fit a header value as they are.
        headers["x-sidecar-error"] = clean(decision.body.decode("ascii", "replace"))
    return Response(
        decision.body, status_code=status, headers=headers, media_type="application/json"
    )


def routes(services: Services) -> list[Route]:
    async def refuse(headers: Mapping[str, str], message: str, nginx: bool) -> Response:
        """A request that cannot be judged as described: 400, but identity comes first, as
        everywhere else, so an unauthenticated caller learns nothing but 401."""
        found = await services.engine.identify(headers)
        if isinstance(found, Decision):
            return render(found, nginx)
        return render(deny("bad_request", message), nginx)

    async def authz(request: Request) -> Response:
        headers = request_headers(request)
        path_param = request.path_params.get("path")
        nginx = path_param is None and "x-original-uri" in headers
        # For the decision log only: the reservation is keyed by an id the sidecar mints,
        # so a client's x-request-id can neither replay nor collide with another request.
        request_id = headers.get("x-request-id", "")[:128]
        model = headers.get("x-sidecar-model", "").strip()
        try:
            if len(model) > MAX_MODEL or UNSAFE.search(model):
                raise BadOriginal(
                    f"x-sidecar-model must be at most {MAX_MODEL} printable characters"
                )
            method, path, nginx = original_request(path_param, request.method, headers)
        except BadOriginal as exc:
            return await refuse(headers, str(exc), nginx)
        if request.url.query and path_param is not None:
            path = f"{path}?{request.url.query}"
        provider = services.ruleset.provider_for_path(path)
        if (
            not model
            and method in BODY_METHODS
            and provider is not None
            and not _path_names_model(path[len(provider.path_prefix) :])
        ):
            # The engine would read the model from a body; an ingress cannot send one.
            return await refuse(
                headers,
                "x-sidecar-model is required: this authorization endpoint receives no request body",
                nginx,
            )
        attrs = RequestAttrs(
            method=method,
            path=path,
            headers=headers,
            body=None,
            request_id=request_id,
            model_hint=model,
        )
        with_keys = is_ingress(headers, services.settings.current.ingress_token)
        return render(await services.engine.check(attrs), nginx, with_keys)

    return [
        Route("/authz", authz, methods=METHODS),
        Route("/authz/{path:path}", authz, methods=METHODS),
    ]
