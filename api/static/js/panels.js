// What each plot of the study page shows, computed from the page's model:
//   model.study (the study record), model.trials (Map id -> trial), model.curves (Map id ->
//   downsampled series of model.metric), and the answers of /importance and /contour.

import { STATE_COLORS, bounds, el, num, param, paramOf, ramp, valueColors } from "./format.js";

/** The study's objectives as [{metric, direction}]. */
export function objectives(study) {
  const o = study.spec.objective;
  return Array.isArray(o) ? o : [o];
}

export function valueOf(trial, i) {
  if (trial.values) return trial.values[i];
  return i === 0 ? trial.value : null;
}

/** Axis settings for a parameter of the space. */
export function axisOf(p) {
  if (p?.type === "categorical") return { type: "category", categories: p.choices };
  return { type: p?.log ? "log" : "linear" };
}

export function trialLabel(t, study) {
  const values = objectives(study)
    .map((o, i) => `${o.metric} = ${num(valueOf(t, i))}`)
    .join("\n");
  const params = Object.entries(t.params)
    .map(([k, v]) => `${k} = ${param(v)}`)
    .join("\n");
  const state = t.feasible === false ? `${t.state}, infeasible` : t.state;
  return `trial #${t.number} (${state})\n${values}\n${params}`;
}

function finished(model, i) {
  return [...model.trials.values()]
    .filter((t) => t.state === "complete" && Number.isFinite(valueOf(t, i)))
    .sort((a, b) => a.number - b.number);
}

export function history(model, i) {
  const { study } = model;
  const o = objectives(study)[i];
  const done = finished(model, i);
  const pruned = [...model.trials.values()].filter(
    (t) => t.state === "pruned" && Number.isFinite(valueOf(t, i)),
  );
  const better = o.direction === "maximize" ? Math.max : Math.min;
  // a study with constraints: the best is chosen among the trials that meet them (the
  // server says which in `feasible`), so the line leaves the others out
  const feasible = done.filter((t) => t.feasible !== false);
  const infeasible = done.filter((t) => t.feasible === false);
  let best = null;
  const line = feasible.map((t) => {
    best = best === null ? valueOf(t, i) : better(best, valueOf(t, i));
    return [t.number, best];
  });
  const point = (t, color, hollow) => ({
    x: t.number,
    y: valueOf(t, i),
    color,
    hollow,
    label: trialLabel(t, study),
    pick: t.id,
  });
  return {
    x: { label: "trial" },
    y: { label: `${o.metric} (${o.direction})` },
    empty: "no complete trials yet",
    layers: [
      { kind: "points", data: pruned.map((t) => point(t, STATE_COLORS.pruned, true)) },
      { kind: "points", data: feasible.map((t) => point(t, STATE_COLORS.complete, false)) },
      { kind: "line", points: line, color: "#d62728", width: 2, step: true },
      ...(infeasible.length
        ? [{ kind: "points", data: infeasible.map((t) => point(t, STATE_COLORS.waiting, true)) }]
        : []),
    ],
  };
}

const CURVE_ORDER = { complete: 0, failed: 1, pruned: 2, paused: 3, waiting: 4, running: 5 };

// Points per curve drawn once a study has more than MANY_CURVES of them (each keeps its first,
// last, lowest and highest points of each run): drawing is the dear part of the page there.
const MANY_CURVES = 2000;
const FEW_POINTS = 40;

/** At most `most` [step, value] points of a curve: the first and last, and each run's
 *  lowest and highest (as the server's downsampling). */
export function thinned(steps, values, most) {
  const n = steps.length;
  if (n <= most) return steps.map((s, k) => [s, values[k]]);
  const runs = Math.floor((most - 2) / 2);
  const keep = [0];
  for (let r = 0; r < runs; r += 1) {
    const a = 1 + Math.floor(((n - 2) * r) / runs);
    const b = 1 + Math.floor(((n - 2) * (r + 1)) / runs);
    if (a >= b) continue;
    let lo = a;
    let hi = a;
    for (let k = a + 1; k < b; k += 1) {
      if (values[k] < values[lo]) lo = k;
      if (values[k] > values[hi]) hi = k;
    }
    keep.push(Math.min(lo, hi));
    if (hi !== lo) keep.push(Math.max(lo, hi));
  }
  keep.push(n - 1);
  return keep.map((k) => [steps[k], values[k]]);
}

