"""Device login over HTTP (RFC 8628): /device/code, /device/token, the /device page, JWKS.

The token endpoints answer in RFC 6749 JSON; the page is plain HTML that works without
JavaScript. Approving needs a person's own sign-in and a CSRF token bound to them and the
code; wrong codes are counted per person and per client address.
"""

from __future__ import annotations

import html
from collections.abc import Awaitable, Callable
from importlib.resources import files
from string import Template
from urllib.parse import parse_qsl

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route

from sidecar import untrusted_json
from sidecar.admin_access import is_admin
from sidecar.http.auth import client_addr, request_headers
from sidecar.http.same_origin import cross_site
from sidecar.identity.device import (
    ADMIN_TOKEN_TTL,
    GRANT_TYPE,
    DeviceLogin,
    Grant,
    IssuedToken,
    access_ttl,
    format_user_code,
    normalize_user_code,
)
from sidecar.metrics import ATTEMPTS_THROTTLED
from sidecar.model import Identity
from sidecar.policy.windows import parse_duration
from sidecar.services import Services
from sidecar.store.base import StoreUnavailable

log = structlog.get_logger("sidecar.device")
REFRESH_GRANT = "refresh_token"

MAX_PARAMS_BODY = 8 * 1024
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_PAGE_HEADERS = {
    **_NO_STORE,
    # Inline styles only; no scripts, frames or foreign form targets (clickjacking, CSRF).
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # The page's address carries the user code.
    "Referrer-Policy": "no-referrer",
}
_TEMPLATE = Template(
    files("sidecar.http").joinpath("templates/device.html").read_text(encoding="utf-8")
)
_ERRORS = {
    "authorization_pending": "the login has not been approved yet",
    "slow_down": "polling too fast; wait 5 seconds longer between polls",
    "access_denied": "the login was denied",
    "expired_token": "the device code expired; start the login again",
    "invalid_grant": "unknown, already used or expired device code",
}


class BadParams(Exception):
    """A token-endpoint request whose body cannot be read as parameters."""


def oauth_error(code: str, description: str, status: int = 400) -> JSONResponse:
    return JSONResponse(
        {"error": code, "error_description": description}, status_code=status, headers=_NO_STORE
    )


def page(title: str, body: str, status: int = 200) -> HTMLResponse:
    text = _TEMPLATE.substitute(title=html.escape(title), body=body)
    return HTMLResponse(text, status_code=status, headers=_PAGE_HEADERS)


def human_duration(seconds: int) -> str:
    for unit, size in (("day", 86_400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0 and seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} seconds"


async def read_params(request: Request) -> dict[str, str]:
    """Form-encoded or JSON parameters; each may appear once (RFC 6749 §3.1)."""
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_PARAMS_BODY:
            raise BadParams(f"request body larger than {MAX_PARAMS_BODY} bytes")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        try:
            data = untrusted_json.loads(raw or b"{}", unique_keys=True)
        except untrusted_json.DuplicateKey as err:
            raise BadParams(f"request body: {err}") from None
        except ValueError:
            raise BadParams("request body is not valid JSON") from None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise BadParams("request body must be a JSON object of strings")
        return data
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=32)
    except (UnicodeDecodeError, ValueError):
        raise BadParams("request body is not form-encoded") from None
    params = dict(pairs)
    if len(params) != len(pairs):
        raise BadParams("a parameter was given more than once")
    return params


def _code_form(message: str = "") -> str:
    return (
        f'{message}<form method="get" action="device">'
        '<p><label for="user_code">Enter the code your terminal shows:</label></p>'
        '<input type="text" id="user_code" name="user_code" autocomplete="off" '
        'autocapitalize="characters" spellcheck="false" maxlength="16" '
        'placeholder="XXXX-XXXX" required autofocus>'
        '<button class="primary" type="submit">Continue</button></form>'
    )


def _who(identity: Identity) -> str:
    return f"<p>Signed in as <strong>{html.escape(identity.user)}</strong>.</p>"


