"""Every HTTP route that is not public refuses everyone who should not reach it.

The test walks the real app's routes (included routers and mounted sub-apps too), so
a route added later is attacked here without anyone writing a test for it. Each
FastAPI route must depend on saf.deps.current_principal (checked on its dependency
tree), and then every route, FastAPI's or not, is tried with real requests:

- no token, a malformed token, a forged token (our kid, another key), an expired
  token, the token of a user disabled after it was issued, the token of a revoked
  client: 401;
- clinic A's clinician on clinic B's objects, and a dermatologist on a case routed
  to thoracic radiology: 404 or 403, or a success that names none of the objects it
  must not see (an empty list);
- an EHR client of the owning clinic whose scopes do not cover the route, and an
  admin on PHI routes: 403 or 404;
- and, as a positive control, the rightful caller gets a success (a route that
  always answered 404 would otherwise pass).

Path parameters are filled by name from clinic B's data (PARAMS). A route with a
parameter name not in PARAMS fails the suite until someone adds it there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from saf import audit
from saf.app import PUBLIC_PATHS, create_app
from saf.deps import AUTHENTICATES, CurrentPrincipal, current_principal
from saf.forwarding import enqueue_study, parse_forward_rules
from saf.hub import Hub
from saf.models import AuditRecord, Case, Instance, Series, Study, User
from saf.tokens import issue_access_token
from saf.users import disable_user, principal_of_user, revoke_client
from tests.factories import make_user
from tests.saf.tenants import (
    People,
    World,
    add_fhir_referral,
    add_subscription,
    ehr_login,
    fhir_referral,
    login,
    make_people,
    make_world,
    stow_body,
    subscription_body,
)

# --------------------------------------------------------------------------- the data

PARAMS: dict[str, Callable[[Target], str]] = {
    "case_id": lambda t: t.case_id,
    "study_id": lambda t: t.study_id,
    "series_id": lambda t: t.series_id,
    "instance_id": lambda t: t.instance_id,
    "patient_id": lambda t: t.patient_pk,
    "study": lambda t: t.study_uid,
    "series": lambda t: t.series_uid,
    "instance": lambda t: t.sop_instance_uid,
    "frames": lambda t: "1",
    "resource_type": lambda t: "ServiceRequest",
    "resource_id": lambda t: t.service_request_id,
    "version_id": lambda t: "1",
    "task_id": lambda t: t.case_id,
    "frame": lambda t: "1",
    "annotation_id": lambda t: t.annotation_id,
    "job_id": lambda t: str(t.forward_job_id),
    "path": lambda t: "7FE00010",  # a bulk data tag path: the target's Pixel Data
}
"""How to fill each path parameter with an object of clinic B's chest CT case (the target).
A new route with another parameter name must be added here."""

RIGHTFUL: dict[tuple[str, str], str] = {
    ("POST", "/api/cases/{case_id}/claim"): "thoracic",
    ("GET", "/api/audit"): "admin",
    ("GET", "/api/forward/jobs"): "admin",
    ("GET", "/api/forward/jobs/{job_id}"): "admin",
    ("POST", "/api/forward/jobs/{job_id}/retry"): "admin",
    ("POST", "/api/forward/retry"): "admin",
    ("DELETE", "/fhir/{resource_type}/{resource_id}"): "ehr_b",  # clinicians may not delete
    # The viewer: the specialist who claimed the case draws and replies (the claim above
    # runs first); the clinic comments.
    ("POST", "/api/cases/{case_id}/annotations"): "thoracic",
    ("PUT", "/api/cases/{case_id}/annotations/{annotation_id}"): "thoracic",
    ("DELETE", "/api/cases/{case_id}/annotations/{annotation_id}"): "thoracic",
    ("PUT", "/api/cases/{case_id}/reply"): "thoracic",
    ("POST", "/api/cases/{case_id}/reply/question"): "thoracic",
    ("POST", "/api/cases/{case_id}/reply/sign"): "thoracic",
}
"""Who may use a route, when not clinic B's clinician (the target's owner)."""

ADMIN_CALLERS = frozenset({"admin"})

BODIES: dict[tuple[str, str], Callable[[Target], tuple[bytes, str]]] = {
    ("POST", "/dicomweb/studies"): lambda t: t.stow,
    ("POST", "/dicomweb/studies/{study}"): lambda t: t.stow,
    ("POST", "/fhir/{resource_type}"): lambda t: (fhir_referral(), "application/fhir+json"),
    ("PUT", "/fhir/{resource_type}/{resource_id}"): lambda t: (
        fhir_referral(t.service_request_id),
        "application/fhir+json",
    ),
}
"""Request bodies (content, Content-Type) for routes that need one, sent by every caller."""


def _json(make: Callable[[Target], object]) -> Callable[[Target], tuple[bytes, str]]:
    return lambda t: (json.dumps(make(t)).encode(), "application/json")


def _line(t: Target) -> dict[str, object]:
    return {"instance_id": t.instance_id, "frame": 1, "kind": "line", "points": [[1, 1], [9, 9]]}


BODIES.update(
    {
        ("POST", "/api/cases/{case_id}/annotations"): _json(_line),
        ("PUT", "/api/cases/{case_id}/annotations/{annotation_id}"): _json(_line),
        ("PUT", "/api/cases/{case_id}/reply"): _json(
            lambda t: {"findings": "f", "impression": "i", "recommendation": "", "urgent": False}
        ),
        ("POST", "/api/cases/{case_id}/reply/question"): _json(lambda t: {"text": "prior CT?"}),
        ("POST", "/api/cases/{case_id}/comments"): _json(lambda t: {"text": "none"}),
    }
)

QUERIES: dict[tuple[str, str], str] = {
    ("GET", "/api/instances/{instance_id}/frames/{frame}/value"): "?x=1&y=1",
}
"""Query strings routes need (appended to the filled path for every caller)."""


# FHIR Subscription, AuditEvent and the read-only ImagingStudy (A2).
PARAMS.update(
    {
        "subscription_id": lambda t: t.subscription_id,
        "audit_event_id": lambda t: t.audit_event_id,
    }
)
RIGHTFUL.update(
    {
        ("POST", "/fhir/Subscription"): "ehr_b",  # clinicians read subscriptions, EHRs write
        ("PUT", "/fhir/Subscription/{subscription_id}"): "ehr_b",
        ("DELETE", "/fhir/Subscription/{subscription_id}"): "ehr_b",
        ("GET", "/fhir/AuditEvent"): "admin",
        ("GET", "/fhir/AuditEvent/{audit_event_id}"): "admin",
        ("POST", "/fhir/ImagingStudy"): "ehr_b",
        ("PUT", "/fhir/ImagingStudy/{study_id}"): "ehr_b",
        ("DELETE", "/fhir/ImagingStudy/{study_id}"): "ehr_b",
    }
)
BODIES.update(
    {
        ("POST", "/fhir/Subscription"): lambda t: (subscription_body(), "application/fhir+json"),
        ("PUT", "/fhir/Subscription/{subscription_id}"): lambda t: (
            subscription_body(t.subscription_id),
            "application/fhir+json",
        ),
    }
)
NOT_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("POST", "/fhir/ImagingStudy"),
        ("PUT", "/fhir/ImagingStudy/{study_id}"),
        ("DELETE", "/fhir/ImagingStudy/{study_id}"),
    }
)
"""Routes that exist to refuse an interaction (405 with an OperationOutcome: writes to the
read-only ImagingStudy): an authenticated caller's 405 counts as a refusal, and the
rightful caller's positive control is a 405 too."""


