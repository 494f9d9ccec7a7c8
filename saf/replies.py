"""The specialist's reply to a case: the draft, questions and answers, and signing.

A reply is a draft (findings, impression, recommendation, urgency; sealed at rest)
that the specialist who claimed the case saves as often as they like, then signs.
Instead of replying, the specialist may ask the clinic a question (a FHIR
Communication about the case's Task: the case goes on hold); the clinic answers with
a comment (a Communication ``inResponseTo`` the question: the case is back in
progress). The case moves only through saf.fhir_store's effects of those resources,
the one place that turns a reply into a Task status.

Signing (`sign`) makes, in this order, each step recorded before the next and each
skipped when a retry finds it done, so a crash at any point and a second click end in
the same single result:

1. the reply is marked ``signing`` with the signer and the signing time: annotations
   and draft are frozen from here, and the time seeds every UID that follows;
2. per study, the Comprehensive 3D SR (TID 1500) and the GSPS (saf.sr), each stored
   through saf.ingest as a new series of the study (an instance whose SOP Instance UID
   is already indexed is not stored again); the series made are recorded;
3. the PDF report (saf.report_pdf) with key images, sealed as a blob and recorded;
4. the DiagnosticReport (final; basedOn the case's ServiceRequests, imagingStudy its
   studies, conclusion the impression, presentedForm the PDF) under an id derived from
   the case and signing time, written in one transaction with its id on the reply (a
   concurrent signer fails on the primary key); then its effect settles (the case is
   completed; idempotent, so a retry after a crash here settles it);
5. the reply is marked ``signed`` and, in the same transaction, the outbox event
   ``case.replied`` (saf.pipeline.REPLY_TOPIC) lists the studies and the SR/GSPS series.

Clinic users see a reply once it is signed (a draft is the specialist's work in
progress: they see its status only), and every question and answer.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import tempfile
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from saf import annotations as anno
from saf import fhir_store, frames, report_pdf, sr, vault
from saf.annotations import Frozen, Invalid, NotAllowed, check_writer
from saf.crypto import CryptoError, open_value, reseal_value, seal_value, value_key_id
from saf.db import transaction
from saf.hub import Hub
from saf.identity import SYSTEM, Principal
from saf.ingest import IngestError, Sender, ingest_part10
from saf.models import (
    Blob,
    Case,
    CaseMessage,
    CaseStudy,
    Clinic,
    FhirResource,
    Instance,
    OutboxEvent,
    Patient,
    Reply,
    Series,
    Study,
    utcnow,
)
from saf.pipeline import REPLY_TOPIC
from saf.render import RenderError, render_decoded
from saf.routing import RuleSet

log = logging.getLogger(__name__)

TEXT_MAX: Final = 20_000
"""Longest findings, impression or recommendation, in characters."""

MESSAGE_MAX: Final = 4_000
"""Longest question or comment, in characters."""

KEY_IMAGES_MAX: Final = 6
"""Annotated frames shown in the PDF, at most."""

KEY_IMAGE_SIZE: Final = 512

REPLY_IDENTIFIER_SYSTEM: Final = "urn:saf:reply"
"""Identifier system of the DiagnosticReport of a case's reply (value: the case id)."""

SOURCE: Final = "viewer:reply"
"""Ingest source label of the SR and GSPS objects."""

FIELDS: Final = ("findings", "impression", "recommendation")

ReplyError = anno.AnnotationError
"""Refusals share saf.annotations' classes: Invalid 422, NotAllowed 403, Frozen 409."""


class Conflict(anno.AnnotationError):
    """The case cannot take this now (409)."""

    status = 409


_SIGN_LOCKS: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
"""One signer per case at a time in this process (across processes the primary keys and
the index's duplicate check keep the result single)."""


@dataclass(frozen=True)
class ReplyDraft:
    """What the reply form sends."""

    findings: str
    impression: str
    recommendation: str
    urgent: bool


