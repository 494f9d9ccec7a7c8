// The image viewer: server-rendered frames on a canvas (thumbnail first, then full size,
// neighbours prefetched), window/level, scroll, zoom/pan, pixel values, annotations in
// image coordinates (saved at once), and the reply form alongside.
import { api, banner, body, canWrite, clearBanner, debounce, el, personName } from "./common.js";
import { showReply } from "./reply.js";

const caseId = body.case;
const PRESETS = { "40,80": "brain", "-600,1500": "lung", "300,1500": "bone", "40,400": "abdomen" };
const THUMB = 128; // px: the first, fast paint
const FULL_MAX = 1024; // px: largest edge requested for the full-size frame
const PREFETCH_CONCURRENCY = 6;
const WL_DEBOUNCE_MS = 150;
const VALUE_THROTTLE_MS = 120;
const HIT_PX = 10; // screen px within which a pointer touches an annotation
const NO_PIXELS = new Set(["SR", "PR", "KO", "DOC", "SEG", "RTSTRUCT"]);

const imageCanvas = document.getElementById("image");
const overlay = document.getElementById("overlay");
const stage = document.getElementById("stage");
const slider = document.getElementById("slider");
const ictx = imageCanvas.getContext("2d");
const octx = overlay.getContext("2d");

const state = {
  info: null, // GET /api/cases/{id}
  seriesId: null,
  frames: [], // GET /api/series/{id}/frames -> frames
  index: 0,
  win: null, // {center, width} chosen by the user; null = each frame's default
  view: { scale: 1, x: 0, y: 0 }, // image px -> CSS px: sx = x * scale + view.x
  mode: "wl",
  annotations: [],
  selected: null, // annotation id
  draft: null, // annotation being drawn: {kind, points}
  editable: false,
  painted: null, // what the image canvas shows
  paintedWin: null, // the window of the last full-quality paint (for the preview contrast)
  generation: 0, // bumps on series/window change: stale prefetches are dropped
};
window.safViewer = state; // for the browser tests and the bench (no PHI beyond the page's)

// ----------------------------------------------------------------------------- images

const cache = new Map(); // url -> Promise<HTMLImageElement>
const loaded = new Map(); // url -> HTMLImageElement (decoded)
const CACHE_MAX = 800;

function frameUrl(frame, size, win) {
  const params = new URLSearchParams({ size: String(size), format: "jpeg", quality: size <= THUMB ? "70" : "88" });
  if (win) {
    params.set("wc", String(Math.round(win.center)));
    params.set("ww", String(Math.max(1, Math.round(win.width))));
  }
  return `/api/instances/${frame.instance_id}/frames/${frame.frame}/rendered?${params}`;
}

function fullSize(frame) {
  return Math.min(FULL_MAX, Math.max(frame.rows || 512, frame.columns || 512));
}

function load(url) {
  let promise = cache.get(url);
  if (!promise) {
    const img = new Image();
    img.decoding = "async";
    img.src = url;
    promise = img.decode().then(
      () => {
        loaded.set(url, img);
        return img;
      },
      (error) => {
        cache.delete(url);
        // A 401 shows as a decode error: ask the API once, so the page can say so.
        api(`/api/cases/${caseId}`).catch(() => {});
        throw error;
      },
    );
    cache.set(url, promise);
    if (cache.size > CACHE_MAX) {
      const oldest = cache.keys().next().value;
      cache.delete(oldest);
      loaded.delete(oldest);
    }
  }
  return promise;
}

/** The best image already decoded for frame i: full at this window, else anything. */
function bestLoaded(i) {
  const frame = state.frames[i];
  const exact = loaded.get(frameUrl(frame, fullSize(frame), state.win));
  if (exact) return { img: exact, exact: true };
  const prefix = `/api/instances/${frame.instance_id}/frames/${frame.frame}/`;
  let best = null;
  for (const [url, img] of loaded) if (url.startsWith(prefix) && (!best || img.naturalWidth > best.naturalWidth)) best = img;
  return best ? { img: best, exact: false } : null;
}

