"""The Celery app: broker from SAF_BROKER_URL (embedded SQLite broker by default), late acks."""

from __future__ import annotations

from celery import Celery

from saf.settings import Settings

QUEUE = "saf"
"""The queue saf's tasks go to."""


def make_celery(settings: Settings) -> Celery:
    """A Celery app for `settings`: tasks are acknowledged only once they finished."""
    app = Celery("saf", broker=settings.effective_broker_url, include=["workers.tasks"])
    app.conf.update(
        task_default_queue=QUEUE,
        task_acks_late=True,  # a worker that dies mid-task leaves the message to redo
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if app.conf.broker_url.startswith(("redis", "rediss")):
        # Unacknowledged tasks (their worker died) come back after this many seconds.
        app.conf.broker_transport_options = {
            "visibility_timeout": settings.broker_visibility_timeout
        }
    return app
