"""The signed reply as a PDF (fpdf2): header, patient, clinic, the report, key images, signature.

Key images are frames the specialist annotated, rendered by saf.render and drawn over
with the annotations (saf.replies makes them); this module only lays the page out.
The PDF uses the core Helvetica font, so text is folded to Latin-1 (characters outside
it print as "?"); the report's text of record is the DiagnosticReport and the SR.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from fpdf import FPDF

TITLE: Final = "Teleconsultation report"
IMAGE_WIDTH_MM: Final = 85.0
"""Key images are laid out two per row at this width."""


@dataclass(frozen=True)
class KeyImage:
    """A rendered, annotated frame and its caption (series, frame; no PHI beyond the case)."""

    data: bytes
    """JPEG or PNG bytes."""
    caption: str
    width: int
    height: int


@dataclass(frozen=True)
class ReportContent:
    """Everything printed on the report."""

    case_id: str
    clinic: str
    patient_name: str | None
    patient_id: str
    patient_sex: str | None
    patient_birth_date: str | None
    studies: list[str]
    findings: str
    impression: str
    recommendation: str
    urgent: bool
    signed_by: str
    signed_at: datetime
    specialty: str
    key_images: Sequence[KeyImage] = field(default_factory=list)
    measurements: Sequence[str] = field(default_factory=list)


def _latin1(text: str) -> str:
    return text.encode("latin-1", "replace").decode("latin-1")


def render_pdf(content: ReportContent) -> bytes:
    """The report as PDF bytes."""
    pdf = FPDF(format="A4")
    pdf.set_creation_date(content.signed_at)
    pdf.set_title(f"{TITLE} {content.case_id}")
    pdf.set_author(_latin1(content.signed_by))
    pdf.set_creator("saf")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()

    pdf.set_font("Helvetica", "B", 16)
    pdf.cell(0, 10, TITLE, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("Helvetica", "", 9)
    pdf.cell(
        0,
        5,
        _latin1(f"Case {content.case_id} - {content.specialty} - from {content.clinic}"),
        new_x="LMARGIN",
        new_y="NEXT",
    )
    if content.urgent:
        pdf.set_text_color(200, 0, 0)
        pdf.set_font("Helvetica", "B", 12)
        pdf.cell(0, 8, "URGENT FINDING", new_x="LMARGIN", new_y="NEXT")
        pdf.set_text_color(0, 0, 0)
    pdf.ln(2)

    _heading(pdf, "Patient")
    pdf.set_font("Helvetica", "", 10)
    rows = [
        ("Name", content.patient_name or "-"),
        ("Patient ID (clinic)", content.patient_id),
        ("Sex", content.patient_sex or "-"),
        ("Birth date", content.patient_birth_date or "-"),
        ("Clinic", content.clinic),
        ("Studies", "; ".join(content.studies) or "-"),
    ]
    for label, value in rows:
        pdf.set_font("Helvetica", "B", 10)
        pdf.cell(40, 6, _latin1(label))
        pdf.set_font("Helvetica", "", 10)
        pdf.multi_cell(0, 6, _latin1(value), new_x="LMARGIN", new_y="NEXT")

    for title, text in (
        ("Findings", content.findings),
        ("Impression", content.impression),
        ("Recommendation", content.recommendation),
    ):
        _heading(pdf, title)
        pdf.set_font("Helvetica", "", 10)
        pdf.multi_cell(0, 5, _latin1(text or "-"), new_x="LMARGIN", new_y="NEXT")

    if content.measurements:
        _heading(pdf, "Measurements")
        pdf.set_font("Helvetica", "", 9)
        for line in content.measurements:
            pdf.multi_cell(0, 5, _latin1(f"- {line}"), new_x="LMARGIN", new_y="NEXT")

    if content.key_images:
        _heading(pdf, "Key images")
        _images(pdf, content.key_images)

    pdf.ln(6)
    pdf.set_font("Helvetica", "I", 10)
    signed = content.signed_at.strftime("%Y-%m-%d %H:%M UTC")
    pdf.multi_cell(
        0,
        5,
        _latin1(f"Electronically signed by {content.signed_by} on {signed}."),
        new_x="LMARGIN",
        new_y="NEXT",
    )
    return bytes(pdf.output())


def _heading(pdf: FPDF, text: str) -> None:
    pdf.ln(3)
    pdf.set_font("Helvetica", "B", 12)
    pdf.cell(0, 7, text, new_x="LMARGIN", new_y="NEXT")
    pdf.set_draw_color(160, 160, 160)
    pdf.line(pdf.l_margin, pdf.get_y(), pdf.w - pdf.r_margin, pdf.get_y())
    pdf.ln(1)


def _images(pdf: FPDF, images: Sequence[KeyImage]) -> None:
    left = pdf.l_margin
    for i, image in enumerate(images):
        height = IMAGE_WIDTH_MM * image.height / max(1, image.width)
        column = i % 2
        if column == 0 and pdf.get_y() + height + 8 > pdf.h - pdf.b_margin:
            pdf.add_page()
        x = left + column * (IMAGE_WIDTH_MM + 5)
        y = pdf.get_y()
        pdf.image(io.BytesIO(image.data), x=x, y=y, w=IMAGE_WIDTH_MM, h=height)
        pdf.set_xy(x, y + height + 1)
        pdf.set_font("Helvetica", "", 8)
        pdf.cell(IMAGE_WIDTH_MM, 4, _latin1(image.caption)[:90])
        if column == 1 or i == len(images) - 1:
            pdf.set_xy(left, y + height + 7)
        else:
            pdf.set_xy(left, y)
