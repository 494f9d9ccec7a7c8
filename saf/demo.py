"""Demo data for `saf up --demo`: a demo clinic (AE DEMO) and one synthetic study."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from saf.clinics import add_clinic
from saf.hub import Hub
from saf.ingest import Sender, ingest_part10

log = logging.getLogger(__name__)

DEMO_CLINIC = "Demo Clinic"
"""Name of the clinic `saf up --demo` registers."""

DEMO_AE_TITLE = "DEMO"
"""Calling AE title registered for the demo clinic."""


def load_demo(hub: Hub) -> int:
    """Register the demo clinic and ingest a small synthetic CT study; idempotent."""
    from samples.generate import generate_study

    clinic = add_clinic(hub, DEMO_CLINIC, DEMO_AE_TITLE)
    sender = Sender(clinic.id, "demo")
    with tempfile.TemporaryDirectory(dir=hub.settings.spool_dir) as tmp:
        paths = generate_study("ct", Path(tmp), count=24, rows=256, columns=256, seed=7)
        for path in paths:
            ingest_part10(hub, path, sender)
    log.info("demo clinic %s ready (AE %s), %d instances", clinic.id, DEMO_AE_TITLE, len(paths))
    return len(paths)
