"""The viewer's server-rendered pages: login, worklist, case page and image viewer.

The pages are small Jinja2 shells (no inline script or style: the CSP forbids them);
most of their data comes from the JSON API (`/api`, audited there) through the ES
modules in `viewer/static/`. The case pages check the case through saf.tenancy (404
otherwise, the same page for absent and hidden) and audit the access. Server-rendered
parts: the case page's referral and documents (read through saf.fhir_store, each read
audited), and the viewer page's first series' frame list plus a preload of its first
128 px frame, so the first image needs no round trip after the page (slow links).

Choices:
- an unauthenticated *browser* (a GET whose Accept names text/html) is redirected to
  ``/login?next=<path>``; any other client gets the usual JSON 401, so scripts and the
  route walker see a plain refusal;
- ``/`` redirects to ``/worklist`` (public: it holds nothing);
- clinic users get the same pages: the worklist shows their clinic's cases, the case
  page shows images read-only and lets them comment/answer.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, Final
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import or_

from saf import audit, fhir_store, frames, tenancy
from saf.deps import AuthError, HubDep, require_scope
from saf.identity import Principal
from saf.models import CaseStudy, FhirResource, Series, Study

HERE: Final = Path(__file__).parent
STATIC_DIR: Final = HERE / "static"
TEMPLATES_DIR: Final = HERE / "templates"

LOGIN_PATH: Final = "/login"
ROOT_PATH: Final = "/"
PUBLIC_PAGES: Final = frozenset({LOGIN_PATH, ROOT_PATH})
"""Pages anyone may load (they hold no data); saf.app adds them to PUBLIC_PATHS."""

templates = Jinja2Templates(directory=str(TEMPLATES_DIR))


class PageRoute(APIRoute):
    """An HTML page: a browser without a valid session is sent to the login page (and back
    to where it was afterwards) instead of receiving a JSON 401."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except AuthError as exc:
                wants_html = "text/html" in request.headers.get("accept", "")
                if exc.status_code != 401 or request.method != "GET" or not wants_html:
                    raise
                target = request.url.path
                if request.url.query:
                    target += "?" + request.url.query
                return RedirectResponse(f"{LOGIN_PATH}?next={quote(target, safe='')}", 303)

        return handle


router = APIRouter(tags=["viewer-pages"], route_class=PageRoute)

CaseSearch = Annotated[Principal, Depends(require_scope("Task", "s"))]
CaseRead = Annotated[Principal, Depends(require_scope("Task", "r"))]


def static_files() -> StaticFiles:
    """The viewer's JS/CSS (public, no PHI), mounted at /static by saf.app."""
    return StaticFiles(directory=str(STATIC_DIR))


def _who(principal: Principal) -> dict[str, Any]:
    """What the page tells its scripts about the caller (no PHI)."""
    return {
        "name": principal.name,
        "role": principal.role,
        "specialties": " ".join(sorted(principal.specialties)),
        "can_write": principal.kind == "user" and principal.role == "specialist",
    }


@router.get(ROOT_PATH, include_in_schema=False)
def root() -> RedirectResponse:
    """The viewer's home is the worklist."""
    return RedirectResponse("/worklist", 303)


@router.get(LOGIN_PATH, response_class=HTMLResponse)
def login_page(request: Request, next: str = "/worklist") -> Response:
    """The login form (posts to /auth/session from script)."""
    # Only a local path may be a redirect target (no open redirect to another site).
    if not next.startswith("/") or next.startswith("//") or "\\" in next:
        next = "/worklist"
    return templates.TemplateResponse(request, "login.html", {"next": next})


@router.get("/worklist", response_class=HTMLResponse)
def worklist_page(request: Request, caller: CaseSearch) -> Response:
    """The caller's worklists (specialists) or their clinic's cases (clinic users)."""
    return templates.TemplateResponse(request, "worklist.html", {"who": _who(caller)})


def _visible_case(hub: HubDep, caller: Principal, case_id: str, page: str) -> bool:
    with hub.sessions() as session:
        found = tenancy.get_case(session, caller, case_id)
    if found is None:
        audit.record_access(
            hub,
            "read",
            caller,
            "Case",
            case_id,
            outcome=audit.MINOR_FAILURE,
            detail=f"{page} page: not found or not visible to the caller",
        )
        return False
    audit.record_access(hub, "read", caller, "Case", found.id, owner=found, detail=f"{page} page")
    return True


def _not_found(request: Request, caller: Principal) -> Response:
    return templates.TemplateResponse(
        request, "not_found.html", {"who": _who(caller)}, status_code=404
    )


def _texts(concepts: Any) -> list[str]:
    """Display texts of CodeableConcepts (their text, else their codings' displays)."""
    out: list[str] = []
    for concept in concepts if isinstance(concepts, list) else [concepts]:
        if not isinstance(concept, dict):
            continue
        text = concept.get("text") or ", ".join(
            str(c.get("display") or c.get("code") or "")
            for c in concept.get("coding") or []
            if isinstance(c, dict)
        )
        if text:
            out.append(str(text))
    return out


def _referral(content: dict[str, Any]) -> dict[str, Any]:
    notes = [str(n.get("text")) for n in content.get("note") or [] if isinstance(n, dict)]
    requester = content.get("requester") or {}
    return {
        "code": ", ".join(_texts(content.get("code"))),
        "reasons": _texts(content.get("reasonCode") or []),
        "notes": [n for n in notes if n and n != "None"],
        "priority": content.get("priority"),
        "authored_on": content.get("authoredOn"),
        "requester": requester.get("display") if isinstance(requester, dict) else None,
    }


