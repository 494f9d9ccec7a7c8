"""The viewer's JSON API under /api: frames, pixel values, annotations, reply (placeholder
while the work lands)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api", tags=["viewer"])
