"""DICOM JSON (PS3.18 F.2) of a dataset, large binary values as BulkDataURIs, and back to
the values those URIs name.

The JSON is pydicom's (`DataElement.to_json_dict`, element by element); this module only
walks sequences itself so that each bulk value's handler knows where the value is: its
*tag path*, ``7FE00010`` at the top level, ``00291010/0/00091001`` for an element of
the first item (0-based, as Orthanc numbers them) of a sequence.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any, Final

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

BULK_DATA_MIN: Final = 768
"""Binary values longer than this (bytes) are a BulkDataURI; shorter ones InlineBinary."""

PIXEL_TAGS: Final = (0x7FE00008, 0x7FE00009, 0x7FE00010)
"""Float Pixel Data, Double Float Pixel Data, Pixel Data: what stop_before_pixels skips."""

BulkURI = Callable[[str], str]
"""Makes the BulkDataURI of a value from its tag path."""


class TagPathError(ValueError):
    """A bulk data tag path that is malformed or names no binary value of the dataset."""


def to_json(ds: Dataset, bulk_uri: BulkURI) -> dict[str, Any]:
    """The dataset as DICOM JSON, as pydicom makes it, with every binary value longer than
    BULK_DATA_MIN replaced by ``{"vr": ..., "BulkDataURI": bulk_uri(tag_path)}``."""
    return _dataset(ds, "", bulk_uri)


def encode(item: dict[str, Any]) -> bytes:
    """Compact JSON bytes (no spaces), as the metadata answers send them."""
    return json.dumps(item, separators=(",", ":")).encode()


def _dataset(ds: Dataset, prefix: str, bulk_uri: BulkURI) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # keys(), not iteration: the element is converted when it is asked for, once
    for tag in ds.keys():  # noqa: SIM118
        key = f"{int(tag):08X}"
        elem = ds[tag]
        if elem.VR == "SQ":
            items = [
                _dataset(item, f"{prefix}{key}/{index}/", bulk_uri)
                for index, item in enumerate(elem.value or [])
            ]
            out[key] = {"vr": "SQ", "Value": items}
        else:
            path = prefix + key
            out[key] = elem.to_json_dict(_handler(bulk_uri, path), BULK_DATA_MIN * 4 // 3)
    return out


def _handler(bulk_uri: BulkURI, path: str) -> Callable[[DataElement], str]:
    return lambda _elem: bulk_uri(path)


def pixel_data_entry(
    head: bytes, *, little_endian: bool, implicit_vr: bool, bulk_uri: BulkURI
) -> tuple[str, dict[str, Any]] | None:
    """The JSON entry of the pixel data element whose header starts `head` (where a parse
    with stop_before_pixels stopped), read from its header alone: the value itself may be
    gigabytes and is never read for metadata. None when `head` is not such a header."""
    if len(head) < 8:
        return None
    order = "<" if little_endian else ">"
    group, element = struct.unpack(order + "HH", head[:4])
    tag = group << 16 | element
    if tag not in PIXEL_TAGS:
        return None
    if implicit_vr:
        (length,) = struct.unpack(order + "L", head[4:8])
        vr = dictionary_VR(tag).split(" or ")[-1]  # OB or OW: implicit VR is OW (PS3.5 A.1)
    else:
        vr = head[4:6].decode("ascii", "replace")
        if len(head) < 12:
            return None
        (length,) = struct.unpack(order + "L", head[8:12])
    key = f"{tag:08X}"
    if length == 0:
        return key, {"vr": vr}
    return key, {"vr": vr, "BulkDataURI": bulk_uri(key)}


def bulk_value(ds: Dataset, path: str) -> bytes:
    """The value at a tag path (see the module docstring), as stored; TagPathError when the
    path is malformed or names no binary value of `ds`."""
    parts = path.strip("/").split("/")
    if len(parts) % 2 != 1:
        raise TagPathError(f"tag path {path!r}: expected tag[/item/tag...]")
    current = ds
    try:
        for seq_key, index in zip(parts[:-2:2], parts[1:-1:2], strict=True):
            seq = current[int(seq_key, 16)]
            if seq.VR != "SQ":
                raise TagPathError(f"tag path {path!r}: {seq_key} is not a sequence")
            current = seq.value[int(index)]
        elem = current[int(parts[-1], 16)]
    except (KeyError, IndexError, ValueError) as exc:
        if isinstance(exc, TagPathError):
            raise
        raise TagPathError(f"tag path {path!r} names nothing in this instance") from None
    value = elem.value
    if not isinstance(value, bytes | bytearray):
        raise TagPathError(f"tag path {path!r} is not a binary value")
    return bytes(value)
