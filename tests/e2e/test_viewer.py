"""The viewer end to end in a real browser: log in, worklist, claim, an image painted,
window/level, scroll, a length that survives a reload, the reply, the clinic sees it;
the SR and GSPS land in the archive. Once at a desktop size with a mouse, once at a
tablet size with touch (swipe to scroll, pinch to zoom, draw with a finger)."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydicom import dcmread
from sqlalchemy import select

from saf import vault
from saf.demo import DEMO_CLINICIAN, DEMO_PASSWORD, DEMO_SPECIALIST
from saf.models import Blob, Instance, Series, Study
from tests.e2e.conftest import Served, demo_hub

pytestmark = pytest.mark.slow

SCREENSHOTS = Path(os.environ.get("SAF_E2E_SCREENSHOTS", "/tmp/saf-e2e-screenshots"))
"""Where the tests leave screenshots for a person to look at (bench/viewer.py makes the
README's)."""

CANVAS_STATS = """() => {
  const c = document.getElementById('image');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let lit = 0, sum = 0, hash = 0;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i];
    if (v > 8) lit++;
    sum += v;
    hash = (hash * 31 + v) | 0;
  }
  return {lit, mean: sum / (d.length / 4), hash, n: d.length / 4};
}"""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """A fresh demo hub per test (signing a reply freezes the case)."""
    with demo_hub(tmp_path / "data") as s:
        yield s


def log_in(page: Any, served: Served, username: str, path: str = "/") -> None:
    page.goto(served.url + path)
    page.wait_for_url(re.compile(r"/login\?next="))
    page.fill("#username", username)
    page.fill("#password", DEMO_PASSWORD)
    page.click("#login-submit")
    page.wait_for_url(re.compile(r"/(worklist|cases/)"))


def canvas(page: Any) -> dict[str, Any]:
    stats: dict[str, Any] = page.evaluate(CANVAS_STATS)
    return stats


def wait_full_paint(page: Any) -> None:
    page.wait_for_selector('#stage[data-painted="full"]', timeout=15000)


def wait_window_painted(page: Any, center: float, width: float) -> None:
    page.wait_for_function(
        f"""() => {{ const w = window.safViewer.paintedWin;
             return w && Math.round(w.center) === {center} && Math.round(w.width) === {width}
               && document.getElementById('stage').dataset.painted === 'full'; }}""",
        timeout=15000,
    )


def stage_box(page: Any) -> dict[str, float]:
    box: dict[str, float] = page.locator("#stage").bounding_box()
    return box


def open_case_as_specialist(page: Any, served: Served) -> None:
    log_in(page, served, DEMO_SPECIALIST)
    row = page.locator(f'tr.case-row[data-case="{served.demo.case_id}"]')
    row.wait_for()
    assert served.demo.worklist in page.locator("#worklists").inner_text()
    row.locator("button.claim").click()
    page.wait_for_url(re.compile(rf"/cases/{served.demo.case_id}$"))
    page.wait_for_selector("#patient-name")
    page.click("#open-viewer")
    page.wait_for_url(re.compile(r"/viewer"))
    wait_full_paint(page)


def annotations_api(page: Any, served: Served) -> list[dict[str, Any]]:
    response = page.request.get(f"{served.url}/api/cases/{served.demo.case_id}/annotations")
    assert response.ok, response.text()
    found: list[dict[str, Any]] = response.json()["annotations"]
    return found


def sign_reply(page: Any) -> None:
    page.fill("#reply-findings", "Small nodule in the right lower lobe.")
    page.fill("#reply-impression", "Probably benign nodule; follow up.")
    page.fill("#reply-recommendation", "CT in 6 months.")
    page.wait_for_function(
        "() => /draft saved/.test(document.getElementById('reply-saved').textContent)"
    )
    page.click("#reply-sign")
    page.wait_for_selector("#reply-signed", timeout=30000)


def clinic_sees_reply(browser: Any, served: Served, **context: Any) -> None:
    clinic = browser.new_context(**context)
    page = clinic.new_page()
    log_in(page, served, DEMO_CLINICIAN, f"/cases/{served.demo.case_id}")
    page.wait_for_selector("#reply-signed")
    assert "Probably benign nodule" in page.locator("#reply-signed").inner_text()
    # the clinic sees the images read-only: no drawing tools, no reply form
    page.click("#open-viewer")
    wait_full_paint(page)
    assert not page.locator("#tools").is_visible()
    assert page.locator("#reply-form").count() == 0
    page.wait_for_selector("#ann-list li.ann")  # the specialist's annotations are shown
    # the clinic's worklist lists the case as completed (it shows closed cases too)
    page.goto(served.url + "/worklist")
    row = page.locator(f'tr.case-row[data-case="{served.demo.case_id}"]')
    row.wait_for()
    assert "completed" in row.inner_text()
    assert row.locator("button.claim").count() == 0
    clinic.close()


def archived_reply_objects(served: Served) -> dict[str, Any]:
    """The SR and GSPS the reply stored as new series of the demo study, parsed."""
    found: dict[str, Any] = {}
    with served.hub.sessions() as session:
        rows = session.execute(
            select(Series.modality, Blob)
            .join(Study, Study.id == Series.study_pk)
            .join(Instance, Instance.series_pk == Series.id)
            .join(Blob, Blob.id == Instance.blob_id)
            .where(Study.id == served.demo.study_id, Series.modality.in_(("SR", "PR")))
        ).all()
        for modality, blob in rows:
            data = b"".join(vault.read(served.hub, blob))
            found[str(modality)] = dcmread(io.BytesIO(data))
    return found


def test_specialist_reads_annotates_and_replies_clinic_sees_it(
    browser: Any, served: Served
) -> None:
    context = browser.new_context(viewport={"width": 1366, "height": 860})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # a CSP violation or a failed request shows as a console error
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    open_case_as_specialist(page, served)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)

    first = canvas(page)
    assert first["lit"] > first["n"] * 0.05, first  # an image, not a blank canvas

    # window/level: a preset, then a drag; each repaints with new server-rendered pixels
    page.select_option("#preset", "-600,1500")
    wait_window_painted(page, -600, 1500)
    lung = canvas(page)
    assert lung["hash"] != first["hash"] and abs(lung["mean"] - first["mean"]) > 1
    box = stage_box(page)
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx, cy)
    page.mouse.down()
    page.mouse.move(cx + 60, cy + 40, steps=5)
    page.mouse.up()
    page.wait_for_function(
        "() => window.safViewer.paintedWin && window.safViewer.paintedWin.width !== 1500"
        " && document.getElementById('stage').dataset.painted === 'full'",
        timeout=15000,
    )
    dragged = canvas(page)
    assert dragged["hash"] != lung["hash"]

    # scroll: the wheel moves to another frame with other pixels
    before = page.evaluate("() => window.safViewer.index")
    page.mouse.wheel(0, 120)
    page.wait_for_function(f"() => window.safViewer.index === {before + 1}")
    wait_full_paint(page)
    page.wait_for_function(
        "() => document.getElementById('stage').dataset.frame === String(window.safViewer.index)"
    )
    scrolled = canvas(page)
    assert scrolled["hash"] != dragged["hash"]
    page.keyboard.press("ArrowUp")
    page.wait_for_function(f"() => window.safViewer.index === {before}")

    # the pixel value under the mouse, in HU
    page.mouse.move(cx + 3, cy + 3)
    page.wait_for_function("() => /HU$/.test(document.getElementById('hud-br').textContent)")

    # a length, drawn with the mouse, measured by the server in mm
    page.click('[data-mode="line"]')
    page.mouse.move(cx - 80, cy - 20)
    page.mouse.down()
    page.mouse.move(cx + 60, cy + 50, steps=6)
    page.mouse.up()
    page.wait_for_selector("#ann-list li.ann")
    text = page.locator("#ann-list li.ann .measure").first.inner_text()
    assert re.fullmatch(r"\d+(\.\d)? mm", text), text
    [saved] = annotations_api(page, served)
    assert saved["kind"] == "line" and saved["measurement"]["length_mm"] > 0
    page.screenshot(path=str(SCREENSHOTS / "viewer.png"))

    page.reload()
    wait_full_paint(page)
    page.wait_for_selector("#ann-list li.ann")
    assert page.locator("#ann-list li.ann .measure").first.inner_text() == text
    [again] = annotations_api(page, served)
    assert again["points"] == saved["points"]
    assert again["measurement"]["length_mm"] == saved["measurement"]["length_mm"]

    sign_reply(page)
    page.click("#logout")
    page.wait_for_url(re.compile(r"/login"))
    context.close()

    clinic_sees_reply(browser, served, viewport={"width": 1366, "height": 860})
    objects = archived_reply_objects(served)
    assert set(objects) == {"SR", "PR"}, objects
    assert objects["SR"].SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert objects["PR"].SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale SPS
    assert not errors, errors


