"""Incoming resources: the body read within its limit, parsed, validated as R4.

Validation uses ``fhir.resources.R4B`` (the R4B models accept R4 4.0.1 content for the
types served here; R4B differs from R4 in resources we do not serve, e.g. the
medication-definition family, SubscriptionTopic, and Citation). Its models refuse unknown
elements and wrong datatypes but do not enforce code bindings, so the codes the hub acts
on are checked here (`CODES`). What is stored is the client's JSON as sent (plus id and
meta), not the model's re-serialisation, so a read returns exactly what was written.
"""

from __future__ import annotations

import json
from typing import Any, Final

from fastapi import Request
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from fhir_api.outcome import FhirError, issue
from saf.hub import Hub
from saf.routing import RuleSet, RulesHolder

CODES: Final[dict[tuple[str, str], frozenset[str]]] = {
    ("ServiceRequest", "status"): frozenset(
        {"draft", "active", "on-hold", "revoked", "completed", "entered-in-error", "unknown"}
    ),
    ("ServiceRequest", "intent"): frozenset(
        {
            "proposal",
            "plan",
            "directive",
            "order",
            "original-order",
            "reflex-order",
            "filler-order",
            "instance-order",
            "option",
        }
    ),
    ("ServiceRequest", "priority"): frozenset({"routine", "urgent", "asap", "stat"}),
    ("Task", "status"): frozenset(
        {
            "draft",
            "requested",
            "received",
            "accepted",
            "rejected",
            "ready",
            "cancelled",
            "in-progress",
            "on-hold",
            "failed",
            "completed",
            "entered-in-error",
        }
    ),
    ("DiagnosticReport", "status"): frozenset(
        {
            "registered",
            "partial",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "appended",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
    ("Communication", "status"): frozenset(
        {
            "preparation",
            "in-progress",
            "not-done",
            "on-hold",
            "stopped",
            "completed",
            "entered-in-error",
            "unknown",
        }
    ),
    ("DocumentReference", "status"): frozenset({"current", "superseded", "entered-in-error"}),
    ("DocumentReference", "docStatus"): frozenset(
        {"preliminary", "final", "amended", "entered-in-error"}
    ),
    ("List", "status"): frozenset({"current", "retired", "entered-in-error"}),
    ("List", "mode"): frozenset({"working", "snapshot", "changes"}),
}
"""Required bindings (R4 value sets) of the codes saf acts on."""


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 once it is known to exceed `max_bytes` (by its
    Content-Length before reading, or while reading a body sent without one)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise FhirError(400, "Content-Length is not a number") from None
        if size > max_bytes:
            raise FhirError(413, f"the body is {size} bytes; at most {max_bytes} are accepted")
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > max_bytes:
            raise FhirError(413, f"the body exceeds {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def fhirpath(resource_type: str, loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a FHIRPath expression: ``ServiceRequest.code.coding[0]``."""
    path = resource_type
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif "[" in part or "(" in part or part == "resourceType":
            # pydantic's validator labels (function-after[...]) are not elements.
            continue
        else:
            path += f".{part}"
    return path


def parse(body: bytes, resource_type: str) -> dict[str, Any]:
    """The resource in `body` (FHIR JSON), validated as R4 `resource_type`; FhirError
    (400) naming each problem's location otherwise."""
    if not body.strip():
        raise FhirError(400, "the request has no body; a FHIR JSON resource is expected")
    try:
        content = json.loads(body)
    except UnicodeDecodeError:
        raise FhirError(400, "the body is not UTF-8") from None
    except RecursionError:
        raise FhirError(400, "the JSON is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise FhirError(
            400, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(content, dict):
        raise FhirError(400, "the body must be a JSON object (a FHIR resource)")
    validate(content, resource_type)
    return content


def validate(content: Any, resource_type: str | None, where: str | None = None) -> None:
    """Check `content` is a valid R4 resource (of `resource_type` when given); FhirError
    (400) naming each problem's location, prefixed with `where` (``Bundle.entry[2].resource``)
    instead of the type name when given."""
    if not isinstance(content, dict):
        raise FhirError(400, "a resource must be a JSON object", expression=[where or "resource"])
    found = content.get("resourceType")
    if resource_type is not None and found != resource_type:
        raise FhirError(
            400,
            f"resourceType is {found!r}; this endpoint takes {resource_type}",
            expression=[f"{where or resource_type}.resourceType"],
        )
    if not isinstance(found, str):
        raise FhirError(400, "resourceType is missing", expression=[f"{where}.resourceType"])
    try:
        model = get_fhir_model_class(found)
    except (KeyError, ValueError):
        raise FhirError(
            400, f"{found!r} is not a FHIR resource type", expression=[f"{where}.resourceType"]
        ) from None
    label = where or found
    try:
        model.model_validate(content)
    except ValidationError as exc:
        issues = [
            issue(
                "structure" if err["type"] == "extra_forbidden" else "value",
                f"{err['msg']}"
                + (" (unknown element)" if err["type"] == "extra_forbidden" else ""),
                [fhirpath(label, tuple(err["loc"]))],
            )
            for err in exc.errors()
        ]
        raise FhirError(400, "invalid resource", issues=issues) from None
    except (ValueError, TypeError) as exc:
        raise FhirError(400, f"invalid resource: {exc}", expression=[label]) from None
    _check_codes(content, found, label)


def rules_of(request: Request, hub: Hub) -> RuleSet:
    """The routing rules a referral is routed by (loaded once per app, reloaded when the
    file changes)."""
    holder: RulesHolder | None = getattr(request.app.state, "fhir_rules", None)
    if holder is None:
        holder = RulesHolder(hub.settings.rules_path)
        request.app.state.fhir_rules = holder
    return holder.current


def _check_codes(content: dict[str, Any], resource_type: str, label: str) -> None:
    problems = []
    for (type_, element), allowed in CODES.items():
        if type_ != resource_type or element not in content:
            continue
        value = content[element]
        if value not in allowed:
            problems.append(
                issue(
                    "code-invalid",
                    f"{value!r} is not a valid {resource_type}.{element} "
                    f"(one of {', '.join(sorted(allowed))})",
                    [f"{label}.{element}"],
                )
            )
    if problems:
        raise FhirError(400, "invalid code", issues=problems)
