"""The FHIR read and vread of the stored types as plain Starlette routes, ahead of every
other route of the app: the hot path of a FHIR server, so it skips what FastAPI adds.

A FastAPI route with the `CurrentPrincipal` dependency costs two trips through the thread
pool (the sync dependency, then the sync route), the dependency solver, and a scan of every
route mounted before it. These routes make one trip (saf.deps.authenticated_endpoint) and
call the very same functions: saf.deps.current_principal (no, bad or expired token,
logged-out token, disabled account, revoked client: 401), then
fhir_api.routes.read_response (``_format``/Accept: 406, SMART scope: 403, tenancy, the
audit record committed before the answer, ETag and Last-Modified). Errors are
OperationOutcomes through fhir_api.outcome.error_response, as under `FhirRoute`.

They match only ``GET /fhir/<type>/<id>`` and ``GET /fhir/<type>/<id>/_history/<n>``
with a type of saf.fhir_store.STORED_TYPES (no other router serves those types); any
other path or method goes on to the FastAPI routes as before.
"""

from __future__ import annotations

from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from fhir_api.outcome import error_response
from fhir_api.routes import read_response
from saf.deps import authenticated_endpoint
from saf.fhir_store import STORED_TYPES
from saf.hub import Hub
from saf.identity import Principal

_TYPES: Final = frozenset(STORED_TYPES)


class StoredTypeRoute(Route):
    """A GET-only route whose ``{resource_type}`` must be one of the stored types."""

    def __init__(self, path: str, endpoint: Any) -> None:
        super().__init__(path, endpoint, methods=["GET"])
        self.methods = {"GET"}  # not HEAD (Starlette adds it): the FastAPI routes answer 405

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is not Match.NONE and child["path_params"]["resource_type"] not in _TYPES:
            return Match.NONE, {}
        return match, child


def _read(request: Request, principal: Principal, hub: Hub) -> Response:
    params = request.path_params
    return read_response(
        request,
        principal,
        hub,
        params["resource_type"],
        params["resource_id"],
        params.get("version_id"),
    )


read: Final = authenticated_endpoint(_read, error_response)
"""``GET /fhir/<type>/<id>[/_history/<n>]``."""

routes: Final[list[BaseRoute]] = [
    StoredTypeRoute("/fhir/{resource_type}/{resource_id}", read),
    StoredTypeRoute("/fhir/{resource_type}/{resource_id}/_history/{version_id}", read),
]
"""Mounted first by the composition root (saf.app)."""
