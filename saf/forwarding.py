"""Forwarding: rules as data say which studies go where; each (destination, study) is a job
in the database with its own retry schedule, so a destination that is down for hours or
days delays only its own jobs and never another destination's.

The rules file (``<data dir>/forwarding.toml``) is a list of ``[[rule]]`` tables. Unlike
routing (first match wins), EVERY matching rule applies: a study can go to several
destinations. A rule without conditions forwards every study::

    [[rule]]
    name = "regional-pacs"
    modality = ["CT", "MR"]
    clinic = ["North Valley Clinic"]
    destination = "dicom://PACS@pacs.example.org:104"

    [[rule]]
    name = "cloud-archive"
    destination = "https://archive.example.org/dicomweb"
    token_env = "ARCHIVE_TOKEN"   # bearer token read from this variable when sending

    [[rule]]
    name = "research-archive"
    event = ["study.stable", "reply"]
    destination = "dicoms://RESEARCH@research.example.org:2762"
    tls_sha256 = "9f86d0...0f00a08"   # optional pin of the destination's certificate
    deidentify = true                  # PS3.15 Basic Profile, see saf.deidentify

``event`` (default ``["study.stable"]``) may also name ``"reply"``: a signed consult reply
(the ``case.replied`` outbox event, :func:`enqueue_reply`) queues one job per matching
destination that sends ONLY the reply's series (SR, GSPS; the rule's ``modality`` is
matched against the reply series' modalities, e.g. ``["SR", "PR"]``). The clinic's own
PACS gets replies without any rule: every DICOM peer of the case's clinic registered with
the ``reply`` permission and a host and port (``saf clinic add --allow store,reply --host
--port``) gets a C-STORE job for the reply.

``dicoms://`` is C-STORE over TLS (PS3.15 Annex B): the destination's certificate must
chain to SAF_FORWARD_TLS_CA (else SAF_DICOM_TLS_CA, else the system roots) and be valid
for its host; ``tls_sha256`` also pins it. The hub presents SAF_DICOM_TLS_CERT/KEY when
the destination asks for a client certificate.

With ``deidentify = true`` each instance is de-identified for that destination just
before sending (saf.deidentify: keyed, deterministic remapping, so retries and resends
carry the same UIDs); the ack table records the SOP Instance UID the destination holds.

Sending is not done here: the composition root hands a :data:`Transport` (see
``dicom_node.forward``) to :func:`run_job` / :class:`Forwarder`, so the core never imports
the DICOM package.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import tomllib
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal, cast
from urllib.parse import urlsplit

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import joinedload

from saf import audit, vault
from saf.aetitle import check_ae_title
from saf.commitment import ReportTransport, run_report_job
from saf.db import transaction
from saf.deidentify import Deidentifier, DeidentifyError, destination_seed, hub_secret
from saf.hub import Hub
from saf.models import (
    Clinic,
    DicomPeer,
    ForwardAck,
    ForwardJob,
    Instance,
    Series,
    Study,
    utcnow,
)

# The routing rules' error type and line-finding helpers: one way to report a rules
# file's mistakes (file, line, rule, "did you mean"), whichever file it is.
from saf.routing import RulesError, scan_layout, syntax_error, table_error

log = logging.getLogger(__name__)

FORWARDING_FILENAME: Final = "forwarding.toml"
"""Name of the forwarding rules file inside the data directory."""

EVENTS: Final = ("study.stable", "reply")
"""Events a forwarding rule can name."""

RULE_KEYS: Final = frozenset(
    {"name", "destination", "event", "clinic", "modality", "token_env", "deidentify",
     "tls_sha256"}
)  # fmt: skip
"""Every key a forwarding ``[[rule]]`` table may have."""

State = Literal["pending", "sending", "done", "failed"]
"""A job's state: pending (waiting for its next attempt), sending, done, failed (gave up)."""

ACTOR: Final = audit.Actor("system", "forwarder", "saf forward")
"""Who the audit trail names for a forward (the hub itself, on an operator's rule)."""


@dataclass(frozen=True)
class Destination:
    """Where a rule sends: a DICOM AE (C-STORE) or a DICOMweb service (STOW-RS)."""

    url: str
    kind: Literal["dicom", "dicomweb"]
    host: str
    port: int
    ae_title: str = ""
    """Called AE title (dicom destinations)."""
    tls: bool = False
    """dicoms://: C-STORE over TLS."""
    tls_sha256: str | None = None
    """Pinned SHA-256 of the destination's certificate (from the rule; not in the URL)."""

    @classmethod
    def parse(cls, url: str) -> Destination:
        """``dicom://AET@host:port``, ``dicoms://AET@host:port`` (TLS) or
        ``https://host[:port]/path`` (``http://`` too); raises :class:`RulesError` saying
        what a valid one looks like."""
        if not isinstance(url, str) or not url.strip():
            raise RulesError(
                'destination must be a string, e.g. "dicom://PACS@pacs.example.org:104"',
                key="destination",
            )
        url = url.strip()
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme in ("dicom", "dicoms"):
            example_port = 2762 if parts.scheme == "dicoms" else 104
            problem = None
            if not parts.username or not parts.hostname or port is None or port < 1:
                problem = "needs an AE title, a host and a port"
            else:
                try:
                    check_ae_title(parts.username)
                except ValueError as exc:
                    problem = str(exc)
            if problem or parts.path not in ("", "/") or parts.password is not None:
                raise RulesError(
                    f'destination "{url}" {problem or "has extra parts"}: write it as '
                    f'"{parts.scheme}://AET@host:port", e.g. '
                    f'"{parts.scheme}://PACS@pacs.example.org:{example_port}"',
                    key="destination",
                )
            assert parts.hostname is not None and port is not None
            return cls(url, "dicom", parts.hostname, port, ae_title=str(parts.username),
                       tls=parts.scheme == "dicoms")  # fmt: skip
        if parts.scheme in ("https", "http"):
            if not parts.hostname or port == -1 or parts.username or parts.query:
                raise RulesError(
                    f'destination "{url}" is not a DICOMweb base URL like '
                    '"https://archive.example.org/dicomweb" (no credentials in the URL: '
                    "use token_env)",
                    key="destination",
                )
            default = 443 if parts.scheme == "https" else 80
            return cls(url.rstrip("/"), "dicomweb", parts.hostname, port or default)
        hint = difflib.get_close_matches(parts.scheme, ["dicom", "dicoms", "https", "http"], n=1)
        raise RulesError(
            f'destination "{url}" must start with dicom:// (C-STORE), dicoms:// (C-STORE over '
            "TLS) or https:// (STOW-RS)" + (f'; did you mean "{hint[0]}://"?' if hint else ""),
            key="destination",
        )


