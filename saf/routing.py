"""Routing rules as data: an operator-edited TOML file puts each case on a specialist worklist.

The file is a list of ``[[rule]]`` tables; the first rule whose conditions all hold wins, and
the last rule must have no conditions so that every case lands on some worklist::

    [[rule]]
    name = "chest-ct"
    modality = ["CT"]
    body_part = ["CHEST", "THORAX"]
    worklist = "thoracic-radiology"

    [[rule]]
    name = "default"
    worklist = "general-radiology"

A condition is a list of values and holds when it shares a value with the case (a study
with CT and PT matches ``modality = ["PT"]``). Values compare case-insensitively: modality
and body part are upper-cased, specialty and priority lower-cased, clinic names casefolded.

Every mistake in the file raises :class:`RulesError`, whose message names the file, the
line, the rule and what to change. Line numbers for semantic errors come from a small
line scan (:func:`scan_layout`), not a second TOML parser; its limits are documented there.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import threading
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, cast, get_args

log = logging.getLogger(__name__)

Priority = Literal["stat", "urgent", "routine"]
"""Case priority, most urgent first."""

PRIORITIES: Final[tuple[Priority, ...]] = get_args(Priority)
"""The allowed priority values, most urgent first."""

RULES_FILENAME: Final = "routing.toml"
"""Usual name of the routing file inside the data directory."""

WORKLIST_PATTERN: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
"""Worklist names: lower-case letters, digits and hyphens, starting alphanumeric, max 63."""

CONDITION_KEYS: Final = ("modality", "body_part", "clinic", "requested_specialty", "priority")
"""Rule keys that are conditions (each a list of values), in the order they are checked."""

RULE_KEYS: Final = frozenset({"name", "worklist", *CONDITION_KEYS})
"""Every key a ``[[rule]]`` table may have."""

DEFAULT_RULES_TOML: Final = """\
# Built-in rules, in force while no routing file exists: every case goes to "general".
[[rule]]
name = "default"
worklist = "general"
"""
"""Rules in force when the routing file does not exist: one catch-all to worklist "general"."""

# DICOM code strings (Modality, BodyPartExamined): upper-case letters, digits, space, "_".
_CODE_STRING = re.compile(r"^[A-Z0-9_ ]{1,16}$")
_CATCH_ALL_HINT = '[[rule]] name = "default" worklist = "general-radiology"'


class RulesError(ValueError):
    """A routing file (or a rule built in code) is wrong; the message says where and how to fix.

    ``source``, ``line``, ``column``, ``rule`` (name), ``index`` (0-based position of the rule)
    and ``key`` are set when known; ``problem`` is the message without the location.
    """

    def __init__(
        self,
        problem: str,
        *,
        source: str | None = None,
        line: int | None = None,
        column: int | None = None,
        rule: str | None = None,
        index: int | None = None,
        key: str | None = None,
    ) -> None:
        self.problem = problem
        self.source = source
        self.line = line
        self.column = column
        self.rule = rule
        self.index = index
        self.key = key
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.source or ""
        if self.line is not None:
            where += f" line {self.line}"
            if self.column is not None:
                where += f", column {self.column}"
        if self.rule is not None:
            where += f' (rule "{self.rule}")'
        elif self.index is not None:
            where += f" (rule #{self.index + 1})"
        where = where.strip()
        return f"{where}: {self.problem}" if where else self.problem


def _code_strings(values: Iterable[str], key: str) -> frozenset[str]:
    out = frozenset(v.strip().upper() for v in values)
    bad = sorted(v for v in out if not _CODE_STRING.match(v))
    if bad:
        raise RulesError(
            f'{key} value "{bad[0]}" is not a DICOM code string '
            "(1-16 characters: letters, digits, space, underscore)",
            key=key,
        )
    return out


def _normalise(key: str, values: Iterable[str]) -> frozenset[str]:
    if key in ("modality", "body_part"):
        return _code_strings(values, key)
    if key == "clinic":
        return frozenset(" ".join(v.split()) for v in values)
    lowered = frozenset(v.strip().lower() for v in values)
    if key == "priority":
        bad = sorted(lowered - set(PRIORITIES))
        if bad:
            raise RulesError(
                f'priority "{bad[0]}" is not one of: {", ".join(PRIORITIES)}', key="priority"
            )
    return lowered


def _condition(key: str, value: object) -> frozenset[str] | None:
    """Check and normalise one condition value; ``None`` means "no condition"."""
    if value is None:
        return None
    if isinstance(value, str):
        raise RulesError(
            f'{key} must be a list of strings, e.g. {key} = ["{value}"], not "{value}"', key=key
        )
    if not isinstance(value, list | tuple | set | frozenset):
        raise RulesError(
            f'{key} must be a list of strings, e.g. {key} = ["..."], not {value!r}', key=key
        )
    if not value:
        raise RulesError(
            f"{key} is an empty list, which never matches; remove the key to match any {key}",
            key=key,
        )
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise RulesError(f"{key} must hold non-empty strings in quotes, not {item!r}", key=key)
    return _normalise(key, cast(Iterable[str], value))


@dataclass(frozen=True)
class CaseFacts:
    """What a case knows when it is routed. Values are normalised like rule values."""

    modalities: frozenset[str]
    body_parts: frozenset[str]
    clinic: str
    requested_specialty: str | None
    priority: Priority

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "modalities", frozenset(m.strip().upper() for m in self.modalities)
        )
        object.__setattr__(
            self, "body_parts", frozenset(b.strip().upper() for b in self.body_parts)
        )
        object.__setattr__(self, "clinic", " ".join(self.clinic.split()))
        specialty = (self.requested_specialty or "").strip().lower() or None
        object.__setattr__(self, "requested_specialty", specialty)
        priority = self.priority.strip().lower()
        if priority not in PRIORITIES:
            raise ValueError(f'priority "{self.priority}" is not one of: {", ".join(PRIORITIES)}')
        object.__setattr__(self, "priority", priority)


@dataclass(frozen=True)
class Rule:
    """One routing rule: a worklist and conditions that must all hold (``None``: any value).

    The constructor validates and normalises, or raises :class:`RulesError`; list, tuple and
    set values are accepted and stored as frozensets.
    """

    name: str
    worklist: str
    modality: frozenset[str] | None = None
    body_part: frozenset[str] | None = None
    clinic: frozenset[str] | None = None
    requested_specialty: frozenset[str] | None = None
    priority: frozenset[Priority] | None = None

    def __post_init__(self) -> None:
        name: object = self.name
        if name is None:
            raise RulesError('missing name; add e.g. name = "chest-ct"', key="name")
        if not isinstance(name, str) or not name.strip():
            raise RulesError(
                f'name must be a non-empty string in quotes, e.g. name = "chest-ct", not {name!r}',
                key="name",
            )
        object.__setattr__(self, "name", name.strip())
        worklist: object = self.worklist
        if worklist is None:
            raise RulesError(
                'missing worklist; add e.g. worklist = "general-radiology"',
                rule=self.name,
                key="worklist",
            )
        if not isinstance(worklist, str):
            raise RulesError(
                "worklist must be a string in quotes, e.g. worklist = "
                f'"general-radiology", not {worklist!r}',
                rule=self.name,
                key="worklist",
            )
        if not WORKLIST_PATTERN.match(worklist):
            raise RulesError(
                f'worklist "{worklist}" is not a valid worklist name (use 1-63 lower-case '
                "letters, digits and hyphens, starting with a letter or digit, e.g. "
                '"thoracic-radiology")',
                rule=self.name,
                key="worklist",
            )
        for key in CONDITION_KEYS:
            try:
                object.__setattr__(self, key, _condition(key, getattr(self, key)))
            except RulesError as exc:
                raise RulesError(exc.problem, rule=self.name, key=exc.key) from None

    @property
    def conditions(self) -> dict[str, frozenset[str]]:
        """The conditions this rule has, by key (empty for a catch-all)."""
        return {k: v for k in CONDITION_KEYS if (v := getattr(self, k)) is not None}

    @property
    def is_catch_all(self) -> bool:
        """True when the rule has no conditions and so matches every case."""
        return not self.conditions

    def matches(self, facts: CaseFacts) -> bool:
        """True when every condition of this rule holds for the case."""
        if self.modality is not None and not self.modality & facts.modalities:
            return False
        if self.body_part is not None and not self.body_part & facts.body_parts:
            return False
        if self.clinic is not None and facts.clinic.casefold() not in {
            c.casefold() for c in self.clinic
        }:
            return False
        if self.requested_specialty is not None and (
            facts.requested_specialty not in self.requested_specialty
        ):
            return False
        return self.priority is None or facts.priority in self.priority


@dataclass(frozen=True)
class RuleSet:
    """An ordered, valid set of rules: unique names, and only the last rule is a catch-all."""

    rules: tuple[Rule, ...]
    source: str = "<string>"

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        if not self.rules:
            raise RulesError(
                f"no rules; add at least a final catch-all rule: {_CATCH_ALL_HINT}",
                source=self.source,
            )
        seen: set[str] = set()
        last = len(self.rules) - 1
        for i, rule in enumerate(self.rules):
            if rule.name in seen:
                raise RulesError(
                    f'duplicate rule name "{rule.name}"; give each rule its own name',
                    source=self.source,
                    rule=rule.name,
                    index=i,
                    key="name",
                )
            seen.add(rule.name)
            if rule.is_catch_all and i != last:
                raise RulesError(
                    f"this rule has no conditions, so it catches every case and the "
                    f"{last - i} rule(s) after it can never match; move it to the end "
                    "or give it conditions",
                    source=self.source,
                    rule=rule.name,
                    index=i,
                )
        if not self.rules[-1].is_catch_all:
            raise RulesError(
                "the last rule must be a catch-all (no conditions) so every case lands on a "
                f"worklist; add at the end: {_CATCH_ALL_HINT}",
                source=self.source,
                rule=self.rules[-1].name,
                index=last,
            )

    def route(self, facts: CaseFacts) -> Rule:
        """The first rule that matches the case (the final catch-all if no other does)."""
        for rule in self.rules:
            if rule.matches(facts):
                return rule
        raise AssertionError("unreachable: the last rule is a catch-all")


@dataclass
class _Layout:
    """Where things are in the text, found by :func:`scan_layout` (1-based line numbers)."""

    rule_lines: list[int] = field(default_factory=list)
    rule_keys: list[dict[str, int]] = field(default_factory=list)
    top_keys: dict[str, int] = field(default_factory=dict)


_RULE_HEADER = re.compile(r"^\s*\[\[\s*rule\s*\]\]\s*(#.*)?$")
_ANY_HEADER = re.compile(r"^\s*\[[^\]]*\]\]?\s*(#.*)?$")
_KEY_LINE = re.compile(r"""^\s*(?:([A-Za-z0-9_-]+)|"([^"\\]*)"|'([^']*)')\s*=""")