async function show(i) {
  if (!state.frames.length) return;
  state.index = Math.max(0, Math.min(state.frames.length - 1, i));
  slider.value = String(state.index + 1);
  const frame = state.frames[state.index];
  const have = bestLoaded(state.index);
  if (have) paint(have.img, have.exact);
  hud();
  drawOverlay();
  if (have && have.exact) return;
  const generation = state.generation;
  const index = state.index;
  try {
    if (!have) {
      const thumb = await load(frameUrl(frame, THUMB, state.win));
      if (state.index === index && state.generation === generation && !bestLoaded(index)?.exact) paint(thumb, false);
    }
    const full = await load(frameUrl(frame, fullSize(frame), state.win));
    if (state.index === index && state.generation === generation) paint(full, true);
  } catch {
    if (state.index === index) banner("This frame could not be loaded.", "error");
  }
}

/** Draw `img` (any size) over the frame's full extent, so a thumbnail shows scaled up. */
function paint(img, exact) {
  const frame = state.frames[state.index];
  const dpr = devicePixelRatio || 1;
  ictx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ictx.fillStyle = "#000";
  ictx.fillRect(0, 0, imageCanvas.width, imageCanvas.height);
  ictx.imageSmoothingEnabled = true;
  ictx.imageSmoothingQuality = exact ? "medium" : "high";
  const { scale, x, y } = state.view;
  ictx.drawImage(img, x, y, frame.columns * scale, frame.rows * scale);
  if (exact) {
    imageCanvas.style.filter = "";
    state.paintedWin = currentWindow();
  }
  state.painted = { src: img.src, exact, index: state.index };
  // ms since navigation start, read by bench/viewer.py
  state.firstPaint ??= performance.now();
  if (exact) state.firstFullPaint ??= performance.now();
  stage.dataset.painted = exact ? "full" : "preview";
  stage.dataset.frame = String(state.index);
}

function repaint() {
  const have = state.frames.length && bestLoaded(state.index);
  if (have) paint(have.img, have.exact);
  drawOverlay();
}

let prefetchRun = 0;
async function prefetch() {
  const run = ++prefetchRun;
  const n = state.frames.length;
  const order = [];
  for (let d = 1; d < n; d++) {
    if (state.index + d < n) order.push(state.index + d);
    if (state.index - d >= 0) order.push(state.index - d);
  }
  let next = 0;
  const worker = async () => {
    while (run === prefetchRun && next < order.length) {
      const frame = state.frames[order[next++]];
      try {
        await load(frameUrl(frame, fullSize(frame), state.win));
      } catch {
        /* shown when the user gets there */
      }
    }
  };
  await Promise.all(Array.from({ length: PREFETCH_CONCURRENCY }, worker));
  if (run === prefetchRun) stage.dataset.prefetched = "true";
}

// ----------------------------------------------------------------------------- layout

function resize() {
  const dpr = devicePixelRatio || 1;
  const { clientWidth: w, clientHeight: h } = stage;
  for (const canvas of [imageCanvas, overlay]) {
    canvas.width = Math.max(1, Math.round(w * dpr));
    canvas.height = Math.max(1, Math.round(h * dpr));
  }
  repaint();
}

function fit() {
  const frame = state.frames[state.index];
  if (!frame) return;
  const { clientWidth: w, clientHeight: h } = stage;
  const scale = Math.min(w / frame.columns, h / frame.rows) * 0.98;
  state.view = { scale, x: (w - frame.columns * scale) / 2, y: (h - frame.rows * scale) / 2 };
  repaint();
  hud();
}

function zoomAt(factor, sx, sy) {
  const v = state.view;
  const scale = Math.max(0.05, Math.min(40, v.scale * factor));
  const k = scale / v.scale;
  state.view = { scale, x: sx - (sx - v.x) * k, y: sy - (sy - v.y) * k };
  repaint();
  hud();
}

function toImage(sx, sy) {
  const v = state.view;
  return [(sx - v.x) / v.scale, (sy - v.y) / v.scale];
}

function toScreen([x, y]) {
  const v = state.view;
  return [x * v.scale + v.x, y * v.scale + v.y];
}

