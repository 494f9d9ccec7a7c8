"""DICOMweb (PS3.18) under /dicomweb: QIDO-RS search, WADO-RS retrieve, STOW-RS store.

One module per service, as PS3.18 names them: `qido` (search, matched by saf.query, the
one matcher C-FIND uses too), `wado` (instances as stored, metadata, frames),
`rendered` (rendered images and thumbnails), `stow` (store, through saf.ingest, the one
ingest path); `common` holds what they share and `cors` the browser access.

Every route resolves the caller (saf.deps), asks saf.tenancy what it may see and writes
an audit record; another tenant's study answers 404 exactly like a missing one. Study,
series and instance path segments are DICOM UIDs, as the standard has them.

Choices written down:

- QIDO-RS answers from the index (never from blobs), through saf.query: the attributes
  the index holds are the ones returned (`includefield` adds what the index has; unknown
  fields are ignored). Matching is PS3.4 C.2.2.2's, as for C-FIND: a PatientName value
  without wildcards matches the whole name, case-insensitively. No match answers 200
  with ``[]`` (dicomweb-client and OHIF accept both that and 204).
- WADO-RS retrieve streams the original stored Part 10 bytes, decrypted chunk by
  chunk (saf.vault.read), one part per instance; only the newest version of an
  instance is served. A request for a specific transfer syntax other than the stored
  one answers 406: the hub does not transcode.
- Metadata (DICOM JSON, saf.dicomjson: pydicom's, element for element) is served from
  the index: table instance_metadata holds each instance's JSON, zlib-compressed and
  sealed (saf.instance_metadata). The worker makes the rows when the study completes,
  from the read that renders its thumbnails; an instance without a row gets it made
  from its blob, stored and served by the first request. A study's rows come in one
  query and are joined as bytes (no JSON parsed); gzip when asked. There is no
  in-memory cache: the table answers 1,000 instances in tens of milliseconds.
- Binary values over 768 bytes, Pixel Data among them, are BulkDataURIs to
  `.../instances/{sop}/bulkdata/{tag path}` (``7FE00010``; ``SSSSEEEE/item/tag`` inside
  a sequence, items from 0), served from the stored object as multipart/related (or
  the bare bytes when only application/octet-stream is accepted), one byte range
  honoured (206).
- STOW-RS spools each part to a private file and hands it to saf.ingest.ingest_part10,
  the one ingest path; the answer lists only what ingest committed.
"""

from __future__ import annotations

from fastapi import APIRouter

from dicom_node.dicomweb.common import PREFIX, _newest, _newest_version, _Stored
from dicom_node.dicomweb.cors import DicomwebCORS, cors_origins
from dicom_node.dicomweb.qido import router as qido_router
from dicom_node.dicomweb.rendered import router as rendered_router
from dicom_node.dicomweb.stow import router as stow_router
from dicom_node.dicomweb.wado import router as wado_router

router = APIRouter(prefix=PREFIX, tags=["dicomweb"])
router.include_router(qido_router)
router.include_router(wado_router)
router.include_router(rendered_router)
router.include_router(stow_router)

__all__ = [
    "PREFIX",
    "DicomwebCORS",
    "_Stored",
    "_newest",
    "_newest_version",
    "cors_origins",
    "router",
]
