// The login form: posts to /auth/session, then returns to where the user was.
import { body } from "./common.js";

const form = document.getElementById("login");
const error = document.getElementById("login-error");

function show(text) {
  error.textContent = text;
  error.hidden = false;
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  error.hidden = true;
  const submit = document.getElementById("login-submit");
  submit.disabled = true;
  try {
    const response = await fetch("/auth/session", {
      method: "POST",
      credentials: "same-origin",
      body: new URLSearchParams(new FormData(form)),
    });
    if (response.status === 204) {
      location.assign(body.next || "/worklist");
      return;
    }
    if (response.status === 429) {
      const wait = response.headers.get("Retry-After");
      show(`Too many attempts. Try again in ${wait || "a few"} seconds.`);
    } else if (response.status === 400 || response.status === 401) {
      show("Wrong username or password, or the account is disabled.");
    } else {
      show(`Login failed (${response.status}). Try again.`);
    }
  } catch {
    show("The server cannot be reached. Check the connection and try again.");
  } finally {
    submit.disabled = false;
  }
});
