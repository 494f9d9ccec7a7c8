"""The Celery app: broker from SAF_BROKER_URL (embedded SQLite broker by default), late acks."""

from __future__ import annotations

from celery import Celery

from saf.settings import Settings

QUEUE = "saf"
"""The queue saf's tasks go to."""

EMBEDDED_POLLING_INTERVAL = 0.1
"""Seconds between polls of the embedded SQLite broker."""


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
    if app.conf.broker_url.startswith("sqla+"):
        # The embedded broker is polled: every 0.1 s instead of kombu's 1 s, so a
        # complete study does not wait up to a second for its task (a local file: cheap).
        # Set on the class: this transport hands every transport option to
        # create_engine, which refuses `polling_interval`.
        from kombu.transport import sqlalchemy as sqla_transport

        sqla_transport.Transport.polling_interval = EMBEDDED_POLLING_INTERVAL
    if app.conf.broker_url.startswith(("redis", "rediss")):
        timeout = settings.broker_visibility_timeout
        app.conf.broker_transport_options = {
            # Unacknowledged tasks (their worker died) come back after this many seconds...
            "visibility_timeout": timeout,
            # ...found by a running worker's sweep every few seconds (kombu's default
            # sweep is every 10th 10 s tick, which would add up to 100 s).
            "unacked_restore_interval": max(1.0, min(10.0, timeout / 3)),
            "unacked_restore_throttle": 1,
        }
    return app
