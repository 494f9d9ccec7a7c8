"""The viewer's server-rendered pages (placeholder while the work lands)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["viewer-pages"])