def _strings(key: str, value: object) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise RulesError(f'{key} must be a list of strings, e.g. {key} = ["{value}"]', key=key)
    if not isinstance(value, list | tuple | set | frozenset) or not value:
        raise RulesError(
            f'{key} must be a non-empty list of strings, e.g. {key} = ["..."]', key=key
        )
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise RulesError(f"{key} must hold non-empty strings in quotes, not {item!r}", key=key)
    return frozenset(cast(Iterable[str], value))


@dataclass(frozen=True)
class ForwardRule:
    """One forwarding rule; the constructor validates and normalises, or raises RulesError."""

    name: str
    destination: Destination
    events: frozenset[str] = frozenset({"study.stable"})
    clinic: frozenset[str] | None = None
    """Clinic names (casefolded); None: any clinic."""
    modality: frozenset[str] | None = None
    """Modalities (upper case); the study matches when any series has one. None: any."""
    token_env: str | None = None
    deidentify: bool = False
    """Send de-identified (saf.deidentify)."""
    tls_sha256: str | None = None
    """dicoms:// only: the destination certificate's SHA-256 (hex, lower case, no colons)."""

    def __post_init__(self) -> None:
        name: object = self.name
        if not isinstance(name, str) or not name.strip():
            raise RulesError('missing name; add e.g. name = "regional-pacs"', key="name")
        object.__setattr__(self, "name", name.strip())
        events = _strings("event", self.events) or frozenset()
        unknown = sorted(events - set(EVENTS))
        if unknown:
            hint = difflib.get_close_matches(unknown[0], EVENTS, n=1)
            raise RulesError(
                f'event "{unknown[0]}" is not one of: {", ".join(EVENTS)}'
                + (f'; did you mean "{hint[0]}"?' if hint else ""),
                rule=self.name,
                key="event",
            )
        object.__setattr__(self, "events", events)
        clinic = _strings("clinic", self.clinic)
        if clinic is not None:
            clinic = frozenset(" ".join(c.split()).casefold() for c in clinic)
        object.__setattr__(self, "clinic", clinic)
        modality = _strings("modality", self.modality)
        if modality is not None:
            modality = frozenset(m.strip().upper() for m in modality)
        object.__setattr__(self, "modality", modality)
        token_env: object = self.token_env
        if token_env is not None:
            if not isinstance(token_env, str) or not token_env.isidentifier():
                raise RulesError(
                    "token_env must name an environment variable, e.g. "
                    f'token_env = "ARCHIVE_TOKEN", not {token_env!r}',
                    rule=self.name,
                    key="token_env",
                )
            if self.destination.kind != "dicomweb":
                raise RulesError(
                    "token_env applies to DICOMweb (https://) destinations only",
                    rule=self.name,
                    key="token_env",
                )
        pin: object = self.tls_sha256
        if pin is not None:
            text = pin.replace(":", "").strip().lower() if isinstance(pin, str) else ""
            if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
                raise RulesError(
                    "tls_sha256 must be a certificate's SHA-256 fingerprint: 64 hex digits "
                    '(colons allowed), e.g. from "openssl x509 -noout -fingerprint -sha256"',
                    rule=self.name,
                    key="tls_sha256",
                )
            if not self.destination.tls:
                raise RulesError(
                    "tls_sha256 applies to dicoms:// (DICOM TLS) destinations only",
                    rule=self.name,
                    key="tls_sha256",
                )
            object.__setattr__(self, "tls_sha256", text)

    def matches(self, event: str, clinic: str, modalities: Iterable[str]) -> bool:
        """True when the event, the clinic and one of the study's modalities fit the rule."""
        if event not in self.events:
            return False
        if self.clinic is not None and " ".join(clinic.split()).casefold() not in self.clinic:
            return False
        return self.modality is None or bool(self.modality & {m.upper() for m in modalities})


@dataclass(frozen=True)
class ForwardRuleSet:
    """The forwarding rules in force (possibly none): unique names; all matches apply."""

    rules: tuple[ForwardRule, ...] = ()
    source: str = "<string>"

    def __post_init__(self) -> None:
        seen: set[str] = set()
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

    def matching(self, event: str, clinic: str, modalities: Iterable[str]) -> list[ForwardRule]:
        """Every rule that applies, in file order."""
        modalities = set(modalities)
        return [r for r in self.rules if r.matches(event, clinic, modalities)]