# --------------------------------------------------------------------------- parsing


def draft_from_json(body: object) -> ReplyDraft:
    """A ReplyDraft from a request body; Invalid names the wrong field."""
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object", "body")
    values: dict[str, str] = {}
    for name in FIELDS:
        value = body.get(name)
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise Invalid(f"{name}: must be a string", name)
        if len(value) > TEXT_MAX:
            raise Invalid(f"{name}: at most {TEXT_MAX} characters", name)
        values[name] = value
    urgent = body.get("urgent", False)
    if not isinstance(urgent, bool):
        raise Invalid("urgent: must be true or false", "urgent")
    return ReplyDraft(values["findings"], values["impression"], values["recommendation"], urgent)


def text_from_json(body: object) -> str:
    """The ``text`` of a question or comment; Invalid when missing, empty or too long."""
    if not isinstance(body, dict) or not isinstance(body.get("text"), str):
        raise Invalid("text: a string is required", "text")
    text = str(body["text"]).strip()
    if not text:
        raise Invalid("text: must not be empty", "text")
    if len(text) > MESSAGE_MAX:
        raise Invalid(f"text: at most {MESSAGE_MAX} characters", "text")
    return text


# --------------------------------------------------------------------------- reading


def _context(case_id: str) -> str:
    return f"reply/{case_id}"


def _content(hub: Hub, row: Reply) -> dict[str, str]:
    empty = dict.fromkeys(FIELDS, "")
    if not row.content_sealed:
        return empty
    try:
        opened = json.loads(
            open_value(hub.keyring, row.content_sealed, context=_context(row.case_id))
        )
    except (CryptoError, ValueError):
        log.error("reply of case %s failed authentication", row.case_id)
        return empty
    return {name: str(opened.get(name) or "") for name in FIELDS}


def _reply_row(hub: Hub, case_id: str) -> Reply | None:
    with hub.sessions() as session:
        return session.get(Reply, case_id)


def _is_clinic(principal: Principal, case: Case) -> bool:
    return (
        principal.kind != "system"
        and principal.clinic_id == case.clinic_id
        and (principal.kind != "user" or principal.role == "clinician")
    )


def view(hub: Hub, principal: Principal, case: Case) -> dict[str, Any]:
    """The reply as the API answers it (see the module docstring for who sees a draft)."""
    row = _reply_row(hub, case.id)
    signed = row is not None and row.status == "signed"
    show_text = row is not None and (signed or not _is_clinic(principal, case))
    content = _content(hub, row) if row is not None and show_text else dict.fromkeys(FIELDS)
    body: dict[str, Any] = {
        "case_id": case.id,
        "status": "none" if row is None else ("signed" if signed else "draft"),
        "signing": row is not None and row.status == "signing",
        **content,
        "urgent": bool(row.urgent) if row is not None and show_text else False,
        "updated_at": row.updated_at.isoformat() if row is not None else None,
        "updated_by": row.updated_by if row is not None and show_text else None,
        "signed_by": row.signed_by if signed and row is not None else None,
        "signed_at": row.signed_at.isoformat()
        if signed and row is not None and row.signed_at
        else None,
        "diagnostic_report": f"DiagnosticReport/{row.diagnostic_report_id}"
        if signed and row is not None and row.diagnostic_report_id
        else None,
        "objects": _objects(hub, row) if signed and row is not None else [],
        "pdf_url": f"/api/cases/{case.id}/reply/pdf"
        if signed and row is not None and row.pdf_blob_id
        else None,
        "communications": communications(hub, case),
    }
    return body