@dataclass(frozen=True)
class Target:
    """Clinic B's chest CT case (routed to thoracic radiology) and its objects."""

    case_id: str
    study_id: str
    series_id: str
    instance_id: str
    patient_pk: str
    ids: frozenset[str]
    """Every id of the case: none may appear in a body the attacker receives."""
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    """DICOM UIDs of the study, and of a series and an instance in it (DICOMweb paths)."""
    stow: tuple[bytes, str]
    """A STOW-RS body (content, Content-Type): a new instance of the target study, of
    another patient, so that storing it anywhere leaks nothing of clinic B."""
    service_request_id: str
    fhir_patient_id: str
    """Clinic B's FHIR referral for the case and its subject Patient (fhir_api routes)."""
    forward_job_id: int = 0
    """A forwarding job of the target study (the admin's /api/forward routes)."""
    annotation_id: str = ""
    """An annotation on the target case (the viewer's annotation routes)."""
    subscription_id: str = ""
    """Clinic B's FHIR Subscription (its endpoint refuses connections: status error)."""
    audit_event_id: str = ""
    """An audit record (admins read the trail at /fhir/AuditEvent)."""
    binary_id: str = ""
    """Clinic B's FHIR Binary (a referral letter's bytes; fhir_api.mhd)."""
    task: Callable[[], dict[str, Any]] = dict
    """The case's Task as it is now (a Task update sends it back changed)."""


