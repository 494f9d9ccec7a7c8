// The reply: a specialist's structured form (autosaved draft, sign and send, ask the
// clinic a question) or, for everyone else and once signed, the report read-only; and
// the questions/comments thread (clinic users answer here).
import { api, banner, body, canWrite, debounce, el, fmtDate } from "./common.js";

const AUTOSAVE_MS = 800;

function readOnly(reply) {
  if (reply.status !== "signed")
    return el("p", { class: "muted", id: "reply-none", text: "No reply yet." });
  const part = (title, text) => (text ? [el("h3", { text: title }), el("p", { class: "prose", text })] : []);
  return el(
    "div",
    { class: "reply-signed", id: "reply-signed" },
    reply.urgent ? el("p", { class: "badge overdue", text: "URGENT" }) : null,
    part("Findings", reply.findings),
    part("Impression", reply.impression),
    part("Recommendation", reply.recommendation),
    el("p", { class: "muted", text: `Signed by ${reply.signed_by || "?"} ${fmtDate(reply.signed_at)}` }),
    reply.pdf_url ? el("p", {}, el("a", { href: reply.pdf_url, target: "_blank", rel: "noopener", text: "Report (PDF)" })) : null,
    (reply.objects || []).length
      ? el("p", { class: "muted" }, "In the archive: ", reply.objects.map((o) => o.modality).join(", "))
      : null,
  );
}

function form(caseId, reply, onChange) {
  const field = (name, label, rows) =>
    el("label", {}, label, el("textarea", { name, id: `reply-${name}`, rows: String(rows), value: reply[name] || "" }));
  const status = el("span", { class: "muted", id: "reply-saved" });
  const node = el(
    "form",
    { class: "reply-form", id: "reply-form" },
    field("findings", "Findings", 5),
    field("impression", "Impression", 3),
    field("recommendation", "Recommendation", 2),
    el("label", { class: "inline" }, el("input", { type: "checkbox", name: "urgent", id: "reply-urgent", checked: !!reply.urgent }), " Urgent"),
    status,
  );
  const values = () => ({
    findings: node.elements.findings.value,
    impression: node.elements.impression.value,
    recommendation: node.elements.recommendation.value,
    urgent: node.elements.urgent.checked,
  });
  const save = debounce(async () => {
    status.textContent = "saving…";
    try {
      const saved = await api(`/api/cases/${caseId}/reply`, { method: "PUT", json: values() });
      status.textContent = `draft saved ${new Date(saved.updated_at || Date.now()).toLocaleTimeString()}`;
    } catch (error) {
      status.textContent = "";
      if (error.status !== 401) banner(`The draft was not saved: ${error.message}`, "error");
    }
  }, AUTOSAVE_MS);
  node.addEventListener("input", () => save());
  node.addEventListener("submit", (e) => e.preventDefault());
  const sign = el("button", {
    type: "button",
    id: "reply-sign",
    class: "primary",
    text: "Sign and send",
    onclick: async () => {
      if (!node.elements.impression.value.trim()) {
        banner("Write an impression before signing.", "error");
        return;
      }
      sign.disabled = true;
      try {
        await save.flush();
        await api(`/api/cases/${caseId}/reply/sign`, { method: "POST" });
        banner("Reply signed and sent.", "info");
        onChange();
      } catch (error) {
        sign.disabled = false;
        if (error.status !== 401) banner(`Could not sign: ${error.message}`, "error");
      }
    },
  });
  const question = el("textarea", { id: "question-text", rows: "2", placeholder: "Question for the clinic" });
  const ask = el("button", {
    type: "button",
    id: "ask-question",
    text: "Ask the clinic a question",
    onclick: async () => {
      if (!question.value.trim()) return question.focus();
      try {
        await api(`/api/cases/${caseId}/reply/question`, { method: "POST", json: { text: question.value } });
        question.value = "";
        banner("Question sent; the case waits for the clinic's answer.", "info");
        onChange();
      } catch (error) {
        if (error.status !== 401) banner(`Could not send the question: ${error.message}`, "error");
      }
    },
  });
  return el("div", {}, node, el("div", { class: "row" }, sign), el("div", { class: "ask" }, question, ask));
}

function thread(list, reply) {
  list.replaceChildren(
    ...(reply.communications || []).map((c) =>
      el(
        "li",
        { class: `comm from-${c.from}` },
        el("div", { class: "muted", text: `${c.author || c.from} · ${fmtDate(c.sent_at)}` }),
        el("div", { class: "prose", text: c.text }),
      ),
    ),
  );
  if (!list.children.length) list.append(el("li", { class: "muted", text: "Nothing yet." }));
}

/** Render the reply of `caseId` into `container` (and the thread into `threadList` if given). */
export async function showReply(caseId, container, { threadList, caseInfo } = {}) {
  let reply;
  try {
    reply = await api(`/api/cases/${caseId}/reply`);
  } catch (error) {
    if (error.status !== 401)
      container.replaceChildren(el("p", { class: "error", text: `The reply cannot be loaded: ${error.message}` }));
    return null;
  }
  const refresh = () => showReply(caseId, container, { threadList, caseInfo });
  const mine = caseInfo ? caseInfo.assigned_to === body.user : true;
  if (canWrite && reply.status !== "signed" && mine) container.replaceChildren(form(caseId, reply, refresh));
  else if (canWrite && reply.status !== "signed" && !caseInfo?.assigned_to)
    container.replaceChildren(
      el("p", { class: "muted", text: "Claim the case to annotate and write the reply. " }),
      el("button", {
        type: "button",
        id: "reply-claim",
        class: "primary",
        text: "Claim",
        onclick: async () => {
          try {
            await api(`/api/cases/${caseId}/claim`, { method: "POST" });
            location.reload();
          } catch (error) {
            banner(`Could not claim: ${error.message}`, "error");
          }
        },
      }),
    );
  else if (canWrite && reply.status !== "signed")
    container.replaceChildren(el("p", { class: "muted", text: `${caseInfo.assigned_to} has claimed this case.` }));
  else container.replaceChildren(readOnly(reply));
  if (threadList) thread(threadList, reply);
  return reply;
}

/** The clinic's answer/comment form on the case page. */
export function commentForm(caseId, formNode, onSent) {
  formNode.hidden = false;
  formNode.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = formNode.querySelector("textarea");
    if (!text.value.trim()) return;
    try {
      await api(`/api/cases/${caseId}/comments`, { method: "POST", json: { text: text.value } });
      text.value = "";
      onSent();
    } catch (error) {
      if (error.status !== 401) banner(`Could not send: ${error.message}`, "error");
    }
  });
}