def _objects(hub: Hub, row: Reply) -> list[dict[str, Any]]:
    """The SR and GSPS series signing stored, with their series ids in the index."""
    made = _made_objects(row)
    if not made:
        return []
    with hub.sessions() as session:
        found = {
            (s.study_pk, s.series_instance_uid): s.id
            for s in session.scalars(
                select(Series).where(
                    Series.series_instance_uid.in_({m["series_instance_uid"] for m in made})
                )
            )
        }
    seen: set[str] = set()
    out = []
    for m in made:
        if m["series_instance_uid"] in seen:
            continue
        seen.add(m["series_instance_uid"])
        out.append(
            {
                "series_instance_uid": m["series_instance_uid"],
                "modality": m["modality"],
                "series_id": found.get((m["study_pk"], m["series_instance_uid"])),
                "study_id": m["study_pk"],
            }
        )
    return out


def _made_objects(row: Reply) -> list[dict[str, str]]:
    return [m for m in row.objects or [] if isinstance(m, dict)]


def communications(hub: Hub, case: Case) -> list[dict[str, Any]]:
    """The case's questions and answers, oldest first (texts from their Communications)."""
    with hub.sessions() as session:
        rows = list(
            session.scalars(
                select(CaseMessage).where(CaseMessage.case_id == case.id).order_by(CaseMessage.id)
            )
        )
    out = []
    for row in rows:
        text = None
        try:
            stored = fhir_store.read(hub, SYSTEM, "Communication", row.communication_id)
            payload = (stored.content or {}).get("payload") or []
            text = next((p.get("contentString") for p in payload if isinstance(p, dict)), None)
        except fhir_store.StoreError:
            text = None  # deleted or unreadable: listed without its text
        out.append(
            {
                "id": row.communication_id,
                "from": row.sender,
                "author": row.author,
                "text": text,
                "sent_at": row.sent_at.isoformat(),
            }
        )
    return out


def pdf_bytes(hub: Hub, case: Case) -> bytes | None:
    """The signed report's PDF, or None before signing."""
    with hub.sessions() as session:
        row = session.get(Reply, case.id)
        if row is None or row.status != "signed" or row.pdf_blob_id is None:
            return None
        blob = session.get_one(Blob, row.pdf_blob_id)
    return b"".join(vault.read(hub, blob))


# --------------------------------------------------------------------------- the draft


def save_draft(hub: Hub, principal: Principal, case: Case, draft: ReplyDraft) -> None:
    """Save the draft (the specialist who claimed the case; not once signing started)."""
    sealed = seal_value(
        hub.keyring,
        json.dumps({n: getattr(draft, n) for n in FIELDS}),
        context=_context(case.id),
    )
    with transaction(hub.sessions) as session:
        check_writer(session, principal, case)
        row = session.get(Reply, case.id, with_for_update=True)
        if row is None:
            row = Reply(case_id=case.id, status="draft")
            session.add(row)
        row.content_sealed = sealed
        row.urgent = draft.urgent
        row.updated_by = principal.name
        row.updated_at = utcnow()
    anno.start_work(hub, case, principal.name)


# --------------------------------------------------------------------------- questions


def _task(case: Case) -> dict[str, str]:
    return {"reference": f"Task/{case.id}"}


def _communication(
    principal: Principal, case: Case, text: str, in_response_to: str | None
) -> dict[str, Any]:
    content: dict[str, Any] = {
        "resourceType": "Communication",
        "status": "completed",
        "about": [_task(case)],
        "sent": utcnow().isoformat().replace("+00:00", "Z"),
        "sender": {"display": principal.name},
        "payload": [{"contentString": text}],
    }
    if in_response_to:
        content["inResponseTo"] = [{"reference": f"Communication/{in_response_to}"}]
    return content


def _message(
    hub: Hub,
    principal: Principal,
    case: Case,
    content: dict[str, Any],
    sender: str,
    rules: RuleSet,
) -> None:
    """Store the Communication and its place in the case's conversation together, then let
    its effect move the case."""
    try:
        with transaction(hub.sessions) as session:
            stored = fhir_store.create_in(session, hub, principal, content)
            session.add(
                CaseMessage(
                    case_id=case.id,
                    communication_id=stored.id,
                    sender=sender,
                    author=principal.name,
                )
            )
        fhir_store.settle(hub, principal, [stored], rules)
    except fhir_store.StoreError as exc:
        raise Conflict(f"case {case.id}: {exc}") from None


