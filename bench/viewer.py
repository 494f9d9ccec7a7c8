"""Viewer benchmark, measured in Debian's Chromium: first image after opening a case,
scrolling a 200-slice CT, and the JS + CSS the viewer page ships.

A demo-mode hub (SQLite, local encrypted blobs) gets one generated CT (200 x 512x512 by
default) routed to the demo specialist's worklist, and is served by uvicorn on loopback.
Chromium (headless, Playwright, never downloaded) logs in as the specialist, then:

* first image: a fresh browser context (empty cache) opens ``/cases/{id}/viewer``; the
  page records ``performance.now()`` (ms since navigation start) when the canvas is
  first painted (the thumbnail-size frame) and when the full-size frame is painted.
  Once on loopback and once under CDP network emulation of 1.5 Mbit/s with 300 ms
  latency (``Network.emulateNetworkConditions``). Each is repeated; median and worst
  are printed. The hub's server caches are warm after the first repetition (as for a
  specialist opening their second case of the day), the browser cache never is;
* scroll: once every frame of the series is prefetched, the slider is stepped through
  all 200 frames, one step per animation frame, and the frames per second at which a
  full-quality frame was on the canvas are reported;
* bytes: the uncompressed size of every script and stylesheet the viewer page loads.

Run from the repository root::

    python -m bench.viewer [--count 200] [--size 512] [--repeat 5] [--screenshots DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGETS = {
    "first_image_loopback_ms": 500.0,
    "first_image_slow_link_ms": 2000.0,
    "scroll_fps": 20.0,
    "js_css_bytes": 200 * 1024,
}

SLOW_LINK = {
    "offline": False,
    "latency": 300,  # ms added to each round trip
    "downloadThroughput": 1_500_000 / 8,  # bytes/s
    "uploadThroughput": 1_500_000 / 8,
}

SCROLL_JS = """async () => {
  const s = window.safViewer, slider = document.getElementById('slider');
  const n = s.frames.length, frame = () => new Promise(r => requestAnimationFrame(r));
  await frame();
  let full = 0;
  const t0 = performance.now();
  for (let i = 0; i < n; i++) {
    slider.value = String(i + 1);
    slider.dispatchEvent(new Event('input'));
    await frame();
    if (s.painted && s.painted.exact && s.painted.index === i) full++;
  }
  const seconds = (performance.now() - t0) / 1000;
  return {frames: n, full, seconds, fps: full / seconds};
}"""


def log_in(context: Any, url: str, username: str, password: str) -> None:
    page = context.new_page()
    page.goto(f"{url}/login")
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("#login-submit")
    page.wait_for_url("**/worklist")
    page.close()


def open_viewer(browser: Any, url: str, case_id: str, slow: bool) -> dict[str, Any]:
    """One cold open of the viewer; returns the page's paint times and loaded bytes."""
    from saf.demo import DEMO_PASSWORD, DEMO_SPECIALIST

    context = browser.new_context(viewport={"width": 1366, "height": 860})
    log_in(context, url, DEMO_SPECIALIST, DEMO_PASSWORD)
    page = context.new_page()
    static: dict[str, int] = {}

    def on_response(response: Any) -> None:
        if response.request.resource_type in ("script", "stylesheet"):
            # a body no longer available is not counted
            with contextlib.suppress(Exception):
                static[response.url] = len(response.body())

    page.on("response", on_response)
    if slow:
        cdp = context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Network.emulateNetworkConditions", SLOW_LINK)
    page.goto(f"{url}/cases/{case_id}/viewer")
    page.wait_for_function(
        "() => window.safViewer && window.safViewer.firstFullPaint", timeout=60000
    )
    times = page.evaluate(
        "() => ({first: window.safViewer.firstPaint, full: window.safViewer.firstFullPaint})"
    )
    result = {"first_ms": times["first"], "full_ms": times["full"], "static": static, "page": page}
    result["context"] = context
    return result