def _target(hub: Hub, world: World) -> Target:
    with hub.sessions() as session:
        case = session.get_one(Case, world.ct_case_b)
        study_id = next(s for s, c in world.b.case_of_study.items() if c == case.id)
        series = list(session.scalars(select(Series.id).where(Series.study_pk == study_id)))
        instances = list(session.scalars(select(Instance.id).where(Instance.series_pk.in_(series))))
        study = session.get_one(Study, study_id)
        patient_pk = study.patient_pk
        instance = session.get_one(Instance, instances[0])
        series_uid = session.get_one(Series, instance.series_pk).series_instance_uid
    fhir_patient_id, service_request_id = add_fhir_referral(hub, world)
    return Target(
        case.id,
        study_id,
        instance.series_pk,
        instances[0],
        patient_pk,
        frozenset(
            {case.id, study_id, patient_pk, *series, *instances, fhir_patient_id}
            | {service_request_id}
        ),
        study.study_instance_uid,
        series_uid,
        instance.sop_instance_uid,
        stow_body(study.study_instance_uid),
        service_request_id,
        fhir_patient_id,
        forward_job_id=_forward_job(hub, study_id),
        annotation_id=_annotation(hub, case.id, instances[0]),
        subscription_id=add_subscription(hub, world),
        audit_event_id=str(audit.record(hub, "config", audit.Actor("system", "saf", "saf"))),
        binary_id=_binary(hub, world),
        task=lambda: _task(hub, case.id),
    )


def _task(hub: Hub, case_id: str) -> dict[str, Any]:
    """The case's Task as its clinic reads it now."""
    from fhir_api.tasks import task_of
    from saf.identity import SYSTEM

    with hub.sessions() as session:
        return task_of(hub, session, SYSTEM, session.get_one(Case, case_id))


def _binary(hub: Hub, world: World) -> str:
    """Clinic B's Binary, stored the way its EHR would (A1: fhir_api.mhd)."""
    from saf import documents, fhir_store
    from saf.identity import Principal
    from saf.routing import default_rules

    ehr = Principal(
        kind="client", id="ehr-b", name="ehr-b", role="system", clinic_id=world.b.clinic_id
    )
    sealed = documents.put(hub, b"%PDF-1.4 referral letter")
    binary = {"resourceType": "Binary", "contentType": "application/pdf"}
    return fhir_store.create(hub, ehr, binary, default_rules(), document=sealed).id


def _annotation(hub: Hub, case_id: str, instance_id: str) -> str:
    """An arrow on the target case's first image, as if drawn before the walk."""
    from saf.db import transaction
    from saf.models import Annotation

    with transaction(hub.sessions) as session:
        row = Annotation(
            case_id=case_id,
            instance_id=instance_id,
            frame=1,
            kind="arrow",
            points=[[1.0, 1.0], [5.0, 5.0]],
            measurement={},
            created_by="dr.thorax",
        )
        session.add(row)
        session.flush()
        return row.id


def _forward_job(hub: Hub, study_id: str) -> int:
    """Queue the target study for a forwarding destination (nothing listens: it stays due)."""
    rule = '[[rule]]\nname = "pacs"\ndestination = "dicom://PACS@127.0.0.1:9"\n'
    [job_id] = enqueue_study(hub, study_id, rules=parse_forward_rules(rule))
    return job_id