def routes(services: Services) -> list[BaseRoute]:
    def device_login() -> DeviceLogin:
        login = services.device_login
        if login is None or not services.ruleset.config.identity.device_login.enabled:
            raise HTTPException(404, "device login is not enabled")
        return login

    def token_ttl() -> int:
        return parse_duration(services.ruleset.config.identity.device_login.token_ttl)

    def session_ttl() -> int:
        return parse_duration(services.ruleset.config.identity.device_login.session_ttl)

    def admin(identity: Identity) -> bool:
        return is_admin(identity, services.ruleset.config.admin.groups)

    def base_url(request: Request) -> str:
        configured = services.ruleset.config.identity.device_login.public_url
        return (configured or str(request.base_url)).rstrip("/")

    async def person(request: Request) -> Identity | Response:
        found = await services.engine.identify(request_headers(request))
        if not isinstance(found, tuple):
            return page(
                "Sign in required",
                "<p>Approving a terminal login needs your organization sign-in. Open "
                "this page through the gateway's sign-in, then try again.</p>",
                401,
            )
        identity = found[0]
        if identity.kind != "user":
            return page(
                "A person must approve",
                f"<p>You are signed in as a {html.escape(identity.kind)} identity "
                f"(<strong>{html.escape(identity.user)}</strong>). Only a person signed "
                "in with their own account can approve a terminal login.</p>",
                403,
            )
        return identity

    async def code(request: Request, login: DeviceLogin, params: dict[str, str]) -> Response:
        scope = params.get("scope", "")
        if scope not in ("", "llm", "admin"):
            return oauth_error("invalid_scope", "scope must be llm or admin")
        addr = client_addr(services, request)
        if not await login.start_allowed(addr):
            return oauth_error("slow_down", "too many device codes from this address", 429)
        device_code, grant = await login.start(
            addr,
            request.headers.get("user-agent", "")[:200],
            params.get("client_id", "")[:128],
            "admin" if scope == "admin" else "",
        )
        log.info("device_code_issued", grant=grant.id[:12], client_addr=addr, scope=grant.scope)
        shown = format_user_code(grant.user_code)
        uri = f"{base_url(request)}/device"
        return JSONResponse(
            {
                "device_code": device_code,
                "user_code": shown,
                "verification_uri": uri,
                "verification_uri_complete": f"{uri}?user_code={shown}",
                "expires_in": round(grant.expires_at - grant.created_at),
                "interval": grant.interval,
            },
            headers=_NO_STORE,
        )

    async def token(request: Request, login: DeviceLogin, params: dict[str, str]) -> Response:
        if params.get("grant_type") == REFRESH_GRANT:
            return await refreshed(login, params)
        if params.get("grant_type") != GRANT_TYPE:
            return oauth_error(
                "unsupported_grant_type", f"grant_type must be {GRANT_TYPE} or {REFRESH_GRANT}"
            )
        device_code = params.get("device_code", "")
        if not device_code or len(device_code) > 256:
            return oauth_error("invalid_request", "device_code is required")
        checks = login.poll_checks(client_addr(services, request))
        wait = await services.attempts.retry_after(checks)
        if wait is not None:
            ATTEMPTS_THROTTLED.labels(checks[0][0].name).inc()
            answer = oauth_error(
                "slow_down",
                f"too many unknown device codes from this address; retry in {wait} s",
                429,
            )
            answer.headers["Retry-After"] = str(wait)
            return answer
        result = await login.exchange(
            device_code, token_ttl(), params.get("client_id", ""), session_ttl()
        )
        if result == "invalid_grant":
            await services.attempts.failed(checks)
        if isinstance(result, str):
            return oauth_error(result, _ERRORS.get(result, result))
        log.info(
            "device_token_issued",
            email=result.approver.email,
            subject=result.approver.subject,
            expires_in=result.expires_in,
            scope=result.scope,
            session=result.session,
        )
        return token_answer(result)

    def token_answer(result: IssuedToken) -> JSONResponse:
        body: dict[str, object] = {
            "access_token": result.access_token,
            "token_type": "Bearer",
            "expires_in": result.expires_in,
            "scope": result.scope or "llm",
        }
        if result.refresh_token is not None:
            body["refresh_token"] = result.refresh_token
        return JSONResponse(body, headers=_NO_STORE)

    async def refreshed(login: DeviceLogin, params: dict[str, str]) -> Response:
        refresh_token = params.get("refresh_token", "")
        if not refresh_token:
            return oauth_error("invalid_request", "refresh_token is required")
        result = await login.refresh(refresh_token, token_ttl())
        if isinstance(result, str):
            return oauth_error(
                "invalid_grant",
                "the refresh token is expired, revoked or already used; run `sidecar login` again",
            )
        log.info("device_token_refreshed", email=result.approver.email, session=result.session)
        return token_answer(result)

    async def revoke(request: Request, login: DeviceLogin, params: dict[str, str]) -> Response:
        # RFC 7009: the answer is the same whether or not the token was known.
        done = await login.sessions.revoke_by_refresh(params.get("token", ""), "logout")
        if done is not None:
            log.info("cli_session_logged_out", session=done[1]["id"], email=done[1]["email"])
        return JSONResponse({}, headers=_NO_STORE)

    async def checked_grant(
        request: Request, login: DeviceLogin, identity: Identity, text: str
    ) -> Grant | Response:
        """The grant a typed code names, counting wrong codes against person and address."""
        addr = client_addr(services, request)
        checks = login.guess_checks(identity, addr)
        wait = await services.attempts.retry_after(checks)
        if wait is not None:
            log.warning("device_code_guesses_blocked", client_addr=addr, email=identity.email)
            ATTEMPTS_THROTTLED.labels("device-guess").inc()
            blocked = page(
                "Too many attempts",
                "<p>Too many wrong codes. Wait ten minutes, then try again.</p>",
                429,
            )
            blocked.headers["Retry-After"] = str(wait)
            return blocked
        user_code = normalize_user_code(text)
        grant = None if user_code is None else await login.find(user_code)
        if grant is None:
            await services.attempts.failed(checks)
            return page(
                "Code not found",
                _who(identity)
                + _code_form(
                    '<p class="warn">That code is unknown or has expired. Check it and try '
                    "again.</p>"
                ),
                404,
            )
        return grant

    def admin_grants(identity: Identity) -> str:
        ttl = access_ttl("admin", token_ttl(), ADMIN_TOKEN_TTL)
        return (
            '</dl><p class="admin">This grants ADMIN access to the gateway: budgets, '
            "spend limits, service tokens and every user's usage, as "
            f"{html.escape(identity.user)}, for {html.escape(human_duration(ttl))}.</p><dl>"
        )

    async def verify_page(request: Request) -> Response:
        login = device_login()
        identity = await person(request)
        if isinstance(identity, Response):
            return identity
        text = request.query_params.get("user_code", "")
        if not text:
            return page("Approve a terminal login", _who(identity) + _code_form())
        grant = await checked_grant(request, login, identity, text)
        if isinstance(grant, Response):
            return grant
        if grant.status != "pending" or grant.expires_at <= login.now():
            return page(
                "Code already used",
                "<p>This code was already approved, denied or has expired. Run "
                "<code>sidecar login</code> again for a new one.</p>",
                409,
            )
        if grant.scope == "admin" and not admin(identity):
            return page(
                "An administrator must approve",
                '<p class="admin">This code asks for ADMIN access to the gateway.'
                "</p><p>Only a member of the admin groups can approve it. If you did "
                "not start it, tell your administrators.</p>",
                403,
            )
        csrf = await login.csrf_token(identity, grant)
        age = max(0, round(login.now() - grant.created_at))
        when = f"{age // 60} min ago" if age >= 60 else f"{age} s ago"
        e = html.escape
        body = (
            _who(identity)
            + "<p>A terminal asks to use the LLM gateway as you. Check that it shows this "
            "code:</p>"
            + f'<div class="code">{e(format_user_code(grant.user_code))}</div><dl>'
            + (
                admin_grants(identity)
                if grant.scope == "admin"
                else f"<dt>Grants</dt><dd>A token for LLM calls and your own budget view, as "
                f"{e(identity.user)}, valid for {e(human_duration(token_ttl()))} and renewed "
                f"for up to {e(human_duration(session_ttl()))}. It never carries admin "
                "rights.</dd>"
            )
            + f"<dt>Groups</dt><dd>{e(', '.join(identity.groups) or 'none')}</dd>"
            + f"<dt>To</dt><dd>The terminal that asked from address "
            f"<strong>{e(grant.client_addr)}</strong></dd>"
            + f"<dt>Its client</dt><dd>{e(grant.user_agent or 'unknown')}</dd>"
            + f"<dt>Requested</dt><dd>{when}</dd></dl>"
            + '<p class="warn">Do not approve a code you did not start yourself, just now, '
            "in your own terminal. Anyone who sent you this link or code would spend your "
            "budget as you until the token expires.</p>"
            + '<form method="post" action="device/approve" class="actions">'
            + f'<input type="hidden" name="user_code" value="{e(grant.user_code)}">'
            + f'<input type="hidden" name="csrf_token" value="{e(csrf)}">'
            + '<button class="primary" type="submit" name="action" value="approve">'
            "Approve</button>"
            + '<button type="submit" name="action" value="deny">Deny</button></form>'
        )
        return page("Approve a terminal login", body)

    async def approve(request: Request) -> Response:
        login = device_login()
        if cross_site(request, services.ruleset.config.identity.device_login.public_url):
            # The CSRF token already binds the form to its person; this refuses a foreign
            # page's post before anything is read, whatever it guessed or stole.
            log.warning(
                "device_approve_cross_site",
                origin=request.headers.get("origin", ""),
                client_addr=client_addr(services, request),
            )
            return page(
                "Request refused",
                "<p>This approval did not come from this site's own page. Open the "
                "link from your terminal and approve there.</p>",
                403,
            )
        identity = await person(request)
        if isinstance(identity, Response):
            return identity
        try:
            params = await read_params(request)
        except BadParams as exc:
            return page("Bad request", f"<p>{html.escape(str(exc))}</p>", 400)
        action = params.get("action", "")
        if action not in {"approve", "deny"}:
            return page("Bad request", "<p>action must be approve or deny.</p>", 400)
        grant = await checked_grant(request, login, identity, params.get("user_code", ""))
        if isinstance(grant, Response):
            return grant
        if not await login.csrf_ok(identity, grant, params.get("csrf_token", "")):
            return page(
                "Form expired",
                "<p>This form did not come from your approval page. Open the link "
                "from your terminal again.</p>",
                403,
            )
        result = await login.decide(grant.user_code, identity, action == "approve", admin(identity))
        if result == "not_admin":
            log.warning("device_admin_login_refused", email=identity.email, grant=grant.id[:12])
            return page(
                "An administrator must approve",
                '<p class="admin">This code asks for ADMIN access.</p><p>Only a '
                "member of the admin groups can approve it.</p>",
                403,
            )
        if isinstance(result, str):
            return page(
                "Code already used",
                "<p>This code was already approved, denied or has expired.</p>",
                409,
            )
        log.info(
            f"device_login_{result.status}",
            email=identity.email,
            subject=identity.subject,
            grant=grant.id[:12],
            client_addr=grant.client_addr,
        )
        if result.status == "approved":
            return page(
                "Login approved",
                "<p>Done. Return to your terminal: it will finish signing in within a "
                "few seconds.</p>",
            )
        return page(
            "Login denied", "<p>The terminal will not get access. You can close this page.</p>"
        )

    async def jwks(request: Request) -> Response:
        keys = await device_login().keys.jwks()
        return JSONResponse(keys, headers={"Cache-Control": "public, max-age=60"})

    def oauth(
        handler: Callable[[Request, DeviceLogin, dict[str, str]], Awaitable[Response]],
    ) -> Callable[[Request], Awaitable[Response]]:
        """An OAuth endpoint of device login, given its parameters; a body that cannot be
        read as parameters is answered `invalid_request`."""

        async def endpoint(request: Request) -> Response:
            login = device_login()
            try:
                params = await read_params(request)
            except BadParams as exc:
                return oauth_error("invalid_request", str(exc))
            return await handler(request, login, params)

        return endpoint

    def unavailable(
        handler: Callable[[Request], Awaitable[Response]], oauth: bool
    ) -> Callable[[Request], Awaitable[Response]]:
        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except StoreUnavailable:
                log.warning("device_store_unavailable", path=request.url.path)
                if oauth:
                    return oauth_error("temporarily_unavailable", "store unavailable", 503)
                return page(
                    "Try again shortly",
                    "<p>The gateway's store is unavailable. Try again shortly.</p>",
                    503,
                )

        return guarded

    return [
        Route("/device/code", unavailable(oauth(code), True), methods=["POST"]),
        Route("/device/token", unavailable(oauth(token), True), methods=["POST"]),
        Route("/device/revoke", unavailable(oauth(revoke), True), methods=["POST"]),
        Route("/device", unavailable(verify_page, False), methods=["GET"]),
        Route("/device/approve", unavailable(approve, False), methods=["POST"]),
        Route("/.well-known/jwks.json", unavailable(jwks, True), methods=["GET"]),
    ]