def ask(hub: Hub, principal: Principal, case: Case, text: str, rules: RuleSet) -> None:
    """The specialist asks the clinic a question: a Communication; the case goes on hold."""
    with hub.sessions() as session:
        check_writer(session, principal, case)
    _message(hub, principal, case, _communication(principal, case, text, None), "specialist", rules)


def comment(hub: Hub, principal: Principal, case: Case, text: str, rules: RuleSet) -> None:
    """A clinic user's answer (to the last question, if any) or comment."""
    if not _is_clinic(principal, case):
        raise NotAllowed("comments come from the clinic's users; a specialist asks a question")
    with hub.sessions() as session:
        last_question = session.scalar(
            select(CaseMessage.communication_id)
            .where(CaseMessage.case_id == case.id, CaseMessage.sender == "specialist")
            .order_by(CaseMessage.id.desc())
            .limit(1)
        )
    content = _communication(principal, case, text, last_question)
    _message(hub, principal, case, content, "clinic", rules)


# --------------------------------------------------------------------------- signing


def sign(hub: Hub, principal: Principal, case: Case, rules: RuleSet) -> None:
    """Sign and send the reply (see the module docstring); a signed reply is left as is."""
    with _SIGN_LOCKS[case.id]:
        row = _begin(hub, principal, case)
        if row.status == "signed":
            return
        assert row.signed_at is not None and row.signed_by is not None
        seed = f"{case.id}:{row.signed_at.isoformat()}"
        marks = _marks(hub, case)
        made = _make_objects(hub, case, row, marks, seed)
        row = _store_pdf(hub, case, row, marks)
        _report(hub, principal, case, row, seed, made, rules)
        _finish(hub, case, made)


def _begin(hub: Hub, principal: Principal, case: Case) -> Reply:
    """Step 1: freeze the reply (or find it signing or signed already)."""
    with transaction(hub.sessions) as session:
        row = session.get(Reply, case.id, with_for_update=True)
        if row is not None and row.status == "signed":
            return row
        if not (principal.kind == "user" and principal.role == "specialist"):
            raise NotAllowed("only the specialist who claimed the case can sign its reply")
        if case.assigned_to != principal.name:
            raise NotAllowed(f"case {case.id} is not assigned to you")
        if row is None or not _content(hub, row)["impression"].strip():
            raise Invalid("impression: the reply needs an impression to be signed", "impression")
        if row.status == "draft":
            status = session.scalar(select(Case.status).where(Case.id == case.id))
            if status not in anno.WRITABLE_STATUSES:
                raise Frozen(f"case {case.id} is {status}: it cannot be replied to")
            row.status = "signing"
            row.signed_by = principal.name
            row.signed_at = utcnow().replace(microsecond=0)
            row.updated_at = row.signed_at
        return row


def _marks(hub: Hub, case: Case) -> dict[str, list[sr.Mark]]:
    """The case's annotations with their images, by study primary key."""
    rows = anno.of_case(hub, case.id)
    by_study: dict[str, list[sr.Mark]] = defaultdict(list)
    if not rows:
        return by_study
    with hub.sessions() as session:
        instances = {
            i.id: (i, study_pk)
            for i, study_pk in session.execute(
                select(Instance, Series.study_pk)
                .join(Series, Series.id == Instance.series_pk)
                .where(Instance.id.in_({r.instance_id for r in rows}))
            )
        }
    for row in rows:
        instance, study_pk = instances[row.instance_id]
        loaded = frames.load(hub, instance)
        by_study[study_pk].append(
            sr.Mark(
                annotation_id=row.id,
                kind=row.kind,
                points=row.points,
                text=anno.text_of(hub, row),
                frame=row.frame,
                measurement=row.measurement,
                image=loaded.ds,
            )
        )
    return by_study


