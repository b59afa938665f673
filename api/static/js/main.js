// Entry point: takes the token from the URL, shows the studies list or one study
// (`?study=<id>`), and asks for the token when the API answers 401.

import * as api from "./api.js";
import { StudyPage } from "./study.js";
import { studiesPage } from "./studies.js";

const root = document.getElementById("app");
const banner = document.getElementById("banner");
const footer = document.getElementById("stats");
const dialog = document.getElementById("token-dialog");
const tokenInput = document.getElementById("token-input");
let current = null;

function start() {
  current?.stop();
  api.forgetAll();
  const query = new URLSearchParams(location.search);
  const id = Number(query.get("study"));
  const events = { onError, onOk };
  if (id > 0) {
    current = new StudyPage(root, id, events, { curves: query.get("curves") });
    current.start();
  } else {
    current = studiesPage(root, events);
  }
  window.hpo.page = current;
}

function onOk() {
  banner.hidden = true;
  const { requests, notModified, bytes } = api.stats;
  footer.textContent =
    `${requests} requests, ${notModified} answered 304 (unchanged), ` +
    `${(bytes / 1024).toFixed(1)} kB received · polling every 3 s while this tab is visible`;
}

function onError(error) {
  if (error instanceof api.Unauthorized) {
    current?.stop();
    dialog.hidden = false;
    tokenInput.focus();
    return;
  }
  banner.textContent =
    error instanceof api.ApiError
      ? error.message
      : `cannot reach the server (${error.message}); retrying`;
  banner.hidden = false;
}

document.getElementById("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  api.setToken(tokenInput.value.trim());
  tokenInput.value = "";
  dialog.hidden = true;
  start();
});

window.hpo = { api, page: null };
api.takeTokenFromUrl();
start();