# FHIR Binary and transaction/batch Bundles (A1).
PARAMS["binary_id"] = lambda t: t.binary_id
BODIES.update(
    {
        ("POST", "/fhir/Binary"): lambda t: (b"%PDF-1.4 another letter", "application/pdf"),
        ("POST", "/fhir"): lambda t: (
            b'{"resourceType": "Bundle", "type": "transaction", "entry": [{"request": '
            b'{"method": "POST", "url": "Patient"}, "resource": {"resourceType": "Patient", '
            b'"identifier": [{"system": "urn:walker", "value": "W1"}]}}]}',
            "application/fhir+json",
        ),
    }
)


# Task update and patch (fhir_api.tasks): the clinic raises the priority, which it may do
# whatever the case's state (the claim may have run first).
BODIES.update(
    {
        ("PUT", "/fhir/Task/{task_id}"): lambda t: (
            json.dumps({**t.task(), "priority": "stat"}).encode(),
            "application/fhir+json",
        ),
        ("PATCH", "/fhir/Task/{task_id}"): lambda t: (
            b'[{"op": "replace", "path": "/priority", "value": "urgent"}]',
            "application/json-patch+json",
        ),
    }
)


# --------------------------------------------------------------------------- the walker


@dataclass(frozen=True)
class Endpoint:
    """One method on one route path (a template such as /api/cases/{case_id})."""

    method: str
    path: str
    route: BaseRoute | None = field(default=None, compare=False)


def walk(routes: Sequence[BaseRoute], prefix: str = "") -> Iterator[Endpoint]:
    """Every endpoint of an app: its routes, included routers and mounted sub-apps."""
    for context in iter_route_contexts(routes):
        route = context.original_route
        if isinstance(route, Mount):
            yield from walk(route.routes, prefix + route.path)
        elif isinstance(route, WebSocketRoute):
            yield Endpoint("WEBSOCKET", prefix + route.path, route)
        elif context.path is not None:
            for method in sorted((context.methods or {"GET"}) - {"HEAD"}):
                yield Endpoint(method, prefix + context.path, route)


def authenticates(route: BaseRoute | None) -> bool:
    """Whether a FastAPI route depends (directly or through other dependencies) on
    saf.deps.current_principal, or a plain route's endpoint is a
    saf.deps.authenticated_endpoint (which calls it itself)."""
    if isinstance(route, Route) and not isinstance(route, APIRoute):
        return getattr(route.endpoint, AUTHENTICATES, None) is current_principal
    if not isinstance(route, APIRoute):
        return False
    pending = [route.dependant]
    while pending:
        dependant = pending.pop()
        if dependant.call is current_principal:
            return True
        pending.extend(dependant.dependencies)
    return False


def _with_body(endpoint: Endpoint, headers: dict[str, str], target: Target) -> dict[str, Any]:
    """Request arguments: the caller's headers, and the route's body from BODIES if any."""
    make = BODIES.get((endpoint.method, endpoint.path))
    if make is None:
        return {"headers": headers}
    content, content_type = make(target)
    return {"headers": {**headers, "Content-Type": content_type}, "content": content}


_PARAM = re.compile(r"{(\w+)(?::\w+)?}")


def fill(path: str, target: Target) -> str:
    """The URL of `path` aimed at the target; KeyError names an unknown parameter."""

    def value(match: re.Match[str]) -> str:
        name = match[1]
        if name not in PARAMS:
            raise KeyError(name)
        return PARAMS[name](target)

    return _PARAM.sub(value, path)


@dataclass(frozen=True)
class Attempt:
    """A caller who must be refused: `refused` says whether the response is a refusal."""

    name: str
    headers: dict[str, str]
    refused: Callable[[httpx.Response], bool]
    expected: str
    skip_when_rightful: frozenset[str] = frozenset()
    """Rightful-caller names for whose routes this attempt is not an attack."""


def unauthenticated(response: httpx.Response) -> bool:
    return response.status_code == 401


def denied(response: httpx.Response) -> bool:
    return response.status_code in (403, 404)


def hides(secrets: frozenset[str]) -> Callable[[httpx.Response], bool]:
    """Refused, or a success that mentions none of `secrets` (an empty list)."""

    def check(response: httpx.Response) -> bool:
        if response.status_code in (403, 404):
            return True
        if not response.is_success:
            return False
        body = response.text
        return not any(secret in body for secret in secrets)

    return check


