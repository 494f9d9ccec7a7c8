"""What happens after ingest, driven by outbox events: the work the Celery tasks will call.

Every step is idempotent, so an event handled twice (a worker killed mid-task, a
message redelivered) ends in the same state as handled once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from saf import forwarding, frames, subscriptions
from saf.cases import CASE_STATUS_TOPIC, on_study_stable
from saf.hub import Hub
from saf.routing import RuleSet
from saf.thumbnails import ThumbnailReport, make_study_thumbnails

log = logging.getLogger(__name__)

REPLY_TOPIC = "case.replied"
"""Outbox topic written with a signed reply (saf.replies), in the same transaction.
Payload: ``case_id``, ``study_ids`` (the study primary keys the reply objects were stored
into) and ``series_instance_uids`` (the reply's SR/GSPS series, the objects to forward)."""

ACTIONABLE_TOPICS = frozenset({"study.stable", CASE_STATUS_TOPIC, REPLY_TOPIC})
"""Outbox topics that need a task; the others are records only."""


@dataclass(frozen=True)
class CompletedStudy:
    """The outcome of handling a complete study."""

    study_id: str
    case_id: str
    thumbnails: ThumbnailReport


def complete_study(hub: Hub, study_id: str, rules: RuleSet) -> CompletedStudy:
    """Render the study's thumbnails (and, from the same read of each instance, keep its
    DICOM JSON in the index for WADO-RS metadata), make or join its case and route it, then
    queue it for the forwarding destinations whose rules match."""
    thumbnails = make_study_thumbnails(hub, study_id)
    case_id = on_study_stable(hub, study_id, rules)
    # Queued after the case so a forwarding failure never delays the specialist; the
    # sending itself happens in the forwarder, per destination (saf.forwarding).
    forwarding.enqueue_study(hub, study_id, "study.stable")
    # Last, and never fatal: the frame headers indexed now make the viewer's first opening
    # of a series an index read; without them it reads the headers on demand.
    try:
        frames.index_study(hub, study_id)
    except Exception as exc:
        log.warning("study %s: frame headers not indexed (%s)", study_id, type(exc).__name__)
    log.info(
        "study %s complete: case %s, %d thumbnail(s) made, %d placeholder(s), %d metadata row(s)",
        study_id,
        case_id,
        thumbnails.made,
        thumbnails.placeholders,
        thumbnails.metadata,
    )
    return CompletedStudy(study_id, case_id, thumbnails)


def handle_event(hub: Hub, topic: str, payload: dict[str, Any], rules: RuleSet) -> object:
    """Do the work an outbox event asks for; topics with nothing to do return None."""
    if topic == "study.stable":
        return complete_study(hub, str(payload["study_id"]), rules)
    if topic == CASE_STATUS_TOPIC:
        return subscriptions.on_case_status(hub, payload)
    if topic == REPLY_TOPIC:
        return forwarding.enqueue_reply(hub, payload)
    return None  # instance.stored / instance.new_version: nothing to do before completion