def touch(cdp: Any, kind: str, points: list[tuple[float, float]]) -> None:
    cdp.send(
        "Input.dispatchTouchEvent",
        {
            "type": kind,
            "touchPoints": [{"x": x, "y": y, "id": i} for i, (x, y) in enumerate(points)],
        },
    )


def swipe(cdp: Any, start: tuple[float, float], end: tuple[float, float], steps: int = 8) -> None:
    touch(cdp, "touchStart", [start])
    for i in range(1, steps + 1):
        t = i / steps
        touch(
            cdp,
            "touchMove",
            [(start[0] + (end[0] - start[0]) * t, start[1] + (end[1] - start[1]) * t)],
        )
    touch(cdp, "touchEnd", [])


def test_the_same_flow_on_a_tablet_with_touch(browser: Any, served: Served) -> None:
    tablet = {
        "viewport": {"width": 820, "height": 1180},
        "device_scale_factor": 2,
        "is_mobile": True,
        "has_touch": True,
    }
    context = browser.new_context(**tablet)
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    open_case_as_specialist(page, served)
    assert canvas(page)["lit"] > 0
    assert page.evaluate("() => window.safViewer.mode") == "scroll"  # touch starts scrolling

    box = stage_box(page)
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    before = page.evaluate("() => window.safViewer.index")
    swipe(cdp, (cx, cy - 100), (cx, cy + 60))
    page.wait_for_function(f"() => window.safViewer.index !== {before}")
    # a tap reads the pixel value (there is no hover on a tablet)
    touch(cdp, "touchStart", [(cx, cy)])
    touch(cdp, "touchEnd", [])
    page.wait_for_function("() => /HU$/.test(document.getElementById('hud-br').textContent)")

    scale = page.evaluate("() => window.safViewer.view.scale")
    touch(cdp, "touchStart", [(cx - 40, cy), (cx + 40, cy)])
    for step in range(1, 9):
        touch(cdp, "touchMove", [(cx - 40 - 10 * step, cy), (cx + 40 + 10 * step, cy)])
    touch(cdp, "touchEnd", [])
    assert page.evaluate("() => window.safViewer.view.scale") > scale * 1.5  # pinched in

    page.locator('[data-mode="line"]').tap()
    swipe(cdp, (cx - 60, cy - 30), (cx + 40, cy + 30))
    page.wait_for_selector("#ann-list li.ann")
    text = page.locator("#ann-list li.ann .measure").first.inner_text()
    assert text.endswith(" mm"), text
    page.screenshot(path=str(SCREENSHOTS / "viewer-tablet.png"))
    page.reload()
    page.wait_for_selector("#ann-list li.ann")
    assert page.locator("#ann-list li.ann .measure").first.inner_text() == text

    sign_reply(page)
    context.close()
    clinic_sees_reply(browser, served, **tablet)
    assert set(archived_reply_objects(served)) == {"SR", "PR"}


