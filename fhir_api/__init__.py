"""FHIR R4 REST API (referrals, documents, MHD recipient); built in a later issue."""
