// The study page's header: name, state, sampler, counts, budget, best value, and the buttons
// that pause, resume and stop the study.

import { ago, el, num } from "./format.js";
import { badge } from "./table.js";

function best(s) {
  if (s.directions.length > 1) return `Pareto front: ${s.best_trials.length} trial(s)`;
  if (!s.best_trial) return "no complete trial yet";
  return `best ${num(s.best_trial.value)} (trial #${s.best_trial.number})`;
}

function counts(s) {
  const c = s.counts;
  const waiting = c.waiting ? ` · ${c.waiting} waiting` : "";
  const paused = c.paused ? ` · ${c.paused} paused` : "";
  const budget = s.spec.budget?.max_trials ?? "∞";
  return (
    `${c.complete} complete · ${c.running} running · ${c.pruned} pruned · ${c.failed} failed` +
    `${paused}${waiting} · budget ${budget}`
  );
}

/** Draw study `s` into `head`; `onAct(state)` runs when a button is pressed. */
export function renderHeader(head, s, objectiveSel, onAct) {
  const button = (label, state, enabled) =>
    el("button", { class: `act-${state}`, disabled: !enabled, onclick: () => onAct(state) }, label);
  head.replaceChildren(
    el(
      "div",
      { class: "title" },
      el("a", { href: "./", class: "back" }, "← studies"),
      el("h1", {}, s.name),
      el("span", { id: "study-state" }, badge(s.state)),
      s.state_reason ? el("span", { class: "muted" }, s.state_reason) : null,
    ),
    el(
      "div",
      { class: "facts" },
      el("span", {}, `sampler ${s.spec.sampler.type}`),
      el("span", {}, `pruner ${s.spec.pruner?.type ?? "none"}`),
      el("span", { id: "counts" }, counts(s)),
      el("strong", { id: "best" }, best(s)),
      el(
        "span",
        { class: "muted", id: "updated", dataset: { time: s.updated_at } },
        `updated ${ago(s.updated_at)}`,
      ),
      objectiveSel,
    ),
    el(
      "div",
      { class: "actions" },
      button("Pause", "paused", s.state === "running"),
      button("Resume", "running", s.state === "paused"),
      button("Stop", "stopped", s.state === "running" || s.state === "paused"),
    ),
  );
}