@dataclass
class Callers:
    """Tokens of every caller the walker uses."""

    rightful: dict[str, dict[str, str]]
    attempts: list[Attempt] = field(default_factory=list)


def check_routes(client: TestClient, callers: Callers, target: Target) -> list[str]:
    """Attack every non-public endpoint of the client's app; the list of what got through."""
    app = client.app
    assert isinstance(app, FastAPI)
    problems: list[str] = []
    positive: list[tuple[Endpoint, str]] = []
    for endpoint in walk(app.routes):
        if endpoint.path in PUBLIC_PATHS:
            continue
        label = f"{endpoint.method} {endpoint.path}"
        if endpoint.method == "WEBSOCKET":
            problems.append(f"{label}: websocket routes are not covered by this test; add them")
            continue
        try:
            url = fill(endpoint.path, target) + QUERIES.get((endpoint.method, endpoint.path), "")
        except KeyError as exc:
            problems.append(
                f"{label}: unknown path parameter {exc.args[0]!r}; add it to PARAMS in "
                "tests/saf/test_routes_protected.py (say which of clinic B's objects fills it)"
            )
            continue
        if not authenticates(endpoint.route):
            problems.append(
                f"{label}: does not depend on saf.deps.current_principal (use CurrentPrincipal "
                "or require_scope), or add its path to saf.app.PUBLIC_PATHS if it is public"
            )
        rightful = RIGHTFUL.get((endpoint.method, endpoint.path), "clinician_b")
        for attempt in callers.attempts:
            if rightful in attempt.skip_when_rightful:
                continue
            response = client.request(
                endpoint.method, url, **_with_body(endpoint, attempt.headers, target)
            )
            refused_here = (endpoint.method, endpoint.path) in NOT_ALLOWED and (
                response.status_code == 405 and attempt.refused is not unauthenticated
            )
            if not attempt.refused(response) and not refused_here:
                problems.append(
                    f"{label}: {attempt.name} got {response.status_code}, expected "
                    f"{attempt.expected}: {response.text[:200]}"
                )
        positive.append((endpoint, url))
    # Positive controls last: they may change state (a claim).
    for endpoint, url in positive:
        rightful = RIGHTFUL.get((endpoint.method, endpoint.path), "clinician_b")
        response = client.request(
            endpoint.method, url, **_with_body(endpoint, callers.rightful[rightful], target)
        )
        wanted = (
            response.status_code == 405
            if (endpoint.method, endpoint.path) in NOT_ALLOWED
            else response.is_success
        )
        if not wanted:
            problems.append(
                f"{endpoint.method} {endpoint.path}: the rightful caller ({rightful}) got "
                f"{response.status_code}, expected success (fix the route or RIGHTFUL): "
                f"{response.text[:200]}"
            )
    return problems


# --------------------------------------------------------------------------- the set-up


@dataclass
class Setup:
    hub: Hub
    world: World
    people: People
    target: Target
    callers: Callers


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _forged(token: str) -> str:
    """The same claims and header, signed by a key that is not the hub's."""
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    return jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), "ES256", headers=header)