function localPoint(event) {
  const r = stage.getBoundingClientRect();
  return [event.clientX - r.left, event.clientY - r.top];
}

// ----------------------------------------------------------------------------- window

function currentWindow() {
  return state.win || state.frames[state.index]?.window || { center: 40, width: 400 };
}

const requestWindow = debounce(() => {
  state.generation++;
  show(state.index).then(() => prefetch());
}, WL_DEBOUNCE_MS);

/** Set the window; meanwhile the current image is shown with an approximate contrast. */
function setWindow(win, immediate = false) {
  const before = state.paintedWin || currentWindow();
  state.win = win ? { center: win.center, width: Math.max(1, win.width) } : null;
  const after = currentWindow();
  const contrast = before.width / after.width;
  imageCanvas.style.filter = `contrast(${contrast.toFixed(3)})`;
  hud();
  if (immediate) requestWindow.flush();
  else requestWindow();
}

document.getElementById("preset").addEventListener("change", (event) => {
  const value = event.target.value;
  if (!value) return;
  if (value === "default") setWindow(null, true);
  else {
    const [center, width] = value.split(",").map(Number);
    setWindow({ center, width }, true);
  }
  event.target.value = "";
});

// ----------------------------------------------------------------------------- HUD

function hud() {
  const frame = state.frames[state.index];
  if (!frame) return;
  const win = currentWindow();
  const preset = PRESETS[`${Math.round(win.center)},${Math.round(win.width)}`];
  document.getElementById("hud-tr").textContent =
    `${state.index + 1} / ${state.frames.length}` +
    (frame.instance_number != null ? `  #${frame.instance_number}` : "") +
    (frame.slice_location != null ? `  ${Number(frame.slice_location).toFixed(1)} mm` : "");
  document.getElementById("hud-bl").textContent =
    `W ${Math.round(win.width)} L ${Math.round(win.center)}${preset ? ` (${preset})` : ""}  ·  ${Math.round(state.view.scale * 100)}%`;
  const series = currentSeries();
  document.getElementById("hud-tl").textContent = series
    ? `${series.modality || ""} ${series.series_description || ""}`.trim()
    : "";
  stage.dataset.window = `${Math.round(win.center)},${Math.round(win.width)}`;
}

let valueTimer = null;
let valueAbort = null;
function readValue(sx, sy) {
  clearTimeout(valueTimer);
  valueTimer = setTimeout(async () => {
    const frame = state.frames[state.index];
    if (!frame) return;
    const [x, y] = toImage(sx, sy).map(Math.floor);
    const out = document.getElementById("hud-br");
    if (x < 0 || y < 0 || x >= frame.columns || y >= frame.rows) {
      out.textContent = "";
      return;
    }
    valueAbort?.abort();
    valueAbort = new AbortController();
    try {
      const v = await api(`/api/instances/${frame.instance_id}/frames/${frame.frame}/value?x=${x}&y=${y}`, {
        signal: valueAbort.signal,
      });
      const value = typeof v.value === "number" ? +v.value.toFixed(2) : v.value;
      out.textContent = `(${x}, ${y})  ${value}${v.unit ? ` ${v.unit}` : ""}`;
    } catch {
      /* readout is best effort */
    }
  }, VALUE_THROTTLE_MS);
}

// ----------------------------------------------------------------------------- annotations

const POINTS = { arrow: 2, text: 1, line: 2, angle: 3, ellipse: 2 };

function measurementText(a) {
  const m = a.measurement || {};
  const n = (v, d = 1) => (typeof v === "number" ? v.toFixed(d) : "?");
  if (a.kind === "line") {
    if (m.length_mm != null) return `${n(m.length_mm)} mm`;
    if (m.length_px != null) return `${n(m.length_px)} px (${m.note || "pixel spacing unknown"})`;
  }
  if (a.kind === "angle" && m.angle_deg != null) return `${n(m.angle_deg)}°`;
  if (a.kind === "ellipse") {
    const area = m.area_mm2 != null ? `${n(m.area_mm2)} mm²` : m.area_px2 != null ? `${n(m.area_px2)} px²` : "";
    const unit = m.unit ? ` ${m.unit}` : "";
    const stats = m.mean != null ? ` mean ${n(m.mean)}${unit} SD ${n(m.sd)}` : "";
    return `${area}${stats}`.trim();
  }
  return a.text || "";
}

