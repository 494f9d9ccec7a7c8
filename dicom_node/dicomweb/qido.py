"""QIDO-RS: search for studies, series and instances (PS3.18 10.6), matched by saf.query.

The request's query parameters become a C-FIND identifier at the resource's level
(``/studies`` STUDY, ``/series`` SERIES, ``/instances`` IMAGE, across studies when the
path names none) and saf.query matches it, as it does for C-FIND: the same keys, the
same wildcards, ranges, UID lists, PatientName rule and newest-version rule, on the same
tenancy layer. This module only translates: parameters in, DICOM JSON out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

from fastapi import APIRouter, HTTPException, Request, Response
from pydicom import config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from dicom_node.dicomweb.common import (
    Search,
    _audit,
    _base_url,
    _json_response,
    _not_found,
    _studies_by_uid,
)
from saf import tenancy
from saf.deps import HubDep
from saf.hub import Hub
from saf.identity import Principal
from saf.models import Series, Study
from saf.query import KEYS, LEVELS, Level, QueryError, find

router = APIRouter()

QIDO_LIMIT_MAX: Final = 5000
"""Most results one QIDO-RS answer holds; ask for more with `offset`."""

STUDY_FIELDS: Final = (
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ModalitiesInStudy",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
"""Study-level return attributes (PS3.18 Table 10.6.3-3), those the index holds."""
SERIES_FIELDS: Final = (
    "Modality",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
)
"""Series-level return attributes (PS3.18 Table 10.6.3-4), those the index holds."""
INSTANCE_FIELDS: Final = (
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "AvailableTransferSyntaxUID",
)
"""Instance-level return attributes (PS3.18 Table 10.6.3-5), those the index holds."""

_RETURNED: Final[dict[Level, tuple[str, ...]]] = {
    "STUDY": STUDY_FIELDS,
    "SERIES": SERIES_FIELDS,
    "IMAGE": INSTANCE_FIELDS,
}
_OPTIONAL: Final[dict[Level, tuple[str, ...]]] = {
    "STUDY": ("StudyDescription",),
    "SERIES": ("BodyPartExamined",),
    "IMAGE": (),
}
"""What ``includefield=all`` adds at each level."""

_LISTS: Final = frozenset({"Modality", "ModalitiesInStudy"})
"""Non-UID keys that take a list of values (``CT,MR``), as saf.query allows."""

_LEVEL_NAMES: Final[dict[Level, str]] = {
    "PATIENT": "Patient",
    "STUDY": "Study",
    "SERIES": "Series",
    "IMAGE": "Instance",
}

_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")
_QUERY_RETRIEVE_ATTRIBUTES: Final = ("00080052", "00080054", "00080005")
"""QueryRetrieveLevel, RetrieveAETitle, SpecificCharacterSet: C-FIND's, not QIDO-RS's
(the JSON is UTF-8 by definition)."""
_RETRIEVE_URL: Final = "00081190"
_MORE: Final = '299 saf "There are additional results that can be requested"'


@dataclass
class _Search:
    """A QIDO-RS request's query parameters, sorted out."""

    matching: dict[str, list[str]] = field(default_factory=dict)
    """Matching keys (keywords) and their values (more than one for a list)."""
    include: list[str] = field(default_factory=list)
    include_all: bool = False
    limit: int = QIDO_LIMIT_MAX
    offset: int = 0
    warnings: list[str] = field(default_factory=list)


def _keyword(key: str) -> str | None:
    """The keyword of a parameter given as keyword or tag (``0020000D``); None if unknown."""
    if _TAG.match(key):
        return keyword_for_tag(int(key, 16)) or None
    return key if tag_for_keyword(key) is not None else None


def _params(request: Request, level: Level) -> _Search:
    search = _Search()
    allowed = LEVELS[: LEVELS.index(level) + 1]
    for key, value in request.query_params.multi_items():
        if key == "includefield":
            for item in (v.strip() for v in value.split(",")):
                if item == "all":
                    search.include_all = True
                elif (keyword := _keyword(item)) is not None and keyword in KEYS:
                    search.include.append(keyword)  # others: nothing the index holds
        elif key in ("limit", "offset"):
            if not value.isdigit():
                raise HTTPException(400, f"{key} must be a non-negative integer")
            if key == "limit":
                search.limit = min(int(value), QIDO_LIMIT_MAX) or QIDO_LIMIT_MAX
            else:
                search.offset = int(value)
        elif key == "fuzzymatching":
            if value.lower() == "true":
                search.warnings.append(
                    '299 saf "fuzzymatching is not supported; matching is exact"'
                )
        else:
            keyword = _keyword(key)
            spec = KEYS.get(keyword) if keyword is not None else None
            if spec is None or keyword is None or keyword.startswith("NumberOf"):
                search.warnings.append(f'299 saf "the attribute {key[:64]} is not supported"')
            elif spec.level not in allowed:
                search.warnings.append(
                    f'299 saf "{keyword} is not a key of {_LEVEL_NAMES[level]} searches"'
                )
            elif keyword in _LISTS or dictionary_VR(keyword) == "UI":
                # PS3.18 8.3.4.1 separates a list with commas; PS3.4 with backslashes.
                search.matching[keyword] = [v for v in re.split(r"[,\\]", value) if v.strip()]
            else:
                search.matching[keyword] = [value]
    return search


