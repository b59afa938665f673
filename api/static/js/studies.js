// The list of studies: state, sampler, trial counts, budget, best value, last update.

import * as api from "./api.js";
import { ago, el, num } from "./format.js";
import { Poller } from "./poll.js";
import { badge } from "./table.js";

const STATES = ["", "running", "paused", "stopped", "completed"];

function best(s) {
  if (s.directions.length > 1)
    return s.best_values.length ? `front of ${s.best_values.length}` : "-";
  return num(s.best_value);
}

function row(s) {
  const c = s.counts;
  return el(
    "tr",
    { dataset: { study: s.id } },
    el("td", {}, el("a", { href: `?study=${s.id}` }, s.name)),
    el("td", {}, badge(s.state)),
    el("td", {}, s.sampler),
    el("td", { class: "num" }, String(c.complete + c.pruned)),
    el("td", { class: "num" }, String(c.running + c.waiting)),
    el("td", { class: "num" }, String(c.failed)),
    el("td", { class: "num" }, s.max_trials === null ? "-" : String(s.max_trials)),
    el("td", { class: "num" }, best(s)),
    el("td", { dataset: { time: s.updated_at }, title: s.updated_at }, ago(s.updated_at)),
  );
}

export function studiesPage(root, events) {
  let studies = [];
  const filter = el(
    "select",
    { "aria-label": "filter by state", onchange: () => render() },
    STATES.map((s) => el("option", { value: s }, s || "all states")),
  );
  const body = el("tbody");
  const count = el("span", { class: "muted" });
  root.replaceChildren(
    el("header", { class: "page-head" }, el("h1", {}, "Studies"), filter, count),
    el(
      "table",
      { class: "studies" },
      el(
        "thead",
        {},
        el(
          "tr",
          {},
          [
            "name",
            "state",
            "sampler",
            "done",
            "running",
            "failed",
            "budget",
            "best",
            "updated",
          ].map((h) => el("th", {}, h)),
        ),
      ),
      body,
    ),
  );

  function render() {
    const shown = studies.filter((s) => !filter.value || s.state === filter.value);
    body.replaceChildren(...shown.map(row));
    count.textContent = `${shown.length} of ${studies.length}`;
    if (!studies.length)
      body.replaceChildren(
        el("tr", {}, el("td", { colspan: 9, class: "muted" }, "no studies yet")),
      );
  }

  const poller = new Poller(async () => {
    const page = await api.get("dashboard/studies");
    if (page) {
      studies = page.studies;
      render();
    } else {
      for (const cell of body.querySelectorAll("[data-time]"))
        cell.textContent = ago(cell.dataset.time);
    }
  }, events);
  poller.start();
  return poller;
}