export function curves(model) {
  // Thousands of curves at a fixed opacity are a solid block: fade them as they grow.
  const alpha = Math.min(0.55, Math.max(0.12, 40 / model.curves.size));
  const most = model.curves.size > MANY_CURVES ? FEW_POINTS : Infinity;
  const series = [...model.curves.values()].map((c) => {
    const t = model.trials.get(c.trial_id);
    const state = t ? t.state : c.state;
    const points = thinned(c.steps, c.values, most);
    const cut = { pruned: " (pruned here)", paused: " (paused at a rung)" }[state] || "";
    return {
      state,
      points,
      color: STATE_COLORS[state],
      alpha: state === "running" ? 1 : alpha,
      width: state === "running" ? 1.8 : 1.2,
      end: state === "pruned" ? "cross" : state === "running" ? "dot" : null,
      label:
        `trial #${c.number} (${state})${cut}\nlast step ${c.steps[c.steps.length - 1]}, ` +
        `${model.metric} = ${num(c.values[c.values.length - 1])}\n${c.n} points`,
      pick: c.trial_id,
    };
  });
  series.sort((a, b) => CURVE_ORDER[a.state] - CURVE_ORDER[b.state]);
  return {
    x: { label: "step" },
    y: { label: model.metric },
    empty: `no ${model.metric} reported yet`,
    layers: [{ kind: "lines", series }],
  };
}

export function parallel(model, i) {
  const { study } = model;
  const space = study.spec.space;
  const names = Object.keys(space);
  const o = objectives(study)[i];
  const done = finished(model, i);
  const color = valueColors(
    done.map((t) => valueOf(t, i)),
    o.direction,
  );
  const axes = [
    ...names.map((n) => ({ name: n, ...axisOf(space[n]) })),
    { name: o.metric, type: "linear" },
  ];
  const rows = done.map((t) => ({
    values: [...names.map((n) => paramOf(t, n)), valueOf(t, i)],
    color: color(valueOf(t, i)),
  }));
  return { axes, rows };
}

export function slice(model, name, i) {
  const { study } = model;
  const o = objectives(study)[i];
  const done = finished(model, i);
  const last = Math.max(1, bounds(done.map((t) => t.number))[1]);
  return {
    x: { label: name, ...axisOf(study.spec.space[name]) },
    y: { label: o.metric },
    empty: "no complete trials yet",
    layers: [
      {
        kind: "points",
        data: done
          .filter((t) => paramOf(t, name) !== undefined)
          .map((t) => ({
            x: paramOf(t, name),
            y: valueOf(t, i),
            color: ramp(t.number / last),
            label: trialLabel(t, study),
            pick: t.id,
          })),
      },
    ],
  };
}

/** The estimated grid of `result` (asked without its points), and the page's own complete
 * trials on top. */
export function contour(model, result, i, note) {
  if (!result || !result.z.length) return { layers: [], empty: note };
  const axis = (a) =>
    a.kind === "categorical"
      ? { type: "category", categories: a.values, label: a.name }
      : { type: a.log ? "log" : "linear", label: a.name };
  const [x, y] = [result.x.name, result.y.name];
  const points = finished(model, i)
    .filter((t) => paramOf(t, x) !== undefined && paramOf(t, y) !== undefined)
    .map((t) => ({ x: paramOf(t, x), y: paramOf(t, y), value: valueOf(t, i), number: t.number }));
  const zs = result.z.flat().concat(points.map((p) => p.value));
  const color = valueColors(zs, objectives(model.study)[i].direction);
  return {
    x: axis(result.x),
    y: axis(result.y),
    layers: [
      { kind: "cells", xs: result.x.values, ys: result.y.values, z: result.z, color },
      {
        kind: "points",
        data: points.map((p) => ({
          x: p.x,
          y: p.y,
          color: "#fff",
          r: 3,
          label: `trial #${p.number}: ${num(p.value)}`,
        })),
      },
      {
        kind: "points",
        data: points.map((p) => ({ x: p.x, y: p.y, color: "#222", r: 3.5, hollow: true })),
      },
    ],
  };
}

export function pareto(model, i, j) {
  const { study } = model;
  const os = objectives(study);
  const front = new Set(study.best_trials.map((t) => t.id));
  const done = [...model.trials.values()].filter(
    (t) => t.state === "complete" && t.values && Number.isFinite(t.values[i]),
  );
  const point = (t, onFront) => ({
    x: t.values[i],
    y: t.values[j],
    color: onFront ? "#d62728" : "#9db4c8",
    r: onFront ? 4.5 : 3,
    label: trialLabel(t, study),
    pick: t.id,
  });
  const frontTrials = done.filter((t) => front.has(t.id)).sort((a, b) => a.values[i] - b.values[i]);
  return {
    x: { label: `${os[i].metric} (${os[i].direction})` },
    y: { label: `${os[j].metric} (${os[j].direction})` },
    empty: "no complete trials yet",
    layers: [
      { kind: "points", data: done.filter((t) => !front.has(t.id)).map((t) => point(t, false)) },
      {
        kind: "line",
        points: frontTrials.map((t) => [t.values[i], t.values[j]]),
        color: "#d62728",
        width: 1,
      },
      { kind: "points", data: frontTrials.map((t) => point(t, true)) },
    ],
  };
}

function importanceNote(answer) {
  const fitted = answer.n_fitted ?? answer.n_trials;
  const over =
    fitted < answer.n_trials
      ? `a sample of ${fitted} of ${answer.n_trials} complete trials`
      : `${answer.n_trials} complete trials`;
  const pending = answer.status === "computing" ? " (updating…)" : "";
  return `${answer.method}, over ${over}${pending}`;
}