def _make_objects(
    hub: Hub, case: Case, row: Reply, marks: dict[str, list[sr.Mark]], seed: str
) -> list[dict[str, str]]:
    """Step 2: SR and GSPS per study, stored through the ingest path (once)."""
    if row.objects is not None:
        return _made_objects(row)
    assert row.signed_by is not None and row.signed_at is not None
    with hub.sessions() as session:
        institution = session.get_one(Clinic, case.clinic_id).name
    made = []
    for study_pk, study_marks in sorted(marks.items()):
        objects: list[tuple[str, Dataset]] = []
        if sr.measuring(study_marks):
            report = sr.measurement_report(
                study_marks,
                seed=seed,
                observer=row.signed_by,
                signed_at=row.signed_at,
                institution=institution,
            )
            objects.append(("SR", report))
        for state in sr.presentation_states(
            study_marks, seed=seed, observer=row.signed_by, signed_at=row.signed_at
        ):
            objects.append(("PR", state))
        for modality, ds in objects:
            _ingest_once(hub, case, ds)
            made.append(
                {
                    "study_pk": study_pk,
                    "series_instance_uid": str(ds.SeriesInstanceUID),
                    "sop_instance_uid": str(ds.SOPInstanceUID),
                    "modality": modality,
                }
            )
    with transaction(hub.sessions) as session:
        stored = session.get_one(Reply, case.id)
        stored.objects = made
    row.objects = made
    return made


def _ingest_once(hub: Hub, case: Case, ds: Dataset) -> None:
    """Store `ds` as the case's clinic's, unless an instance with its UID is indexed."""
    with hub.sessions() as session:
        exists = session.scalar(
            select(Instance.id)
            .join(Series, Series.id == Instance.series_pk)
            .join(Study, Study.id == Series.study_pk)
            .where(
                Instance.sop_instance_uid == str(ds.SOPInstanceUID),
                Study.clinic_id == case.clinic_id,
            )
            .limit(1)
        )
    if exists is not None:
        return
    with tempfile.TemporaryDirectory(dir=hub.settings.spool_dir) as tmp:
        path = Path(tmp) / "reply.dcm"
        ds.save_as(path, enforce_file_format=True)
        try:
            ingest_part10(hub, path, Sender(case.clinic_id, SOURCE))
        except IngestError as exc:
            raise Conflict(
                f"case {case.id}: reply object {ds.SOPInstanceUID} could not be stored: "
                f"{exc.message}"
            ) from None


def _store_pdf(hub: Hub, case: Case, row: Reply, marks: dict[str, list[sr.Mark]]) -> Reply:
    """Step 3: the PDF report, sealed as a blob, recorded on the reply (once)."""
    if row.pdf_blob_id is not None:
        return row
    data = report_pdf.render_pdf(_report_content(hub, case, row, marks))
    blob = vault.store(hub, io.BytesIO(data), len(data))
    try:
        with transaction(hub.sessions) as session:
            session.add(blob)
            session.flush()
            done = session.execute(
                update(Reply)
                .where(Reply.case_id == case.id, Reply.pdf_blob_id.is_(None))
                .values(pdf_blob_id=blob.id)
            )
            if done.rowcount != 1:  # type: ignore[attr-defined]
                raise _AlreadyThere
    except _AlreadyThere:
        vault.discard(hub, blob)
    except BaseException:
        vault.discard(hub, blob)
        raise
    fresh = _reply_row(hub, case.id)
    assert fresh is not None
    return fresh


class _AlreadyThere(Exception):
    """A concurrent signer recorded its PDF first."""


