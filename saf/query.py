"""Query matching on the index: a DICOM identifier in, matching identifiers (or instances) out.

Used by C-FIND, C-MOVE and C-GET (dicom_node.qr) and by QIDO-RS (dicom_node.dicomweb.qido):
one matcher. It reads the index only (never a blob) and every query starts from
saf.tenancy, so a caller sees its own rows and nothing else. Queries are relational at
every level (keys of the levels above the query level narrow it, as QIDO-RS's
``/series`` and ``/instances`` need and C-FIND's relational queries allow), and answers
carry the computed counts of every level they reach.

Matching (PS3.4 C.2.2.2): single value, wildcard (``*``, ``?``), range for dates and
times (``20240101-20240131``, ``-20240131``, ``20240101-``), a list of UIDs (and of
Modality / ModalitiesInStudy values, backslash-separated) and universal matching (an
empty value). Matching is case-sensitive, as the standard asks, except PatientName,
which is case-insensitive, as PACS do; a PatientName without wildcards matches the whole
name (trailing empty components aside), not one of its components. SQL's LIKE is
case-insensitive on SQLite and not on PostgreSQL, so every row SQL returns is checked
again here; both databases give the same answer.

PatientName and PatientBirthDate are sealed in the index (saf.crypto.seal_value), so
SQL cannot match them: the other keys narrow the rows in SQL, then the patient's values
are opened and matched here, each patient once. At most MAX_SCANNED rows are looked at
that way; a query that needs more is refused (0xA700) and should add a key.

Only the newest version of an instance counts (as everywhere in saf): instance rows
with a newer version at the same clinic are left out of matches and counts.
"""

from __future__ import annotations

import functools
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import ColumnElement, Select, and_, exists, func, select
from sqlalchemy.orm import InstrumentedAttribute, Session, aliased

from saf.crypto import CryptoError, open_value
from saf.hub import Hub
from saf.identity import Principal
from saf.models import Instance, Patient, Series, Study
from saf.tenancy import visible_instances, visible_patients, visible_series, visible_studies

log = logging.getLogger(__name__)

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
Model = Literal["patient", "study"]

LEVELS: Final[tuple[Level, ...]] = ("PATIENT", "STUDY", "SERIES", "IMAGE")
"""Query/retrieve levels, top down."""

MAX_MATCHES: Final = 10_000
"""Most identifiers one query returns; more are cut (and the caller is told)."""

MAX_SCANNED: Final = 50_000
"""Most rows a query matching a sealed key (PatientName, PatientBirthDate) may open."""

CHARACTER_SET: Final = "ISO_IR 192"
"""Responses are UTF-8: the index holds text as received, decoded."""

IDENTIFIER_MISMATCH: Final = 0xA900
"""C-FIND/MOVE/GET "Identifier does not match SOP Class" (PS3.4 C.4)."""

OUT_OF_RESOURCES: Final = 0xA700


class QueryError(Exception):
    """A query that cannot be answered; `status` is the DIMSE status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------- matchers


@dataclass(frozen=True)
class Matcher:
    """One key's matching condition, parsed from its value in the identifier."""

    kind: Literal["single", "wildcard", "range", "list"]
    values: tuple[str, ...] = ()
    low: str | None = None
    high: str | None = None
    fold_case: bool = False

    def test(self, value: str | None) -> bool:
        """Whether a stored value matches (None/empty matches nothing but universal)."""
        if value is None or value == "":
            return False
        if self.fold_case:
            value = _norm_pn(value).upper()
        if self.kind == "single":
            return value == self.values[0]
        if self.kind == "list":
            return value in self.values
        if self.kind == "wildcard":
            return _wildcard_regex(self.values[0]).fullmatch(value) is not None
        low, high = self.low, self.high
        return (low is None or value >= low) and (high is None or value <= high)


def _norm_pn(value: str) -> str:
    """A person name without trailing empty components (``DOE^JOHN^^`` is ``DOE^JOHN``)."""
    return "=".join(group.rstrip("^ ") for group in value.split("=")).rstrip("=")