/** Horizontal bars, most important first. */
export function importanceBars(answer) {
  const entries = Object.entries(answer?.importances || {});
  if (answer?.status === "computing" && !entries.length) {
    return [el("p", { class: "muted" }, "computing…")];
  }
  if (!answer || answer.n_trials < 2) {
    return [el("p", { class: "muted" }, "needs at least two complete trials")];
  }
  return [
    ...entries.map(([name, v]) => {
      const bar = el("span", { class: "bar" });
      bar.style.width = `${(v * 100).toFixed(1)}%`;
      return el(
        "div",
        { class: "imp-row", dataset: { param: name, importance: v } },
        el("span", { class: "imp-name" }, name),
        el("span", { class: "imp-track" }, bar),
        el("span", { class: "imp-value" }, `${(v * 100).toFixed(1)}%`),
      );
    }),
    el("p", { class: "muted" }, importanceNote(answer)),
  ];
}

/** A promotion study's rungs (ASHA or Hyperband with `mode: promotion`), from the trials'
 * last steps: per bracket and rung, how many trials reached it, how many wait there paused,
 * how many went on (were promoted), and how many its top ⌊n/η⌋ holds. Null for other studies. */
export function rungs(model) {
  const p = model.study.spec.pruner;
  if (p.mode !== "promotion") return null;
  const eta = p.reduction_factor;
  let brackets = 1; // ASHA: one bracket, with or without max_steps (its rungs go on)
  if (p.type === "hyperband") {
    const sMax = Math.floor(Math.log(p.max_steps / p.min_steps) / Math.log(eta) + 1e-9);
    if (!Number.isFinite(sMax)) return null; // (the server bounds max_steps: 2**62 at most)
    brackets = Math.min(sMax + 1, 64);
  }
  const trials = [...model.trials.values()];
  const top = Math.max(0, ...trials.map((t) => t.last_step ?? 0));
  const rows = [];
  for (let b = 0; b < brackets; b++) {
    const mine = trials.filter((t) => t.number % brackets === b);
    for (let step = p.min_steps * eta ** b, k = 0; step <= top; step *= eta, k++) {
      if (p.max_steps != null && step >= p.max_steps) break;
      const reached = mine.filter((t) => (t.last_step ?? 0) >= step);
      const next = step * eta;
      rows.push({
        bracket: b,
        rung: k,
        step,
        reached: reached.length,
        paused: reached.filter((t) => t.state === "paused" && t.last_step < next).length,
        wentOn: reached.filter((t) => t.last_step > step).length,
        promotable: Math.floor(reached.length / eta),
      });
    }
  }
  return { brackets, rows };
}

/** A PBT study's lineage (`scheduler: {type: pbt}`): every copy a trial made (the step it
 * took another trial's checkpoint at, whose, how its mutable parameters were explored), and
 * `name`'s value over each trial's steps, as step lines that jump at each copy. A replayed
 * schedule (`type: replay`) the same way, each change of its trials' parameters a row with no
 * trial copied. Null for other studies. */
export function lineage(model, name) {
  const study = model.study;
  const kind = study.spec.scheduler?.type;
  if (kind !== "pbt" && kind !== "replay") return null;
  const trials = [...model.trials.values()].sort((a, b) => a.number - b.number);
  const copies = [];
  const series = [];
  for (const t of trials) {
    const segments = t.schedule ?? [{ step: 0, params: t.params, parent: null }];
    for (const [k, s] of segments.entries())
      if (s.parent || (kind === "replay" && k > 0))
        copies.push({
          id: t.id,
          trial: t.number,
          step: s.step,
          parent: s.parent?.number ?? null,
          parentStep: s.parent?.step ?? null,
          explored: Object.entries(s.perturbed ?? {})
            .map(([k, how]) => `${k} ${how}`)
            .join(", "),
          params: s.params,
        });
    const points = [];
    segments.forEach((s, k) => {
      const v = s.params[name];
      if (typeof v !== "number") return;
      const end = k + 1 < segments.length ? segments[k + 1].step : Math.max(t.last_step ?? 0, s.step);
      points.push([s.step, v], [end, v]);
    });
    if (points.length)
      series.push({
        points,
        color: STATE_COLORS[t.state],
        width: t.schedule?.some((s) => s.parent) || kind === "replay" ? 2 : 1,
        label: `#${t.number}: ${name} over steps${t.schedule ? ` (${kind === "pbt" ? `${t.schedule.filter((s) => s.parent).length} copies` : `${t.schedule.length - 1} changes`})` : ""}`,
        pick: t.id,
      });
  }
  const spec = study.spec.space[name];
  const chart = {
    x: { label: "step" },
    y: { label: name, type: spec?.log ? "log" : "linear" },
    empty: `no trial has a numeric ${name}`,
    layers: [{ kind: "lines", series }],
  };
  return { kind, copies, chart };
}