def _fields(level: Level, top: Level, search: _Search) -> list[str]:
    """Return keys: those of the levels from `top` down to `level`, plus includefield."""
    levels = LEVELS[LEVELS.index(top) : LEVELS.index(level) + 1]
    fields = [f for lv in levels if lv != "PATIENT" for f in _RETURNED[lv]]
    if search.include_all:
        fields += [f for lv in levels if lv != "PATIENT" for f in _OPTIONAL[lv]]
    allowed = LEVELS[: LEVELS.index(level) + 1]
    fields += [k for k in search.include if KEYS[k].level in allowed]
    return list(dict.fromkeys(fields))


def _element(keyword: str, value: Any) -> DataElement:
    # Validation is saf.query's: it answers a bad value with a QueryError, not pydicom's warning.
    tag = tag_for_keyword(keyword)
    assert tag is not None  # keywords here come from saf.query.KEYS, all in the dictionary
    return DataElement(tag, dictionary_VR(tag), value, validation_mode=config.IGNORE)


def _identifier(level: Level, fields: list[str], matching: dict[str, list[str]]) -> Dataset:
    """The C-FIND identifier of a search: matching keys with values, return keys empty."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    try:
        for keyword in fields:
            ds.add(_element(keyword, None))
        for keyword, values in matching.items():
            ds.add(_element(keyword, values if len(values) > 1 else values[0]))
    except (ValueError, TypeError, OverflowError) as exc:
        raise HTTPException(400, f"a query value is not valid: {exc}") from None
    return ds


def _retrieve_url(base: str, ds: Dataset, level: Level) -> str:
    url = f"{base}/studies/{ds.StudyInstanceUID}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{ds.SeriesInstanceUID}"
    if level == "IMAGE":
        url += f"/instances/{ds.SOPInstanceUID}"
    return url


def _json(ds: Dataset, base: str, level: Level) -> dict[str, Any]:
    """An answer as DICOM JSON (PS3.18 F.2), with its RetrieveURL."""
    item = ds.to_json_dict()
    for tag in _QUERY_RETRIEVE_ATTRIBUTES:
        item.pop(tag, None)
    item[_RETRIEVE_URL] = {"vr": "UR", "Value": [_retrieve_url(base, ds, level)]}
    return dict(sorted(item.items()))


def _search(
    request: Request,
    hub: Hub,
    caller: Principal,
    level: Level,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> Response:
    search = _params(request, level)
    top: Level = "IMAGE" if series_uid else "SERIES" if study_uid else "STUDY"
    fields = _fields(level, top, search)
    # The UIDs a RetrieveURL is made of are always asked for.
    uids = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    fields += [k for k in uids[: LEVELS.index(level)] if k not in fields]
    matching = dict(search.matching)
    if study_uid is not None:
        matching["StudyInstanceUID"] = [study_uid]
    if series_uid is not None:
        matching["SeriesInstanceUID"] = [series_uid]
    with hub.sessions() as session:
        if study_uid is not None and not _studies_by_uid(session, caller, study_uid):
            _not_found(hub, "search", caller, "Study", study_uid)
        if series_uid is not None and (
            session.scalar(
                tenancy.visible_series(caller)
                .join(Study, Study.id == Series.study_pk)
                .where(
                    Study.study_instance_uid == study_uid,
                    Series.series_instance_uid == series_uid,
                )
                .limit(1)
            )
            is None
        ):
            _not_found(hub, "search", caller, "Series", series_uid)
    try:
        result = find(
            hub,
            caller,
            _identifier(level, fields, matching),
            "study",
            limit=search.limit,
            offset=search.offset,
        )
    except QueryError as exc:
        raise HTTPException(400, exc.message) from None
    base = _base_url(request)
    items = [_json(ds, base, level) for ds in result.identifiers]
    if result.truncated:
        search.warnings.append(_MORE)
    name = _LEVEL_NAMES[level]
    scope = {"STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}[level]
    _audit(hub, "search", caller, name, None, detail=f"QIDO-RS {scope}: {len(items)} results")
    response = _json_response(request, items)
    for warning in search.warnings:
        response.headers.append("Warning", warning)
    return response


@router.get("/studies")
def search_studies(request: Request, caller: Search, hub: HubDep) -> Response:
    """QIDO-RS: search for studies."""
    return _search(request, hub, caller, "STUDY")


@router.get("/series")
def search_all_series(request: Request, caller: Search, hub: HubDep) -> Response:
    """QIDO-RS: search for series of any study."""
    return _search(request, hub, caller, "SERIES")


@router.get("/instances")
def search_all_instances(request: Request, caller: Search, hub: HubDep) -> Response:
    """QIDO-RS: search for instances of any study."""
    return _search(request, hub, caller, "IMAGE")


@router.get("/studies/{study}/series")
def search_series(study: str, request: Request, caller: Search, hub: HubDep) -> Response:
    """QIDO-RS: search for the series of a study."""
    return _search(request, hub, caller, "SERIES", study)


@router.get("/studies/{study}/instances")
def search_study_instances(study: str, request: Request, caller: Search, hub: HubDep) -> Response:
    """QIDO-RS: search for the instances of a study."""
    return _search(request, hub, caller, "IMAGE", study)


@router.get("/studies/{study}/series/{series}/instances")
def search_instances(
    study: str, series: str, request: Request, caller: Search, hub: HubDep
) -> Response:
    """QIDO-RS: search for the instances of a series."""
    return _search(request, hub, caller, "IMAGE", study, series)