def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    parts = ("." if ch == "?" else ".*" if ch == "*" else re.escape(ch) for ch in pattern)
    return re.compile("".join(parts), re.DOTALL)


def _like(pattern: str) -> str:
    """A DICOM wildcard as an SQL LIKE pattern (escape character ``\\``)."""
    out = []
    for ch in pattern:
        if ch in "%_\\":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def _pad_time(value: str, fill: str) -> str:
    """HH[MM[SS[.F]]] padded for comparison as text (fill "0" for a lower bound, "9" upper)."""
    value = value.replace(":", "")
    main, _, fraction = value.partition(".")
    main = main.ljust(6, "0" if fill == "0" else "9")
    if fill == "9":
        main = main[:2] + min(main[2:4], "59") + min(main[4:6], "59")
        return f"{main}.{fraction.ljust(6, '9')}"
    return f"{main}.{fraction}" if fraction else main


_DATE: Final = re.compile(r"\d{8}|\d{8}-|-\d{8}|\d{8}-\d{8}")
"""A DA matching value: a date or a range of dates (PS3.4 C.2.2.2.5)."""


def parse_matcher(values: Sequence[str], vr: str, *, allow_list: bool = False) -> Matcher | None:
    """The matcher for a key's value(s); None for universal matching (empty value).

    Raises QueryError for a value that is not a valid matching expression.
    """
    values = tuple(v.strip() for v in values if v is not None)
    values = tuple(v for v in values if v)
    if not values or (len(values) == 1 and values[0] == "*" and vr != "UI"):
        return None
    if len(values) > 1:
        if not allow_list:
            raise QueryError(IDENTIFIER_MISMATCH, f"a {vr} key takes one value, not a list")
        return Matcher("list", values)
    value = values[0]
    if vr == "DA" and not _DATE.fullmatch(value):
        raise QueryError(IDENTIFIER_MISMATCH, f"date {value!r}: use YYYYMMDD or a range of them")
    if vr in ("DA", "TM", "DT") and "-" in value:
        low, _, high = value.partition("-")
        if not low and not high:
            raise QueryError(IDENTIFIER_MISMATCH, f"empty range {value!r}")
        if vr == "TM":
            return Matcher(
                "range", low=_pad_time(low, "0") if low else None,
                high=_pad_time(high, "9") if high else None,
            )  # fmt: skip
        return Matcher("range", low=low or None, high=high or None)
    if vr == "PN":
        name = _norm_pn(value).upper()
        kind: Literal["single", "wildcard"] = (
            "wildcard" if any(c in name for c in "*?") else "single"
        )
        return Matcher(kind, (name,), fold_case=True)
    if vr not in ("UI", "IS", "US", "DA", "TM") and any(c in value for c in "*?"):
        return Matcher("wildcard", (value,))
    return Matcher("single", (value,))


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True)
class Key:
    """A DICOM attribute the index can match and/or return."""

    level: Level
    column: InstrumentedAttribute[Any] | None = None
    """Index column; None for sealed or computed values."""
    kind: Literal["text", "int", "sealed", "computed"] = "text"


