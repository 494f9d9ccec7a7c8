"""The rules of a DICOM AE title (PS3.5, VR AE), checked in one place."""

from __future__ import annotations


def check_ae_title(value: str) -> str:
    """The AE title without padding; ValueError if it is not 1-16 printable chars, no '\\'."""
    stripped = value.strip()
    if not 1 <= len(stripped) <= 16 or "\\" in stripped or not stripped.isprintable():
        raise ValueError(f"invalid AE title {value!r}: 1-16 printable characters, no backslash")
    return stripped