def parse_forward_rules(text: str, source: str = "<string>") -> ForwardRuleSet:
    """Parse forwarding rules from TOML text; raises :class:`RulesError` naming ``source``."""
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
    raw: object = doc.get("rule", [])
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise RulesError(
            "rules must be written as [[rule]] tables (double brackets), one per rule",
            source=source,
            line=layout.top_keys.get("rule", 1),
            key="rule",
        )
    if len(layout.rule_lines) != len(raw):
        layout.rule_lines.clear()
        layout.rule_keys.clear()
    rules: list[ForwardRule] = []
    for index, table in enumerate(cast(list[dict[str, Any]], raw)):
        try:
            rules.append(_rule_from_table(table))
        except RulesError as exc:
            raise table_error(exc, layout, index, source) from None
    try:
        return ForwardRuleSet(tuple(rules), source=source)
    except RulesError as exc:
        raise table_error(exc, layout, exc.index or 0, source) from None


def _rule_from_table(table: dict[str, Any]) -> ForwardRule:
    name = table.get("name")
    shown = name if isinstance(name, str) else None
    unknown = sorted(set(table) - RULE_KEYS)
    if unknown:
        hint = difflib.get_close_matches(unknown[0], sorted(RULE_KEYS), n=1)
        problem = f'unknown key "{unknown[0]}" (expected one of: {", ".join(sorted(RULE_KEYS))})'
        raise RulesError(
            problem + (f'; did you mean "{hint[0]}"?' if hint else ""), rule=shown, key=unknown[0]
        )
    deidentify = table.get("deidentify", False)
    if not isinstance(deidentify, bool):
        raise RulesError("deidentify must be true or false", rule=shown, key="deidentify")
    if "destination" not in table:
        raise RulesError(
            'missing destination; add e.g. destination = "dicom://PACS@pacs.example.org:104"',
            rule=shown,
            key="destination",
        )
    try:
        destination = Destination.parse(table["destination"])
    except RulesError as exc:
        raise RulesError(exc.problem, rule=shown, key="destination") from None
    try:
        return ForwardRule(
            name=cast(str, name),
            destination=destination,
            events=table.get("event", ["study.stable"]),
            clinic=table.get("clinic"),
            modality=table.get("modality"),
            token_env=table.get("token_env"),
            deidentify=deidentify,
            tls_sha256=table.get("tls_sha256"),
        )
    except RulesError as exc:
        raise RulesError(exc.problem, rule=exc.rule or shown, key=exc.key) from None


def load_forward_rules(path: Path) -> ForwardRuleSet:
    """Read a forwarding file; a missing file means no forwarding (an empty rule set)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ForwardRuleSet((), source=f"{path} (absent: no forwarding)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RulesError(
            f"not UTF-8 text (bad byte at offset {exc.start}); save the file as UTF-8",
            source=str(path),
        ) from None
    return parse_forward_rules(text, source=str(path))


class ForwardRulesHolder:
    """The forwarding rules in force for a long-running process, re-read when the file
    changes (mtime, size, inode). A broken new file is logged and kept in ``last_error``;
    the last good rules stay in force. A file broken at start-up raises."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.last_error: RulesError | None = None
        self._signature = self._stat()
        self._rules = load_forward_rules(path)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    @property
    def current(self) -> ForwardRuleSet:
        """The rules in force, re-read first if the file changed."""
        with self._lock:
            signature = self._stat()
            if signature != self._signature:
                self._signature = signature
                try:
                    self._rules, self.last_error = load_forward_rules(self.path), None
                    log.info("forwarding rules reloaded from %s", self.path)
                except (RulesError, OSError) as exc:
                    error = (
                        exc
                        if isinstance(exc, RulesError)
                        else RulesError(f"cannot read the file: {exc}", source=str(self.path))
                    )
                    self.last_error = error
                    log.error("forwarding rules NOT changed, keeping the previous ones: %s", error)
            return self._rules


_holders: dict[Path, ForwardRulesHolder] = {}
_holders_lock = threading.Lock()


def rules_in_force(hub: Hub) -> ForwardRuleSet:
    """The forwarding rules of this hub's data dir (one holder per file and process)."""
    path = hub.settings.forwarding_path
    with _holders_lock:
        holder = _holders.get(path)
        if holder is None:
            holder = _holders[path] = ForwardRulesHolder(path)
    return holder.current


# --- the queue ---------------------------------------------------------------------------


def enqueue_study(
    hub: Hub, study_id: str, event: str = "study.stable", rules: ForwardRuleSet | None = None
) -> list[int]:
    """Queue the study for every destination whose rules match; returns the job ids.

    Idempotent: the same stable study (a redelivered event) queues nothing new; a study
    that became stable again (instances were added or resent) puts each of its jobs back
    to pending once, with a fresh retry window.
    """
    rules = rules if rules is not None else rules_in_force(hub)
    if not rules.rules:
        return []
    now = utcnow()
    with transaction(hub.sessions) as session:
        study = session.get(Study, study_id)
        if study is None:
            return []
        clinic = session.get(Clinic, study.clinic_id)
        modalities = {
            m
            for m in session.scalars(select(Series.modality).where(Series.study_pk == study_id))
            if m
        }
        targets = _targets(rules.matching(event, clinic.name if clinic else "", modalities))
        ids: list[int] = []
        for url, target in targets.items():
            job = session.scalars(
                select(ForwardJob)
                .where(
                    ForwardJob.destination == url,
                    ForwardJob.study_pk == study_id,
                    ForwardJob.scope == "",
                )
                .with_for_update()
            ).first()
            if job is None:
                job = ForwardJob(
                    destination=url,
                    study_pk=study_id,
                    state="pending",
                    study_stable_at=study.stable_at,
                    next_attempt_at=now,
                    queued_at=now,
                    created_at=now,
                    updated_at=now,
                )
                target.apply(job)
                session.add(job)
                session.flush()
            elif job.study_stable_at != study.stable_at:
                job.generation += 1
                job.state = "pending"
                job.attempts = 0
                job.next_attempt_at = job.queued_at = job.updated_at = now
                job.study_stable_at = study.stable_at
                job.last_error = None
                target.apply(job)
            ids.append(int(job.id))
    if ids:
        log.info("study %s queued for %d destination(s)", study_id, len(ids))
    return ids


