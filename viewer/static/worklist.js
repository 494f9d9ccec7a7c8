// The worklist: the specialist's worklists (one per specialty) or the clinic's cases,
// most urgent first then by due time; refreshed in place every 20 s.
import { api, banner, body, canWrite, clearBanner, debounce, el, fmtDate } from "./common.js";

const REFRESH_MS = 20000;
const form = document.getElementById("filters");
const root = document.getElementById("worklists");
const UNCLAIMED = new Set(["requested", "received"]);

function query() {
  const params = new URLSearchParams({ limit: "200" });
  for (const [key, value] of new FormData(form)) if (value) params.set(key, value);
  return params;
}

function row(item) {
  const open = el("a", { href: `/cases/${item.id}`, class: "button", text: "Open" });
  const actions = el("td", { class: "actions" }, open);
  if (canWrite && UNCLAIMED.has(item.status)) {
    actions.prepend(
      el("button", {
        type: "button",
        class: "claim",
        text: "Claim",
        onclick: async (event) => {
          event.target.disabled = true;
          try {
            await api(`/api/cases/${item.id}/claim`, { method: "POST" });
            location.assign(`/cases/${item.id}`);
          } catch (error) {
            banner(`Could not claim: ${error.message}`, "error");
            refresh();
          }
        },
      }),
    );
  }
  return el(
    "tr",
    { class: `case-row ${item.overdue ? "overdue" : ""}`, "data-case": item.id },
    el("td", {}, el("span", { class: `prio prio-${item.priority}`, text: item.priority })),
    el("td", {}, fmtDate(item.due_at), item.overdue ? el("span", { class: "badge overdue", text: "overdue" }) : null),
    el("td", { text: item.clinic }),
    el("td", { text: (item.modalities || []).join(", ") }),
    el("td", { text: item.study_description || "" }),
    el("td", {}, el("span", { class: `status status-${item.status}`, text: item.status })),
    el("td", { text: item.assigned_to || "" }),
    actions,
  );
}

function table(title, items) {
  const head = el(
    "tr",
    {},
    ["Priority", "Due", "Clinic", "Modality", "Study", "Status", "Assigned", ""].map((h) => el("th", { text: h })),
  );
  return el(
    "section",
    { class: "card worklist", "data-worklist": title },
    el("h2", {}, title, el("small", { class: "muted", text: ` ${items.length} case(s)` })),
    items.length
      ? el("table", { class: "cases" }, el("thead", {}, head), el("tbody", {}, items.map(row)))
      : el("p", { class: "muted", text: "No cases." }),
  );
}

let inflight;
async function refresh() {
  inflight?.abort();
  inflight = new AbortController();
  try {
    const data = await api(`/api/cases?${query()}`, { signal: inflight.signal });
    const sections = [];
    if (body.role === "specialist") {
      const wanted = form.elements.specialty.value;
      const lists = (body.specialties || "").split(" ").filter((s) => s && (!wanted || s === wanted));
      for (const specialty of lists)
        sections.push(table(specialty, data.items.filter((i) => i.specialty === specialty)));
    } else {
      sections.push(table("Cases", data.items));
    }
    root.replaceChildren(...sections);
    document.getElementById("refreshed").textContent = `updated ${new Date().toLocaleTimeString()}`;
    clearBanner();
  } catch (error) {
    if (error.name === "AbortError") return;
    if (error.status !== 401) banner(`Could not load the worklist: ${error.message}`, "error");
  }
}

const typed = debounce(refresh, 300);
form.addEventListener("change", refresh);
form.addEventListener("input", (e) => e.target.name === "clinic" && typed());
form.addEventListener("submit", (e) => e.preventDefault());
if (body.role !== "specialist") {
  form.elements.specialty.closest("label").hidden = true;
  form.elements.clinic.closest("label").hidden = true;
  form.elements.status.value = ""; // a clinic follows its cases to the reply
}
refresh();
setInterval(() => document.visibilityState === "visible" && refresh(), REFRESH_MS);
