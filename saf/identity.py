"""Who is calling: the Principal every door (HTTP, DICOM, CLI) resolves its caller to.

Routers and handlers pass a Principal to the core (saf.scope, saf.audit); they never
decide on their own what a caller may see.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final, Literal, cast

PrincipalKind = Literal["user", "client", "ae", "system"]
Role = Literal["clinician", "specialist", "admin", "system"]
ROLES: tuple[Role, ...] = ("clinician", "specialist", "admin")
"""Roles a person can be given (`system` is for EHR clients, AEs and the hub itself)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller.

    - clinician: `clinic_id` set; sees that clinic's data.
    - specialist: `specialties` set; sees cases routed to one of them, and their studies.
    - admin: sees audit and configuration, no PHI.
    - client (an EHR) and ae (a DICOM peer): role `system`, `clinic_id` set, limited by
      `scopes` (SMART v2 scopes, e.g. ``system/DocumentReference.cruds``).
    """

    kind: PrincipalKind
    id: str
    name: str
    role: Role
    clinic_id: str | None = None
    specialties: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    address: str = ""
    """Where the request came from (IP address or host), for the audit trail."""
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)


SYSTEM = Principal(kind="system", id="saf", name="saf", role="system")
"""The hub itself (workers, CLI maintenance): not limited by tenancy."""


# --- SMART on FHIR scopes -------------------------------------------------------------

INTERACTIONS: Final = "cruds"
"""SMART v2 permissions, in the order a scope must list them: create, read, update,
delete, search."""

_SCOPE = re.compile(
    r"^(?P<context>patient|user|system)/(?P<resource>\*|[A-Z][A-Za-z]{0,63})"
    r"\.(?P<perms>read|write|\*|c?r?u?d?s?)$"
)
_V1_ALIASES: Final = {"read": "rs", "write": "cud", "*": "cruds"}
"""SMART v1 permissions and the v2 interactions each stands for (v1 `write` was
create/update/delete; `read` covered search)."""

OTHER_SCOPES: Final = frozenset({"openid", "fhirUser", "offline_access", "online_access"})
"""Scopes that are not resource permissions but that SMART clients commonly ask for; they
are accepted in a request and grant no access to data."""


@dataclass(frozen=True)
class Scope:
    """One parsed SMART resource scope, e.g. ``system/DocumentReference.rs``."""

    context: Literal["patient", "user", "system"]
    resource_type: str
    """A FHIR resource type, or ``*`` for all."""
    interactions: frozenset[str]
    """Subset of c, r, u, d, s."""

    def covers(self, resource_type: str, interaction: str) -> bool:
        """Whether this scope permits `interaction` on `resource_type`."""
        return self.resource_type in ("*", resource_type) and interaction in self.interactions


def parse_scope(text: str) -> Scope | None:
    """Parse a SMART v2 (``.cruds``) or v1 (``.read``/``.write``/``.*``) resource scope.

    Returns None for a string that is not a resource scope (``openid``, a granular scope
    with ``?query``, a typo); callers decide whether that is an error.
    """
    match = _SCOPE.match(text)
    if match is None:
        return None
    perms = match["perms"]
    perms = _V1_ALIASES.get(perms, perms)
    if not perms:
        return None
    context = cast(Literal["patient", "user", "system"], match["context"])
    return Scope(context, match["resource"], frozenset(perms))


_PHI_TYPES: Final = (
    "Patient",
    "ImagingStudy",
    "DocumentReference",
    "Binary",
    "ServiceRequest",
    "Task",
    "DiagnosticReport",
    "Observation",
    "Media",
    "Communication",
)

ROLE_SCOPES: Final[dict[str, frozenset[str]]] = {
    "clinician": frozenset(
        {
            "user/*.rs",
            "user/ServiceRequest.cu",
            "user/DocumentReference.cu",
            "user/Binary.c",
            "user/Task.cu",
            "user/Patient.cu",
            "user/ImagingStudy.cu",
            "user/Communication.cu",
            "user/List.cu",
        }
    ),
    "specialist": frozenset(
        {
            "user/*.rs",
            "user/Task.u",
            "user/DiagnosticReport.cu",
            "user/Observation.cu",
            "user/ImagingStudy.u",
            "user/Communication.cu",
            "user/DocumentReference.c",
            "user/Binary.c",
        }
    ),
    "admin": frozenset({"user/AuditEvent.rs"}),
}
"""What each role may do at most (see `role_scopes`)."""


def role_scopes(role: str) -> frozenset[str]:
    """The SMART scopes a person's role implies (their token can ask for fewer, never more).

    - clinician: read and search everything of their clinic (`user/*.rs`); create and update
      referrals, documents, tasks, patients and studies (``ServiceRequest``,
      ``DocumentReference``, ``Binary``, ``Task``, ``Patient``, ``ImagingStudy``,
      ``Communication``, and ``List`` for an MHD SubmissionSet). No delete: records are
      corrected, not erased.
    - specialist: read and search what is routed to them (`user/*.rs`); update the Task
      (claim, progress), write the reply (``DiagnosticReport``, ``Observation``,
      ``DocumentReference``/``Binary`` for annotations) and ``Communication``.
    - admin: the audit trail only (``user/AuditEvent.rs``) and no PHI: ``user/*.rs`` does not
      apply to admins, and `allows` never lets an admin reach a PHI resource type even
      if a scope string would; conversely only admins read ``AuditEvent`` (``user/*.rs``
      of the other roles does not reach it).

    Which rows (which clinic, which cases) is not decided here but by saf.tenancy.
    """
    return ROLE_SCOPES.get(role, frozenset())


def _covered(scopes: frozenset[str], context: str, resource_type: str, interaction: str) -> bool:
    for text in scopes:
        scope = parse_scope(text)
        if scope and scope.context == context and scope.covers(resource_type, interaction):
            return True
    return False


def allows(principal: Principal, resource_type: str, interaction: str) -> bool:
    """Whether `principal` may perform `interaction` (c, r, u, d or s) on `resource_type`.

    - system (the hub itself): everything.
    - user: the role's scopes (`role_scopes`), narrowed to the token's `scopes` when the
      token carries any; only ``user/`` scopes count. An admin never reaches a PHI type.
    - client (an EHR): its granted ``system/`` scopes.
    - ae (a DICOM peer): its ``system/`` scopes, when the DICOM door sets any.

    ``patient/`` scopes grant nothing: the hub has no patient launch context. Tenancy (which
    rows) is applied separately by saf.tenancy; this answers only "which kinds of thing".
    """
    if interaction not in INTERACTIONS or len(interaction) != 1:
        raise ValueError(f"interaction must be one of c, r, u, d, s, got {interaction!r}")
    if principal.kind == "system":
        return True
    if principal.kind == "user":
        if principal.role == "admin" and resource_type in _PHI_TYPES:
            return False
        if resource_type == "AuditEvent" and principal.role != "admin":
            return False
        if not _covered(role_scopes(principal.role), "user", resource_type, interaction):
            return False
        return not principal.scopes or _covered(
            principal.scopes, "user", resource_type, interaction
        )
    return _covered(principal.scopes, "system", resource_type, interaction)


def grantable(requested: frozenset[str], allowed: frozenset[str]) -> frozenset[str]:
    """The requested scopes that `allowed` fully covers (the rest are dropped, as RFC 6749
    §3.3 lets a server grant less than asked)."""
    granted: set[str] = set()
    for text in requested:
        scope = parse_scope(text)
        if scope is None:
            continue
        context, resource_type = scope.context, scope.resource_type
        if all(_covered(allowed, context, resource_type, i) for i in scope.interactions):
            granted.add(text)
    return frozenset(granted)


def grantable_to(principal: Principal, requested: frozenset[str]) -> frozenset[str]:
    """The requested scopes `principal` may hold: for a person what their role allows (by
    the same rules as `allows`), for a client or AE what it is registered for."""
    if principal.kind != "user":
        return grantable(requested, principal.scopes)
    role_only = Principal(kind="user", id=principal.id, name=principal.name, role=principal.role)
    granted: set[str] = set()
    for text in requested:
        scope = parse_scope(text)
        if scope is None or scope.context != "user":
            continue
        if all(allows(role_only, scope.resource_type, i) for i in scope.interactions):
            granted.add(text)
    return frozenset(granted)