@pytest.fixture
def setup(hub: Hub, tmp_path: Path) -> Iterator[Setup]:
    world = make_world(hub, tmp_path)
    people = make_people(hub, world)
    target = _target(hub, world)
    make_user(hub, "clinician", username="bert.leaving", clinic=world.b.name)
    with TestClient(create_app(hub)) as client:
        rightful = {
            "clinician_b": login(client, people.clinician_b),
            "thoracic": login(client, people.thoracic),
            "admin": login(client, people.admin),
            "ehr_b": ehr_login(client, "ehr-b-fhir", world.b.name, ["system/*.cruds"]),
        }
        clinician_a = login(client, people.clinician_a)
        derm = login(client, people.derm)
        leaving = login(client, "bert.leaving")
        wrong_scope = ehr_login(client, "ehr-b-obs", world.b.name, ["system/Observation.rs"])
        revoked = ehr_login(client, "ehr-b-all", world.b.name, ["system/*.rs", "system/Task.u"])
    disable_user(hub, "bert.leaving")
    revoke_client(hub, "ehr-b-all")
    with hub.sessions() as session:
        owner = session.scalars(select(User).where(User.username == people.clinician_b)).one()
        expired = issue_access_token(hub, principal_of_user(owner), lifetime=-3600).token
    phi_of_both = frozenset(
        {
            *world.a.cases,
            *world.a.studies,
            *world.a.patients,
            *world.a.series,
            *world.b.cases,
            *world.b.studies,
            *world.b.patients,
            *world.b.series,
        }
    )
    secrets_of_b = frozenset({*target.ids, *world.b.cases, *world.b.studies, *world.b.patients})
    names = {"ALPHA^ANNA", "BRAVO^BERT", "CHARLIE^CARA"}
    attempts = [
        Attempt("no token", {}, unauthenticated, "401"),
        Attempt("a malformed token", bearer("not-a-token"), unauthenticated, "401"),
        Attempt(
            "a non-Bearer scheme", {"Authorization": "Basic Ym9iOmJvYg=="}, unauthenticated, "401"
        ),
        Attempt(
            "a forged token",
            bearer(_forged(rightful["clinician_b"]["Authorization"][7:])),
            unauthenticated,
            "401",
        ),
        Attempt("an expired token", bearer(expired), unauthenticated, "401"),
        Attempt("a disabled user's token", leaving, unauthenticated, "401"),
        Attempt("a revoked client's token", revoked, unauthenticated, "401"),
        Attempt(
            "clinic A's clinician",
            clinician_a,
            hides(secrets_of_b | names - {"ALPHA^ANNA"}),
            "404, 403 or nothing of clinic B",
        ),
        Attempt(
            "a specialist the case is not routed to",
            derm,
            hides(target.ids | {"BRAVO^BERT"}),
            "404, 403 or nothing of the case",
        ),
        Attempt(
            "an EHR client of the owner clinic with a wrong scope",
            wrong_scope,
            denied,
            "403 or 404",
        ),
        Attempt(
            "an admin",
            rightful["admin"],
            hides(phi_of_both | names),
            "403, 404 or no PHI",
            skip_when_rightful=ADMIN_CALLERS,
        ),
    ]
    yield Setup(hub, world, people, target, Callers(rightful, attempts))


# --------------------------------------------------------------------------- the tests


def test_every_route_refuses_every_caller_it_must(setup: Setup) -> None:
    app = create_app(setup.hub)
    with TestClient(app) as client:
        problems = check_routes(client, setup.callers, setup.target)

    assert not problems, "\n".join(problems)
    walked = {e.path for e in walk(app.routes)} - PUBLIC_PATHS
    assert {"/api/cases/{case_id}", "/api/audit", "/api/studies/{study_id}"} <= walked
    assert {"/fhir/{resource_type}", "/fhir/{resource_type}/{resource_id}"} <= walked
    methods = {(e.method, e.path) for e in walk(app.routes)}
    assert {("PUT", "/fhir/Task/{task_id}"), ("PATCH", "/fhir/Task/{task_id}")} <= methods


def test_every_attempt_is_audited(setup: Setup) -> None:
    with TestClient(create_app(setup.hub)) as client:
        check_routes(client, setup.callers, setup.target)
        client.post(
            "/auth/token", data={"grant_type": "password", "username": "x", "password": "nope"}
        )
    with setup.hub.sessions() as session:
        rows = list(session.scalars(select(AuditRecord)))

    def seen(**where: Any) -> list[AuditRecord]:
        return [r for r in rows if all(getattr(r, k) == v for k, v in where.items())]

    target = setup.target
    assert seen(event="read", outcome=audit.SUCCESS, entity_id=target.case_id)
    assert seen(event="read", outcome=audit.SUCCESS, entity_id=target.study_id)
    assert seen(event="read", outcome=audit.SUCCESS, entity_id=target.series_id)
    assert seen(event="read", outcome=audit.SUCCESS, entity_id=target.instance_id)
    assert seen(event="update", outcome=audit.SUCCESS, entity_id=target.case_id)  # the claim
    task_updates = seen(event="update", entity_type="Task", entity_id=target.case_id)
    assert {r.detail.split(":")[0] for r in task_updates if r.outcome == audit.SUCCESS} == {
        "update",
        "patch",
    }
    assert seen(event="read", outcome=audit.SUCCESS, entity_id=target.service_request_id)
    assert seen(event="delete", outcome=audit.SUCCESS, entity_id=target.service_request_id)
    for who in (setup.people.clinician_a, setup.people.derm):
        refused = seen(actor_name=who, outcome=audit.MINOR_FAILURE)
        assert {r.entity_id for r in refused} >= {target.case_id, target.study_id}, who
    assert seen(event="login", outcome=audit.SUCCESS, actor_name=setup.people.clinician_b)
    assert seen(event="login", outcome=audit.MINOR_FAILURE)  # the failed password login
    assert len(seen(event="token", outcome=audit.MINOR_FAILURE, actor_kind="anonymous")) >= 5
    assert seen(event="search", entity_type="AuditEvent", actor_name=setup.people.admin)


