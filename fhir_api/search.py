"""Search parameters: parsed into a saf.fhir_store.Search, with what was not understood.

Supported: ``_id``, ``_lastUpdated`` (prefixes eq, gt, ge, lt, le; precision year to
seconds), ``identifier`` (token: ``system|value``, ``value``, ``|value``, ``system|``),
``patient``/``subject`` (reference ``Patient/<id>`` or ``<id>``; not on Patient),
``status``, ``type``/``category``/``code`` (token), ``based-on`` (reference
``ServiceRequest/<id>``), ``date`` (prefixes as ``_lastUpdated``; the element each type
reads is saf.fhir_store.DATE_ELEMENTS; DocumentReference.date is ITI-67's), ``_count``
(default 20, at most `COUNT_MAX`), ``_sort`` by ``_lastUpdated`` or ``date`` (``-`` first:
descending; ties and resources without a date ordered by last update then id), and
``_offset`` (the paging links use it); ``_include=<Type>:patient`` and
``Patient?_revinclude=<Type>:patient`` (see `INCLUDE_PARAMS`). Each parameter given twice
is AND-ed; comma-separated values are OR-ed. Anything else is unknown: ignored and
reported (or refused under ``Prefer: handling=strict``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from saf.fhir_store import Search

COUNT_DEFAULT: Final = 20
COUNT_MAX: Final = 200
"""Largest page a search may ask for."""

PARAMS: Final[dict[str, tuple[str, ...]]] = {
    "Patient": ("_id", "_lastUpdated", "identifier"),
    "Practitioner": ("_id", "_lastUpdated", "identifier"),
    "Organization": ("_id", "_lastUpdated", "identifier"),
    "ServiceRequest": (
        "_id",
        "_lastUpdated",
        "identifier",
        "patient",
        "subject",
        "status",
        "code",
        "date",
    ),
    "DiagnosticReport": (
        "_id",
        "_lastUpdated",
        "identifier",
        "patient",
        "subject",
        "status",
        "based-on",
        "code",
        "category",
        "date",
    ),
    "Communication": (
        "_id",
        "_lastUpdated",
        "identifier",
        "patient",
        "subject",
        "status",
        "based-on",
        "category",
        "date",
    ),
    "DocumentReference": (
        "_id",
        "_lastUpdated",
        "identifier",
        "patient",
        "subject",
        "status",
        "type",
        "category",
        "date",
    ),
    "List": ("_id", "_lastUpdated", "identifier", "patient", "subject", "status", "code", "date"),
}
"""Search parameters per type (the CapabilityStatement lists these)."""

RESULT_PARAMS: Final = frozenset(
    {"_count", "_sort", "_offset", "_format", "_include", "_revinclude"}
)

INCLUDE_PARAMS: Final = ("patient", "subject")
"""``_include=<Type>:patient|subject`` adds the Patients the matches are about;
``_revinclude=<Type>:patient|subject`` on a Patient search adds the resources of <Type>
about the matched Patients (DocumentReference -> Patient, and back)."""

_DATE = re.compile(
    r"^(?P<y>\d{4})(-(?P<m>\d{2})(-(?P<d>\d{2})"
    r"(T(?P<H>\d{2}):(?P<M>\d{2})(:(?P<S>\d{2})(\.(?P<f>\d{1,6})\d*)?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


class SearchError(ValueError):
    """A parameter whose value cannot be understood; names the parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass
class Parsed:
    """The search, the parameters that were not understood, and the ones that were (for
    the ``self`` link)."""

    search: Search
    unknown: list[str] = field(default_factory=list)
    used: list[tuple[str, str]] = field(default_factory=list)
    includes: list[str] = field(default_factory=list)
    """Types whose Patients to add (``_include=<Type>:patient``): the searched type."""
    revincludes: list[str] = field(default_factory=list)
    """Types to add that are about the matched Patients (``_revinclude=<Type>:patient``)."""


def _range(param: str, text: str) -> tuple[datetime, datetime]:
    """The instants [start, end) a date of any precision covers."""
    match = _DATE.match(text)
    if match is None:
        raise SearchError(param, f"{text!r} is not a FHIR date or dateTime")
    y, m, d = int(match["y"]), int(match["m"] or 1), int(match["d"] or 1)
    hour, minute, second = int(match["H"] or 0), int(match["M"] or 0), int(match["S"] or 0)
    tz = match["tz"]
    try:
        start = datetime(y, m, d, hour, minute, second, tzinfo=UTC)
    except ValueError:
        raise SearchError(param, f"{text!r} is not a valid date") from None
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        start -= sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6]))
    if match["f"]:
        # A fraction is as precise as its digits: a poller's cursor taken from
        # meta.lastUpdated (microseconds) misses nothing written later in that second.
        digits = match["f"]
        start += timedelta(microseconds=int(digits.ljust(6, "0")))
        end = start + timedelta(microseconds=10 ** (6 - len(digits)))
    elif match["S"]:
        end = start + timedelta(seconds=1)
    elif match["M"]:
        end = start + timedelta(minutes=1)
    elif match["d"]:
        end = start + timedelta(days=1)
    elif match["m"]:
        end = datetime(y + (m == 12), m % 12 + 1, 1, tzinfo=UTC)
    else:
        end = datetime(y + 1, 1, 1, tzinfo=UTC)
    return start, end