@dataclass(frozen=True)
class _Target:
    """How one destination gets a study: from its (first) rule, or from a reply peer."""

    rule: str
    token_env: str | None = None
    deidentify: bool = False
    tls_sha256: str | None = None

    def apply(self, job: ForwardJob) -> None:
        job.rule, job.token_env = self.rule[:64], self.token_env
        job.deidentify, job.tls_sha256 = self.deidentify, self.tls_sha256


def _targets(rules: Iterable[ForwardRule]) -> dict[str, _Target]:
    """One target per destination URL; the first rule names the job, and the destination
    is de-identified when ANY of its matching rules asks for it (never leak by rule order)."""
    out: dict[str, _Target] = {}
    for rule in rules:
        url = rule.destination.url
        first = out.setdefault(url, _Target(rule.name, rule.token_env, rule.deidentify,
                                            rule.tls_sha256))  # fmt: skip
        if rule.deidentify and not first.deidentify:
            out[url] = _Target(first.rule, first.token_env, True, first.tls_sha256)
    return out


def enqueue_reply(hub: Hub, payload: dict[str, Any]) -> list[int]:
    """Queue a signed reply's series (the ``case.replied`` outbox event) for every
    destination whose rules name the ``reply`` event and match the clinic and the reply
    series' modalities, and for every DICOM peer of the clinic allowed ``reply``; returns
    the job ids. Each job sends only the reply's series of one study.

    Idempotent: a redelivered event finds its jobs (the scope is a digest of the study's
    reply series) and queues nothing new; an amended reply (new series) is a new job.
    """
    study_ids, series_uids = payload.get("study_ids"), payload.get("series_instance_uids")
    if not (
        isinstance(study_ids, list)
        and isinstance(series_uids, list)
        and all(isinstance(x, str) for x in [*study_ids, *series_uids])
    ):
        log.error("case.replied event for case %s without study_ids/series_instance_uids "
                  "lists; nothing forwarded", payload.get("case_id"))  # fmt: skip
        return []
    if not study_ids or not series_uids:
        return []
    rules = rules_in_force(hub)
    now = utcnow()
    ids: list[int] = []
    with transaction(hub.sessions) as session:
        for study_id in dict.fromkeys(study_ids):
            study = session.get(Study, study_id)
            if study is None:
                log.warning("reply of case %s: study %s not indexed; not forwarded",
                            payload.get("case_id"), study_id)  # fmt: skip
                continue
            series = session.execute(
                select(Series.series_instance_uid, Series.modality).where(
                    Series.study_pk == study_id, Series.series_instance_uid.in_(series_uids)
                )
            ).all()
            if not series:
                continue
            uids = sorted({uid for uid, _ in series})
            modalities = {m for _, m in series if m}
            clinic = session.get(Clinic, study.clinic_id)
            targets = _targets(rules.matching("reply", clinic.name if clinic else "", modalities))
            for peer in session.scalars(
                select(DicomPeer)
                .where(DicomPeer.clinic_id == study.clinic_id)
                .order_by(DicomPeer.ae_title)
            ):
                if "reply" not in peer.permissions.split(","):
                    continue
                if not peer.host or not peer.port:
                    log.warning("peer %s may receive replies but has no host and port; "
                                "reply not sent to it", peer.ae_title)  # fmt: skip
                    continue
                url = f"dicom://{peer.ae_title}@{peer.host}:{peer.port}"
                targets.setdefault(url, _Target(f"clinic peer {peer.ae_title}"))
            scope = "reply:" + hashlib.sha256("\n".join(uids).encode()).hexdigest()[:32]
            for url, target in targets.items():
                job = session.scalars(
                    select(ForwardJob).where(
                        ForwardJob.destination == url,
                        ForwardJob.study_pk == study_id,
                        ForwardJob.scope == scope,
                    )
                ).first()
                if job is None:
                    job = ForwardJob(
                        destination=url,
                        study_pk=study_id,
                        scope=scope,
                        series_uids=json.dumps(uids),
                        state="pending",
                        next_attempt_at=now,
                        queued_at=now,
                        created_at=now,
                        updated_at=now,
                    )
                    target.apply(job)
                    session.add(job)
                    session.flush()
                ids.append(int(job.id))
    if ids:
        log.info("reply of case %s queued: %d job(s)", payload.get("case_id"), len(ids))
    return ids


@dataclass(frozen=True)
class OutgoingFile:
    """One stored instance, decrypted to a private temp file, ready to send as it is."""

    instance_id: str
    path: Path
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass
class SendOutcome:
    """What a transport did: the instance ids the destination acknowledged, the reason for
    each one it did not, and whether the destination could not be reached at all."""

    acked: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)
    unreachable: bool = False


