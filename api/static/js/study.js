// The study page. Each poll asks for the study record with its ETag: a 304 means neither the
// study nor a trial's state, values or parameters changed (metric points do not move its
// sequence), and the poll then asks only for the curves, whose own cursor and ETag metric
// points move (another 304 while no trial reports). Otherwise it fetches only the trials and
// curves changed since their cursors, and redraws only the plots whose inputs changed.

import * as api from "./api.js";
import { TrialDetail } from "./detail.js";
import { ago, el } from "./format.js";
import { renderHeader } from "./header.js";
import * as panels from "./panels.js";
import { drawLegend, drawParallel } from "./parcoords.js";
import { Chart } from "./plot.js";
import { Poller } from "./poll.js";
import { TrialsTable } from "./table.js";

const FINISHED = new Set(["complete", "pruned", "failed"]);
const STARTED = ["running", "paused", ...FINISHED];
// While a study with a trainable has no started trial, the server is asked this often why.
const DISPATCH_CHECK_MS = 10000;
const CURVE_POINTS = 120;
const CURVE_PAGE = 1000; // the server's largest page
// While a first load pages through thousands of curves, redraw the part loaded so far only
// this long after the last redraw ended: redrawing every curve after each page cost about as
// much as fetching it (10,000 trials).
const PARTIAL_REDRAW_MS = 5000;
// A study of more trials than this first shows the curves of its best BEST_CURVES complete
// trials and of the unfinished ones (one request instead of one per thousand trials, and a
// plot that can still be read); "show all" (or `&curves=all` in the address) fetches every
// one, `&curves=best` asks for the best ones at any size.
const ALL_CURVES_UP_TO = 2000;
const BEST_CURVES = 1000;

function select(label, onchange) {
  return el("select", { "aria-label": label, onchange });
}

function fill(sel, options, value) {
  sel.replaceChildren(...options.map(([v, text]) => el("option", { value: v }, text)));
  sel.value = value;
}

function card(id, title, ...controls) {
  const body = el("div", { id, class: "plot" });
  return {
    node: el(
      "article",
      { class: "card", id: `card-${id}` },
      el("header", {}, el("h2", {}, title), ...controls),
      body,
    ),
    body,
  };
}

function trialCount(study) {
  return Object.values(study.counts).reduce((a, b) => a + b, 0);
}

export class StudyPage {
  constructor(root, id, events, { curves = null } = {}) {
    this.id = id;
    this.curvesMode = curves; // "all", "best" or null: by the study's size
    this.onError = events.onError;
    this.study = null;
    this.trials = new Map(); // id -> trial record
    this.cursor = null; // of /trials
    this.curves = new Map(); // trial id -> downsampled series of this.metric
    this.curvesCursor = null;
    this.curvesBest = false; // this.curves holds the best ones and the unfinished, not all
    this.curvesForgotten = 0; // counts forgetCurves(): a page asked for before is dropped
    this.drawnAt = 0; // when render() last ran (performance.now())
    this.metric = null;
    this.names = new Set();
    this.objective = 0;
    this.importance = null;
    this.contourAnswer = undefined;
    this.stale = false; // a control changed: fetch again even if the study did not change
    this.unfinished = false; // the last tick failed half-way
    this.v = { study: 0, trials: 0, finished: 0, curves: 0, names: 0, importance: 0, contour: 0 };
    this.keys = {};
    this.renders = {};
    this.dispatchCheckedAt = -Infinity;
    this.notice = document.getElementById("notice");
    this.layout(root);
    this.poller = new Poller(() => this.tick(), events);
  }

  start() {
    this.poller.start();
  }

  stop() {
    this.poller.stop();
    this.notice.hidden = true;
  }

  /** Ask again now, whatever the study's ETag says (a control changed what is shown). */
  refetch() {
    this.stale = true;
    this.poller.now();
  }