def test_an_unauthenticated_browser_is_sent_to_login_and_back(browser: Any, served: Served) -> None:
    context = browser.new_context()
    page = context.new_page()
    target = f"/cases/{served.demo.case_id}/viewer"
    log_in(page, served, DEMO_SPECIALIST, target)
    assert urlsplit(page.url).path == target  # back where the browser wanted to go
    # not claimed yet: no drawing tools; the viewer offers the claim
    wait_full_paint(page)
    page.wait_for_selector("#reply-claim")
    assert not page.locator("#tools").is_visible()
    page.click("#reply-claim")
    page.wait_for_selector("#reply-form")
    assert page.locator("#tools").is_visible()
    # wrong password: the form says so and nothing else happens
    page.click("#logout")
    page.wait_for_url(re.compile(r"/login"))
    page.fill("#username", DEMO_SPECIALIST)
    page.fill("#password", "not the password")
    page.click("#login-submit")
    page.wait_for_selector("#login-error:not([hidden])")
    assert "Wrong username or password" in page.locator("#login-error").inner_text()
    context.close()


def test_worklist_screenshot_and_session_expiry(browser: Any, served: Served) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    page = context.new_page()
    log_in(page, served, DEMO_SPECIALIST)
    page.wait_for_selector("tr.case-row")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "worklist.png"))
    # the session ends (another tab logged out): the page says so and offers to come back
    page.request.delete(f"{served.url}/auth/session")
    page.click("#f-priority")
    page.select_option("#f-priority", "routine")
    page.wait_for_selector("#banner.error:not([hidden])")
    assert "session expired" in page.locator("#banner").inner_text().lower()
    link = page.locator("#banner a").get_attribute("href")
    assert link == "/login?next=%2Fworklist"
    context.close()