Transport = Callable[[Destination, list[OutgoingFile], str | None], SendOutcome]
"""Sends files to a destination (third argument: bearer token, DICOMweb only)."""


@dataclass(frozen=True)
class Claim:
    """A job taken for sending by this process."""

    job_id: int
    destination: str
    generation: int
    report: bool = False
    """A Storage Commitment report (saf.commitment), not a study."""


def claim_due(hub: Hub, *, busy: Iterable[str] = (), limit: int = 100) -> list[Claim]:
    """Take at most one due job per destination (skipping destinations in ``busy``) and
    mark them sending; returns them.

    Due: pending with next_attempt_at reached, or sending for longer than
    SAF_FORWARD_LEASE_SECONDS without progress (the process sending it died). On
    PostgreSQL the rows are locked with SKIP LOCKED, so several workers share the queue.
    """
    now = utcnow()
    lease = now - timedelta(seconds=hub.settings.forward_lease_seconds)
    taken: set[str] = set(busy)
    claims: list[Claim] = []
    with transaction(hub.sessions) as session:
        rows = session.execute(
            select(
                ForwardJob.id,
                ForwardJob.destination,
                ForwardJob.generation,
                ForwardJob.report.is_not(None),
            )
            .where(
                or_(
                    and_(ForwardJob.state == "pending", ForwardJob.next_attempt_at <= now),
                    and_(ForwardJob.state == "sending", ForwardJob.updated_at < lease),
                )
            )
            .order_by(ForwardJob.next_attempt_at, ForwardJob.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        for job_id, destination, generation, report in rows:
            if destination in taken:
                continue  # one job per destination at a time: a down one ties up one sender
            taken.add(destination)
            claims.append(Claim(int(job_id), destination, int(generation), bool(report)))
        if claims:
            session.execute(
                update(ForwardJob)
                .where(ForwardJob.id.in_([c.job_id for c in claims]))
                .values(state="sending", updated_at=now)
            )
    return claims


def retry_delay(hub: Hub, attempts: int, rng: random.Random | None = None) -> float:
    """Seconds before attempt ``attempts + 1``: exponential from SAF_FORWARD_RETRY_BASE_SECONDS,
    capped at SAF_FORWARD_RETRY_MAX_SECONDS, with "equal jitter" (half fixed, half random)
    so many jobs that failed together do not all come back at the same instant."""
    settings = hub.settings
    exp = min(settings.forward_retry_max_seconds,
              settings.forward_retry_base_seconds * 2 ** max(0, attempts - 1))  # fmt: skip
    return float(exp / 2 + (rng or random).uniform(0, exp / 2))


def _newest_instances(
    session: Any, study_id: str, series_uids: list[str] | None = None
) -> list[Instance]:
    stmt = (
        select(Instance)
        .options(joinedload(Instance.blob))
        .join(Series, Instance.series_pk == Series.id)
        .where(Series.study_pk == study_id)
        .order_by(Series.series_number, Instance.instance_number, Instance.version)
    )
    if series_uids is not None:  # a reply job: only the reply's series
        stmt = stmt.where(Series.series_instance_uid.in_(series_uids))
    rows = session.scalars(stmt)
    newest: dict[str, Instance] = {}
    for inst in rows:
        current = newest.get(inst.sop_instance_uid)
        if current is None or inst.version > current.version:
            newest[inst.sop_instance_uid] = inst
    return list(newest.values())


@dataclass(frozen=True)
class JobResult:
    """The outcome of one attempt."""

    job_id: int
    state: State
    sent: int
    """Instances acknowledged in this attempt."""
    remaining: int
    error: str | None = None


def run_job(hub: Hub, claim: Claim, transport: Transport) -> JobResult:
    """One attempt of a claimed job: send every newest instance not yet acknowledged, record
    the acknowledgements, then mark the job done, or schedule its retry (failed once
    SAF_FORWARD_MAX_AGE_SECONDS have passed since it was queued). Never raises for a
    destination's failure; audited as an export whenever instances left or the job ended."""
    destination = Destination.parse(claim.destination)
    with hub.sessions() as session:
        job = session.get(ForwardJob, claim.job_id)
        if job is None or job.generation != claim.generation or job.state != "sending":
            return JobResult(claim.job_id, "pending", 0, 0)  # re-queued meanwhile
        if job.report is not None or job.study_pk is None:
            raise ValueError(f"forward job {claim.job_id} is a commitment report: run_claim")
        study = session.get(Study, job.study_pk)
        if study is None:  # removed from the index since it was queued: nothing to send
            job.state, job.last_error, job.updated_at = (
                "failed",
                "study no longer indexed",
                utcnow(),
            )
            session.commit()
            return JobResult(claim.job_id, "failed", 0, 0, job.last_error)
        token = os.environ.get(job.token_env) if job.token_env else None
        destination = replace(destination, tls_sha256=job.tls_sha256)
        deidentify = job.deidentify
        acked = set(
            session.scalars(select(ForwardAck.instance_id).where(ForwardAck.job_id == job.id))
        )
        only = json.loads(job.series_uids) if job.series_uids else None
        instances = _newest_instances(session, study.id, only)
        todo = [i for i in instances if i.id not in acked]
        clinic_id, patient_pk, study_pk = study.clinic_id, study.patient_pk, study.id
        queued_at, attempts = job.queued_at, job.attempts
        session.expunge_all()
    outcome = SendOutcome()
    sent_uids: dict[str, str] = {}
    if todo:
        with _Heartbeat(hub, claim):
            outcome, sent_uids = _send(hub, destination, todo, token, transport, deidentify)
    now = utcnow()
    remaining = len(todo) - len(outcome.acked)
    error: str | None = None
    state: State = "done"
    next_at = now
    if remaining:
        failed = [i for i in todo if i.id not in outcome.acked]
        first = outcome.errors.get(failed[0].id, "not acknowledged")
        error = f"{remaining} of {len(instances)} instance(s) not stored: {first}"[:256]
        attempts += 1
        if now - queued_at >= timedelta(seconds=hub.settings.forward_max_age_seconds):
            state = "failed"
        else:
            state = "pending"
            next_at = now + timedelta(seconds=retry_delay(hub, attempts))
    with transaction(hub.sessions) as session:
        for instance_id in outcome.acked:
            session.add(ForwardAck(job_id=claim.job_id, instance_id=instance_id, acked_at=now,
                                   sent_sop_instance_uid=sent_uids.get(instance_id)))  # fmt: skip
        values: dict[str, Any] = {
            "instances_total": len(instances),
            "instances_sent": len(instances) - remaining,
            "updated_at": now,
        }
        if state == "done":
            values |= {"state": "done", "last_error": None}
        else:
            values |= {"state": state, "attempts": attempts, "next_attempt_at": next_at,
                       "last_error": error}  # fmt: skip
        changed = session.execute(
            update(ForwardJob)
            .where(ForwardJob.id == claim.job_id, ForwardJob.generation == claim.generation)
            .values(**values)
        ).rowcount  # type: ignore[attr-defined]
        if not changed:
            # Re-queued while sending: keep the new generation pending; acks stay valid.
            session.execute(
                update(ForwardJob)
                .where(ForwardJob.id == claim.job_id)
                .values(instances_total=len(instances), updated_at=now)
            )
        elif outcome.unreachable and state == "pending":
            # Circuit breaker, light: the destination is down, so its other jobs wait
            # for this one's retry instead of each failing in turn. Others are untouched.
            session.execute(
                update(ForwardJob)
                .where(
                    ForwardJob.destination == claim.destination,
                    ForwardJob.state == "pending",
                    ForwardJob.id != claim.job_id,
                    ForwardJob.next_attempt_at < next_at,
                )
                .values(next_attempt_at=next_at)
            )
    if outcome.acked or state != "pending":
        audit.record(
            hub,
            "export",
            ACTOR,
            outcome=audit.SUCCESS if state == "done" else audit.SERIOUS_FAILURE,
            entity_type="Study",
            entity_id=study_pk,
            clinic_id=clinic_id,
            patient_pk=patient_pk,
            detail=f"forward job={claim.job_id} destination={destination.host}:"
            f"{destination.port} sent={len(outcome.acked)} remaining={remaining} state={state}"
            + (" deidentified" if deidentify else ""),
        )
    if state == "done":
        log.info("forward job %d to %s done", claim.job_id, claim.destination)
    else:
        log.warning("forward job %d to %s: %s (%s)", claim.job_id, claim.destination, error, state)
    return JobResult(claim.job_id, state, len(outcome.acked), remaining, error)


class _Heartbeat:
    """Touches a sending job's updated_at every third of SAF_FORWARD_LEASE_SECONDS, so a
    long send over a slow link is not taken for a dead worker's and sent again by another."""

    def __init__(self, hub: Hub, claim: Claim) -> None:
        self._hub, self._claim = hub, claim
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="saf-forward-lease", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._hub.settings.forward_lease_seconds / 3):
            try:
                with transaction(self._hub.sessions) as session:
                    session.execute(
                        update(ForwardJob)
                        .where(
                            ForwardJob.id == self._claim.job_id,
                            ForwardJob.generation == self._claim.generation,
                            ForwardJob.state == "sending",
                        )
                        .values(updated_at=utcnow())
                    )
            except Exception as exc:  # the database is away: the lease may lapse, harmless
                log.warning("forward job %d lease not renewed: %s", self._claim.job_id,
                            type(exc).__name__)  # fmt: skip


def _send(
    hub: Hub,
    destination: Destination,
    todo: list[Instance],
    token: str | None,
    transport: Transport,
    deidentify: bool = False,
) -> tuple[SendOutcome, dict[str, str]]:
    """Decrypt the instances to a private temp dir (verified, as stored), de-identify them
    for this destination if asked, and send them. Returns the outcome and, per instance
    id, the SOP Instance UID that was sent."""
    deidentifier = None
    if deidentify:
        secret = hub_secret(hub.settings.data_dir)
        deidentifier = Deidentifier(destination_seed(secret, destination.url))
    hub.settings.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(tempfile.mkdtemp(prefix="forward-", dir=hub.settings.spool_dir))
    errors: dict[str, str] = {}
    try:
        files: list[OutgoingFile] = []
        for inst in todo:
            path = tmp / f"{inst.id}.dcm"
            try:
                vault.write_to(hub, inst.blob, path)
            except Exception as exc:  # a damaged blob fails this instance, not the job
                errors[inst.id] = f"cannot read stored instance {inst.id}: {type(exc).__name__}"
                continue
            uid = inst.sop_instance_uid
            if deidentifier is not None:
                clean = tmp / f"{inst.id}.deid.dcm"
                try:
                    uid = deidentifier.file(path, clean)
                except Exception as exc:  # this instance stays unsent, with the reason
                    why = str(exc) if isinstance(exc, DeidentifyError) else type(exc).__name__
                    errors[inst.id] = f"cannot de-identify instance {inst.id}: {why}"[:256]
                    continue
                finally:
                    path.unlink(missing_ok=True)  # identified bytes gone as soon as possible
                path = clean
            files.append(OutgoingFile(inst.id, path, uid, inst.sop_class_uid,
                                      inst.transfer_syntax_uid))  # fmt: skip
        sent_uids = {f.instance_id: f.sop_instance_uid for f in files}
        if not files:
            return SendOutcome(errors=errors), sent_uids
        try:
            outcome = transport(destination, files, token)
        except Exception as exc:  # a transport bug must not kill the sender loop
            log.exception("forward to %s failed", destination.url)
            outcome = SendOutcome(
                errors={f.instance_id: f"send failed: {type(exc).__name__}" for f in files}
            )
        outcome.errors = {**errors, **outcome.errors}
        return outcome, sent_uids
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_claim(
    hub: Hub, claim: Claim, transport: Transport, report_transport: ReportTransport | None
) -> JobResult:
    """Run one claimed job of either kind: a study (:func:`run_job`) or a commitment report
    (:func:`saf.commitment.run_report_job`, needs ``report_transport``; without one the
    job goes back to the queue untouched)."""
    if not claim.report:
        return run_job(hub, claim, transport)
    if report_transport is None:
        with transaction(hub.sessions) as session:
            session.execute(
                update(ForwardJob)
                .where(ForwardJob.id == claim.job_id, ForwardJob.state == "sending")
                .values(state="pending")
            )
        return JobResult(claim.job_id, "pending", 0, 1, "no commitment report transport")
    result = run_report_job(hub, claim.job_id, claim.generation, report_transport)
    done = result.state == "done"
    return JobResult(claim.job_id, cast(State, result.state), int(done), int(not done),
                     result.error)  # fmt: skip


def forward_due(
    hub: Hub, transport: Transport, report_transport: ReportTransport | None = None
) -> list[JobResult]:
    """Claim and run every due job once, one after another (tests, one-shot use)."""
    results = []
    for claim in claim_due(hub):
        results.append(run_claim(hub, claim, transport, report_transport))
    return results


class Forwarder:
    """Claims due jobs every SAF_FORWARD_POLL_INTERVAL seconds and sends them on a small
    thread pool, at most one job per destination at a time, so a destination that hangs
    ties up one thread and the others keep flowing. Runs in `saf worker`."""

    def __init__(
        self,
        hub: Hub,
        transport: Transport,
        *,
        threads: int = 4,
        report_transport: ReportTransport | None = None,
    ) -> None:
        self._hub = hub
        self._transport = transport
        self._report_transport = report_transport
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="saf-forward")
        self._threads = threads
        self._busy: dict[str, Future[JobResult | None]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="saf-forwarder", daemon=True)

    def start(self) -> None:
        """Start forwarding in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop claiming; wait for the jobs in flight (a cut send is redone after the lease)."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=30)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.wait(self._hub.settings.forward_poll_interval):
            self._busy = {d: f for d, f in self._busy.items() if not f.done()}
            free = self._threads - len(self._busy)
            if free <= 0:
                continue
            try:
                claims = claim_due(self._hub, busy=self._busy, limit=100)
            except Exception as exc:  # database away: try again next tick
                log.warning("forward claim failed, will retry: %s", type(exc).__name__)
                continue
            for claim in claims[:free]:
                self._busy[claim.destination] = self._pool.submit(self._run_one, claim)
            if len(claims) > free:
                # Claimed beyond the free threads: hand them back, due at once.
                self._release([c.job_id for c in claims[free:]])

    def _run_one(self, claim: Claim) -> JobResult | None:
        try:
            return run_claim(self._hub, claim, self._transport, self._report_transport)
        except Exception:
            # The database failed us mid-job (acks not recorded): back to pending after a
            # pause, instead of sitting in `sending` until the lease runs out.
            log.exception("forward job %d failed unexpectedly; will retry", claim.job_id)
            try:
                with transaction(self._hub.sessions) as session:
                    session.execute(
                        update(ForwardJob)
                        .where(ForwardJob.id == claim.job_id, ForwardJob.state == "sending")
                        .values(
                            state="pending",
                            next_attempt_at=utcnow() + timedelta(seconds=retry_delay(self._hub, 1)),
                        )
                    )
            except Exception:
                log.warning("forward job %d stays sending until its lease ends", claim.job_id)
            return None

    def _release(self, job_ids: list[int]) -> None:
        with transaction(self._hub.sessions) as session:
            session.execute(
                update(ForwardJob)
                .where(ForwardJob.id.in_(job_ids), ForwardJob.state == "sending")
                .values(state="pending")
            )


# --- operators ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DestinationStatus:
    """One destination's queue, for `saf forward status`."""

    destination: str
    kind: str
    """``forward`` (studies) or ``commitment`` (Storage Commitment reports to that AE)."""
    pending: int
    sending: int
    done: int
    failed: int
    attempts: int
    """Most attempts of a job not yet done."""
    next_attempt_at: datetime | None
    """Earliest next attempt of a pending job."""
    last_error: str | None
    """The error of the most recently failed attempt."""


