"""FHIR R4 REST API at /fhir (fhir_api.routes.router): resources, search, history, metadata."""