def test_angle_ellipse_edit_and_delete(browser: Any, served: Served) -> None:
    context = browser.new_context(viewport={"width": 1366, "height": 860})
    page = context.new_page()
    open_case_as_specialist(page, served)
    box = stage_box(page)
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2

    # an angle: drag the first arm, then click the third point (a right angle)
    page.click('[data-mode="angle"]')
    page.mouse.move(cx - 100, cy)
    page.mouse.down()
    page.mouse.move(cx, cy, steps=4)
    page.mouse.up()
    page.mouse.move(cx, cy - 100, steps=4)
    page.mouse.click(cx, cy - 100)
    page.wait_for_function("() => window.safViewer.annotations.length === 1")
    # an ellipse ROI: area, mean and SD in HU
    page.click('[data-mode="ellipse"]')
    page.mouse.move(cx + 40, cy + 40)
    page.mouse.down()
    page.mouse.move(cx + 120, cy + 100, steps=4)
    page.mouse.up()
    page.wait_for_function("() => window.safViewer.annotations.length === 2")
    kinds = {a["kind"]: a for a in annotations_api(page, served)}
    assert abs(kinds["angle"]["measurement"]["angle_deg"] - 90) < 1.5
    ellipse = kinds["ellipse"]["measurement"]
    assert ellipse["area_mm2"] > 0 and ellipse["unit"] == "HU"
    listed = page.locator("#ann-list").inner_text()
    assert "°" in listed and "mm²" in listed and "HU" in listed

    # select the ellipse by its outline and move it: saved with PUT, same area
    page.click('[data-mode="select"]')
    page.mouse.move(cx + 120, cy + 70)
    page.mouse.down()
    page.mouse.move(cx + 150, cy + 90, steps=4)
    page.mouse.up()
    page.wait_for_function(
        f"""() => window.safViewer.annotations.some(a => a.kind === 'ellipse'
              && a.updated_at !== {kinds["ellipse"]["updated_at"]!r})"""
    )
    moved = {a["kind"]: a for a in annotations_api(page, served)}["ellipse"]
    assert moved["points"] != kinds["ellipse"]["points"]
    assert abs(moved["measurement"]["area_mm2"] - ellipse["area_mm2"]) < 0.02 * ellipse["area_mm2"]

    page.keyboard.press("Delete")
    page.wait_for_function("() => window.safViewer.annotations.length === 1")
    assert [a["kind"] for a in annotations_api(page, served)] == ["angle"]

    # an arrow, and a text placed with a click (its words asked in a dialog)
    page.click('[data-mode="arrow"]')
    page.mouse.move(cx - 150, cy + 150)
    page.mouse.down()
    page.mouse.move(cx - 60, cy + 60, steps=4)
    page.mouse.up()
    page.once("dialog", lambda dialog: dialog.accept("calcified granuloma"))
    page.click('[data-mode="text"]')
    page.mouse.click(cx - 160, cy + 170)
    page.wait_for_function("() => window.safViewer.annotations.length === 3")
    made = {a["kind"]: a for a in annotations_api(page, served)}
    assert len(made["arrow"]["points"]) == 2
    assert made["text"]["text"] == "calcified granuloma" and len(made["text"]["points"]) == 1
    context.close()


