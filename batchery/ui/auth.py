"""Who is looking at the dashboard, and CSRF protection for its forms.

In open mode (no keys file) every page opens as the local admin. With keys, `/ui/login`
takes an API key and keeps it in an `HttpOnly`, `SameSite=Strict` cookie scoped to `/ui`;
a page without a valid cookie redirects to the login page. Every POST form carries a token,
HMAC(server secret, hash of the key), so a page of another site cannot post on the user's
behalf even where the browser would send the cookie; a POST whose `Origin` is not this
server is refused as well."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Form, Request

from batchery.model.exceptions import Forbidden, Unauthorized
from batchery.security.auth import KeyRing, hash_key
from batchery.security.trust import OPEN_PRINCIPAL, Principal

COOKIE = "batchery_key"
COOKIE_PATH = "/ui"


class LoginRequired(Exception):
    """Raised by `page_principal`; the handler `install` adds redirects to the login page."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


class CsrfRefused(Forbidden):
    """A POST without a valid token or from another origin; shown as an HTML page (403)."""


def _keys(request: Request) -> KeyRing:
    keys: KeyRing = request.app.state.keys
    return keys


def _secret(request: Request) -> bytes:
    """A per-server secret: tokens die with the process, which only costs a page reload."""
    state = request.app.state
    if getattr(state, "ui_secret", None) is None:
        state.ui_secret = secrets.token_bytes(32)
    secret: bytes = state.ui_secret
    return secret


def cookie_key(request: Request) -> str | None:
    return request.cookies.get(COOKIE) or None


def principal_or_none(request: Request) -> Principal | None:
    """The principal of the cookie's key; None if there is none or it is no longer valid."""
    keys = _keys(request)
    if keys.open:
        return OPEN_PRINCIPAL
    try:
        return keys.principal_for(cookie_key(request))
    except Unauthorized:
        return None


def page_principal(request: Request) -> Principal:
    """Dependency of every page: the signed-in principal, or a redirect to `/ui/login`."""
    principal = principal_or_none(request)
    if principal is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    request.state.ui_principal = principal
    return principal


def login_url(next_url: str) -> str:
    return f"/ui/login?next={quote(next_url, safe='')}"


def csrf_token(request: Request) -> str:
    """The token of the signed-in key (in open mode, of no key) for this server."""
    key = cookie_key(request) or ""
    material = hash_key(key).encode()
    return hmac.new(_secret(request), material, hashlib.sha256).hexdigest()


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin in (f"http://{host}", f"https://{host}")


def check_csrf(request: Request, csrf: Annotated[str, Form()] = "") -> None:
    """Dependency of every POST: the form's `csrf` field must match and the `Origin`
    header, when the browser sends one, must be this server."""
    if not _same_origin(request):
        raise CsrfRefused(f"The form was posted from {request.headers.get('origin')}, "
                        "not from this server; reload the page and try again.")
    if not hmac.compare_digest(csrf, csrf_token(request)):
        raise CsrfRefused("The form's CSRF token is missing or out of date; reload the page "
                        "and try again.")


def safe_next(value: str | None) -> str:
    """Only a path of the dashboard itself: never another site (an open redirect)."""
    if value and value.startswith("/ui") and not value.startswith("//"):
        return value
    return "/ui"


PagePrincipal = Annotated[Principal, Depends(page_principal)]
Csrf = Annotated[None, Depends(check_csrf)]
