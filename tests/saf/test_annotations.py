"""Annotations: measurements against an image of known pixels and spacing, validation, and
who may draw (the specialist who claimed the case, until the reply is signed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from saf import annotations as anno
from saf import frames
from saf.annotations import Draft, Frozen, Invalid, NotAllowed, NotFound
from saf.cases import TaskStatus
from saf.db import transaction
from saf.hub import Hub
from saf.identity import Principal
from saf.models import Annotation, Case, Reply
from tests.viewer.consult import COL_MM, COLUMNS, ROW_MM, ROWS, SPECIALIST, ct_slice, make_consult


def _loaded(tmp_path: Path, *, spacing: bool = True, index: int = 0) -> frames.Loaded:
    path = ct_slice(
        tmp_path,
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        index=index,
        z=0.0,
        instance_number=1,
        spacing=spacing,
    )
    return frames.Loaded("test-instance", dcmread(path), 0)


def _draft(kind: str, points: list[list[float]], text: str | None = None) -> Draft:
    return Draft("test-instance", 1, kind, points, text)


# --------------------------------------------------------------------------- measurements


def test_line_length_uses_row_and_column_spacing(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path)

    across = anno.measure(loaded, _draft("line", [[10, 5], [20, 5]]))
    down = anno.measure(loaded, _draft("line", [[10, 5], [10, 15]]))
    diagonal = anno.measure(loaded, _draft("line", [[0, 0], [6, 8]]))

    assert across["length_mm"] == pytest.approx(10 * COL_MM)  # 8 mm
    assert down["length_mm"] == pytest.approx(10 * ROW_MM)  # 5 mm
    assert diagonal["length_mm"] == pytest.approx(math.hypot(6 * COL_MM, 8 * ROW_MM), abs=1e-3)
    assert diagonal["length_px"] == pytest.approx(10.0)
    assert across["spacing_source"] == "PixelSpacing"


def test_without_spacing_lengths_are_in_pixels_and_say_so(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path, spacing=False)

    line = anno.measure(loaded, _draft("line", [[0, 0], [6, 8]]))
    ellipse = anno.measure(loaded, _draft("ellipse", [[10, 10], [30, 20]]))

    assert line == {"length_px": 10.0, "note": "pixel spacing unknown"}
    assert "area_mm2" not in ellipse and ellipse["note"] == "pixel spacing unknown"
    assert ellipse["area_px2"] == pytest.approx(math.pi * 10 * 5, abs=1e-3)


def test_angle_is_measured_in_mm_space(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path)

    right = anno.measure(loaded, _draft("angle", [[30, 20], [20, 20], [20, 30]]))
    # 45 degrees in pixels, but a pixel is 0.8 mm wide and 0.5 mm tall.
    skewed = anno.measure(loaded, _draft("angle", [[30, 20], [20, 20], [30, 30]]))

    assert right["angle_deg"] == pytest.approx(90.0)
    assert skewed["angle_deg"] == pytest.approx(
        math.degrees(math.atan2(5 * 1.0, 8 * 1.0)), abs=1e-3
    )


def test_ellipse_area_and_statistics_in_hu(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path, index=1)  # HU = 10 * column - 100

    m = anno.measure(loaded, _draft("ellipse", [[10, 10], [30, 20]]))

    # Independent reference: every pixel centre tested against the ellipse.
    rows, cols = np.mgrid[0:ROWS, 0:COLUMNS]
    inside = ((cols + 0.5 - 20) / 10) ** 2 + ((rows + 0.5 - 15) / 5) ** 2 <= 1
    hu = (10 * cols - 100)[inside].astype(float)
    assert m["pixels"] == int(inside.sum())
    assert m["mean"] == pytest.approx(hu.mean(), abs=1e-3)
    assert m["mean"] == pytest.approx(95.0)  # centred on x = 20: columns 19.5 on average
    assert m["sd"] == pytest.approx(hu.std(), abs=1e-3)
    assert (m["min"], m["max"]) == (hu.min(), hu.max())
    assert m["unit"] == "HU"
    assert m["area_mm2"] == pytest.approx(math.pi * 10 * 5 * ROW_MM * COL_MM, abs=1e-3)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"instance_id": "i", "kind": "circle", "points": [[1, 1]]}, "kind"),
        ({"instance_id": "i", "kind": "line", "points": [[1, 1]]}, "points"),
        ({"instance_id": "i", "kind": "line", "points": [[1, 1], [1, "x"]]}, "points[1]"),
        ({"instance_id": "i", "kind": "line", "points": [[1, 1], [1, float("nan")]]}, "points[1]"),
        ({"instance_id": "i", "kind": "text", "points": [[1, 1]], "text": "  "}, "text"),
        ({"instance_id": "i", "kind": "arrow", "points": [[1, 1], [2, 2]], "text": 5}, "text"),
        ({"instance_id": "i", "frame": 0, "kind": "text", "points": [[1, 1]]}, "frame"),
        ({"kind": "text", "points": [[1, 1]], "text": "a"}, "instance_id"),
        ([1, 2], "body"),
    ],
)
def test_bad_bodies_name_the_field(body: object, field: str) -> None:
    with pytest.raises(Invalid) as caught:
        anno.draft_from_json(body)
    assert caught.value.field == field
    assert caught.value.status == 422


def test_points_off_the_image_and_missing_frames_are_refused(tmp_path: Path) -> None:
    loaded = _loaded(tmp_path)

    with pytest.raises(Invalid) as off:
        anno.measure(loaded, _draft("line", [[0, 0], [COLUMNS + 1, 3]]))
    with pytest.raises(Invalid) as frame:
        anno.measure(loaded, Draft("test-instance", 2, "text", [[1, 1]], "x"))
    with pytest.raises(Invalid) as flat:
        anno.measure(loaded, _draft("ellipse", [[5, 5], [5, 9]]))

    assert off.value.field == "points[1]"
    assert frame.value.field == "frame"
    assert flat.value.field == "points"
    # The far edge is on the image (a point on the last pixel's outer corner).
    assert anno.measure(loaded, _draft("line", [[0, 0], [COLUMNS, ROWS]]))["length_px"]


# --------------------------------------------------------------------------- writing


def _case(hub: Hub, case_id: str) -> Case:
    with hub.sessions() as session:
        return session.get_one(Case, case_id)


def test_the_claiming_specialist_draws_edits_and_deletes(hub: Hub, tmp_path: Path) -> None:
    consult = make_consult(hub, tmp_path)
    case = _case(hub, consult.case_id)
    draft = Draft(consult.instance_ids[1], 1, "line", [[10, 5], [20, 5]], "lesion")

    row = anno.create(hub, SPECIALIST, case, draft)
    assert row.measurement["length_mm"] == pytest.approx(8.0)
    assert anno.text_of(hub, row) == "lesion"
    assert _case(hub, case.id).status == TaskStatus.IN_PROGRESS  # work started

    moved = anno.update(
        hub,
        SPECIALIST,
        _case(hub, case.id),
        row.id,
        Draft(consult.instance_ids[1], 1, "line", [[10, 5], [10, 15]], None),
    )
    assert moved.id == row.id and moved.measurement["length_mm"] == pytest.approx(5.0)
    listed = anno.of_case(hub, case.id)
    assert [a.id for a in listed] == [row.id]
    assert anno.to_json(hub, listed[0])["text"] is None

    anno.delete(hub, SPECIALIST, _case(hub, case.id), row.id)
    assert anno.of_case(hub, case.id) == []
    with pytest.raises(NotFound):
        anno.delete(hub, SPECIALIST, _case(hub, case.id), row.id)


def test_the_label_is_sealed_at_rest(hub: Hub, tmp_path: Path) -> None:
    consult = make_consult(hub, tmp_path)
    draft = Draft(consult.instance_ids[0], 1, "text", [[3, 3]], "QUIXOTE nodule")

    row = anno.create(hub, SPECIALIST, _case(hub, consult.case_id), draft)

    with hub.sessions() as session:
        stored = session.get_one(Annotation, row.id)
    assert stored.text_sealed and "QUIXOTE" not in stored.text_sealed


def test_only_the_specialist_who_claimed_it_may_draw(hub: Hub, tmp_path: Path) -> None:
    consult = make_consult(hub, tmp_path)
    case = _case(hub, consult.case_id)
    draft = Draft(consult.instance_ids[0], 1, "arrow", [[1, 1], [9, 9]], None)
    colleague = Principal(
        kind="user",
        id="id-dr.lung",
        name="dr.lung",
        role="specialist",
        specialties=frozenset({"thoracic-radiology"}),
    )
    clinician = Principal(
        kind="user", id="id-c", name="dr.clinic", role="clinician", clinic_id=case.clinic_id
    )

    for who in (colleague, clinician):
        with pytest.raises(NotAllowed):
            anno.create(hub, who, case, draft)
    assert anno.of_case(hub, case.id) == []


def test_an_image_of_another_case_is_refused(hub: Hub, tmp_path: Path) -> None:
    first = make_consult(hub, tmp_path)
    other = make_consult(hub, tmp_path, patient_id="VIEW-2", claim_as=None)

    with pytest.raises(Invalid) as caught:
        anno.create(
            hub,
            SPECIALIST,
            _case(hub, first.case_id),
            Draft(other.instance_ids[0], 1, "arrow", [[1, 1], [9, 9]], None),
        )
    assert caught.value.field == "instance_id"


def test_annotations_freeze_once_signing_starts(hub: Hub, tmp_path: Path) -> None:
    consult = make_consult(hub, tmp_path)
    case = _case(hub, consult.case_id)
    draft = Draft(consult.instance_ids[0], 1, "arrow", [[1, 1], [9, 9]], None)
    row = anno.create(hub, SPECIALIST, case, draft)
    with transaction(hub.sessions) as session:
        session.add(Reply(case_id=case.id, status="signing"))

    with pytest.raises(Frozen):
        anno.create(hub, SPECIALIST, _case(hub, case.id), draft)
    with pytest.raises(Frozen):
        anno.update(hub, SPECIALIST, _case(hub, case.id), row.id, draft)
    with pytest.raises(Frozen):
        anno.delete(hub, SPECIALIST, _case(hub, case.id), row.id)
    with hub.sessions() as session:
        assert session.scalars(select(Annotation.id)).all() == [row.id]


def test_imager_pixel_spacing_is_used_and_named_when_pixel_spacing_is_absent(
    tmp_path: Path,
) -> None:
    loaded = _loaded(tmp_path, spacing=False)
    loaded.ds.ImagerPixelSpacing = [0.2, 0.2]
    loaded = frames.Loaded("test-instance", loaded.ds, 0)

    line = anno.measure(loaded, _draft("line", [[0, 0], [10, 0]]))

    assert line["length_mm"] == pytest.approx(2.0)
    assert line["spacing_source"] == "ImagerPixelSpacing"