def scan_layout(text: str) -> _Layout:
    """Find the line of each ``[[rule]]`` header and of each ``key =`` line, by a line scan.

    Only called on text ``tomllib`` has accepted. Limits, by design (this is not a parser):
    multi-line strings are skipped by counting triple quotes per line, so a triple quote
    inside a one-line string can confuse it; dotted keys (``a.b = 1``) are recorded under
    their first part; a ``[[rule]]`` written inline (``rule = [{...}]``) has no header, in
    which case :func:`parse_rules` notices the header count is off and reports the line of
    the ``rule =`` key instead; a line of a multi-line array that looks exactly like a table
    header (``["x"]``) ends the current rule early.
    """
    layout = _Layout()
    keys: dict[str, int] | None = layout.top_keys
    in_string: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string is not None:
            if in_string in line:
                in_string = None
            continue
        if _RULE_HEADER.match(line):
            layout.rule_lines.append(number)
            keys = {}
            layout.rule_keys.append(keys)
            continue
        if _ANY_HEADER.match(line):
            keys = None  # some other table: its keys are not rule keys
            continue
        match = _KEY_LINE.match(line)
        if match and keys is not None:
            key = next(g for g in match.groups() if g is not None)
            keys.setdefault(key, number)
        for quotes in ('"""', "'''"):
            if line.count(quotes) % 2 == 1:
                in_string = quotes
                break
    return layout