  layout(root) {
    this.head = el("header", { class: "study-head" });
    this.objectiveSel = select("objective", () => {
      this.objective = Number(this.objectiveSel.value);
      // The best ones shown, or on their way, are by the other objective: ask again.
      if (this.curvesBest || (this.curvesCursor === null && this.bestCurvesFirst()))
        this.forgetCurves();
      this.refetch();
    });
    this.metricSel = select("metric", () => {
      this.metric = this.metricSel.value;
      this.forgetCurves();
      this.refetch();
    });
    this.xSel = select("x parameter", () => this.refetch());
    this.ySel = select("y parameter", () => this.refetch());
    this.sliceSel = select("slice parameter", () => this.render());
    this.piSel = select("pareto x", () => this.render());
    this.pjSel = select("pareto y", () => this.render());
    const pick = (id) => this.pick(id);
    const history = card("history", "Optimization history");
    const curves = card("curves", "Learning curves", this.metricSel);
    this.curvesNote = el("p", { class: "note", id: "curves-note", hidden: true });
    const parallel = card("parallel", "Parallel coordinates");
    const importance = card("importance", "Parameter importance");
    const contour = card("contour", "Contour", this.xSel, this.ySel);
    const slice = card("slice", "Slice", this.sliceSel);
    const pareto = card("pareto", "Pareto front", this.piSel, this.pjSel);
    const trials = card("trials", "Trials");
    const rungs = card("rungs", "Rungs (promotion)");
    this.lineageSel = select("lineage parameter", () => this.render());
    const lineage = card("lineage", "PBT lineage", this.lineageSel);
    this.legend = el("div", { class: "ramp" });
    parallel.node.append(this.legend);
    curves.node.append(
      el(
        "p",
        { class: "legend" },
        el("span", { class: "key state-complete" }, "complete"),
        el("span", { class: "key state-running" }, "running ●"),
        el("span", { class: "key state-paused" }, "paused"),
        el("span", { class: "key state-pruned" }, "pruned ✕ (cut off)"),
        el("span", { class: "key state-failed" }, "failed"),
      ),
      this.curvesNote,
    );
    parallel.node.classList.add("wide");
    trials.node.classList.add("wide");
    this.rungsCard = rungs.node;
    this.rungsBox = rungs.body;
    this.rungsCard.hidden = true;
    this.lineageCard = lineage.node;
    this.lineageCard.hidden = true;
    this.lineageCopies = el("div", { class: "copies" });
    lineage.node.append(this.lineageCopies);
    this.paretoCard = pareto.node;
    this.paretoCard.hidden = true;
    this.charts = {
      history: new Chart(history.body, { onPick: pick }),
      curves: new Chart(curves.body, { onPick: pick }),
      contour: new Chart(contour.body, { height: 280 }),
      slice: new Chart(slice.body, { onPick: pick }),
      pareto: new Chart(pareto.body, { onPick: pick }),
      lineage: new Chart(lineage.body, { onPick: pick }),
    };
    this.parallelBox = parallel.body;
    new ResizeObserver(() => this.study && this.drawParallel()).observe(this.parallelBox);
    this.importanceBox = importance.body;
    this.table = new TrialsTable(trials.body, { onPick: pick });
    this.drawer = el("aside", { class: "drawer", id: "detail" });
    this.detail = new TrialDetail(this.drawer, this.onError);
    root.replaceChildren(
      this.head,
      el(
        "section",
        { class: "grid" },
        history.node,
        curves.node,
        parallel.node,
        importance.node,
        contour.node,
        slice.node,
        pareto.node,
        rungs.node,
        lineage.node,
        trials.node,
      ),
      this.drawer,
    );
  }

  // ------------------------------------------------------------------ polling

  /** Whether the study runs, has a trainable and no trial of it has started yet. */
  waitsForDispatch() {
    const s = this.study;
    const started = STARTED.some((state) => s?.counts[state]);
    return Boolean(s?.spec.trainable) && s.state === "running" && !started;
  }

  /** While the study waits for its first trial to start, say why it may wait. */
  async checkDispatch() {
    if (!this.waitsForDispatch()) {
      this.notice.hidden = true;
      return;
    }
    if (performance.now() - this.dispatchCheckedAt < DISPATCH_CHECK_MS) return;
    this.dispatchCheckedAt = performance.now();
    const problem = await api.dispatchProblem();
    const still = !this.poller.stopped && this.waitsForDispatch(); // the answer may be late
    this.notice.textContent = still && problem ? problem : "";
    this.notice.hidden = !(still && problem);
  }

