"""The reply: drafts, questions and answers, and signing (SR and GSPS made with highdicom and
stored through the ingest path, the PDF, the DiagnosticReport, the case completed, the
outbox event), idempotent on retry and after a crash between steps."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from saf import annotations as anno
from saf import fhir_store, keys, replies, vault
from saf.annotations import Draft, Frozen, Invalid, NotAllowed
from saf.cases import TaskStatus
from saf.crypto import value_key_id
from saf.hub import Hub
from saf.identity import SYSTEM, Principal
from saf.models import (
    Annotation,
    Blob,
    Case,
    CaseMessage,
    FhirResource,
    Instance,
    OutboxEvent,
    Reply,
    Series,
)
from saf.pipeline import REPLY_TOPIC
from saf.replies import ReplyDraft
from tests.viewer.consult import RULES, SPECIALIST, Consult, make_consult

DRAFT = ReplyDraft(
    findings="A 8 mm nodule in the right upper lobe.",
    impression="Probably benign nodule.",
    recommendation="CT follow-up in 12 months.",
    urgent=False,
)


def _case(hub: Hub, case_id: str) -> Case:
    with hub.sessions() as session:
        return session.get_one(Case, case_id)


def _clinician(consult: Consult) -> Principal:
    return Principal(
        kind="user", id="id-n", name="nurse.a", role="clinician", clinic_id=consult.clinic_id
    )


def _annotate(hub: Hub, consult: Consult) -> None:
    case = _case(hub, consult.case_id)
    marks: tuple[tuple[str, list[list[float]], str | None], ...] = (
        ("line", [[10, 5], [20, 5]], "nodule"),
        ("ellipse", [[10, 10], [30, 20]], None),
        ("angle", [[30, 20], [20, 20], [20, 30]], None),
        ("arrow", [[40, 30], [30, 20]], "here"),
        ("text", [[5, 35]], "calcified"),
    )
    for kind, points, text in marks:
        anno.create(hub, SPECIALIST, case, Draft(consult.instance_ids[0], 1, kind, points, text))


def _counts(hub: Hub) -> dict[str, int]:
    with hub.sessions() as session:
        return {
            model.__tablename__: int(session.scalar(select(func.count()).select_from(model)) or 0)
            for model in (Instance, Series, Blob, FhirResource, OutboxEvent, CaseMessage)
        }


def test_signing_makes_sr_gsps_pdf_and_report(hub: Hub, tmp_path: Path) -> None:
    consult = make_consult(hub, tmp_path)
    _annotate(hub, consult)
    replies.save_draft(hub, SPECIALIST, _case(hub, consult.case_id), DRAFT)

    replies.sign(hub, SPECIALIST, _case(hub, consult.case_id), RULES)

    case = _case(hub, consult.case_id)
    assert case.status == TaskStatus.COMPLETED
    view = replies.view(hub, _clinician(consult), case)
    assert view["status"] == "signed" and view["signed_by"] == "dr.thorax"
    assert view["impression"] == DRAFT.impression and view["signed_at"]
    assert view["pdf_url"] == f"/api/cases/{case.id}/reply/pdf"
    assert sorted(o["modality"] for o in view["objects"]) == ["PR", "SR"]

    # The SR and GSPS are new series of the study, in the index like any instance.
    with hub.sessions() as session:
        series = {
            s.modality: s
            for s in session.scalars(select(Series).where(Series.study_pk == consult.study_id))
        }
        assert set(series) == {"CT", "SR", "PR"}
        assert {o["series_id"] for o in view["objects"]} == {series["SR"].id, series["PR"].id}
        stored = {
            m: session.scalars(select(Instance).where(Instance.series_pk == series[m].id)).one()
            for m in ("SR", "PR")
        }
        blobs = {m: session.get_one(Blob, i.blob_id) for m, i in stored.items()}
    sr_ds = dcmread(io.BytesIO(b"".join(vault.read(hub, blobs["SR"]))))
    pr_ds = dcmread(io.BytesIO(b"".join(vault.read(hub, blobs["PR"]))))

    report = hd.sr.Comprehensive3DSR.from_dataset(sr_ds)
    tree = report.content
    assert isinstance(tree, hd.sr.MeasurementReport)
    groups = tree.get_planar_roi_measurement_groups()
    values = {m.name.meaning: (m.value, m.unit.value) for g in groups for m in g.get_measurements()}
    assert len(groups) == 3  # line, ellipse, angle; arrows and text go to the GSPS
    assert values["Length"][0] == pytest.approx(8.0) and values["Length"][1] == "mm"
    assert values["Angle"][0] == pytest.approx(90.0) and values["Angle"][1] == "deg"
    assert values["Mean"][0] == pytest.approx(195.0) and values["Mean"][1] == "[hnsf'U]"
    assert values["Area"][1] == "mm2"
    with hub.sessions() as session:
        study_uid = session.get_one(Series, consult.series_id).study.study_instance_uid
    assert sr_ds.StudyInstanceUID == study_uid
    assert sr_ds.PatientID == "VIEW-1" and sr_ds.VerificationFlag == "VERIFIED"
    ct_uid = next(
        i.sop_instance_uid
        for i in _instances(hub, consult.series_id)
        if i.id == consult.instance_ids[0]
    )
    region = groups[0].roi
    assert region is not None
    source = region.ContentSequence[0].ReferencedSOPSequence[0]
    assert source.ReferencedSOPInstanceUID == ct_uid

    assert pr_ds.SOPClassUID.name == "Grayscale Softcopy Presentation State Storage"
    [annotation] = pr_ds.GraphicAnnotationSequence
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == ct_uid
    kinds = sorted(g.GraphicType for g in annotation.GraphicObjectSequence)
    assert kinds == ["ELLIPSE", "POLYLINE", "POLYLINE", "POLYLINE", "POLYLINE"]
    texts = {t.UnformattedTextValue for t in annotation.TextObjectSequence}
    assert {"calcified", "here"} <= texts and any("8.0 mm" in t for t in texts)

    pdf = replies.pdf_bytes(hub, case)
    assert pdf is not None and pdf.startswith(b"%PDF") and len(pdf) > 2000
    assert pdf.count(b"/Subtype /Image") == 1  # the one annotated frame, as a key image

    dr = fhir_store.read(hub, SYSTEM, "DiagnosticReport", view["diagnostic_report"].split("/")[1])
    content = dr.content or {}
    assert content["status"] == "final" and content["conclusion"] == DRAFT.impression
    assert content["imagingStudy"] == [{"reference": f"ImagingStudy/{consult.study_id}"}]
    assert content["presentedForm"][0]["contentType"] == "application/pdf"
    assert content["presentedForm"][0]["size"] == len(pdf)
    assert dr.case_id == case.id and dr.clinic_id == consult.clinic_id

    with hub.sessions() as session:
        [event] = session.scalars(select(OutboxEvent).where(OutboxEvent.topic == REPLY_TOPIC))
    assert event.payload == {
        "case_id": case.id,
        "study_ids": [consult.study_id],
        "series_instance_uids": sorted(
            [series["SR"].series_instance_uid, series["PR"].series_instance_uid]
        ),
    }


def _instances(hub: Hub, series_id: str) -> list[Instance]:
    with hub.sessions() as session:
        return list(session.scalars(select(Instance).where(Instance.series_pk == series_id)))


def test_signing_twice_changes_nothing(hub: Hub, tmp_path: Path) -> None:
    consult = make_consult(hub, tmp_path)
    _annotate(hub, consult)
    replies.save_draft(hub, SPECIALIST, _case(hub, consult.case_id), DRAFT)
    replies.sign(hub, SPECIALIST, _case(hub, consult.case_id), RULES)
    first = replies.view(hub, SPECIALIST, _case(hub, consult.case_id))
    before = _counts(hub)

    replies.sign(hub, SPECIALIST, _case(hub, consult.case_id), RULES)

    assert _counts(hub) == before
    assert replies.view(hub, SPECIALIST, _case(hub, consult.case_id)) == first


def test_a_signing_interrupted_after_any_step_completes_once(hub: Hub, tmp_path: Path) -> None:
    consult = make_consult(hub, tmp_path)
    _annotate(hub, consult)
    replies.save_draft(hub, SPECIALIST, _case(hub, consult.case_id), DRAFT)
    case = _case(hub, consult.case_id)
    # Steps 1 to 3 done (objects stored, PDF sealed), then the process died.
    row = replies._begin(hub, SPECIALIST, case)
    seed = f"{case.id}:{row.signed_at.isoformat() if row.signed_at else ''}"
    marks = replies._marks(hub, case)
    replies._make_objects(hub, case, row, marks, seed)
    replies._store_pdf(hub, case, row, marks)
    with pytest.raises(Frozen):  # frozen from step 1 on
        anno.create(hub, SPECIALIST, case, Draft(consult.instance_ids[0], 1, "text", [[1, 1]], "x"))
    halfway = _counts(hub)

    replies.sign(hub, SPECIALIST, _case(hub, consult.case_id), RULES)

    after = _counts(hub)
    assert after["instance"] == halfway["instance"]  # SR and GSPS not stored again
    assert after["blob"] == halfway["blob"]  # nor the PDF
    assert after["fhir_resource"] == halfway["fhir_resource"] + 1  # the report
    assert after["outbox"] - halfway["outbox"] >= 1
    assert _case(hub, consult.case_id).status == TaskStatus.COMPLETED
    with hub.sessions() as session:
        assert session.get_one(Reply, case.id).status == "signed"
        assert (
            session.scalar(
                select(func.count())
                .select_from(OutboxEvent)
                .where(OutboxEvent.topic == REPLY_TOPIC)
            )
            == 1
        )


def test_after_signing_everything_is_frozen(hub: Hub, tmp_path: Path) -> None:
    consult = make_consult(hub, tmp_path)
    _annotate(hub, consult)
    replies.save_draft(hub, SPECIALIST, _case(hub, consult.case_id), DRAFT)
    replies.sign(hub, SPECIALIST, _case(hub, consult.case_id), RULES)
    case = _case(hub, consult.case_id)
    [first, *_] = anno.of_case(hub, case.id)
    draft = Draft(consult.instance_ids[0], 1, "text", [[1, 1]], "late")

    with pytest.raises(Frozen):
        anno.create(hub, SPECIALIST, case, draft)
    with pytest.raises(Frozen):
        anno.update(hub, SPECIALIST, case, first.id, draft)
    with pytest.raises(Frozen):
        anno.delete(hub, SPECIALIST, case, first.id)
    with pytest.raises(Frozen):
        replies.save_draft(hub, SPECIALIST, case, DRAFT)


def test_a_reply_without_annotations_or_impression(hub: Hub, tmp_path: Path) -> None:
    consult = make_consult(hub, tmp_path)
    case = _case(hub, consult.case_id)
    replies.save_draft(hub, SPECIALIST, case, ReplyDraft("nothing", "", "", False))
    with pytest.raises(Invalid) as caught:
        replies.sign(hub, SPECIALIST, case, RULES)
    assert caught.value.field == "impression"

    replies.save_draft(hub, SPECIALIST, case, ReplyDraft("nothing", "Normal.", "", True))
    replies.sign(hub, SPECIALIST, _case(hub, case.id), RULES)

    view = replies.view(hub, SPECIALIST, _case(hub, case.id))
    assert view["status"] == "signed" and view["objects"] == [] and view["urgent"] is True
    assert _case(hub, case.id).status == TaskStatus.COMPLETED


def test_drafts_are_the_specialists_until_signed(hub: Hub, tmp_path: Path) -> None:
    consult = make_consult(hub, tmp_path)
    case = _case(hub, consult.case_id)
    nurse = _clinician(consult)
    with pytest.raises(NotAllowed):
        replies.save_draft(hub, nurse, case, DRAFT)
    replies.save_draft(hub, SPECIALIST, case, DRAFT)

    mine = replies.view(hub, SPECIALIST, _case(hub, case.id))
    theirs = replies.view(hub, nurse, _case(hub, case.id))

    assert mine["status"] == "draft" and mine["findings"] == DRAFT.findings
    assert theirs["status"] == "draft" and theirs["findings"] is None
    with hub.sessions() as session:
        sealed = session.get_one(Reply, case.id).content_sealed or ""
    assert "nodule" not in sealed


def test_a_question_puts_the_case_on_hold_and_the_answer_resumes_it(
    hub: Hub, tmp_path: Path
) -> None:
    consult = make_consult(hub, tmp_path)
    nurse = _clinician(consult)
    with pytest.raises(NotAllowed):
        replies.comment(hub, SPECIALIST, _case(hub, consult.case_id), "hi", RULES)

    replies.ask(hub, SPECIALIST, _case(hub, consult.case_id), "Any prior imaging?", RULES)
    assert _case(hub, consult.case_id).status == TaskStatus.ON_HOLD
    replies.comment(hub, nurse, _case(hub, consult.case_id), "None, first scan.", RULES)
    assert _case(hub, consult.case_id).status == TaskStatus.IN_PROGRESS

    talk = replies.view(hub, nurse, _case(hub, consult.case_id))["communications"]
    assert [(c["from"], c["author"], c["text"]) for c in talk] == [
        ("specialist", "dr.thorax", "Any prior imaging?"),
        ("clinic", "nurse.a", "None, first scan."),
    ]
    answer = fhir_store.read(hub, SYSTEM, "Communication", talk[1]["id"]).content or {}
    assert answer["inResponseTo"] == [{"reference": f"Communication/{talk[0]['id']}"}]
    assert answer["about"] == [{"reference": f"Task/{consult.case_id}"}]


def test_key_rotation_reseals_annotation_texts_and_reply_drafts(hub: Hub, tmp_path: Path) -> None:
    consult = make_consult(hub, tmp_path)
    _annotate(hub, consult)
    replies.save_draft(hub, SPECIALIST, _case(hub, consult.case_id), DRAFT)

    report = keys.rotate(hub)

    with hub.sessions() as session:
        sealed = [a.text_sealed for a in session.scalars(select(Annotation)) if a.text_sealed]
        sealed.append(session.get_one(Reply, consult.case_id).content_sealed or "")
    assert sealed and {value_key_id(t) for t in sealed} == {report.new_key_id}
    assert report.fields_resealed >= len(sealed)
    case = _case(hub, consult.case_id)
    texts = {anno.text_of(hub, row) for row in anno.of_case(hub, case.id)}
    assert {"nodule", "here", "calcified"} <= texts
    assert replies.view(hub, SPECIALIST, case)["findings"] == DRAFT.findings