def test_question_answered_by_the_clinic(browser: Any, served: Served) -> None:
    context = browser.new_context(viewport={"width": 1366, "height": 860})
    page = context.new_page()
    open_case_as_specialist(page, served)
    page.fill("#question-text", "Any prior imaging of the chest?")
    page.click("#ask-question")
    page.wait_for_selector("#banner:has-text('Question sent')")
    context.close()

    clinic = browser.new_context()
    page = clinic.new_page()
    log_in(page, served, DEMO_CLINICIAN, f"/cases/{served.demo.case_id}")
    page.wait_for_selector("#communications li.from-specialist")
    assert "Any prior imaging" in page.locator("#communications").inner_text()
    assert page.locator("#case-status").inner_text() == "on-hold"
    page.fill("#comment-text", "Yes, a chest X-ray in 2023, normal.")
    page.click("#comment-form button[type=submit]")
    page.wait_for_selector("#communications li.from-clinic")
    page.wait_for_function(
        "() => document.getElementById('case-status').textContent === 'in-progress'"
    )
    clinic.close()

    context = browser.new_context()
    page = context.new_page()
    log_in(page, served, DEMO_SPECIALIST, f"/cases/{served.demo.case_id}")
    page.wait_for_selector("#communications li.from-clinic")
    assert "chest X-ray in 2023" in page.locator("#communications").inner_text()
    context.close()


def test_clinic_adds_a_document_shown_on_the_case_page(
    browser: Any, served: Served, tmp_path: Path
) -> None:
    from PIL import Image

    photo = tmp_path / "wound.png"
    Image.new("RGB", (40, 30), (200, 40, 40)).save(photo)
    context = browser.new_context()
    page = context.new_page()
    log_in(page, served, DEMO_CLINICIAN, f"/cases/{served.demo.case_id}")
    page.set_input_files("#upload-file", str(photo))
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#documents img.doc-image")
    assert (
        page.evaluate("() => document.querySelector('#documents img.doc-image').naturalWidth") == 40
    )  # the bytes came back through /fhir/Binary
    context.close()
    # the specialist of the case sees it too
    context = browser.new_context()
    page = context.new_page()
    log_in(page, served, DEMO_SPECIALIST, f"/cases/{served.demo.case_id}")
    page.wait_for_selector("#documents img.doc-image")
    assert page.locator("#documents").inner_text().count("wound.png") == 0  # shown as image
    page.wait_for_function("() => document.querySelector('#documents img.doc-image').complete")
    assert (
        page.evaluate("() => document.querySelector('#documents img.doc-image').naturalWidth") == 40
    )  # the specialist may read the bytes too (the Binary is linked to the case)
    context.close()


def test_a_referral_letter_pdf_is_shown_inline_on_the_case_page(
    browser: Any, served: Served, tmp_path: Path
) -> None:
    """The clinic uploads a PDF; the specialist's case page frames it (our own origin may
    frame a PDF, nothing else may) and the frame holds the document, not an error page."""
    from fpdf import FPDF

    letter = FPDF()
    letter.add_page()
    letter.set_font("helvetica", size=14)
    letter.cell(text="Referral letter (synthetic)")
    path = tmp_path / "letter.pdf"
    letter.output(str(path))

    context = browser.new_context()
    page = context.new_page()
    log_in(page, served, DEMO_CLINICIAN, f"/cases/{served.demo.case_id}")
    page.set_input_files("#upload-file", str(path))
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#documents iframe.doc-pdf")
    context.close()

    context = browser.new_context()
    page = context.new_page()
    with page.expect_response(re.compile(r"/fhir/Binary/[^/]+$")) as answered:
        log_in(page, served, DEMO_SPECIALIST, f"/cases/{served.demo.case_id}")
        page.wait_for_selector("#documents iframe.doc-pdf")
    response = answered.value
    assert response.status == 200
    assert response.headers["content-type"] == "application/pdf"
    # the identical bytes, through /fhir/Binary, with the reader's session
    assert page.request.get(response.url).body() == path.read_bytes()
    framed = [f for f in page.frames if "/fhir/Binary/" in f.url]
    assert framed, [f.url for f in page.frames]  # a refused frame would be chrome-error://
    context.close()
