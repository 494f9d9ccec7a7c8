"""Who is calling: the Principal every door (HTTP, DICOM, CLI) resolves its caller to.

Routers and handlers pass a Principal to the core (saf.scope, saf.audit); they never
decide on their own what a caller may see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
