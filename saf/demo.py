"""Demo data for `saf up --demo`: a demo clinic (AE DEMO), one synthetic CT routed to a
worklist, and two demo people to log in as.

Choices: the demo study is completed and routed at once (not after the stable age), so
the worklist shows it as soon as the hub answers; the demo users' passwords are fixed
and printed in README, which is acceptable only because they are made in demo mode
(`load_demo` refuses to run otherwise). Everything is idempotent: running it again
adds nothing.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sqlalchemy import select

from saf.clinics import add_clinic
from saf.hub import Hub
from saf.ingest import Sender, ingest_part10
from saf.models import Case, Study
from saf.pipeline import complete_study
from saf.routing import RuleSet, default_rules, load_rules
from saf.users import UserError, add_user, list_users

log = logging.getLogger(__name__)

DEMO_CLINIC = "Demo Clinic"
"""Name of the clinic `saf up --demo` registers."""

DEMO_AE_TITLE = "DEMO"
"""Calling AE title registered for the demo clinic."""

DEMO_SPECIALIST: Final = "demo.specialist"
"""Username of the demo specialist (serves the worklist the demo case is routed to)."""

DEMO_CLINICIAN: Final = "demo.clinic"
"""Username of the demo clinic's clinician."""

DEMO_PASSWORD: Final = "demo-password-only"
"""The demo users' password: known to everyone, so only ever set in demo mode."""


@dataclass(frozen=True)
class Demo:
    """What `load_demo` made (ids only)."""

    clinic_id: str
    study_id: str
    case_id: str
    worklist: str
    instances: int


def _rules(hub: Hub) -> RuleSet:
    try:
        return load_rules(hub.settings.rules_path)
    except FileNotFoundError:
        return default_rules()


def load_demo(hub: Hub, *, slices: int = 24, size: int = 256) -> Demo:
    """Register the demo clinic, ingest a synthetic CT, route its case and make the demo
    users; idempotent. Refuses outside demo mode (the passwords are public)."""
    from samples.generate import generate_study

    if not hub.settings.demo:
        raise RuntimeError("demo data is only loaded in demo mode (SAF_DEMO=true / --demo)")
    clinic = add_clinic(hub, DEMO_CLINIC, DEMO_AE_TITLE)
    sender = Sender(clinic.id, "demo")
    with tempfile.TemporaryDirectory(dir=hub.settings.spool_dir) as tmp:
        paths = generate_study(
            "ct", Path(tmp), count=slices, rows=size, columns=size, seed=7, patient_id="DEMO-1"
        )
        results = [ingest_part10(hub, path, sender) for path in paths]
    with hub.sessions() as session:
        study_id = session.scalars(
            select(Study.id).where(
                Study.clinic_id == clinic.id,
                Study.study_instance_uid == results[-1].study_instance_uid,
            )
        ).one()
    done = complete_study(hub, study_id, _rules(hub))
    with hub.sessions() as session:
        worklist = session.get_one(Case, done.case_id).specialty
    existing = {u.username for u in list_users(hub)}
    for username, role in ((DEMO_SPECIALIST, "specialist"), (DEMO_CLINICIAN, "clinician")):
        if username in existing:
            continue
        with contextlib.suppress(UserError):  # made meanwhile by another process: fine
            add_user(
                hub,
                username,
                DEMO_PASSWORD,
                role,
                clinic=DEMO_CLINIC if role == "clinician" else None,
                specialties=(worklist,) if role == "specialist" else (),
            )
    log.info(
        "demo clinic %s ready (AE %s): case %s on worklist %s, users %s and %s",
        clinic.id,
        DEMO_AE_TITLE,
        done.case_id,
        worklist,
        DEMO_SPECIALIST,
        DEMO_CLINICIAN,
    )
    return Demo(clinic.id, study_id, done.case_id, worklist, len(paths))