function onFrame(a) {
  const frame = state.frames[state.index];
  return frame && a.instance_id === frame.instance_id && a.frame === frame.frame;
}

function drawShape(ctx, kind, points, text, selected) {
  const pts = points.map(toScreen);
  ctx.lineWidth = selected ? 2.5 : 1.5;
  ctx.strokeStyle = selected ? "#ffd54a" : "#4ade80";
  ctx.fillStyle = ctx.strokeStyle;
  ctx.font = "13px system-ui, sans-serif";
  ctx.beginPath();
  if (kind === "line" || kind === "arrow") {
    ctx.moveTo(...pts[0]);
    ctx.lineTo(...(pts[1] || pts[0]));
    ctx.stroke();
    if (kind === "arrow" && pts[1]) {
      const [tx, ty] = pts[0];
      const [hx, hy] = pts[1];
      const angle = Math.atan2(hy - ty, hx - tx);
      ctx.beginPath();
      ctx.moveTo(hx, hy);
      ctx.lineTo(hx - 12 * Math.cos(angle - 0.4), hy - 12 * Math.sin(angle - 0.4));
      ctx.lineTo(hx - 12 * Math.cos(angle + 0.4), hy - 12 * Math.sin(angle + 0.4));
      ctx.closePath();
      ctx.fill();
    }
  } else if (kind === "angle") {
    ctx.moveTo(...pts[0]);
    for (const p of pts.slice(1)) ctx.lineTo(...p);
    ctx.stroke();
  } else if (kind === "ellipse" && pts[1]) {
    const [x0, y0] = pts[0];
    const [x1, y1] = pts[1];
    ctx.ellipse((x0 + x1) / 2, (y0 + y1) / 2, Math.abs(x1 - x0) / 2, Math.abs(y1 - y0) / 2, 0, 0, 2 * Math.PI);
    ctx.stroke();
  } else if (kind === "text") {
    ctx.arc(pts[0][0], pts[0][1], 3, 0, 2 * Math.PI);
    ctx.fill();
  }
  if (selected || kind === "text")
    for (const [x, y] of pts) ctx.strokeRect(x - 4, y - 4, 8, 8);
  if (text) {
    const anchor = kind === "angle" ? pts[1] : pts[pts.length - 1];
    ctx.lineWidth = 3;
    ctx.strokeStyle = "rgba(0,0,0,0.8)";
    ctx.strokeText(text, anchor[0] + 8, anchor[1] - 8);
    ctx.fillText(text, anchor[0] + 8, anchor[1] - 8);
  }
}

function drawOverlay() {
  const dpr = devicePixelRatio || 1;
  octx.setTransform(1, 0, 0, 1, 0, 0);
  octx.clearRect(0, 0, overlay.width, overlay.height);
  octx.setTransform(dpr, 0, 0, dpr, 0, 0);
  for (const a of state.annotations.filter(onFrame))
    drawShape(octx, a.kind, a.points, measurementText(a), a.id === state.selected);
  if (state.draft) drawShape(octx, state.draft.kind, state.draft.points, state.draft.text || "", true);
}

function listAnnotations() {
  const list = document.getElementById("ann-list");
  const index = new Map(state.frames.map((f, i) => [`${f.instance_id}/${f.frame}`, i]));
  list.replaceChildren(
    ...state.annotations.map((a) => {
      const i = index.get(`${a.instance_id}/${a.frame}`);
      return el(
        "li",
        {
          class: `ann ${a.id === state.selected ? "selected" : ""}`,
          "data-id": a.id,
          onclick: () => {
            state.selected = a.id;
            if (i !== undefined) show(i);
            listAnnotations();
            drawOverlay();
          },
        },
        el("span", { class: "kind", text: a.kind }),
        el("span", { class: "measure", text: measurementText(a) }),
        i === undefined ? el("small", { class: "muted", text: " (other series)" }) : el("small", { class: "muted", text: ` frame ${i + 1}` }),
      );
    }),
  );
  if (!state.annotations.length) list.append(el("li", { class: "muted", text: "None yet." }));
  document.getElementById("delete-ann").disabled = !(state.editable && state.selected);
}