  async tick() {
    this.checkDispatch(); // beside the tick: it never fails, and the tick need not wait
    const updated = document.getElementById("updated"); // "updated 2 min ago" moves on
    if (updated) updated.textContent = `updated ${ago(updated.dataset.time)}`;
    // A page that holds nothing of the study asks for all of it (a stopped page's last tick
    // may have kept an ETag after the new page's `forgetAll`), as the pulls below do.
    if (!this.study) api.forget(`studies/${this.id}`);
    const study = await api.get(`studies/${this.id}`);
    if (!study && !this.stale && !this.unfinished && this.study) {
      // 304: no trial changed state; only their curves may have grown.
      const shown = this.v.curves;
      await this.pullCurves();
      if (this.v.curves !== shown) this.render();
      this.detail.sync(this.trials, this.study); // once a tick: its points may have grown
      return;
    }
    this.stale = false;
    // Set until this tick gets through: one that failed half-way (say the server restarted
    // between two of its requests) is finished by the next poll, whose study answers 304.
    this.unfinished = true;
    if (study) {
      if (!this.study) this.setup(study);
      this.study = study;
      this.v.study += 1;
    }
    // Independent: side by side (the server waits for importance and the contour on two
    // threads while its analysis worker fits them, and the page draws the trials while the
    // curves come). All of them end before the tick
    // does, even when one fails (then its error is thrown).
    const pulls = [
      this.pullTrials().then(() => this.render()),
      this.pullCurves(),
      this.pullImportance(),
      this.pullContour(),
    ];
    const failed = (await Promise.allSettled(pulls)).find((r) => r.status === "rejected");
    if (!failed) this.render();
    this.detail.sync(this.trials, this.study); // also when a pull failed: its own requests
    if (failed) throw failed.reason;
    this.unfinished = false;
  }

  async pullTrials() {
    for (;;) {
      const path = api.url(`studies/${this.id}/trials`, { since: this.cursor });
      if (this.cursor === null) api.forget(path); // we hold none of its trials
      const page = await api.get(path);
      if (!page) return;
      for (const t of page.trials) {
        const old = this.trials.get(t.id);
        if (!old || old.state !== t.state || FINISHED.has(t.state)) this.v.finished += 1;
        // A curve fetched beside this page may have been read later than this record.
        const c = this.curves.get(t.id);
        if (c && c.curve_seq > t.curve_seq) t.last_step = c.last_step;
        this.trials.set(t.id, t);
      }
      if (page.trials.length) this.v.trials += 1;
      const more = page.trials.length === 1000 && page.cursor !== this.cursor;
      this.cursor = page.cursor;
      if (!more) return;
    }
  }

  /** Drop the curves held, so that the next poll fetches them anew. */
  forgetCurves() {
    this.curves = new Map();
    this.curvesCursor = null;
    this.curvesBest = false;
    this.curvesForgotten += 1;
    this.v.curves += 1;
  }

  /** Whether a first fetch of the curves asks only for the best ones and the unfinished. */
  bestCurvesFirst() {
    if (this.curvesMode) return this.curvesMode === "best";
    return trialCount(this.study) > ALL_CURVES_UP_TO;
  }

  async pullCurves() {
    let asked = this.metric; // null: the server's default, the first objective's
    const forgotten = this.curvesForgotten;
    for (;;) {
      const best = this.curvesCursor === null && this.bestCurvesFirst();
      const path = api.url(`studies/${this.id}/curves`, {
        metric: asked,
        max_points: CURVE_POINTS,
        since: this.curvesCursor,
        limit: CURVE_PAGE,
        best: best ? BEST_CURVES : null,
        objective: best ? this.objective : null,
      });
      if (this.curvesCursor === null) api.forget(path); // we hold none of its curves
      const page = await api.get(path);
      if (!page) return;
      // The curves were dropped while this page was on its way (another metric or
      // objective, "show all"): the next tick asks anew.
      if (this.metric !== asked || this.curvesForgotten !== forgotten) return;
      asked = this.metric = page.metric;
      if (best) this.curvesBest = true;
      for (const c of page.series) {
        this.curves.set(c.trial_id, c);
        // The trials list moves only with states: the table's "last step" follows the curves.
        // (unless the trial's record was read later: the trials come side by side)
        const t = this.trials.get(c.trial_id);
        if (t && c.curve_seq >= t.curve_seq && t.last_step !== c.last_step) {
          t.last_step = c.last_step;
          this.v.trials += 1;
        }
      }
      if (page.series.length) this.v.curves += 1;
      const known = this.names.size;
      for (const n of [page.metric, ...page.names]) this.names.add(n);
      if (this.names.size !== known) this.v.names += 1;
      this.curvesCursor = page.cursor;
      if (!page.more) return;
      if (performance.now() - this.drawnAt > PARTIAL_REDRAW_MS) this.render(); // loaded so far
    }
  }

  async pullImportance() {
    const key = JSON.stringify([this.study.counts.complete, this.objective]);
    if (key !== this.importanceKey) {
      const path = api.url(`studies/${this.id}/importance`, { objective: this.objective });
      const answer = await api.get(path, { keep: true });
      if (answer !== this.importance) {
        this.importance = answer;
        this.v.importance += 1;
      }
      // Still fitting on the server (202, or the last answer): ask again at the next poll.
      if (answer?.status === "computing") this.stale = true;
      else this.importanceKey = key;
    }
  }