def _report_content(
    hub: Hub, case: Case, row: Reply, marks: dict[str, list[sr.Mark]]
) -> report_pdf.ReportContent:
    content = _content(hub, row)
    with hub.sessions() as session:
        clinic = session.get_one(Clinic, case.clinic_id).name
        patient = session.get_one(Patient, case.patient_pk)
        studies = list(
            session.scalars(
                select(Study)
                .join(CaseStudy, CaseStudy.study_pk == Study.id)
                .where(CaseStudy.case_id == case.id)
                .order_by(Study.created_at)
            )
        )
    assert row.signed_by is not None and row.signed_at is not None
    all_marks = [m for study_marks in marks.values() for m in study_marks]
    return report_pdf.ReportContent(
        case_id=case.id,
        clinic=clinic,
        patient_name=_unseal(hub, patient.name_sealed, "patient.name"),
        patient_id=patient.patient_id,
        patient_sex=patient.sex,
        patient_birth_date=_unseal(hub, patient.birth_date_sealed, "patient.birth_date"),
        studies=[
            " ".join(filter(None, [s.study_date, s.study_description, s.accession_number]))
            for s in studies
        ],
        findings=content["findings"],
        impression=content["impression"],
        recommendation=content["recommendation"],
        urgent=row.urgent,
        signed_by=row.signed_by,
        signed_at=row.signed_at,
        specialty=case.specialty,
        key_images=_key_images(all_marks),
        measurements=[_describe(n, m) for n, m in enumerate(sr.measuring(all_marks), start=1)],
    )


def _unseal(hub: Hub, token: str | None, context: str) -> str | None:
    if not token:
        return None
    try:
        return open_value(hub.keyring, token, context=context)
    except (CryptoError, ValueError):
        return None


def _describe(number: int, mark: sr.Mark) -> str:
    m = mark.measurement
    image = mark.image
    where = f"series {image.get('SeriesNumber', '?')}, image {image.get('InstanceNumber', '?')}"
    if int(mark.image.get("NumberOfFrames") or 1) > 1:
        where += f", frame {mark.frame}"
    label = f" '{mark.text}'" if mark.text else ""
    if mark.kind == "line":
        value = (
            f"{m['length_mm']:.1f} mm"
            if "length_mm" in m
            else f"{m['length_px']:.1f} px (pixel spacing unknown)"
        )
    elif mark.kind == "angle":
        value = f"{m['angle_deg']:.1f} deg"
    else:
        area = f"{m['area_mm2']:.1f} mm2" if "area_mm2" in m else f"{m['area_px2']:.1f} px2"
        unit = f" {m['unit']}" if m.get("unit") else ""
        stats = (
            f", mean {m['mean']:.1f}{unit}, SD {m['sd']:.1f}, "
            f"min {m['min']:.1f}, max {m['max']:.1f}"
            if m.get("mean") is not None
            else ""
        )
        value = area + stats
    return f"{mark.kind.capitalize()} {number}{label} ({where}): {value}"


def _key_images(marks: list[sr.Mark]) -> list[report_pdf.KeyImage]:
    """The annotated frames rendered by saf.render with the annotations drawn over them."""
    by_frame: dict[tuple[str, int], list[sr.Mark]] = defaultdict(list)
    for mark in marks:
        by_frame[(str(mark.image.SOPInstanceUID), mark.frame)].append(mark)
    out: list[report_pdf.KeyImage] = []
    for (_, frame), on_frame in list(by_frame.items())[:KEY_IMAGES_MAX]:
        ds = on_frame[0].image
        try:
            from saf.render import decode_frame

            pixels = decode_frame(ds, frame - 1)
            jpeg = render_decoded(ds, pixels, size=KEY_IMAGE_SIZE, fmt="jpeg", quality=90)
        except (RenderError, ValueError) as exc:
            log.warning("key image %s frame %d not rendered: %s", ds.SOPInstanceUID, frame, exc)
            continue
        image = Image.open(io.BytesIO(jpeg)).convert("RGB")
        _draw(image, on_frame, int(ds.Columns), int(ds.Rows))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        caption = f"Series {ds.get('SeriesNumber', '?')}, image {ds.get('InstanceNumber', '?')}"
        if int(ds.get("NumberOfFrames") or 1) > 1:
            caption += f", frame {frame}"
        out.append(report_pdf.KeyImage(buffer.getvalue(), caption, image.width, image.height))
    return out