KEYS: Final[dict[str, Key]] = {
    "PatientID": Key("PATIENT", Patient.patient_id),
    "PatientName": Key("PATIENT", kind="sealed"),
    "PatientBirthDate": Key("PATIENT", kind="sealed"),
    "PatientSex": Key("PATIENT", Patient.sex),
    "NumberOfPatientRelatedStudies": Key("PATIENT", kind="computed"),
    "NumberOfPatientRelatedSeries": Key("PATIENT", kind="computed"),
    "NumberOfPatientRelatedInstances": Key("PATIENT", kind="computed"),
    "StudyInstanceUID": Key("STUDY", Study.study_instance_uid),
    "StudyDate": Key("STUDY", Study.study_date),
    "StudyTime": Key("STUDY", Study.study_time),
    "AccessionNumber": Key("STUDY", Study.accession_number),
    "StudyID": Key("STUDY", Study.study_id),
    "StudyDescription": Key("STUDY", Study.study_description),
    "ModalitiesInStudy": Key("STUDY", kind="computed"),
    "NumberOfStudyRelatedSeries": Key("STUDY", kind="computed"),
    "NumberOfStudyRelatedInstances": Key("STUDY", kind="computed"),
    "SeriesInstanceUID": Key("SERIES", Series.series_instance_uid),
    "Modality": Key("SERIES", Series.modality),
    "SeriesNumber": Key("SERIES", Series.series_number, "int"),
    "SeriesDescription": Key("SERIES", Series.series_description),
    "BodyPartExamined": Key("SERIES", Series.body_part_examined),
    "NumberOfSeriesRelatedInstances": Key("SERIES", kind="computed"),
    "SOPInstanceUID": Key("IMAGE", Instance.sop_instance_uid),
    "SOPClassUID": Key("IMAGE", Instance.sop_class_uid),
    "InstanceNumber": Key("IMAGE", Instance.instance_number, "int"),
    "Rows": Key("IMAGE", Instance.rows, "int"),
    "Columns": Key("IMAGE", Instance.columns, "int"),
    "NumberOfFrames": Key("IMAGE", Instance.number_of_frames, "int"),
    "AvailableTransferSyntaxUID": Key("IMAGE", Instance.transfer_syntax_uid),
}
"""Attributes the index answers; any other requested attribute comes back empty."""

UNIQUE_KEYS: Final[dict[Level, str]] = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}

_LIST_KEYS = frozenset({"Modality", "ModalitiesInStudy"})
"""Non-UID keys that take a list of values (as modality pickers send them)."""

_IGNORED = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"})


def _values_of(elem: DataElement) -> list[str]:
    value = elem.value
    if value is None:
        return []
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def _levels_upto(level: Level) -> tuple[Level, ...]:
    return LEVELS[: LEVELS.index(level) + 1]


def query_level(identifier: Dataset, model: Model) -> Level:
    """The identifier's QueryRetrieveLevel, checked against the information model."""
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise QueryError(IDENTIFIER_MISMATCH, f"QueryRetrieveLevel {level!r} is not valid")
    if model == "study" and level == "PATIENT":
        raise QueryError(IDENTIFIER_MISMATCH, "Study Root has no PATIENT level")
    return level


@dataclass(frozen=True)
class _Query:
    level: Level
    matchers: dict[str, Matcher]
    requested: list[DataElement]


def _parse(identifier: Dataset, model: Model, *, unique_only: bool = False) -> _Query:
    level = query_level(identifier, model)
    allowed = _levels_upto(level)
    matchers: dict[str, Matcher] = {}
    requested: list[DataElement] = []
    for elem in identifier:
        keyword = elem.keyword
        if keyword in _IGNORED or elem.tag.group == 0x0002:
            continue
        requested.append(elem)
        key = KEYS.get(keyword)
        if key is None or key.level not in allowed or elem.VR == "SQ":
            continue  # not matched on (an unsupported optional key: returned empty)
        if unique_only and keyword not in UNIQUE_KEYS.values():
            continue
        vr = "PN" if keyword == "PatientName" else str(dictionary_VR(elem.tag))
        if keyword == "PatientBirthDate":
            vr = "DA"
        allow_list = vr == "UI" or keyword in _LIST_KEYS
        matcher = parse_matcher(_values_of(elem), vr, allow_list=allow_list)
        if matcher is not None:
            matchers[keyword] = matcher
    return _Query(level, matchers, requested)


# --------------------------------------------------------------------------- SQL


def _newest_clause(instance: Any, study: Any) -> ColumnElement[bool]:
    """`instance` is the newest version of its SOP instance at the study's clinic."""
    i2, s2, st2 = aliased(Instance), aliased(Series), aliased(Study)
    newer = (
        select(i2.id)
        .join(s2, s2.id == i2.series_pk)
        .join(st2, st2.id == s2.study_pk)
        .where(
            i2.sop_instance_uid == instance.sop_instance_uid,
            i2.version > instance.version,
            st2.clinic_id == study.clinic_id,
        )
    )
    return ~exists(newer)