  async pullContour() {
    const [x, y] = [this.xSel.value, this.ySel.value];
    const ckey = JSON.stringify([this.study.counts.complete, this.objective, x, y]);
    if (x === y) {
      if (this.contourAnswer !== null) {
        this.contourAnswer = null;
        this.contourKey = null;
        this.v.contour += 1;
      }
    } else if (ckey !== this.contourKey) {
      const query = { x, y, objective: this.objective, points: false }; // the page has them
      const path = api.url(`studies/${this.id}/contour`, query);
      const answer = await api.get(path, { keep: true });
      if (answer !== this.contourAnswer) {
        this.contourAnswer = answer;
        this.v.contour += 1;
      }
      // Still fitting on the server (202): ask again at the next poll.
      if (answer?.status === "computing") this.stale = true;
      else this.contourKey = ckey;
    }
  }

  /** Controls that depend on the spec, set once the study is known. */
  setup(study) {
    const os = panels.objectives(study);
    const arrow = (o) => `${o.metric} ${o.direction === "minimize" ? "↓" : "↑"}`;
    fill(
      this.objectiveSel,
      os.map((o, i) => [i, arrow(o)]),
      0,
    );
    this.objectiveSel.hidden = os.length < 2;
    const names = Object.keys(study.spec.space);
    fill(
      this.xSel,
      names.map((n) => [n, n]),
      names[0],
    );
    fill(
      this.ySel,
      names.map((n) => [n, n]),
      names[1] ?? names[0],
    );
    fill(
      this.sliceSel,
      names.map((n) => [n, n]),
      names[0],
    );
    const mutable = names.filter((n) => study.spec.space[n].mutable);
    fill(
      this.lineageSel,
      mutable.map((n) => [n, n]),
      mutable[0] ?? "",
    );
    if (os.length > 1) {
      this.paretoCard.hidden = false;
      fill(
        this.piSel,
        os.map((o, i) => [i, arrow(o)]),
        0,
      );
      fill(
        this.pjSel,
        os.map((o, i) => [i, arrow(o)]),
        1,
      );
      this.piSel.hidden = this.pjSel.hidden = os.length < 3;
    }
  }

  // ---------------------------------------------------------------- rendering

  /** Run `draw` when `deps` differ from the last time (counted in `renders`, for tests). */
  once(name, deps, draw) {
    const key = JSON.stringify(deps);
    if (this.keys[name] === key) return;
    draw();
    this.keys[name] = key; // after drawing: a draw that threw is tried again
    this.renders[name] = (this.renders[name] || 0) + 1;
  }

  render() {
    if (!this.study) return;
    try {
      this.draw();
    } finally {
      this.drawnAt = performance.now();
    }
  }

  draw() {
    const { v } = this;
    const i = this.objective;
    const [x, y] = [this.xSel.value, this.ySel.value];
    this.once("head", [v.study], () =>
      renderHeader(this.head, this.study, this.objectiveSel, (state) => this.act(state)),
    );
    this.once("history", [v.finished, i], () => this.charts.history.set(panels.history(this, i)));
    this.once("metrics", [v.names], () =>
      fill(
        this.metricSel,
        [...this.names].sort().map((n) => [n, n]),
        this.metric,
      ),
    );
    this.once("curves", [v.curves, v.finished, this.metric], () =>
      this.charts.curves.set(panels.curves(this)),
    );
    this.once("curvesNote", [v.curves, v.study, this.curvesBest], () => this.noteCurves());
    this.once("parallel", [v.finished, i], () => this.drawParallel());
    this.once("importance", [v.importance], () =>
      this.importanceBox.replaceChildren(...panels.importanceBars(this.importance)),
    );
    const s = this.sliceSel.value;
    this.once("slice", [v.finished, i, s], () => this.charts.slice.set(panels.slice(this, s, i)));
    const computing = this.contourAnswer?.status === "computing";
    const note =
      x === y
        ? "pick two different parameters"
        : computing
          ? "computing…"
          : "needs two complete trials";
    this.once("contour", [v.contour], () =>
      this.charts.contour.set(panels.contour(this, this.contourAnswer, i, note)),
    );
    if (!this.paretoCard.hidden) {
      const [pi, pj] = [Number(this.piSel.value), Number(this.pjSel.value)];
      this.once("pareto", [v.finished, v.study, pi, pj], () =>
        this.charts.pareto.set(panels.pareto(this, pi, pj)),
      );
    }
    this.once("rungs", [v.trials, v.finished, v.study], () => this.drawRungs());
    const lp = this.lineageSel.value;
    this.once("lineage", [v.trials, v.study, lp], () => this.drawLineage(lp));
    if (this.table.update(this.study, this.trials, v.trials))
      this.renders.table = (this.renders.table || 0) + 1;
  }