def _draw(image: Image.Image, marks: list[sr.Mark], columns: int, rows: int) -> None:
    """Draw the marks (image pixel coordinates) on the rendered frame."""
    sx, sy = image.width / columns, image.height / rows
    draw = ImageDraw.Draw(image)
    colour = (255, 210, 0)
    width = max(2, image.width // 256)
    for mark in marks:
        pts = [(x * sx, y * sy) for x, y in mark.points]
        if mark.kind in ("line", "angle"):
            draw.line(pts, fill=colour, width=width)
        elif mark.kind == "arrow":
            draw.line(pts, fill=colour, width=width)
            head = sr._arrow_head(list(pts[0]), list(pts[1]))
            draw.line([tuple(p) for p in head.tolist()], fill=colour, width=width)
        elif mark.kind == "ellipse":
            (x0, y0), (x1, y1) = pts
            draw.ellipse(
                [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=colour, width=width
            )
        label = sr._label(mark)
        if label:
            anchor = pts[0] if mark.kind in ("text", "arrow") else pts[-1]
            draw.text((anchor[0] + 4, anchor[1] + 4), label, fill=colour)


def _report(
    hub: Hub,
    principal: Principal,
    case: Case,
    row: Reply,
    seed: str,
    made: list[dict[str, str]],
    rules: RuleSet,
) -> None:
    """Step 4: the DiagnosticReport with its id on the reply, then its effect (the case is
    completed), settled again on a retry."""
    if row.diagnostic_report_id is not None:
        try:
            stored = fhir_store.read(hub, SYSTEM, "DiagnosticReport", row.diagnostic_report_id)
        except fhir_store.StoreError as exc:
            raise Conflict(f"case {case.id}: its DiagnosticReport is unreadable: {exc}") from None
        fhir_store.settle(hub, principal, [stored], rules)
        return
    content = _diagnostic_report(hub, case, row)
    report_id = hashlib.sha256(f"reply:{seed}".encode()).hexdigest()[:32]
    try:
        with transaction(hub.sessions) as session:
            stored = fhir_store.create_in(session, hub, principal, content, resource_id=report_id)
            session.execute(
                update(Reply).where(Reply.case_id == case.id).values(diagnostic_report_id=stored.id)
            )
    except IntegrityError:
        # A concurrent signer stored it first: settle what it stored.
        stored = fhir_store.read(hub, SYSTEM, "DiagnosticReport", report_id)
    except fhir_store.StoreError as exc:
        raise Conflict(f"case {case.id}: the DiagnosticReport was refused: {exc}") from None
    try:
        fhir_store.settle(hub, principal, [stored], rules)
    except Exception as exc:
        raise Conflict(
            f"case {case.id}: the report is stored but the case did not move: {exc}"
        ) from None


def _diagnostic_report(hub: Hub, case: Case, row: Reply) -> dict[str, Any]:
    content = _content(hub, row)
    assert row.signed_at is not None and row.signed_by is not None and row.pdf_blob_id
    with hub.sessions() as session:
        service_requests = list(
            session.scalars(
                select(FhirResource.id)
                .where(
                    FhirResource.case_id == case.id,
                    FhirResource.resource_type == "ServiceRequest",
                    FhirResource.deleted.is_(False),
                )
                .order_by(FhirResource.id)
            )
        )
        patient_resource = session.scalar(
            select(FhirResource.id)
            .where(
                FhirResource.resource_type == "Patient",
                FhirResource.clinic_id == case.clinic_id,
                FhirResource.patient_pk == case.patient_pk,
                FhirResource.deleted.is_(False),
            )
            .order_by(FhirResource.last_updated.desc())
            .limit(1)
        )
        patient = session.get_one(Patient, case.patient_pk)
        study_ids = list(
            session.scalars(
                select(CaseStudy.study_pk)
                .where(CaseStudy.case_id == case.id)
                .order_by(CaseStudy.study_pk)
            )
        )
        pdf = session.get_one(Blob, row.pdf_blob_id)
    data = b"".join(vault.read(hub, pdf))
    at = row.signed_at.isoformat().replace("+00:00", "Z")
    subject: dict[str, Any] = (
        {"reference": f"Patient/{patient_resource}"}
        if patient_resource
        else {"identifier": {"value": patient.patient_id}}
    )
    base = (hub.settings.public_url or "").rstrip("/")
    text = "\n\n".join(
        f"{name.capitalize()}: {content[name]}" for name in FIELDS if content[name].strip()
    )
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": REPLY_IDENTIFIER_SYSTEM, "value": case.id}],
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
                        "code": "RAD",
                        "display": "Radiology",
                    }
                ]
            }
        ],
        "code": {
            "coding": [
                {
                    "system": "http://loinc.org",
                    "code": "18748-4",
                    "display": "Diagnostic imaging study",
                }
            ],
            "text": "Teleconsultation report",
        },
        "subject": subject,
        "effectiveDateTime": at,
        "issued": at,
        "resultsInterpreter": [{"display": row.signed_by}],
        "conclusion": content["impression"],
        "presentedForm": [
            {
                "contentType": "application/pdf",
                "url": f"{base}/api/cases/{case.id}/reply/pdf",
                "size": len(data),
                "hash": base64.b64encode(
                    hashlib.sha1(data, usedforsecurity=False).digest()
                ).decode(),
                "title": "Teleconsultation report",
                "creation": at,
            },
            {
                "contentType": "text/plain; charset=utf-8",
                "data": base64.b64encode(text.encode()).decode(),
                "title": "Report text",
            },
        ],
    }
    if service_requests:
        report["basedOn"] = [{"reference": f"ServiceRequest/{i}"} for i in service_requests]
    if study_ids:
        report["imagingStudy"] = [{"reference": f"ImagingStudy/{i}"} for i in study_ids]
    if row.urgent:
        report["conclusionCode"] = [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "AA",
                        "display": "Critical abnormal",
                    }
                ],
                "text": "Urgent finding",
            }
        ]
    return report


