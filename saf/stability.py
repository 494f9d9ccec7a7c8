"""The stable-study timer: a study with no new instance for SAF_STABLE_AGE_SECONDS is complete."""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy import func, select, update

from saf.db import transaction
from saf.hub import Hub
from saf.models import Instance, OutboxEvent, Series, Study, utcnow

log = logging.getLogger(__name__)


def mark_stable_studies(hub: Hub, now: datetime | None = None) -> list[str]:
    """Mark complete every study quiet for the stable age; returns their ids.

    Each study is claimed with a conditional update in its own transaction together
    with its outbox event, so several processes may run this at once safely.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=hub.settings.stable_age_seconds)
    with hub.sessions() as session:
        candidates = list(
            session.scalars(
                select(Study.id).where(Study.stable_at.is_(None), Study.last_received_at <= cutoff)
            )
        )
    marked = []
    for study_id in candidates:
        with transaction(hub.sessions) as session:
            claimed = session.execute(
                update(Study)
                .where(
                    Study.id == study_id,
                    Study.stable_at.is_(None),
                    Study.last_received_at <= cutoff,
                )
                .values(stable_at=now)
            )
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                continue
            study = session.get_one(Study, study_id)
            count = session.scalar(
                select(func.count(func.distinct(Instance.sop_instance_uid)))
                .join(Series, Instance.series_pk == Series.id)
                .where(Series.study_pk == study_id)
            )
            session.add(
                OutboxEvent(
                    topic="study.stable",
                    payload={
                        "study_id": study_id,
                        "clinic_id": study.clinic_id,
                        "study_instance_uid": study.study_instance_uid,
                        "instances": count,
                    },
                )
            )
        marked.append(study_id)
        log.info("study %s is complete (%s instances)", study_id, count)
    return marked


class StableStudyTimer:
    """Runs `mark_stable_studies` every SAF_STABLE_CHECK_INTERVAL seconds in a daemon thread."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="saf-stable-timer", daemon=True)

    def start(self) -> None:
        """Start checking in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current check."""
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._hub.settings.stable_check_interval):
            try:
                mark_stable_studies(self._hub)
            except Exception:  # a database outage must not kill the timer; retry next tick
                log.exception("stable-study check failed; retrying")