  /** Say when the curves shown are the best ones, with a link to fetch all of them. */
  noteCurves() {
    this.curvesNote.hidden = !this.curvesBest;
    if (!this.curvesBest) return;
    const all = el("a", { href: "#", onclick: (e) => this.showAllCurves(e) }, "show all");
    const by = panels.objectives(this.study)[this.objective].metric;
    const best = Math.min(BEST_CURVES, this.study.counts.complete);
    this.curvesNote.replaceChildren(
      `${this.curves.size.toLocaleString()} of ${trialCount(this.study).toLocaleString()} ` +
        `trials: the best ${best.toLocaleString()} complete by ${by} and the unfinished · `,
      all,
    );
  }

  showAllCurves(event) {
    event?.preventDefault();
    this.curvesMode = "all";
    const address = new URL(location.href);
    address.searchParams.set("curves", "all"); // a reload shows them all too
    history.replaceState(null, "", address);
    this.forgetCurves();
    this.refetch();
  }

  drawRungs() {
    const found = panels.rungs(this);
    this.rungsCard.hidden = !found;
    if (!found) return;
    const hyperband = found.brackets > 1;
    const head = [...(hyperband ? ["bracket"] : []), "rung", "step", "reached", "paused here"];
    head.push("went on", "top ⌊n/η⌋");
    const cell = (v) => el("td", { class: "num" }, String(v));
    this.rungsBox.replaceChildren(
      el(
        "table",
        { class: "rungs" },
        el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
        el(
          "tbody",
          {},
          ...found.rows.map((r) =>
            el(
              "tr",
              {},
              ...(hyperband ? [cell(r.bracket)] : []),
              cell(r.rung),
              cell(r.step),
              cell(r.reached),
              cell(r.paused),
              cell(r.wentOn),
              cell(r.promotable),
            ),
          ),
        ),
      ),
      found.rows.length ? "" : el("p", { class: "note" }, "no trial has reached a rung yet"),
    );
  }

  drawLineage(name) {
    const found = panels.lineage(this, name);
    this.lineageCard.hidden = !found;
    if (!found) return;
    this.charts.lineage.set(found.chart);
    const replayed = found.kind === "replay";
    this.lineageCard.querySelector("h2").textContent = replayed ? "Replayed schedule" : "PBT lineage";
    const head = ["trial", "from step", "copied", "explored", "params"];
    const cell = (v, cls = "") => el("td", { class: cls }, String(v));
    this.lineageCopies.replaceChildren(
      found.copies.length
        ? el(
            "table",
            { class: "lineage" },
            el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
            el(
              "tbody",
              {},
              ...found.copies.map((c) =>
                el(
                  "tr",
                  { dataset: { trial: c.id } },
                  cell(`#${c.trial}`, "num"),
                  cell(c.step, "num"),
                  cell(c.parent === null ? "— (replayed)" : `#${c.parent} at step ${c.parentStep}`),
                  cell(c.explored || "—"),
                  cell(
                    Object.entries(c.params)
                      .map(([k, v]) => `${k}=${typeof v === "number" ? Number(v.toPrecision(4)) : v}`)
                      .join(", "),
                  ),
                ),
              ),
            ),
          )
        : el("p", { class: "note" }, replayed ? "no trial has changed its parameters yet" : "no trial has copied another yet"),
    );
  }

  drawParallel() {
    const { axes, rows } = panels.parallel(this, this.objective);
    drawParallel(this.parallelBox, axes, rows);
    const o = panels.objectives(this.study)[this.objective];
    drawLegend(
      this.legend,
      rows.map((r) => r.values[r.values.length - 1]),
      o,
    );
  }

  async act(state) {
    if (
      state === "stopped" &&
      !window.confirm(`Stop study ${this.study.name}? Its running trials fail.`)
    )
      return;
    try {
      this.study = await api.patch(`studies/${this.id}`, { state });
      this.v.study += 1;
      this.render();
    } catch (error) {
      this.onError(error);
    }
    this.poller.now();
  }

  pick(id) {
    this.detail.open(id, this.study).catch(this.onError);
  }
}