def _finish(hub: Hub, case: Case, made: list[dict[str, str]]) -> None:
    """Step 5: signed, and the outbox event for forwarding, in one transaction."""
    with transaction(hub.sessions) as session:
        done = session.execute(
            update(Reply)
            .where(Reply.case_id == case.id, Reply.status == "signing")
            .values(status="signed", updated_at=utcnow())
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            return  # a concurrent signer finished first (and wrote the event)
        study_ids = sorted({m["study_pk"] for m in made})
        if not study_ids:
            study_ids = list(
                session.scalars(
                    select(CaseStudy.study_pk)
                    .where(CaseStudy.case_id == case.id)
                    .order_by(CaseStudy.study_pk)
                )
            )
        series = sorted({m["series_instance_uid"] for m in made})
        session.add(
            OutboxEvent(
                topic=REPLY_TOPIC,
                payload={
                    "case_id": case.id,
                    "study_ids": study_ids,
                    "series_instance_uids": series,
                },
            )
        )


def reseal(hub: Hub, new_key_id: str) -> int:
    """Reseal every reply's sealed content under the active key (saf.keys.rotate); how many."""
    keyring = hub.keyring
    resealed = 0
    with transaction(hub.sessions) as session:
        for row in session.scalars(select(Reply).where(Reply.content_sealed.is_not(None))):
            token = row.content_sealed
            if token and value_key_id(token) != new_key_id:
                row.content_sealed = reseal_value(keyring, token, context=_context(row.case_id))
                resealed += 1
    return resealed
