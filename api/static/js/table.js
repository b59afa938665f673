// The trials table: sortable by any column, filtered by state and by a query such as
// `x>0.5 opt=adam` (or plain text), shown a page at a time.

import { el, num, param, paramOf, seconds } from "./format.js";
import { objectives, valueOf } from "./panels.js";

const PAGE = 50;
const STATES = ["", "complete", "running", "paused", "pruned", "failed", "waiting"];
const TERM = /^([\w.\-]+)\s*(<=|>=|!=|=|<|>)\s*(.+)$/;
const OPS = {
  "=": (c) => c === 0,
  "!=": (c) => c !== 0,
  "<": (c) => c < 0,
  ">": (c) => c > 0,
  "<=": (c) => c <= 0,
  ">=": (c) => c >= 0,
};

/** The columns: a title, how to read a trial's value (it sorts), how to show it (`fmt`). */
function columns(study) {
  const cols = [
    { title: "#", value: (t) => t.number },
    { title: "state", value: (t) => t.state, badge: true },
    ...objectives(study).map((o, i) => ({
      title: o.metric,
      value: (t) => valueOf(t, i),
      fmt: num,
    })),
    ...Object.keys(study.spec.space).map((name) => ({
      title: name,
      value: (t) => paramOf(t, name),
      fmt: param,
    })),
    { title: "last step", value: (t) => t.last_step },
    { title: "duration", value: (t) => t.duration_s, fmt: seconds },
    { title: "attempts", value: (t) => t.attempts },
  ];
  return cols;
}

function compare(a, b) {
  if (a === b) return 0;
  if (a === null || a === undefined) return 1;
  if (b === null || b === undefined) return -1;
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b));
}

/** What a filter term names: an objective, `number`, `state`, or a parameter. */
function reader(name, study) {
  const i = objectives(study).findIndex((o) => o.metric === name);
  if (i >= 0) return (t) => valueOf(t, i);
  if (name === "number" || name === "state") return (t) => t[name];
  return (t) => paramOf(t, name);
}

/** A predicate from the filter text: terms like `x>0.5`, `opt=adam`, or words to find. */
export function parseFilter(text, study) {
  const tests = text
    .trim()
    .split(/\s+/)
    .filter(Boolean)
    .map((term) => {
      const m = term.match(TERM);
      if (!m) return (t) => JSON.stringify(t.params).includes(term) || String(t.number) === term;
      const [, name, op, raw] = m;
      const want = Number.isNaN(Number(raw)) ? raw : Number(raw);
      const read = reader(name, study);
      return (t) => {
        const v = read(t);
        if (v === undefined || v === null) return false;
        return OPS[op](compare(typeof want === "number" ? Number(v) : String(v), want));
      };
    });
  return (t) => tests.every((f) => f(t));
}

export class TrialsTable {
  constructor(root, { onPick }) {
    this.onPick = onPick;
    this.sort = { col: 0, desc: false };
    this.page = 0;
    this.key = null;
    this.state = el(
      "select",
      { "aria-label": "state", onchange: () => this.changed() },
      STATES.map((s) => el("option", { value: s }, s || "all states")),
    );
    this.query = el("input", {
      type: "search",
      placeholder: "filter: x>0.5 opt=adam",
      "aria-label": "filter",
      oninput: () => this.changed(),
    });
    this.info = el("span", { class: "muted" });
    this.prev = el("button", { onclick: () => this.turn(-1) }, "‹ prev");
    this.next = el("button", { onclick: () => this.turn(1) }, "next ›");
    this.table = el("table", { class: "trials" });
    root.replaceChildren(
      el("div", { class: "controls" }, this.state, this.query, this.prev, this.next, this.info),
      el("div", { class: "scroll" }, this.table),
    );
  }

  changed() {
    this.page = 0;
    this.update(this.study, this.trials, this.version);
  }

  turn(d) {
    this.page += d;
    this.update(this.study, this.trials, this.version);
  }

  /** Re-render when the trials (`version`), the sort, the filter or the page changed. */
  update(study, trials, version) {
    Object.assign(this, { study, trials, version });
    const key = JSON.stringify([version, this.sort, this.page, this.state.value, this.query.value]);
    if (key === this.key) return false;
    this.key = key;
    const cols = columns(study);
    const col = cols[this.sort.col] || cols[0];
    const keep = parseFilter(this.query.value, study);
    const rows = [...trials.values()]
      .filter((t) => (!this.state.value || t.state === this.state.value) && keep(t))
      .sort((a, b) => {
        const [x, y] = [col.value(a), col.value(b)];
        const none = (v) => v === null || v === undefined;
        if (none(x) !== none(y)) return none(x) ? 1 : -1; // no value: last either way
        return compare(x, y) * (this.sort.desc ? -1 : 1) || a.number - b.number;
      });
    const pages = Math.max(1, Math.ceil(rows.length / PAGE));
    this.page = Math.min(Math.max(0, this.page), pages - 1);
    const shown = rows.slice(this.page * PAGE, (this.page + 1) * PAGE);
    this.prev.disabled = this.page === 0;
    this.next.disabled = this.page >= pages - 1;
    this.info.textContent = rows.length
      ? `${this.page * PAGE + 1}–${this.page * PAGE + shown.length} of ${rows.length} (of ${trials.size})`
      : `none of ${trials.size}`;
    this.table.replaceChildren(
      this.head(cols),
      el(
        "tbody",
        {},
        shown.map((t) => this.row(cols, t)),
      ),
    );
    return true;
  }

  head(cols) {
    return el(
      "thead",
      {},
      el(
        "tr",
        {},
        cols.map((c, i) => {
          const arrow = this.sort.col === i ? (this.sort.desc ? " ▼" : " ▲") : "";
          const sortBy = () => {
            this.sort = { col: i, desc: this.sort.col === i ? !this.sort.desc : false };
            this.update(this.study, this.trials, this.version);
            this.table.querySelector(`thead th:nth-child(${i + 1})`)?.focus();
          };
          return el(
            "th",
            {
              class: "sortable",
              title: c.title,
              tabindex: 0, // reached and sorted by keyboard too
              "aria-sort":
                this.sort.col === i ? (this.sort.desc ? "descending" : "ascending") : null,
              onclick: sortBy,
              onkeydown: (e) => pressed(e) && sortBy(),
            },
            c.title + arrow,
          );
        }),
      ),
    );
  }

  row(cols, t) {
    return el(
      "tr",
      {
        dataset: { trial: t.id, number: t.number },
        tabindex: 0, // Enter or Space opens the trial, as a click does
        onclick: () => this.onPick(t.id),
        onkeydown: (e) => pressed(e) && this.onPick(t.id),
      },
      cols.map((c) => {
        const v = c.value(t);
        if (c.badge) return el("td", {}, badge(v));
        const text = c.fmt ? c.fmt(v) : (v ?? "-");
        return el("td", { title: typeof text === "string" ? text : null }, text);
      }),
    );
  }
}

/** Whether a key event is Enter or Space (then it is handled, not scrolled). */
function pressed(e) {
  if (e.key !== "Enter" && e.key !== " ") return false;
  e.preventDefault();
  return true;
}

export function badge(state) {
  return el("span", { class: `badge state-${state}` }, state);
}
