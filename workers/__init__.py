"""Celery app and thin tasks over saf functions (thumbnails, cases and routing)."""