def status(hub: Hub) -> list[DestinationStatus]:
    """Per destination and kind: job counts by state, next attempt and last error (no PHI)."""
    is_report = ForwardJob.report.is_not(None)
    with hub.sessions() as session:
        counts: dict[tuple[str, bool], dict[str, int]] = {}
        for destination, report, state, n in session.execute(
            select(ForwardJob.destination, is_report, ForwardJob.state, func.count())
            .group_by(ForwardJob.destination, is_report, ForwardJob.state)
        ):  # fmt: skip
            counts.setdefault((destination, bool(report)), {})[state] = int(n)
        out = []
        for destination, report in sorted(counts):
            open_jobs = ForwardJob.state.in_(("pending", "sending", "failed"))
            mine = and_(
                ForwardJob.destination == destination,
                is_report if report else ForwardJob.report.is_(None),
            )
            next_at = session.scalar(
                select(func.min(ForwardJob.next_attempt_at)).where(
                    mine, ForwardJob.state == "pending"
                )
            )
            attempts = session.scalar(select(func.max(ForwardJob.attempts)).where(mine, open_jobs))
            last_error = session.scalar(
                select(ForwardJob.last_error)
                .where(mine, open_jobs, ForwardJob.last_error.is_not(None))
                .order_by(ForwardJob.updated_at.desc())
                .limit(1)
            )
            c = counts[(destination, report)]
            out.append(DestinationStatus(destination, "commitment" if report else "forward",
                                         c.get("pending", 0), c.get("sending", 0),
                                         c.get("done", 0), c.get("failed", 0), attempts or 0,
                                         next_at, last_error))  # fmt: skip
    return out