_DECODE_POSITION = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)\s*$")


def syntax_error(exc: tomllib.TOMLDecodeError, text: str, source: str) -> RulesError:
    """A TOML syntax error as a RulesError naming the file, line and column (shared by the
    routing and forwarding rule files)."""
    message = str(exc)
    line: int | None = None
    column: int | None = None
    match = _DECODE_POSITION.search(message)
    if match:
        message = message[: match.start()]
        if match.group(1):
            line, column = int(match.group(1)), int(match.group(2))
        else:
            line = max(1, len(text.splitlines()))
    return RulesError(
        f"not valid TOML: {message}; fix the syntax there (strings need quotes, "
        'lists look like ["CT", "MR"])',
        source=source,
        line=line,
        column=column,
    )


def table_error(exc: RulesError, layout: _Layout, index: int, source: str) -> RulesError:
    """Re-raise a rule's error with the file and the best line we know."""
    line: int | None = None
    if len(layout.rule_lines) > index:
        line = layout.rule_lines[index]
        if exc.key is not None:
            line = layout.rule_keys[index].get(exc.key, line)
    else:
        line = layout.top_keys.get("rule")
    return RulesError(
        exc.problem, source=source, line=line, rule=exc.rule, index=index, key=exc.key
    )


def parse_rules(text: str, source: str = "<string>") -> RuleSet:
    """Parse routing rules from TOML text; raises :class:`RulesError` naming ``source``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise syntax_error(exc, text, source) from None
    layout = scan_layout(text)
    for key in doc:
        if key != "rule":
            raise RulesError(
                f'unknown top-level key "{key}"; the file holds only [[rule]] tables',
                source=source,
                line=layout.top_keys.get(key, 1),
                key=key,
            )
    raw: object = doc.get("rule")
    if raw is None:
        raise RulesError(
            f"no rules; add at least a final catch-all rule: {_CATCH_ALL_HINT}",
            source=source,
            line=1,
        )
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise RulesError(
            "rules must be written as [[rule]] tables (double brackets), one per rule",
            source=source,
            line=layout.top_keys.get("rule", 1),
            key="rule",
        )
    if len(layout.rule_lines) != len(raw):
        # The scan could not see every header (e.g. inline tables): do not guess lines.
        layout.rule_lines.clear()
        layout.rule_keys.clear()
    rules: list[Rule] = []
    for index, table in enumerate(cast(list[dict[str, Any]], raw)):
        try:
            name = table.get("name")
            shown = name if isinstance(name, str) else None
            unknown = sorted(set(table) - RULE_KEYS)
            if unknown:
                bad = unknown[0]
                hint = difflib.get_close_matches(bad, sorted(RULE_KEYS), n=1)
                problem = f'unknown key "{bad}" (expected one of: {", ".join(sorted(RULE_KEYS))})'
                if hint:
                    problem += f'; did you mean "{hint[0]}"?'
                raise RulesError(problem, rule=shown, key=bad)
            # Values go in as TOML gave them; Rule checks their types and says what to fix.
            values: dict[str, Any] = {
                k: table.get(k) for k in ("name", "worklist", *CONDITION_KEYS)
            }
            rules.append(Rule(**values))
        except RulesError as exc:
            raise table_error(exc, layout, index, source) from None
    try:
        return RuleSet(tuple(rules), source=source)
    except RulesError as exc:
        index = exc.index if exc.index is not None else len(rules) - 1
        raise table_error(exc, layout, index, source) from None


def load_rules(path: Path) -> RuleSet:
    """Read and parse a routing file. A missing file raises ``FileNotFoundError``."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RulesError(
            f"not UTF-8 text (bad byte at offset {exc.start}); save the file as UTF-8",
            source=str(path),
        ) from None
    return parse_rules(text, source=str(path))


