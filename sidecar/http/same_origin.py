"""Cross-site request refusal: admin writes and the device approval form.

A browser attaches the Access cookie to any request to this host, including one a foreign
page makes; only the request's Origin (or Sec-Fetch-Site) says where it came from. API
clients that send a bearer token or Access headers themselves are not at risk and are not
asked for either. Writes must also declare JSON: a cross-site form or a no-CORS fetch can
send form-encoded or text/plain bodies, but not application/json without a preflight that
this server never approves.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import Request

from sidecar.http.envelope import ApiError

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower() if parts.scheme and parts.netloc else ""


def same_origin(request: Request, public_url: str) -> bool:
    """Positive evidence that this request comes from one of this server's own pages."""
    if request.headers.get("sec-fetch-site", "").lower() == "same-origin":
        return True
    origin = request.headers.get("origin", "").strip().lower()
    if not origin or origin == "null":
        return False
    host = request.headers.get("host", "").lower()
    # The scheme is not compared with the Host header's: behind a TLS-terminating proxy the
    # sidecar sees http while the browser's Origin says https. The configured public URL
    # is compared whole.
    return (bool(host) and urlsplit(origin).netloc == host) or (
        bool(public_url) and origin == _origin(public_url)
    )


def cross_site(request: Request, public_url: str) -> bool:
    """Evidence that a request was made by a foreign page (absence of evidence is not)."""
    fetch_site = request.headers.get("sec-fetch-site", "").lower()
    if fetch_site in {"cross-site", "same-site"}:
        return True
    origin = request.headers.get("origin", "").strip().lower()
    if not origin or origin == "null":
        return False
    return not same_origin(request, public_url)


def _has_body(request: Request) -> bool:
    length = request.headers.get("content-length", "0").strip()
    return "transfer-encoding" in request.headers or length not in {"", "0"}


def check_write(request: Request, carriers: tuple[str, ...], public_url: str) -> None:
    """Refuse an admin write a foreign page could have made: 403 cookie without same
    origin, 415 anything but JSON. Nothing has been read or changed yet."""
    if request.method in SAFE_METHODS:
        return
    if "cookie" in carriers and not same_origin(request, public_url):
        raise ApiError(
            403,
            "cross-site request refused: a write authenticated by the "
            "CF_Authorization cookie must come from this site (Origin or "
            "Sec-Fetch-Site: same-origin); API clients should send a token",
        )
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    needs_json = request.method != "DELETE" or _has_body(request)
    if needs_json and ctype != "application/json":
        raise ApiError(415, "Content-Type must be application/json")