async function loadAnnotations() {
  try {
    const data = await api(`/api/cases/${caseId}/annotations`);
    state.annotations = data.annotations || [];
  } catch (error) {
    if (error.status !== 401) banner(`Annotations cannot be loaded: ${error.message}`, "error");
  }
  listAnnotations();
  drawOverlay();
}

function upsert(a) {
  const i = state.annotations.findIndex((x) => x.id === a.id);
  if (i >= 0) state.annotations[i] = a;
  else state.annotations.push(a);
  listAnnotations();
  drawOverlay();
}

function saveFailed(error) {
  if (error.status === 409) {
    state.editable = false;
    banner("The reply is signed: annotations can no longer change.", "error");
  } else if (error.status !== 401) banner(`The annotation was not saved: ${error.message}`, "error");
  loadAnnotations();
}

async function createAnnotation(kind, points, text) {
  const frame = state.frames[state.index];
  try {
    const a = await api(`/api/cases/${caseId}/annotations`, {
      method: "POST",
      json: { instance_id: frame.instance_id, frame: frame.frame, kind, points, text: text ?? null },
    });
    state.selected = a.id;
    upsert(a);
  } catch (error) {
    saveFailed(error);
  }
}

async function updateAnnotation(a) {
  try {
    upsert(
      await api(`/api/cases/${caseId}/annotations/${a.id}`, {
        method: "PUT",
        json: { instance_id: a.instance_id, frame: a.frame, kind: a.kind, points: a.points, text: a.text ?? null },
      }),
    );
  } catch (error) {
    saveFailed(error);
  }
}

async function deleteSelected() {
  const id = state.selected;
  if (!id || !state.editable) return;
  try {
    await api(`/api/cases/${caseId}/annotations/${id}`, { method: "DELETE" });
    state.annotations = state.annotations.filter((a) => a.id !== id);
    state.selected = null;
    listAnnotations();
    drawOverlay();
  } catch (error) {
    saveFailed(error);
  }
}

