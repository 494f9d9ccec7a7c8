"""Celery app and thin tasks over saf functions (thumbnails, routing); built in a later issue."""