def default_rules() -> RuleSet:
    """The built-in rules (:data:`DEFAULT_RULES_TOML`)."""
    return parse_rules(DEFAULT_RULES_TOML, source="<built-in default>")


_Signature = tuple[int, int, int]


class RulesHolder:
    """The rules in force for a long-running process, re-read when the file changes.

    ``current`` checks the file's mtime, size and inode on every call (one ``stat``) and
    re-reads it when they change. A broken new file is logged and recorded in
    ``last_error``; the last good rules stay in force until the file is fixed. While the
    file does not exist the built-in :data:`DEFAULT_RULES_TOML` is in force. A file that is
    broken when the holder is created raises :class:`RulesError` (fail at start-up rather
    than run on rules the operator did not write). Thread-safe.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._last_error: RulesError | None = None
        self._signature = self._stat()
        self._rules = default_rules() if self._signature is None else load_rules(path)

    def _stat(self) -> _Signature | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    @property
    def last_error(self) -> RulesError | None:
        """Why the newest version of the file was rejected; ``None`` when it is in force."""
        return self._last_error

    @property
    def current(self) -> RuleSet:
        """The rules in force, re-read first if the file changed since the last look."""
        with self._lock:
            try:
                signature = self._stat()
            except OSError as exc:
                signature = self._signature
                self._reject(
                    RulesError(f"cannot read the file: {exc.strerror}", source=str(self.path))
                )
            if signature != self._signature:
                self._signature = signature
                self._reload(signature)
            return self._rules

    def _reload(self, signature: _Signature | None) -> None:
        if signature is None:
            log.warning("routing file %s is gone; using the built-in default rules", self.path)
            self._rules, self._last_error = default_rules(), None
            return
        try:
            rules = load_rules(self.path)
        except FileNotFoundError:
            self._signature = None
            self._rules, self._last_error = default_rules(), None
            return
        except OSError as exc:
            self._reject(RulesError(f"cannot read the file: {exc.strerror}", source=str(self.path)))
            return
        except RulesError as exc:
            self._reject(exc)
            return
        self._rules, self._last_error = rules, None
        log.info("routing rules reloaded from %s: %d rules", self.path, len(rules.rules))

    def _reject(self, exc: RulesError) -> None:
        # The message names file, line, rule and key only; rule files hold no PHI.
        self._last_error = exc
        log.error("routing rules NOT changed, keeping the previous ones: %s", exc)


def describe(rules: RuleSet) -> list[dict[str, object]]:
    """One row per rule, in order, for ``saf rules show``; conditions as sorted lists."""
    rows: list[dict[str, object]] = []
    for position, rule in enumerate(rules.rules, start=1):
        row: dict[str, object] = {"position": position, "name": rule.name}
        for key in CONDITION_KEYS:
            values: frozenset[str] | None = getattr(rule, key)
            row[key] = sorted(values) if values is not None else []
        row["worklist"] = rule.worklist
        row["catch_all"] = rule.is_catch_all
        rows.append(row)
    return rows
