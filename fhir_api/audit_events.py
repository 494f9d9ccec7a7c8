"""FHIR audit_events routes (placeholder while the work lands)."""

from __future__ import annotations

from fastapi import APIRouter

from fhir_api.outcome import FhirRoute

router = APIRouter(tags=["fhir"], route_class=FhirRoute)
