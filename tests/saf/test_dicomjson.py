"""saf.dicomjson: pydicom's DICOM JSON with bulk values as BulkDataURIs by tag path, and
back from a tag path to the value; saf.crypto.seal_bytes, which seals the stored JSON."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from saf.crypto import IntegrityError, KeyRing, bytes_key_id, open_bytes, reseal_bytes, seal_bytes
from saf.dicomjson import (
    BULK_DATA_MIN,
    TagPathError,
    bulk_value,
    pixel_data_entry,
    to_json,
)
from tests.factories import make_study


def _uri(path: str) -> str:
    return f"https://hub/bulk/{path}"


def _dataset_with_bulk_values() -> Dataset:
    ds = Dataset()
    ds.PatientName = "DOE^JANE"
    ds.Rows = 2
    ds.add_new(0x00291010, "OB", b"\x01" * BULK_DATA_MIN)  # at the threshold: inline
    ds.add_new(0x00291011, "OB", b"\x02" * (BULK_DATA_MIN + 2))  # over it: a URI
    item = Dataset()
    item.add_new(0x00091001, "OB", b"\x03" * 4000)
    item.ReferencedSOPInstanceUID = "1.2.3"
    ds.add_new(0x00291020, "SQ", Sequence([Dataset(), item]))
    ds.add_new(0x00291030, "SQ", Sequence([]))
    return ds


def test_json_is_pydicoms_with_uris_by_tag_path() -> None:
    ds = _dataset_with_bulk_values()

    item = to_json(ds, _uri)

    assert item["00100010"] == {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]}
    assert item["00280010"] == {"vr": "US", "Value": [2]}
    assert "InlineBinary" in item["00291010"]
    assert item["00291011"] == {"vr": "OB", "BulkDataURI": _uri("00291011")}
    nested = item["00291020"]["Value"][1]
    assert nested["00091001"] == {"vr": "OB", "BulkDataURI": _uri("00291020/1/00091001")}
    assert nested["00081155"] == {"vr": "UI", "Value": ["1.2.3"]}
    assert item["00291020"]["Value"][0] == {}
    assert item["00291030"] == {"vr": "SQ", "Value": []}
    # exactly pydicom's, whose handler cannot tell where a nested value is
    flat = ds.to_json_dict(bulk_data_threshold=1024, bulk_data_element_handler=lambda e: "x")
    assert set(flat) == set(item)
    assert flat["00100010"] == item["00100010"]


def test_a_tag_path_names_the_value_back() -> None:
    ds = _dataset_with_bulk_values()

    assert bulk_value(ds, "00291011") == b"\x02" * (BULK_DATA_MIN + 2)
    assert bulk_value(ds, "00291020/1/00091001") == b"\x03" * 4000
    for bad in ("00291020/5/00091001", "00291020/x/00091001", "00100010", "0029", "00291020/1"):
        with pytest.raises(TagPathError):
            bulk_value(ds, bad)


def test_stored_pixel_data_is_a_uri(tmp_path: Path) -> None:
    [path] = make_study(tmp_path, count=1)
    ds = dcmread(path)

    item = to_json(ds, _uri)

    assert item["7FE00010"] == {"vr": "OW", "BulkDataURI": _uri("7FE00010")}
    assert bulk_value(ds, "7FE00010") == ds.PixelData


def test_pixel_data_described_from_its_element_header() -> None:
    explicit = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF)
    implicit = struct.pack("<HHL", 0x7FE0, 0x0010, 8192)
    big = struct.pack(">HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 8192)
    other = struct.pack("<HH2sHL", 0x0008, 0x0016, b"UI", 0, 0)

    def entry(head: bytes, little: bool = True, implicit_vr: bool = False) -> object:
        return pixel_data_entry(head, little_endian=little, implicit_vr=implicit_vr, bulk_uri=_uri)

    assert entry(explicit) == ("7FE00010", {"vr": "OB", "BulkDataURI": _uri("7FE00010")})
    assert entry(implicit, implicit_vr=True) == (
        "7FE00010",
        {"vr": "OW", "BulkDataURI": _uri("7FE00010")},
    )
    assert entry(big, little=False) == ("7FE00010", {"vr": "OW", "BulkDataURI": _uri("7FE00010")})
    assert entry(other) is None
    assert entry(b"") is None


def test_sealed_bytes_open_only_in_their_context_and_reseal(tmp_path: Path) -> None:
    keyring = KeyRing.create(tmp_path / "keys.json")
    sealed = seal_bytes(keyring, b"PHI json", context="instance_metadata:a")

    assert b"PHI" not in sealed
    assert open_bytes(keyring, sealed, context="instance_metadata:a") == b"PHI json"
    with pytest.raises(IntegrityError):
        open_bytes(keyring, sealed, context="instance_metadata:b")  # another row's
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(IntegrityError):
        open_bytes(keyring, tampered, context="instance_metadata:a")
    with pytest.raises(IntegrityError):
        open_bytes(keyring, b"not sealed", context="instance_metadata:a")
    first = bytes_key_id(sealed)
    assert reseal_bytes(keyring, sealed, context="instance_metadata:a") == sealed
    new = keyring.rotate()
    resealed = reseal_bytes(keyring, sealed, context="instance_metadata:a")
    assert bytes_key_id(resealed) == new != first
    assert open_bytes(keyring, resealed, context="instance_metadata:a") == b"PHI json"