function distToSegment([px, py], [ax, ay], [bx, by]) {
  const dx = bx - ax;
  const dy = by - ay;
  const t = dx || dy ? Math.max(0, Math.min(1, ((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy))) : 0;
  return Math.hypot(px - (ax + t * dx), py - (ay + t * dy));
}

/** The annotation (and handle index, or -1 for its body) under screen point s. */
function hitTest(s) {
  let best = null;
  for (const a of state.annotations.filter(onFrame)) {
    const pts = a.points.map(toScreen);
    pts.forEach((p, i) => {
      const d = Math.hypot(p[0] - s[0], p[1] - s[1]);
      if (d < HIT_PX && (!best || d < best.d)) best = { a, handle: i, d };
    });
    let d = Infinity;
    if (a.kind === "ellipse") {
      const [[x0, y0], [x1, y1]] = pts;
      const rx = Math.abs(x1 - x0) / 2 || 1;
      const ry = Math.abs(y1 - y0) / 2 || 1;
      const r = Math.hypot((s[0] - (x0 + x1) / 2) / rx, (s[1] - (y0 + y1) / 2) / ry);
      d = Math.abs(r - 1) * Math.min(rx, ry);
      if (r < 1) d = Math.min(d, HIT_PX - 1);
    } else for (let i = 1; i < pts.length; i++) d = Math.min(d, distToSegment(s, pts[i - 1], pts[i]));
    if (d < HIT_PX && (!best || d + 1 < best.d)) best = { a, handle: -1, d: d + 1 };
  }
  return best;
}

// ----------------------------------------------------------------------------- pointers

const pointers = new Map(); // pointerId -> [x, y] screen
let gesture = null;

function startGesture(event, s) {
  const mode = event.button === 1 ? "pan" : event.button === 2 ? "zoom" : state.mode;
  const base = { mode, start: s, last: s, view: { ...state.view }, win: { ...currentWindow() }, index: state.index };
  if (POINTS[mode]) {
    if (!state.editable) return null;
    const p = toImage(...s);
    if (state.draft && state.draft.kind === "angle" && state.draft.points.length === 3) {
      state.draft.points[2] = p; // the click places the third point (touch has no hover)
      finishDraft();
      return null;
    }
    if (mode === "text") {
      const text = prompt("Text");
      if (text && text.trim()) createAnnotation("text", [p], text.trim());
      return null;
    }
    state.draft = { kind: mode, points: mode === "angle" ? [p, p] : [p, p] };
    return { ...base, mode: "draw" };
  }
  if (mode === "select") {
    const hit = hitTest(s);
    state.selected = hit ? hit.a.id : null;
    listAnnotations();
    drawOverlay();
    if (!hit || !state.editable) return null;
    return { ...base, mode: "edit", hit, original: hit.a.points.map((p) => [...p]) };
  }
  return base;
}

function finishDraft() {
  const draft = state.draft;
  state.draft = null;
  const screen = draft.points.map(toScreen);
  const far = screen.every((p, i) => i === 0 || Math.hypot(p[0] - screen[i - 1][0], p[1] - screen[i - 1][1]) > 3);
  if (far && draft.points.length === POINTS[draft.kind]) createAnnotation(draft.kind, draft.points);
  drawOverlay();
}

function moveGesture(g, s) {
  const dx = s[0] - g.start[0];
  const dy = s[1] - g.start[1];
  if (g.mode === "wl") {
    // Drag right widens, drag down raises the level; speed follows the current width.
    const k = Math.max(0.5, g.win.width / 300);
    setWindow({ center: g.win.center + dy * k, width: Math.max(1, g.win.width + dx * k * 2) });
  } else if (g.mode === "pan") {
    state.view = { ...g.view, x: g.view.x + dx, y: g.view.y + dy };
    repaint();
  } else if (g.mode === "zoom") {
    const factor = Math.exp(-(s[1] - g.last[1]) / 150);
    zoomAt(factor, g.start[0], g.start[1]);
  } else if (g.mode === "scroll") {
    const step = Math.max(6, stage.clientHeight / Math.max(20, state.frames.length));
    const target = g.index - Math.round(dy / step);
    if (target !== state.index) show(target);
  } else if (g.mode === "draw") {
    state.draft.points[state.draft.points.length - 1] = toImage(...s);
    drawOverlay();
  } else if (g.mode === "angle-move") {
    state.draft.points[state.draft.points.length - 1] = toImage(...s);
    drawOverlay();
  } else if (g.mode === "edit") {
    const [ix, iy] = [dx / state.view.scale, dy / state.view.scale];
    g.hit.a.points = g.original.map((p, i) => (g.hit.handle === -1 || g.hit.handle === i ? [p[0] + ix, p[1] + iy] : p));
    g.moved = true;
    drawOverlay();
  }
  g.last = s;
}

function endGesture(g) {
  if (g.mode === "draw") {
    if (state.draft.kind === "angle") {
      // first segment drawn; the next click places the third point
      state.draft.points.push(state.draft.points[1]);
      drawOverlay();
      return;
    }
    finishDraft();
  } else if (g.mode === "edit" && g.moved) {
    updateAnnotation(g.hit.a);
  }
}

stage.addEventListener("contextmenu", (e) => e.preventDefault());

stage.addEventListener("pointerdown", (event) => {
  stage.setPointerCapture(event.pointerId);
  const s = localPoint(event);
  pointers.set(event.pointerId, s);
  if (pointers.size === 2) {
    // two fingers: pinch zoom and pan, whatever the mode
    state.draft = null;
    const [a, b] = [...pointers.values()];
    gesture = { mode: "pinch", dist: Math.hypot(a[0] - b[0], a[1] - b[1]), mid: [(a[0] + b[0]) / 2, (a[1] + b[1]) / 2] };
    return;
  }
  if (pointers.size > 2) return;
  gesture = startGesture(event, s);
  event.preventDefault();
});

stage.addEventListener("pointermove", (event) => {
  const s = localPoint(event);
  if (event.pointerType === "mouse" && !pointers.size) readValue(...s);
  if (!pointers.has(event.pointerId)) {
    if (state.draft && gesture?.mode === "angle-move") moveGesture(gesture, s);
    return;
  }
  pointers.set(event.pointerId, s);
  if (gesture?.mode === "pinch" && pointers.size === 2) {
    const [a, b] = [...pointers.values()];
    const dist = Math.hypot(a[0] - b[0], a[1] - b[1]);
    const mid = [(a[0] + b[0]) / 2, (a[1] + b[1]) / 2];
    state.view = { ...state.view, x: state.view.x + mid[0] - gesture.mid[0], y: state.view.y + mid[1] - gesture.mid[1] };
    zoomAt(dist / (gesture.dist || dist), mid[0], mid[1]);
    gesture.dist = dist;
    gesture.mid = mid;
  } else if (gesture) moveGesture(gesture, s);
});

function pointerEnd(event) {
  if (!pointers.delete(event.pointerId)) return;
  // a tap (touch has no hover) reads the pixel value under the finger
  if (event.pointerType !== "mouse" && ["wl", "scroll", "pan", "zoom"].includes(gesture?.mode)) {
    const s = localPoint(event);
    if (Math.hypot(s[0] - gesture.start[0], s[1] - gesture.start[1]) < 6) readValue(...s);
  }
  if (gesture && gesture.mode !== "pinch" && pointers.size === 0) {
    const g = gesture;
    if (g.mode !== "angle-move") gesture = null;
    endGesture(g);
    if (state.draft && state.draft.kind === "angle") gesture = { ...g, mode: "angle-move" };
  } else if (pointers.size === 0) gesture = null;
}
stage.addEventListener("pointerup", pointerEnd);
stage.addEventListener("pointercancel", (event) => {
  pointers.delete(event.pointerId);
  gesture = null;
  state.draft = null;
  drawOverlay();
});

let wheelSum = 0;
stage.addEventListener(
  "wheel",
  (event) => {
    event.preventDefault();
    if (event.ctrlKey || event.metaKey) {
      zoomAt(Math.exp(-event.deltaY / 300), ...localPoint(event));
    } else {
      // one frame per wheel notch; a trackpad's small deltas add up to a notch first
      wheelSum += event.deltaMode === 0 ? event.deltaY : event.deltaY * 40;
      if (Math.abs(wheelSum) >= 40) {
        show(state.index + Math.sign(wheelSum));
        wheelSum = 0;
      }
    }
  },
  { passive: false },
);

addEventListener("keydown", (event) => {
  if (event.target.closest("input, textarea, select")) return;
  const keys = { ArrowDown: 1, ArrowRight: 1, PageDown: 10, ArrowUp: -1, ArrowLeft: -1, PageUp: -10 };
  if (event.key in keys) {
    event.preventDefault();
    show(state.index + keys[event.key]);
  } else if (event.key === "Home") show(0);
  else if (event.key === "End") show(state.frames.length - 1);
  else if ((event.key === "Delete" || event.key === "Backspace") && state.selected) deleteSelected();
  else if (event.key === "Escape") {
    state.draft = null;
    gesture = null;
    drawOverlay();
  } else if (event.key === "f") fit();
});

slider.addEventListener("input", () => show(Number(slider.value) - 1));

// ----------------------------------------------------------------------------- toolbar

function setMode(mode) {
  state.mode = mode;
  state.draft = null;
  for (const b of document.querySelectorAll("#toolbar [data-mode]")) b.classList.toggle("on", b.dataset.mode === mode);
  stage.dataset.mode = mode;
  drawOverlay();
}

document.getElementById("toolbar").addEventListener("click", (event) => {
  const button = event.target.closest("[data-mode]");
  if (button) setMode(button.dataset.mode);
});
document.getElementById("fit").addEventListener("click", fit);
document.getElementById("reset").addEventListener("click", () => {
  setWindow(null, true);
  setMode(matchMedia("(pointer: coarse)").matches ? "scroll" : "wl");
  fit();
});
document.getElementById("delete-ann").addEventListener("click", deleteSelected);

// ----------------------------------------------------------------------------- series

function allSeries() {
  return (state.info?.studies || []).flatMap((st) => st.series);
}

function currentSeries() {
  return allSeries().find((s) => s.id === state.seriesId);
}

function seriesList() {
  const root = document.getElementById("series-list");
  root.replaceChildren(
    ...allSeries()
      .filter((s) => !NO_PIXELS.has(s.modality))
      .map((s) =>
        el(
          "button",
          {
            type: "button",
            class: `series ${s.id === state.seriesId ? "on" : ""}`,
            "data-series": s.id,
            onclick: () => openSeries(s.id),
          },
          s.thumbnail && !s.thumbnail.placeholder
            ? el("img", { src: s.thumbnail.url, alt: "", width: "96", height: "96" })
            : el("span", { class: "noimg", text: s.modality || "?" }),
          el("span", { text: `${s.series_description || s.modality || ""} (${s.instances.length})` }),
        ),
      ),
  );
}

/** The frame list the page carries for its first series (one round trip saved). */
function inlined(seriesId) {
  const node = document.getElementById("frames-data");
  if (!node) return null;
  node.remove(); // used once: a later switch back asks the API (the series may have grown)
  const data = JSON.parse(node.textContent);
  return data.series_id === seriesId ? data : null;
}

async function openSeries(seriesId) {
  prefetchRun++;
  state.generation++;
  state.seriesId = seriesId;
  state.win = null;
  stage.dataset.prefetched = "false";
  history.replaceState(null, "", `?series=${seriesId}`);
  let data = inlined(seriesId);
  try {
    data ??= await api(`/api/series/${seriesId}/frames`);
  } catch (error) {
    if (error.status !== 401) banner(`This series cannot be shown: ${error.message}`, "error");
    return;
  }
  if (state.seriesId !== seriesId) return;
  state.frames = data.frames || [];
  slider.max = String(Math.max(1, state.frames.length));
  slider.hidden = state.frames.length < 2;
  seriesList();
  const frame = state.frames[0];
  if (!frame) return banner("This series has no frames to show.", "error");
  const presets = document.getElementById("preset");
  presets.hidden = (data.modality || frame.modality) !== "CT";
  state.index = Math.floor(state.frames.length / 2);
  fit();
  clearBanner();
  await show(state.index);
  drawOverlay();
  prefetch();
}

// ----------------------------------------------------------------------------- start

async function start() {
  resize();
  new ResizeObserver(() => {
    const frame = state.frames[state.index];
    // keep the same image point in the centre when the stage changes size
    const [cx, cy] = frame ? toImage(stage.clientWidth / 2, stage.clientHeight / 2) : [0, 0];
    resize();
    if (frame && state.painted) {
      const { clientWidth: w, clientHeight: h } = stage;
      state.view = { ...state.view, x: w / 2 - cx * state.view.scale, y: h / 2 - cy * state.view.scale };
      repaint();
    }
  }).observe(stage);
  if (matchMedia("(pointer: coarse)").matches) setMode("scroll");
  const wanted = body.series;
  const framesFirst = wanted ? openSeries(wanted) : null; // in parallel with the case
  try {
    state.info = await api(`/api/cases/${caseId}`);
  } catch (error) {
    if (error.status !== 401) banner(`Could not load the case: ${error.message}`, "error");
    return;
  }
  const p = state.info.patient || {};
  document.getElementById("patient-line").textContent =
    `${personName(p.name)} · ${p.sex || "?"} · ${p.patient_id || ""} · ${state.info.clinic}`;
  const mine = state.info.assigned_to === body.user;
  const reply = await showReply(caseId, document.getElementById("reply"), { caseInfo: state.info });
  state.editable = canWrite && mine && reply?.status !== "signed";
  document.getElementById("tools").hidden = !state.editable;
  document.querySelector('[data-mode="select"]').hidden = false;
  if (!framesFirst) {
    const first = allSeries().find((s) => !NO_PIXELS.has(s.modality));
    if (first) openSeries(first.id);
    else banner("This case has no images.", "info");
  } else {
    await framesFirst;
    seriesList();
  }
  loadAnnotations();
}

start();