def retry(hub: Hub, *, destination: str | None = None, failed_only: bool = False) -> int:
    """Make jobs due now: pending ones (and failed ones, which get a fresh retry window
    and attempt count); with ``failed_only`` only failed ones. Returns how many."""
    now = utcnow()
    with transaction(hub.sessions) as session:
        stmt = update(ForwardJob)
        if destination is not None:
            stmt = stmt.where(ForwardJob.destination == destination)
        pending = 0
        if not failed_only:  # first, so the failed ones reset below are not counted twice
            pending = session.execute(
                stmt.where(ForwardJob.state == "pending").values(next_attempt_at=now)
            ).rowcount  # type: ignore[attr-defined]
        failed = session.execute(
            stmt.where(ForwardJob.state == "failed").values(
                state="pending", attempts=0, queued_at=now, next_attempt_at=now, updated_at=now
            )
        ).rowcount  # type: ignore[attr-defined]
    return int(failed or 0) + int(pending or 0)


@dataclass(frozen=True)
class JobView:
    """One job as operators see it (ids, UIDs of what was sent, counts; never names)."""

    id: int
    destination: str
    rule: str
    state: str
    study_id: str | None
    """None for a commitment report."""
    scope: str
    series_uids: list[str] | None
    deidentify: bool
    attempts: int
    instances_total: int
    instances_sent: int
    last_error: str | None
    next_attempt_at: datetime | None
    queued_at: datetime
    updated_at: datetime


