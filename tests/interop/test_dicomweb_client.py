"""The real `dicomweb-client` (Python) against the hub's /dicomweb on a real uvicorn server:
search, retrieve instance/metadata/frames/rendered, and store instances."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import uvicorn
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.dataset import Dataset

from saf.app import create_app
from saf.hub import Hub
from saf.ingest import ingest_part10
from tests.factories import login_as, make_clinic, make_study
from tests.interop.conftest import free_port


@dataclass
class Served:
    url: str
    client: DICOMwebClient
    """Clinic A's clinician's client."""
    other: DICOMwebClient
    """Clinic B's clinician's client."""
    files: list[Path]
    """Clinic A's CT, already stored."""


@pytest.fixture
def served(hub: Hub, tmp_path: Path) -> Iterator[Served]:
    """The hub's app on a real uvicorn server in a thread, and logged-in clients."""
    sender = make_clinic(hub, "Clinic A", "MODALITY_A")
    make_clinic(hub, "Clinic B", "MODALITY_B")
    files = make_study(tmp_path / "ct", "ct", count=3, seed=5, patient_name="ALPHA^ANNA")
    for path in files:
        ingest_part10(hub, path, sender)
    app = create_app(hub)
    with TestClient(app) as client:
        headers_a = login_as(client, "clinician", username="anna", clinic="Clinic A")
        headers_b = login_as(client, "clinician", username="bert", clinic="Clinic B")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/dicomweb"
    try:
        yield Served(
            url,
            DICOMwebClient(url=url, headers=headers_a),
            DICOMwebClient(url=url, headers=headers_b),
            files,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def uids(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def encoded(ds: Dataset) -> bytes:
    """The dataset as a Part 10 byte string (what the client received, re-serialised)."""
    from io import BytesIO

    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_search(served: Served) -> None:
    study, series, sop = uids(served.files[0])

    studies = served.client.search_for_studies(search_filters={"PatientName": "alpha*"})
    in_study = served.client.search_for_series(study)
    instances = served.client.search_for_instances(study, series)
    nothing = served.other.search_for_studies()

    assert [Dataset.from_json(s).StudyInstanceUID for s in studies] == [study]
    assert [Dataset.from_json(s).SeriesInstanceUID for s in in_study] == [series]
    assert sorted(Dataset.from_json(i).SOPInstanceUID for i in instances) == sorted(
        uids(p)[2] for p in served.files
    )
    assert sop in {Dataset.from_json(i).SOPInstanceUID for i in instances}
    assert nothing == []


def test_retrieve_instance_is_byte_identical(served: Served) -> None:
    study, series, sop = uids(served.files[0])

    ds = served.client.retrieve_instance(study, series, sop)
    response = requests.get(
        f"{served.url}/studies/{study}/series/{series}/instances/{sop}",
        headers={
            **served.client._session.headers,
            "Accept": 'multipart/related; type="application/dicom"',
        },
        timeout=30,
    )

    assert ds.SOPInstanceUID == sop
    assert ds.PixelData == dcmread(served.files[0]).PixelData
    # the raw part, as the hub sent it, is the stored file byte for byte
    assert served.files[0].read_bytes() in response.content
    with pytest.raises(requests.HTTPError) as refused:
        served.other.retrieve_instance(study, series, sop)
    assert refused.value.response.status_code == 404


def test_retrieve_metadata_frames_and_rendered(served: Served) -> None:
    study, series, sop = uids(served.files[1])

    metadata = served.client.retrieve_study_metadata(study)
    [frame] = served.client.retrieve_instance_frames(study, series, sop, frame_numbers=[1])
    jpeg = served.client.retrieve_instance_rendered(study, series, sop, media_types=("image/jpeg",))
    png = served.client.retrieve_instance_rendered(
        study, series, sop, media_types=("image/png",), params={"viewport": "32,32"}
    )

    assert len(metadata) == 3
    first = Dataset.from_json(metadata[0])
    assert str(first.PatientName) == "ALPHA^ANNA"
    assert set(metadata[0]["7FE00010"]) == {"vr", "BulkDataURI"}  # never inline
    assert frame == dcmread(served.files[1]).PixelData
    assert jpeg[:2] == b"\xff\xd8"
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bulk_data_uris_of_metadata_retrieve_the_values(served: Served) -> None:
    """The client follows each BulkDataURI of the metadata (whole and by byte range) and
    builds the dataset back with pydicom's bulk data handler."""
    study, series, sop = uids(served.files[0])
    stored = dcmread(served.files[0])

    item = served.client.retrieve_instance_metadata(study, series, sop)  # the one item
    # dicomweb-client sends `Host: 127.0.0.1` without the port, and the hub (no public
    # URL configured) builds absolute URIs from the Host header: put the port back.
    uri = item["7FE00010"]["BulkDataURI"].replace("//127.0.0.1/", f"//{served.url.split('/')[2]}/")
    [whole] = served.client.retrieve_bulkdata(uri)
    [ranged] = served.client.retrieve_bulkdata(uri, byte_range=(100, 199))
    ds = Dataset.from_json(
        {**item, "7FE00010": {**item["7FE00010"], "BulkDataURI": uri}},
        lambda _tag, _vr, url: served.client.retrieve_bulkdata(url)[0],
    )

    assert uri.startswith(f"{served.url}/studies/{study}/series/{series}/instances/{sop}/bulkdata/")
    assert whole == stored.PixelData
    assert ranged == stored.PixelData[100:200]
    assert bytes(ds.PixelData) == stored.PixelData and ds.PatientName == stored.PatientName
    with pytest.raises(requests.HTTPError) as refused:
        served.other.retrieve_bulkdata(uri)
    assert refused.value.response.status_code == 404


def test_store_instances_then_found_and_retrieved_identically(
    served: Served, tmp_path: Path
) -> None:
    files = make_study(tmp_path / "new", "mr", count=2, seed=8, patient_id="NEW1")
    datasets = [dcmread(p) for p in files]
    study, series, _ = uids(files[0])

    result = served.client.store_instances(datasets)
    found = served.client.search_for_instances(study, series)
    retrieved = served.client.retrieve_series(study, series)

    assert sorted(str(item.ReferencedSOPInstanceUID) for item in result.ReferencedSOPSequence) == (
        sorted(str(ds.SOPInstanceUID) for ds in datasets)
    )
    assert "FailedSOPSequence" not in result
    assert len(found) == 2
    sent = {str(ds.SOPInstanceUID): encoded(ds) for ds in datasets}
    assert {str(ds.SOPInstanceUID): encoded(ds) for ds in retrieved} == sent
    assert served.other.search_for_studies(search_filters={"StudyInstanceUID": study}) == []