def _sql_clause(column: Any, matcher: Matcher, kind: str) -> ColumnElement[bool]:
    if kind == "int":
        try:
            numbers = [int(v) for v in matcher.values]
        except ValueError:
            raise QueryError(IDENTIFIER_MISMATCH, f"not a number: {matcher.values}") from None
        clause: ColumnElement[bool] = (
            column.in_(numbers) if matcher.kind == "list" else column == numbers[0]
        )
        return clause
    if matcher.kind == "single":
        return column == matcher.values[0]  # type: ignore[no-any-return]
    if matcher.kind == "list":
        return column.in_(matcher.values)  # type: ignore[no-any-return]
    if matcher.kind == "wildcard":
        return column.like(_like(matcher.values[0]), escape="\\")  # type: ignore[no-any-return]
    clauses = []
    if matcher.low is not None:
        clauses.append(column >= matcher.low)
    if matcher.high is not None:
        clauses.append(column <= matcher.high)
    return and_(*clauses)


@functools.lru_cache(maxsize=1024)
def _base(principal: Principal, level: Level) -> Select[Any]:
    """Tenancy-scoped rows of `level` joined to their parents, built once per caller and
    level: building it (aliased tables, correlated subqueries) costs several times what
    running it does for a C-GET or a QIDO by UID. Statements are immutable; a changed role
    or clinic is another Principal."""
    if level == "PATIENT":
        return visible_patients(principal)
    if level == "STUDY":
        return visible_studies(principal).join(Patient, _patient_of_study()).add_columns(Patient)
    if level == "SERIES":
        return (
            visible_series(principal)
            .join(Study, Study.id == Series.study_pk)
            .join(Patient, _patient_of_study())
            .add_columns(Study, Patient)
        )
    return (
        visible_instances(principal)
        .join(Series, Series.id == Instance.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .join(Patient, _patient_of_study())
        .add_columns(Series, Study, Patient)
        .where(_newest_clause(Instance, Study))
    )


def _patient_of_study() -> ColumnElement[bool]:
    """Join condition Study -> Patient. A study's patient is always its own clinic's (the
    ingest path looks it up by clinic and Patient ID); saying so lets the database match
    PatientID through the (clinic_id, patient_id) unique index instead of scanning every
    study of the clinic (8 ms -> well under 1 ms over 10,000 studies on SQLite)."""
    return and_(Patient.id == Study.patient_pk, Patient.clinic_id == Study.clinic_id)


_STUDY_ORDER: Final = (Study.study_date, Study.study_time, Study.study_instance_uid, Study.id)
_SERIES_ORDER: Final = (Series.series_number, Series.series_instance_uid, Series.id)
_ORDER: Final[dict[Level, tuple[Any, ...]]] = {
    "PATIENT": (Patient.patient_id, Patient.id),
    "STUDY": _STUDY_ORDER,
    "SERIES": (*_STUDY_ORDER, *_SERIES_ORDER),
    "IMAGE": (*_STUDY_ORDER, *_SERIES_ORDER, Instance.instance_number, Instance.sop_instance_uid,
              Instance.id),
}  # fmt: skip
"""Answer order: studies by date, then each study's series and instances by number; every
level ends on a primary key, so paging with offset neither repeats nor skips a row."""


def _statement(principal: Principal, query: _Query) -> Select[Any]:
    stmt = _base(principal, query.level)
    for keyword, matcher in query.matchers.items():
        key = KEYS[keyword]
        if key.column is not None:
            stmt = stmt.where(_sql_clause(key.column, matcher, key.kind))
        elif keyword == "ModalitiesInStudy":
            s = aliased(Series)
            stmt = stmt.where(
                exists(
                    select(s.id).where(
                        s.study_pk == Study.id, _sql_clause(s.modality, matcher, "text")
                    )
                )
            )
    return stmt.order_by(*_ORDER[query.level])


# --------------------------------------------------------------------------- rows


@dataclass
class _Row:
    patient: Patient
    study: Study | None = None
    series: Series | None = None
    instance: Instance | None = None


def _rows(result: Iterable[Any], level: Level) -> Iterator[_Row]:
    for row in result:
        if level == "PATIENT":
            yield _Row(row[0])
        elif level == "STUDY":
            yield _Row(row[1], row[0])
        elif level == "SERIES":
            yield _Row(row[2], row[1], row[0])
        else:
            yield _Row(row[3], row[2], row[1], row[0])


class _Sealed:
    """Opens sealed patient values once per patient per query."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._cache: dict[tuple[str, str], str | None] = {}

    def get(self, patient: Patient, keyword: str) -> str | None:
        key = (patient.id, keyword)
        if key not in self._cache:
            if keyword == "PatientName":
                token, context = patient.name_sealed, "patient.name"
            else:
                token, context = patient.birth_date_sealed, "patient.birth_date"
            try:
                self._cache[key] = (
                    open_value(self.hub.keyring, token, context=context) if token else None
                )
            except (CryptoError, ValueError):
                # One damaged value must not fail every search that reaches its patient:
                # it matches nothing and answers empty; saf fsck reports it.
                log.warning("sealed %s of patient %s cannot be opened", context, patient.id)
                self._cache[key] = None
        return self._cache[key]


def _text_value(row: _Row, keyword: str, sealed: _Sealed) -> str | None:
    key = KEYS[keyword]
    if key.kind == "sealed":
        return sealed.get(row.patient, keyword)
    owner = {"PATIENT": row.patient, "STUDY": row.study, "SERIES": row.series}.get(
        key.level, row.instance
    )
    if owner is None or key.column is None:
        return None
    value = getattr(owner, key.column.key)
    return None if value is None else str(value)


def _matches(row: _Row, query: _Query, sealed: _Sealed) -> bool:
    """Check again what SQL matched loosely (LIKE's case) and what it cannot (sealed keys)."""
    for keyword, matcher in query.matchers.items():
        key = KEYS[keyword]
        if key.kind in ("computed", "int"):
            continue  # ModalitiesInStudy and numbers: SQL's answer is exact
        if key.kind == "text" and matcher.kind not in ("wildcard",):
            continue
        if not matcher.test(_text_value(row, keyword, sealed)):
            return False
    return True


def _needs_python(query: _Query) -> bool:
    return any(KEYS[k].kind == "sealed" for k in query.matchers)


def _exact_in_sql(query: _Query) -> bool:
    """Whether SQL's rows are the final answer (nothing is checked again in Python)."""
    return not any(
        KEYS[k].kind == "sealed" or (KEYS[k].kind == "text" and m.kind == "wildcard")
        for k, m in query.matchers.items()
    )


def _matched_rows(
    session: Session,
    hub: Hub,
    principal: Principal,
    query: _Query,
    limit: int,
    offset: int = 0,
) -> tuple[list[_Row], bool, _Sealed]:
    """Matching rows (at most `limit`, after skipping `offset` matches) and whether more
    were left out."""
    sealed = _Sealed(hub)
    rows: list[_Row] = []
    python_only = _needs_python(query)
    stmt = _statement(principal, query)
    if _exact_in_sql(query):
        # SQL's answer is final, so the page is cut there: a deep page reads one page of
        # rows (and one more, to tell whether more are left), not everything before it.
        stmt = stmt.offset(offset).limit(limit + 1)
        offset = 0
    skipped = 0
    result = session.execute(stmt)
    for scanned, row in enumerate(_rows(result, query.level), start=1):
        if python_only and scanned > MAX_SCANNED:
            raise QueryError(
                OUT_OF_RESOURCES,
                "too many candidates for PatientName/PatientBirthDate: add more keys",
            )
        if _matches(row, query, sealed):
            if skipped < offset:
                skipped += 1
                continue
            if len(rows) == limit:
                return rows, True, sealed
            rows.append(row)
    return rows, False, sealed


# --------------------------------------------------------------------------- computed


def _chunks(items: Sequence[str], size: int = 500) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _counts(
    session: Session, stmt: Callable[[Sequence[str]], Select[Any]], ids: list[str]
) -> dict[str, int]:
    out: dict[str, int] = {}
    for chunk in _chunks(ids):
        for key, count in session.execute(stmt(chunk)):
            out[str(key)] = int(count)
    return out


@functools.lru_cache(maxsize=1)
def _current_instances() -> Select[Any]:
    """Instances that are the newest version of their SOP instance (built once: the
    aliased subquery costs more to build than a count query costs to run)."""
    return (
        select(Instance.sop_instance_uid)
        .join(Series, Series.id == Instance.series_pk)
        .join(Study, Study.id == Series.study_pk)
        .where(_newest_clause(Instance, Study))
    )


def _owner_pk(row: _Row, level: Level) -> str | None:
    """Primary key of the row's patient, study or series (the owner of `level`'s counts)."""
    owner = {"PATIENT": row.patient, "STUDY": row.study, "SERIES": row.series}.get(level)
    return None if owner is None else str(owner.id)


def _count_statements(level: Level) -> dict[str, Callable[[Sequence[str]], Select[Any]]]:
    """Per computed count of `level`: (owner primary key, count) for a chunk of owners."""
    if level == "PATIENT":
        pcol: Any = Study.patient_pk
        return {
            "NumberOfPatientRelatedStudies": lambda c: select(pcol, func.count(Study.id))
            .where(pcol.in_(c)).group_by(pcol),
            "NumberOfPatientRelatedSeries": lambda c: select(pcol, func.count(Series.id))
            .join(Series, Series.study_pk == Study.id).where(pcol.in_(c)).group_by(pcol),
            "NumberOfPatientRelatedInstances": lambda c: _current_instances()
            .with_only_columns(pcol, func.count(Instance.id)).where(pcol.in_(c)).group_by(pcol),
        }  # fmt: skip
    if level == "STUDY":
        scol: Any = Series.study_pk
        return {
            "NumberOfStudyRelatedSeries": lambda c: select(scol, func.count(Series.id))
            .where(scol.in_(c)).group_by(scol),
            "NumberOfStudyRelatedInstances": lambda c: _current_instances()
            .with_only_columns(scol, func.count(Instance.id)).where(scol.in_(c)).group_by(scol),
        }  # fmt: skip
    if level == "SERIES":
        icol: Any = Instance.series_pk
        return {
            "NumberOfSeriesRelatedInstances": lambda c: _current_instances()
            .with_only_columns(icol, func.count(Instance.id)).where(icol.in_(c)).group_by(icol),
        }  # fmt: skip
    return {}


def _computed(
    session: Session, level: Level, rows: list[_Row], wanted: set[str]
) -> dict[str, dict[str, Any]]:
    """Computed attributes per owner primary key (patient, study or series), for every
    level the query reaches: an IMAGE answer may carry its study's counts (QIDO-RS)."""
    out: dict[str, dict[str, Any]] = defaultdict(dict)
    for owner_level in _levels_upto(level):
        ids = sorted({pk for r in rows if (pk := _owner_pk(r, owner_level)) is not None})
        for keyword, stmt in _count_statements(owner_level).items():
            if keyword in wanted:
                counts = _counts(session, stmt, ids)
                for pk in ids:
                    out[pk][keyword] = counts.get(pk, 0)
        if owner_level == "STUDY" and "ModalitiesInStudy" in wanted:
            modalities: dict[str, set[str]] = defaultdict(set)
            for chunk in _chunks(ids):
                pairs = session.execute(
                    select(Series.study_pk, Series.modality)
                    .where(Series.study_pk.in_(chunk))
                    .distinct()
                )
                for pk, modality in pairs:
                    if modality:
                        modalities[str(pk)].add(str(modality))
            for pk in ids:
                out[pk]["ModalitiesInStudy"] = sorted(modalities[pk])
    return out


# --------------------------------------------------------------------------- answers


def _answer(
    row: _Row,
    query: _Query,
    sealed: _Sealed,
    computed: dict[str, dict[str, Any]],
    retrieve_aet: str,
) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = CHARACTER_SET
    ds.QueryRetrieveLevel = query.level
    ds.RetrieveAETitle = retrieve_aet
    for elem in query.requested:
        keyword = elem.keyword
        key = KEYS.get(keyword)
        value: Any = None
        if key is not None and key.level in _levels_upto(query.level):
            if key.kind == "computed":
                pk = _owner_pk(row, key.level)
                value = computed.get(pk, {}).get(keyword) if pk is not None else None
            elif key.kind == "int":
                text = _text_value(row, keyword, sealed)
                value = int(text) if text is not None else None
            else:
                value = _text_value(row, keyword, sealed)
        if elem.VR == "SQ":
            ds.add(DataElement(elem.tag, "SQ", []))
        else:
            # Values come from the index, read from stored instances: validating each one
            # again per answer would cost more than the query.
            ds.add(DataElement(elem.tag, elem.VR, value, validation_mode=config.IGNORE))
    return ds


@dataclass(frozen=True)
class FindResult:
    """Identifiers that matched, and whether MAX_MATCHES (or the limit) cut the list."""

    identifiers: list[Dataset]
    truncated: bool
    level: Level
    study_pks: list[str]
    """Primary keys of the studies the answers touch (for the audit trail)."""


def find(
    hub: Hub,
    principal: Principal,
    identifier: Dataset,
    model: Model = "study",
    *,
    limit: int = MAX_MATCHES,
    offset: int = 0,
) -> FindResult:
    """Match a C-FIND (or QIDO-RS) identifier against what `principal` may see.

    `offset` matches are skipped and at most `limit` returned (QIDO-RS paging; the order
    is stable: study date and time, then UIDs). Raises QueryError (with the DIMSE status)
    for an identifier that cannot be matched.
    """
    query = _parse(identifier, model)
    wanted = {elem.keyword for elem in query.requested}
    with hub.sessions() as session:
        rows, truncated, sealed = _matched_rows(session, hub, principal, query, limit, offset)
        computed = _computed(session, query.level, rows, wanted)
        retrieve_aet = hub.settings.ae_title
        answers = [_answer(row, query, sealed, computed, retrieve_aet) for row in rows]
        study_pks = sorted({r.study.id for r in rows if r.study is not None})
    return FindResult(answers, truncated, query.level, study_pks)


# --------------------------------------------------------------------------- retrieve


@dataclass(frozen=True)
class StoredInstance:
    """The newest stored version of one SOP instance, to send (C-MOVE, C-GET)."""

    instance_id: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    blob_id: str
    study_pk: str
    study_instance_uid: str
    patient_pk: str
    clinic_id: str


def retrieve_instances(
    hub: Hub, principal: Principal, identifier: Dataset, model: Model = "study"
) -> list[StoredInstance]:
    """The instances a C-MOVE/C-GET identifier selects among what `principal` may see.

    Only the unique keys (PatientID, StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID,
    single values or UID lists) of the requested level and above are used, as PS3.4
    C.4.2.2.1 asks; the requested level's unique key must be given.
    """
    query = _parse(identifier, model, unique_only=True)
    if UNIQUE_KEYS[query.level] not in query.matchers:
        raise QueryError(
            IDENTIFIER_MISMATCH, f"a {query.level} retrieve needs {UNIQUE_KEYS[query.level]}"
        )
    image = _Query("IMAGE", query.matchers, [])
    # Only the columns a sender needs: loading 200 rows of four ORM entities cost several
    # times what running the statement does.
    stmt = _statement(principal, image).with_only_columns(
        Instance.id.label("instance_id"),
        Instance.sop_class_uid,
        Instance.sop_instance_uid,
        Instance.transfer_syntax_uid,
        Instance.blob_id,
        Study.id.label("study_pk"),
        Study.study_instance_uid,
        Patient.id.label("patient_pk"),
        Study.clinic_id,
    )
    with hub.sessions() as session:
        return [StoredInstance(**row._mapping) for row in session.execute(stmt)]