def _view(job: ForwardJob) -> JobView:
    return JobView(
        int(job.id), job.destination, job.rule, job.state, job.study_pk, job.scope,
        json.loads(job.series_uids) if job.series_uids else None, job.deidentify, job.attempts,
        job.instances_total, job.instances_sent, job.last_error,
        job.next_attempt_at if job.state == "pending" else None, job.queued_at, job.updated_at,
    )  # fmt: skip


def list_jobs(
    hub: Hub,
    *,
    destination: str | None = None,
    state: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[JobView], int]:
    """Jobs, newest first, optionally of one destination and/or state; and the total."""
    where = []
    if destination is not None:
        where.append(ForwardJob.destination == destination)
    if state is not None:
        where.append(ForwardJob.state == state)
    with hub.sessions() as session:
        total = session.scalar(select(func.count()).select_from(ForwardJob).where(*where)) or 0
        jobs = session.scalars(
            select(ForwardJob).where(*where).order_by(ForwardJob.id.desc()).limit(limit)
            .offset(offset)
        ).all()  # fmt: skip
        return [_view(j) for j in jobs], int(total)


@dataclass(frozen=True)
class JobDetail:
    """A job and what its destination acknowledged: instance id -> the UID it holds."""

    job: JobView
    acked: dict[str, str | None]
    clinic_id: str | None
    patient_pk: str | None
    """For the audit record of who looked (not shown)."""


def get_job(hub: Hub, job_id: int) -> JobDetail | None:
    """One job with its acknowledgements; None if there is no such job."""
    with hub.sessions() as session:
        job = session.get(ForwardJob, job_id)
        if job is None:
            return None
        acked = {
            instance_id: uid
            for instance_id, uid in session.execute(
                select(ForwardAck.instance_id, ForwardAck.sent_sop_instance_uid)
                .where(ForwardAck.job_id == job_id)
                .order_by(ForwardAck.acked_at, ForwardAck.instance_id)
            )
        }
        study = session.get(Study, job.study_pk) if job.study_pk else None
        if study is None:
            return JobDetail(_view(job), acked, None, None)
        return JobDetail(_view(job), acked, study.clinic_id, study.patient_pk)


def retry_job(hub: Hub, job_id: int) -> State | None:
    """Make one job due now (a failed one gets a fresh retry window and attempt count);
    returns its state afterwards, or None if there is no such job. A job that is done or
    sending is left as it is."""
    now = utcnow()
    with transaction(hub.sessions) as session:
        job = session.get(ForwardJob, job_id, with_for_update=True)
        if job is None:
            return None
        if job.state == "pending":
            job.next_attempt_at = job.updated_at = now
        elif job.state == "failed":
            job.state, job.attempts = "pending", 0
            job.queued_at = job.next_attempt_at = job.updated_at = now
        return cast(State, job.state)
