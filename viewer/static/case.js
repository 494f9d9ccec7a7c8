// The case page: patient, studies with series thumbnails, history, reply and thread.
import { api, banner, body, canWrite, el, fmtDate, personName, sessionExpired } from "./common.js";
import { commentForm, showReply } from "./reply.js";

const caseId = body.case;
const UNCLAIMED = new Set(["requested", "received"]);
const NO_PIXELS = new Set(["SR", "PR", "KO", "DOC", "SEG", "RTSTRUCT"]); // listed, not viewed

function age(birthDate) {
  if (!birthDate || birthDate.length < 8) return null;
  const b = new Date(`${birthDate.slice(0, 4)}-${birthDate.slice(4, 6)}-${birthDate.slice(6, 8)}`.replace(/--/g, "-"));
  if (Number.isNaN(b.getTime())) return null;
  const now = new Date();
  let years = now.getFullYear() - b.getFullYear();
  if (now < new Date(now.getFullYear(), b.getMonth(), b.getDate())) years -= 1;
  return years;
}

function head(info) {
  const p = info.patient || {};
  const years = age((p.birth_date || "").replace(/-/g, ""));
  const actions = el("div", { class: "row" });
  if (canWrite && UNCLAIMED.has(info.status))
    actions.append(
      el("button", {
        type: "button",
        id: "claim",
        class: "primary",
        text: "Claim",
        onclick: async () => {
          try {
            await api(`/api/cases/${caseId}/claim`, { method: "POST" });
            load();
          } catch (error) {
            banner(`Could not claim: ${error.message}`, "error");
          }
        },
      }),
    );
  actions.append(el("a", { class: "button", id: "open-viewer", href: `/cases/${caseId}/viewer`, text: "Open images" }));
  return [
    el("h1", { id: "patient-name", text: personName(p.name) }),
    el(
      "dl",
      { class: "facts wide" },
      el("dt", { text: "Sex" }), el("dd", { text: p.sex || "?" }),
      el("dt", { text: "Age" }), el("dd", { text: years === null ? "?" : `${years} y` }),
      el("dt", { text: "Clinic patient ID" }), el("dd", { text: p.patient_id || "" }),
      el("dt", { text: "Clinic" }), el("dd", { text: info.clinic }),
      el("dt", { text: "Status" }), el("dd", {}, el("span", { id: "case-status", class: `status status-${info.status}`, text: info.status })),
      el("dt", { text: "Priority" }), el("dd", {}, el("span", { class: `prio prio-${info.priority}`, text: info.priority })),
      el("dt", { text: "Due" }), el("dd", { text: fmtDate(info.due_at) }),
      el("dt", { text: "Assigned" }), el("dd", { text: info.assigned_to || "nobody yet" }),
    ),
    actions,
  ];
}

function studies(info) {
  return (info.studies || []).map((st) =>
    el(
      "div",
      { class: "study" },
      el("h3", { text: `${st.study_description || "Study"} ${st.study_date || ""}` }),
      el(
        "div",
        { class: "thumbs" },
        st.series.map((s) =>
          el(
            NO_PIXELS.has(s.modality) ? "div" : "a",
            NO_PIXELS.has(s.modality)
              ? { class: "thumb", title: "a DICOM object without pixels (in the archive)", "data-series": s.id }
              : { class: "thumb", href: `/cases/${caseId}/viewer?series=${s.id}`, "data-series": s.id },
            s.thumbnail && !s.thumbnail.placeholder
              ? el("img", { src: s.thumbnail.url, alt: "", loading: "lazy", width: "128", height: "128" })
              : el("div", { class: "noimg", text: s.modality || "?" }),
            el("span", { text: `${s.modality || ""} ${s.series_description || ""} (${s.instances.length})` }),
          ),
        ),
      ),
    ),
  );
}

async function load() {
  let info;
  try {
    info = await api(`/api/cases/${caseId}`);
  } catch (error) {
    if (error.status !== 401) banner(`Could not load the case: ${error.message}`, "error");
    return;
  }
  document.getElementById("case-head").replaceChildren(...head(info));
  document.getElementById("studies").replaceChildren(el("h2", { text: "Images" }), ...studies(info));
  document.getElementById("history-list").replaceChildren(
    ...(info.history || []).map((h) =>
      el("li", { text: `${fmtDate(h.at)} · ${h.actor}: ${h.from_status || "—"} → ${h.to_status}${h.note ? ` (${h.note})` : ""}` }),
    ),
  );
  await showReply(caseId, document.getElementById("reply"), {
    threadList: document.getElementById("communications"),
    caseInfo: info,
  });
}

/** A clinic adds a document: the bytes as a FHIR Binary, then a DocumentReference whose
 * context names the case (Task/<case id>), through the FHIR API like an EHR would. */
async function upload(event) {
  event.preventDefault();
  const file = document.getElementById("upload-file").files[0];
  if (!file) return;
  const post = async (url, type, payload) => {
    const response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": type, Accept: "application/fhir+json" },
      body: payload,
    });
    if (response.status === 401) sessionExpired();
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const issue = (data.issue || [])[0] || {};
      throw new Error(`${issue.diagnostics || response.status}${issue.expression ? ` (${issue.expression.join(", ")})` : ""}`);
    }
    return data;
  };
  try {
    const binary = await post("/fhir/Binary", file.type || "application/octet-stream", file);
    await post(
      "/fhir/DocumentReference",
      "application/fhir+json",
      JSON.stringify({
        resourceType: "DocumentReference",
        status: "current",
        description: file.name,
        date: new Date().toISOString(),
        content: [{ attachment: { url: `Binary/${binary.id}`, contentType: file.type, title: file.name, size: file.size } }],
        context: { related: [{ reference: `Task/${caseId}` }] },
      }),
    );
    location.reload();
  } catch (error) {
    banner(`The document was not added: ${error.message}`, "error");
  }
}

if (body.role === "clinician") {
  commentForm(caseId, document.getElementById("comment-form"), load);
  document.getElementById("upload-form")?.addEventListener("submit", upload);
}
load();