def _documents(content: dict[str, Any]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    title = content.get("description") or ", ".join(_texts(content.get("type")))
    for item in content.get("content") or []:
        attachment = item.get("attachment") if isinstance(item, dict) else None
        if not isinstance(attachment, dict):
            continue
        url = str(attachment.get("url") or "")
        # Only our own Binary routes are linked (a foreign URL could leak the session's
        # Referer-free request to another site; inline data is not rendered).
        if url.startswith("Binary/"):
            url = "/fhir/" + url
        if not url.startswith("/fhir/Binary/"):
            url = ""
        docs.append(
            {
                "title": attachment.get("title") or title or "document",
                "content_type": str(attachment.get("contentType") or ""),
                "url": url,
                "date": content.get("date"),
            }
        )
    return docs


def _case_fhir(hub: HubDep, caller: Principal, case_id: str) -> dict[str, Any]:
    """The case's referrals and documents, read through the FHIR store (audited)."""
    with hub.sessions() as session:
        rows = session.execute(
            tenancy.visible_fhir_resources(caller)
            .with_only_columns(FhirResource.resource_type, FhirResource.id)
            .where(
                FhirResource.case_id == case_id,
                FhirResource.deleted.is_(False),
                FhirResource.resource_type.in_(("ServiceRequest", "DocumentReference")),
            )
            .order_by(FhirResource.last_updated)
        ).all()
    referrals: list[dict[str, Any]] = []
    documents: list[dict[str, Any]] = []
    for resource_type, resource_id in rows:
        try:
            stored = fhir_store.read(hub, caller, resource_type, resource_id)
        except Exception:  # gone or unreadable since the query: show the rest
            continue
        audit.record_access(
            hub, "read", caller, resource_type, stored.id, owner=stored, detail="case page"
        )
        if stored.content is None:
            continue
        if resource_type == "ServiceRequest":
            referrals.append(_referral(stored.content))
        else:
            documents += _documents(stored.content)
    return {"referrals": referrals, "documents": documents}


@router.get("/cases/{case_id}", response_class=HTMLResponse)
def case_page(case_id: str, request: Request, caller: CaseRead, hub: HubDep) -> Response:
    """A case: patient, referral, documents, studies, history, the reply and comments."""
    if not _visible_case(hub, caller, case_id, "case"):
        return _not_found(request, caller)
    return templates.TemplateResponse(
        request,
        "case.html",
        {"who": _who(caller), "case_id": case_id, **_case_fhir(hub, caller, case_id)},
    )


@router.get("/cases/{case_id}/viewer", response_class=HTMLResponse)
def viewer_page(
    case_id: str, request: Request, caller: CaseRead, hub: HubDep, series: str | None = None
) -> Response:
    """The image viewer for a case's series (annotations and the reply form alongside)."""
    if not _visible_case(hub, caller, case_id, "viewer"):
        return _not_found(request, caller)
    series_id = series or _first_series(hub, caller, case_id)
    listing = _frames(hub, caller, series_id) if series_id else None
    first_image = None
    if listing and listing["frames"]:
        middle = listing["frames"][len(listing["frames"]) // 2]
        first_image = (
            f"/api/instances/{middle['instance_id']}/frames/{middle['frame']}/rendered?"
            + urlencode(FIRST_IMAGE_QUERY)
        )
    return templates.TemplateResponse(
        request,
        "viewer.html",
        {
            "who": _who(caller),
            "case_id": case_id,
            "series": series_id,
            "frames": listing,
            "first_image": first_image,
        },
    )


FIRST_IMAGE_QUERY: Final = {"size": "128", "format": "jpeg", "quality": "70"}
"""The first, thumbnail-size frame the viewer paints (viewer.js asks for exactly this
URL, so the page's preload of it is used)."""


def _frames(hub: HubDep, caller: Principal, series_id: str) -> dict[str, Any] | None:
    """The series' frame list, as GET /api/series/{id}/frames answers it (the fields the
    viewer uses), for the page to carry: the viewer saves a round trip before its first
    image. None when the series is not the caller's or cannot be listed now (the script
    then asks the API itself)."""
    with hub.sessions() as session:
        found = tenancy.get_series(session, caller, series_id)
        study = session.get(Study, found.study_pk) if found is not None else None
    if found is None or study is None:
        return None
    try:
        listed = frames.series_frames(hub, found)
    except Exception:  # the API route reports the damage; the page just does not inline
        return None
    audit.record_access(
        hub, "read", caller, "Series", found.id, owner=study, detail=f"viewer page, {len(listed)}"
    )
    return {
        "series_id": found.id,
        "modality": found.modality,
        "frames": [{k: f.to_json()[k] for k in INLINED_FRAME_KEYS} for f in listed],
    }


INLINED_FRAME_KEYS: Final = (
    "instance_id",
    "frame",
    "rows",
    "columns",
    "window",
    "instance_number",
    "slice_location",
)
"""What viewer.js uses of a frame entry: the page carries only these (a 200-slice series
is then ≈ 30 KB of HTML less to send over a slow link)."""


NO_PIXELS: Final = ("SR", "PR", "KO", "DOC", "SEG", "RTSTRUCT")
"""Modalities of series without images to show (the viewer lists them elsewhere)."""


def _first_series(hub: HubDep, caller: Principal, case_id: str) -> str:
    """The series the viewer opens first, named in the page so its frames are fetched at
    once, in parallel with the case (one round trip less on a slow link)."""
    with hub.sessions() as session:
        found = session.scalar(
            tenancy.visible_series(caller)
            .join(CaseStudy, CaseStudy.study_pk == Series.study_pk)
            .where(
                CaseStudy.case_id == case_id,
                or_(Series.modality.is_(None), Series.modality.not_in(NO_PIXELS)),
            )
            .order_by(Series.series_number, Series.series_instance_uid)
            .limit(1)
        )
    return found.id if found is not None else ""