def _leaky_app(hub: Hub) -> FastAPI:
    app = create_app(hub)

    @app.get("/api/leak/{case_id}")
    def leak(case_id: str) -> dict[str, str]:
        """A route someone forgot to protect: no CurrentPrincipal, no tenancy."""
        with hub.sessions() as session:
            case = session.get_one(Case, case_id)
            return {"id": case.id, "clinic_id": case.clinic_id, "patient": case.patient_pk}

    return app


def test_the_walker_reports_an_unprotected_route(setup: Setup) -> None:
    with TestClient(_leaky_app(setup.hub)) as client:
        problems = check_routes(client, setup.callers, setup.target)

    leaks = [p for p in problems if p.startswith("GET /api/leak/{case_id}: ")]
    assert leaks, problems
    assert any("does not depend on saf.deps.current_principal" in p for p in leaks)
    assert any("no token got 200" in p for p in leaks)
    assert any("clinic A's clinician got 200" in p for p in leaks)
    assert any("an admin got 200" in p for p in leaks)


def test_the_walker_reports_a_route_with_a_parameter_it_cannot_fill(setup: Setup) -> None:
    app = create_app(setup.hub)

    @app.get("/api/widgets/{widget_id}")
    def widget(widget_id: str, caller: CurrentPrincipal) -> dict[str, str]:
        return {"id": widget_id}

    with TestClient(app) as client:
        problems = check_routes(client, setup.callers, setup.target)

    assert [p for p in problems if "/api/widgets/" in p] == [
        "GET /api/widgets/{widget_id}: unknown path parameter 'widget_id'; add it to PARAMS "
        "in tests/saf/test_routes_protected.py (say which of clinic B's objects fills it)"
    ]


def test_the_walker_reaches_into_mounted_apps(setup: Setup) -> None:
    app = create_app(setup.hub)
    sub = FastAPI()

    @sub.get("/peek/{study_id}")
    def peek(study_id: str) -> dict[str, str]:
        return {"study": study_id}

    app.mount("/sub", sub)

    with TestClient(app) as client:
        problems = check_routes(client, setup.callers, setup.target)

    peeks = [p for p in problems if p.startswith("GET /sub/peek/{study_id}: ")]
    assert any("a disabled user's token got 200" in p for p in peeks), problems
    assert any("a specialist the case is not routed to got 200" in p for p in peeks)


def test_the_walker_reports_a_plain_route_that_does_not_authenticate(setup: Setup) -> None:
    """A plain Starlette route passes the dependency check only as an
    saf.deps.authenticated_endpoint (fhir_api.lean); any other is reported."""
    app = create_app(setup.hub)

    async def peek(request: Request) -> JSONResponse:
        return JSONResponse({"case": request.path_params["case_id"]})

    app.router.routes.insert(0, Route("/api/peek/{case_id}", peek))

    with TestClient(app) as client:
        problems = check_routes(client, setup.callers, setup.target)

    peeks = [p for p in problems if p.startswith("GET /api/peek/{case_id}: ")]
    assert any("does not depend on saf.deps.current_principal" in p for p in peeks), problems
    assert any("no token got 200" in p for p in peeks)
    assert not [p for p in problems if p.startswith("GET /fhir/")], problems
