// Shared by every page: fetch wrapper, session renewal and expiry, logout, small DOM helpers.

const RENEW_EVERY_MS = 5 * 60 * 1000; // the access token lives 900 s; renew well before
let lastActivity = Date.now();
let expired = false;

export const body = document.body.dataset;
export const canWrite = body.canWrite === "true";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Fetch JSON (or nothing) from our API; throws ApiError with the server's message. */
export async function api(url, { method = "GET", json, signal } = {}) {
  const init = { method, credentials: "same-origin", headers: { Accept: "application/json" }, signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const response = await fetch(url, init);
  if (response.status === 401) {
    sessionExpired();
    throw new ApiError(401, "session expired");
  }
  if (!response.ok) throw new ApiError(response.status, await errorText(response));
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response;
}

async function errorText(response) {
  try {
    const data = await response.json();
    if (typeof data.detail === "string") return data.detail;
    if (Array.isArray(data.detail))
      return data.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
    return data.error_description || data.message || JSON.stringify(data);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

/** Show a message in the page banner (kind: info | error). */
export function banner(text, kind = "info", link) {
  const el = document.getElementById("banner");
  if (!el) return;
  el.className = `banner ${kind}`;
  el.replaceChildren(document.createTextNode(text));
  if (link) {
    const a = el.appendChild(document.createElement("a"));
    a.href = link.href;
    a.textContent = link.text;
  }
  el.hidden = false;
}

export function clearBanner() {
  const el = document.getElementById("banner");
  if (el) el.hidden = true;
}

export function loginUrl() {
  return `/login?next=${encodeURIComponent(location.pathname + location.search)}`;
}

/** The session is gone: say so, keep the page, offer to log in and come back here. */
export function sessionExpired() {
  if (expired) return;
  expired = true;
  banner("Your session expired. ", "error", { href: loginUrl(), text: "Log in again" });
  document.body.classList.add("expired");
}

async function renew() {
  if (expired || Date.now() - lastActivity > RENEW_EVERY_MS) return; // idle: let it lapse
  const response = await fetch("/auth/session/renew", { method: "POST", credentials: "same-origin" });
  if (response.status === 401) sessionExpired();
}

/** Create an element: el("td", {class: "x", text: "y"}, child...) */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key === "value") node.value = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** A DICOM person name (Family^Given^Middle) as "Family, Given Middle". */
export function personName(pn) {
  const [family = "", ...rest] = (pn || "").split("^");
  const given = rest.filter(Boolean).join(" ");
  return [family, given].filter(Boolean).join(", ") || "(no name)";
}

export function fmtDate(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function debounce(fn, ms) {
  let timer;
  const wrapped = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  wrapped.flush = (...args) => {
    clearTimeout(timer);
    return fn(...args);
  };
  return wrapped;
}

function init() {
  for (const type of ["pointerdown", "keydown", "wheel"])
    addEventListener(type, () => (lastActivity = Date.now()), { passive: true, capture: true });
  if (body.user) setInterval(renew, RENEW_EVERY_MS);
  const logout = document.getElementById("logout");
  if (logout)
    logout.addEventListener("click", async () => {
      await fetch("/auth/session", { method: "DELETE", credentials: "same-origin" });
      location.assign("/login");
    });
}

init();
