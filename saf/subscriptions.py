"""FHIR Subscriptions (R4 backport, topic "case status changed"): who is told what, and
the delivery of notifications through the outbox.

Placeholder while the Subscription work lands: `on_case_status` is the outbox entry
point (saf.pipeline calls it for every ``case.status`` event).
"""

from __future__ import annotations

from typing import Any

from saf.hub import Hub


def on_case_status(hub: Hub, payload: dict[str, Any]) -> int:
    """Queue a notification for each active subscription that a case status change
    concerns; returns how many were queued."""
    return 0