def last_updated_bounds(text: str) -> list[tuple[str, datetime]]:
    """A ``_lastUpdated`` value (with its prefix) as bounds: ("ge", start) and/or ("lt", end)."""
    return date_bounds("_lastUpdated", text)


def date_bounds(param: str, text: str) -> list[tuple[str, datetime]]:
    """A date parameter's value (with its prefix) as bounds: ("ge", start) and/or ("lt", end)."""
    prefix = text[:2] if text[:2] in ("eq", "gt", "ge", "lt", "le") else "eq"
    value = text[2:] if text[:2] == prefix else text
    start, end = _range(param, value)
    return {
        "eq": [("ge", start), ("lt", end)],
        "gt": [("ge", end)],
        "ge": [("ge", start)],
        "lt": [("lt", start)],
        "le": [("lt", end)],
    }[prefix]


def _token(text: str) -> tuple[str | None, str | None]:
    if "|" not in text:
        return None, text
    system, _, value = text.partition("|")
    return system, value or None


def _reference(text: str) -> str:
    return text if text.startswith("Patient/") else f"Patient/{text}"


def _int(param: str, text: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise SearchError(param, f"{text!r} is not an integer") from None
    return max(low, min(high, value))


def parse_search(resource_type: str, pairs: list[tuple[str, str]]) -> Parsed:
    """Parse query pairs (in order, repeats kept) for a search of `resource_type`."""
    parsed = Parsed(Search(count=COUNT_DEFAULT))
    known = PARAMS.get(resource_type, ())
    search = parsed.search
    for name, value in pairs:
        base = name.split(":")[0]
        if base in RESULT_PARAMS:
            if name == "_count":
                search.count = _int(name, value, 0, COUNT_MAX)
            elif name == "_offset":
                search.offset = _int(name, value, 0, 1 << 31)
            elif name in ("_include", "_revinclude"):
                source, _, param = value.partition(":")
                ok = param in INCLUDE_PARAMS and "patient" in PARAMS.get(source, ())
                if name == "_include" and not (ok and source == resource_type):
                    raise SearchError(
                        name, f"only {resource_type}:patient or :subject is supported"
                    )
                if name == "_revinclude" and not (ok and resource_type == "Patient"):
                    raise SearchError(name, "only Patient?_revinclude=<Type>:patient is supported")
                (parsed.includes if name == "_include" else parsed.revincludes).append(source)
                parsed.used.append((name, value))
            elif name == "_sort":
                key = value.removeprefix("-")
                if key != "_lastUpdated" and not (key == "date" and "date" in known):
                    raise SearchError(
                        name, "only _lastUpdated and date (where searchable), each with - or not"
                    )
                search.descending = value.startswith("-")
                search.sort_by_date = key == "date"
                parsed.used.append((name, value))
            continue
        if base not in known or ":" in name:
            parsed.unknown.append(name)
            continue
        alternatives = [v for v in value.split(",") if v]
        if not alternatives:
            continue
        parsed.used.append((name, value))
        if name == "_id":
            search.ids.append(alternatives)
        elif name == "_lastUpdated":
            if len(alternatives) > 1:
                raise SearchError(name, "one value per _lastUpdated (repeat it to AND ranges)")
            search.last_updated += last_updated_bounds(alternatives[0])
        elif name == "identifier":
            search.identifiers.append([_token(v) for v in alternatives])
        elif name in ("patient", "subject"):
            search.subjects.append([_reference(v) for v in alternatives])
        elif name == "status":
            search.statuses.append(alternatives)
        elif name in ("type", "category", "code"):
            search.tokens.append((name, [_token(v) for v in alternatives]))
        elif name == "based-on":
            refs = [v if "/" in v else f"ServiceRequest/{v}" for v in alternatives]
            search.tokens.append(("based-on", [("", r) for r in refs]))
        elif name == "date":
            if len(alternatives) > 1:
                raise SearchError(name, "one value per date (repeat it to AND ranges)")
            search.dates += [
                (op, at.replace(tzinfo=None).isoformat(timespec="seconds"))
                for op, at in date_bounds("date", alternatives[0])
            ]
    return parsed