def save_png(data: bytes, path: Path) -> None:
    """A screenshot as a small PNG for the README (palette of 96 colours)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.convert("RGB").quantize(colors=96).save(path, optimize=True)


def viewer_screenshot(page: Any, url: str, case_id: str, path: Path) -> None:
    """The viewer at the middle slice in the lung window, with a length and an ellipse."""
    state = page.evaluate(
        "() => { const s = window.safViewer, f = s.frames[Math.floor(s.frames.length / 2)];"
        " return {id: f.instance_id, frame: f.frame, rows: f.rows, cols: f.columns}; }"
    )
    r, c = state["rows"], state["cols"]
    for kind, points in (
        ("line", [[c * 0.30, r * 0.42], [c * 0.40, r * 0.62]]),
        ("ellipse", [[c * 0.60, r * 0.40], [c * 0.72, r * 0.55]]),
    ):
        body = {"instance_id": state["id"], "frame": state["frame"], "kind": kind}
        page.request.post(
            f"{url}/api/cases/{case_id}/annotations",
            data={**body, "points": points, "text": None},
            headers={"Origin": url},
        )
    page.reload()
    page.wait_for_function("() => window.safViewer.firstFullPaint")
    page.select_option("#preset", "-600,1500")
    page.wait_for_function(
        "() => window.safViewer.paintedWin && window.safViewer.paintedWin.center === -600"
    )
    page.wait_for_selector("#ann-list li.ann")
    save_png(page.screenshot(), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="CT slices (default 200)")
    parser.add_argument("--size", type=int, default=512, help="rows = columns (default 512)")
    parser.add_argument("--repeat", type=int, default=5, help="cold opens per link (default 5)")
    parser.add_argument("--screenshots", type=Path, help="write worklist.png and viewer.png here")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from tests.e2e.conftest import demo_hub, launch_chromium

    print(f"machine: {platform.processor() or platform.machine()}, python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        with demo_hub(Path(tmp) / "data", slices=args.count, size=args.size) as served:
            print(
                f"hub ready: {args.count} x {args.size}x{args.size} CT ingested and routed "
                f"in {time.perf_counter() - started:.1f} s, serving {served.url}"
            )
            with sync_playwright() as playwright:
                browser = launch_chromium(playwright)
                try:
                    results = run(browser, served, args)
                finally:
                    browser.close()
    report(results)
    return 0 if all(r["ok"] for r in results.values()) else 1


def run(browser: Any, served: Any, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    from saf.demo import DEMO_PASSWORD, DEMO_SPECIALIST

    case_id = served.demo.case_id
    # The specialist claims the case first, as they would before reading it.
    context = browser.new_context(viewport={"width": 1366, "height": 860})
    log_in(context, served.url, DEMO_SPECIALIST, DEMO_PASSWORD)
    page = context.new_page()
    page.request.post(f"{served.url}/api/cases/{case_id}/claim", headers={"Origin": served.url})
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
        page.goto(f"{served.url}/worklist?")
        page.select_option("#f-status", "")
        page.wait_for_selector("tr.case-row")
        clip = {"x": 0, "y": 0, "width": 1366, "height": 330}
        save_png(page.screenshot(clip=clip), args.screenshots / "worklist.png")
    context.close()

    out: dict[str, dict[str, Any]] = {}
    for slow, key in ((False, "first_image_loopback_ms"), (True, "first_image_slow_link_ms")):
        firsts: list[float] = []
        fulls: list[float] = []
        for i in range(args.repeat):
            opened = open_viewer(browser, served.url, case_id, slow)
            firsts.append(opened["first_ms"])
            fulls.append(opened["full_ms"])
            if not slow and i == args.repeat - 1:
                out["js_css_bytes"] = {
                    "value": sum(opened["static"].values()),
                    "detail": ", ".join(
                        f"{u.rsplit('/', 1)[-1]} {n}" for u, n in sorted(opened["static"].items())
                    ),
                }
                page = opened["page"]
                page.wait_for_function(
                    "() => document.getElementById('stage').dataset.prefetched === 'true'",
                    timeout=300000,
                )
                scroll = page.evaluate(SCROLL_JS)
                out["scroll_fps"] = {
                    "value": scroll["fps"],
                    "detail": f"{scroll['full']} of {scroll['frames']} frames full quality "
                    f"in {scroll['seconds']:.2f} s",
                }
                if args.screenshots:
                    viewer_screenshot(page, served.url, case_id, args.screenshots / "viewer.png")
            opened["context"].close()
            time.sleep(0.5)  # let the hub finish what the closed page had in flight
        out[key] = {
            "value": statistics.median(firsts),
            "detail": f"median of {args.repeat}; worst {max(firsts):.0f} ms; full size "
            f"median {statistics.median(fulls):.0f} ms, worst {max(fulls):.0f} ms",
        }
    for key, result in out.items():
        target = TARGETS[key]
        result["target"] = target
        result["ok"] = (
            result["value"] >= target if key == "scroll_fps" else result["value"] <= target
        )
    return out


def report(results: dict[str, dict[str, Any]]) -> None:
    labels = {
        "first_image_loopback_ms": ("first image, loopback", "ms", "<="),
        "first_image_slow_link_ms": ("first image, 1.5 Mbit/s 300 ms", "ms", "<="),
        "scroll_fps": ("scroll 200-slice CT", "fps", ">="),
        "js_css_bytes": ("viewer JS + CSS", "bytes", "<="),
    }
    print(f"{'measure':34} {'value':>10} {'target':>12}  ok   detail")
    for key, (label, unit, op) in labels.items():
        r = results.get(key)
        if r is None:
            print(f"{label:34} {'-':>10}")
            continue
        print(
            f"{label:34} {r['value']:>10.0f} {op + ' ' + format(r['target'], '.0f'):>12}  "
            f"{'yes' if r['ok'] else 'NO ':4} {unit}; {r['detail']}"
        )


if __name__ == "__main__":
    sys.exit(main())
