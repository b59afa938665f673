// One trial in a side drawer: parameters, values, every metric series, state history,
// attempts and error text. It refreshes itself when the trial changes.

import * as api from "./api.js";
import { el, num, param, seconds } from "./format.js";
import { objectives, valueOf } from "./panels.js";
import { Chart } from "./plot.js";
import { badge } from "./table.js";

const MAX_POINTS = 1000;
const MAX_CHARTS = 50; // metric charts drawn in a trial's drawer; the rest are named

function pairs(rows) {
  return el(
    "table",
    { class: "kv" },
    el(
      "tbody",
      {},
      rows.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))),
    ),
  );
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "-";
}

function prunedText(p) {
  if (!p) return null;
  const where = p.rung !== undefined ? `rung ${p.rung} (step ${p.step})` : `step ${p.step}`;
  return `${p.pruner}: ${p.metric} = ${num(p.value)} at ${where}, threshold ${num(p.threshold)}`;
}

export class TrialDetail {
  constructor(root, onError) {
    this.root = root;
    this.onError = onError;
    this.id = null;
    this.seq = null;
    this.series = {};
    root.hidden = true;
  }

  async open(id, study) {
    this.id = id;
    this.study = study;
    this.seq = null;
    this.series = {};
    this.answer = null; // the series answer drawn (api.get keeps it: a 304 gives it back)
    this.failed = false;
    this.focus = true; // the first drawing takes the keyboard focus (to its close button)
    this.root.hidden = false;
    this.root.replaceChildren(el("p", { class: "muted" }, "loading…"));
    await this.refresh();
  }

  close() {
    const id = this.id;
    this.id = null;
    this.root.hidden = true;
    document.querySelector(`table.trials tr[data-trial="${id}"]`)?.focus(); // back to its row
  }

  /** Called at every poll of the page: reload when the open trial changed (its `seq` moved
   * on), when its metrics grew (its series answers 200, not 304: the trials list moves only
   * with states, so a running trial's points and last step were never shown), or when the
   * last load failed (the drawer said "loading…" for good after one error). */
  sync(trials, study) {
    this.study = study;
    if (this.id === null || this.loading || this.polling) return;
    const t = trials.get(this.id);
    if (this.failed || (t && t.seq !== this.seq)) {
      this.refresh().catch(this.onError);
      return;
    }
    const id = this.id;
    this.polling = true; // one look at a time (its own flag: a refresh may be on its way)
    api
      .get(this.seriesPath(id), { keep: true })
      .then((answer) => {
        this.polling = false;
        if (id === this.id && answer !== this.answer && !this.loading) return this.refresh();
      })
      .catch((err) => {
        this.polling = false;
        this.onError(err);
      });
  }

  seriesPath(id) {
    return api.url(`trials/${id}/series`, { max_points: MAX_POINTS });
  }

  async refresh() {
    const id = this.id;
    this.loading = true;
    try {
      const [trial, series] = await Promise.all([
        api.get(`trials/${id}`),
        api.get(this.seriesPath(id), { keep: true }),
      ]);
      if (id !== this.id) return;
      this.failed = false;
      this.answer = series;
      this.series = series.series;
      this.seq = trial.seq;
      this.render(trial);
    } catch (err) {
      if (id === this.id) {
        this.failed = true; // the next poll tries again
        if (this.seq === null) {
          const why = `could not load trial: ${err.message}; trying again`;
          this.root.replaceChildren(el("p", { class: "muted load-error" }, why));
        }
      }
      throw err;
    } finally {
      this.loading = false;
    }
  }

  render(t) {
    const os = objectives(this.study);
    const values = os.map((o, i) => [`${o.metric} (${o.direction})`, num(valueOf(t, i))]);
    const facts = [
      ...values,
      ["attempts", String(t.attempts)],
      ["created", when(t.created_at)],
      ["started", when(t.started_at)],
      ["finished", when(t.finished_at)],
      ["duration", seconds(t.duration_s)],
      ["last step", t.last_step ?? "-"],
    ];
    if (t.placement?.node) facts.push(["node", t.placement.node]);
    if (t.has_checkpoint) facts.push(["checkpoint", "yes"]);
    // A chart per metric, for the first MAX_CHARTS of them (objectives first); the rest are
    // named below them: 5,000 metric names drew 5,000 charts and froze the tab for 37 s.
    const metrics = Object.entries(this.series);
    const first = new Set(os.map((o) => o.metric));
    metrics.sort(([a], [b]) => first.has(b) - first.has(a));
    const charts = metrics.slice(0, MAX_CHARTS).map(([name, s]) => {
      const box = el("div", { class: "series", dataset: { metric: name } });
      return { name, s, box };
    });
    const more = metrics.slice(MAX_CHARTS).map(([name]) => name);
    const parts = [
      el(
        "div",
        { class: "drawer-head" },
        el("h2", {}, `Trial #${t.number} `, badge(t.state)),
        el("button", { class: "close", "aria-label": "close", onclick: () => this.close() }, "×"),
      ),
      pairs(facts),
      t.pruned ? el("p", { class: "pruned" }, "Pruned: ", prunedText(t.pruned)) : null,
      t.error ? el("div", {}, el("h3", {}, "Error"), el("pre", { class: "error" }, t.error)) : null,
      el("h3", {}, "Parameters"),
      pairs(Object.entries(t.params).map(([k, v]) => [k, param(v)])),
      t.test_metrics ? el("h3", {}, "Test metrics") : null,
      t.test_metrics ? pairs(Object.entries(t.test_metrics).map(([k, v]) => [k, num(v)])) : null,
      el("h3", {}, "Metrics"),
      charts.length
        ? charts.map((c) => el("div", {}, el("h4", {}, `${c.name} (${c.s.n} points)`), c.box))
        : el("p", { class: "muted" }, "no metrics reported"),
      more.length
        ? el(
            "p",
            { class: "muted more-metrics" },
            `${more.length} more metrics, not drawn: ${more.slice(0, 200).join(", ")}` +
              (more.length > 200 ? ", …" : ""),
          )
        : null,
      el("h3", {}, "History"),
      el(
        "table",
        { class: "events" },
        el(
          "thead",
          {},
          el(
            "tr",
            {},
            el("th", {}, "time"),
            el("th", {}, "state"),
            el("th", {}, "attempt"),
            el("th", {}, "detail"),
          ),
        ),
        el(
          "tbody",
          {},
          (t.events || []).map((e) =>
            el(
              "tr",
              {},
              el("td", {}, when(e.time)),
              el("td", {}, e.state),
              el("td", {}, String(e.attempt)),
              el("td", {}, e.detail || ""),
            ),
          ),
        ),
      ),
    ];
    this.root.replaceChildren(...parts.flat().filter(Boolean));
    if (this.focus) {
      this.root.querySelector(".close")?.focus();
      this.focus = false;
    }
    for (const c of charts) {
      new Chart(c.box, { height: 150 }).set({
        x: { label: "step" },
        y: { label: c.name },
        layers: [
          {
            kind: "line",
            points: c.s.steps.map((x, k) => [x, c.s.values[k]]),
            color: "#2a7ab0",
            width: 1.5,
          },
        ],
      });
    }
  }
}
