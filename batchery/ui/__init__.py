"""The web dashboard at `/ui`: server-rendered pages (Jinja2), one stylesheet and one small
script of our own, all shipped in the package, so it works offline.

Page modules register their routes on `router`; `install(app)` mounts it, the static files
and the offline `/docs`. Pages read through the same services as the API."""

from __future__ import annotations

import importlib
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from batchery.model.exceptions import Forbidden
from batchery.security.trust import Principal
from batchery.ui import auth

HERE = Path(__file__).parent
router = APIRouter(prefix="/ui", include_in_schema=False)
templates = Jinja2Templates(directory=str(HERE / "templates"))

#: The page modules; one that does not exist (yet) is skipped.
PAGE_MODULES = ("batchery.ui.pages_core", "batchery.ui.pages_batches", "batchery.ui.pages_jobs")
NAV = (("Overview", "/ui"), ("Batches", "/ui/batches"), ("Jobs", "/ui/jobs"),
       ("Endpoints", "/ui/endpoints"), ("Webhooks", "/ui/webhooks"))


#: Shown for a value that is not known.
NONE = "\u2013"


def human(value: float | int | None) -> str:
    """`1234` -> `1,234`; from a million on, `1.2 M` (and `G`)."""
    if value is None:
        return NONE
    if abs(value) >= 1_000_000_000:
        return f"{value / 1_000_000_000:.1f} G"
    if abs(value) >= 1_000_000:
        return f"{value / 1_000_000:.1f} M"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}" if math.isfinite(value) else NONE
    return f"{int(value):,}"


def iso(ts: int | float | None) -> str:
    """A Unix time as ISO 8601 (UTC), for `<time datetime=...>`."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def duration(seconds: int | float | None) -> str:
    if seconds is None or seconds < 0:
        return NONE
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


templates.env.filters["human"] = human
templates.env.filters["iso"] = iso
templates.env.filters["duration"] = duration


def project_filter(request: Request, principal: Principal) -> str | None:
    """The project a page shows: a member's own; for an admin `?project=` or None (all)."""
    if not principal.is_admin:
        return principal.project
    return request.query_params.get("project") or None


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> Response:
    """Render a template with what every page needs: the principal, the nav, the CSRF token."""
    principal: Principal | None = getattr(request.state, "ui_principal", None)
    if principal is None:
        principal = auth.principal_or_none(request)
    base = {"principal": principal, "nav": NAV, "csrf": auth.csrf_token(request),
            "path": request.url.path, "project": None}
    if principal is not None:
        base["project"] = project_filter(request, principal)
    return templates.TemplateResponse(request, name, {**base, **context},
                                      status_code=status_code)


def fragment(request: Request, name: str, **context: Any) -> Response:
    """A template rendered alone (no layout), for the live-update polling."""
    return render(request, name, **context)


async def _login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, auth.LoginRequired)
    return RedirectResponse(auth.login_url(exc.next_url), status_code=303)


async def _csrf_refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, auth.CsrfRefused)
    return forbidden_page(request, exc)


def forbidden_page(request: Request, exc: Forbidden) -> Response:
    return render(request, "error.html", status_code=403, title="Not allowed",
                  message=str(exc))


def install(app: FastAPI) -> None:
    """Mount the dashboard on `app`: pages, static files, `/` -> `/ui`, and offline `/docs`."""
    for module in PAGE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=str(HERE / "static")), name="ui-static")
    app.add_exception_handler(auth.LoginRequired, _login_required)
    app.add_exception_handler(auth.CsrfRefused, _csrf_refused)

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui", status_code=307)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse((HERE / "templates" / "docs.html").read_text())
