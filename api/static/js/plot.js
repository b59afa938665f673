// Canvas plots without dependencies: numeric (linear or log) and categorical axes; layers of
// points, lines, many polylines and heat cells; a hover tooltip, and a click that picks a trial.

import { bounds, num, param } from "./format.js";

const PAD = { left: 60, right: 14, top: 12, bottom: 40 };
const FONT = "11px system-ui, sans-serif";
const INK = "#555";
const GRID = "#ececec";
const HOVER_PX = 10;

/** Where values fall on one axis: "linear", "log" or "category". */
export class Scale {
  constructor(type, domain, range) {
    this.type = type;
    this.range = range;
    if (type === "category") {
      this.categories = domain;
      this.index = new Map(domain.map((c, i) => [key(c), i]));
    } else {
      this.domain = domain;
      const f = type === "log" ? Math.log10 : (v) => v;
      this.lo = f(domain[0]);
      this.hi = f(domain[1]);
      this.f = f;
    }
  }

  map(v) {
    const [a, b] = this.range;
    if (this.type === "category") {
      const i = this.index.get(key(v));
      return i === undefined ? NaN : a + ((i + 0.5) / this.categories.length) * (b - a);
    }
    if (this.type === "log" && !(v > 0)) return NaN;
    // halves: near ±1.8e308 the span hi - lo overflows to Infinity (every point on one edge)
    const at = (this.f(v) / 2 - this.lo / 2) / (this.hi / 2 - this.lo / 2);
    return a + at * (b - a);
  }

  ticks(count = 5) {
    if (this.type === "category") {
      const step = Math.ceil(this.categories.length / 12);
      return this.categories.filter((_, i) => i % step === 0).map((c) => [c, param(c)]);
    }
    if (this.type === "log") return logTicks(this.lo, this.hi).map((v) => [v, num(v)]);
    return linearTicks(this.lo, this.hi, count).map((v) => [v, num(v)]);
  }
}

function key(v) {
  // a string apart from the number or literal it spells: "3" is not 3, "true" is not true
  return typeof v === "string" ? `s:${v}` : JSON.stringify(v);
}

const MAX_TICKS = 100;

export function linearTicks(lo, hi, count) {
  const raw = (hi - lo) / Math.max(1, count);
  if (!(raw > 0) || !Number.isFinite(raw)) return [lo, hi].filter(Number.isFinite);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const first = Math.ceil(lo / step) * step;
  // A span of a few ulps (two values one rounding apart): a step below the values' own
  // precision would never move v. The ends are the ticks then.
  if (!(step > 0) || first + step === first || (hi - lo) / step > MAX_TICKS) return [lo, hi];
  const out = [];
  for (let i = 0; i <= MAX_TICKS; i += 1) {
    const v = first + i * step;
    if (v > hi + step * 1e-9) break;
    out.push(Math.abs(v) < step * 1e-9 ? 0 : Number(v.toPrecision(12)));
  }
  return out;
}

function logTicks(lo, hi) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [];
  const out = [];
  const mults = hi - lo < 2 ? [1, 2, 5] : [1];
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e += 1) {
    for (const m of mults) {
      const v = m * 10 ** e;
      if (Math.log10(v) >= lo - 1e-9 && Math.log10(v) <= hi + 1e-9) out.push(v);
    }
  }
  return out;
}

/** The [lo, hi] an axis should show for `values` (a little wider than the data). */
export function extent(values, type) {
  let vs = values.filter((v) => Number.isFinite(v));
  if (type === "log") vs = vs.filter((v) => v > 0);
  if (!vs.length) return type === "log" ? [1, 10] : [0, 1];
  const [lo, hi] = bounds(vs);
  if (type === "log") {
    const pad = (Math.log10(hi) - Math.log10(lo)) * 0.04 || 0.5;
    return [Math.max(lo / 10 ** pad, Number.MIN_VALUE), Math.min(hi * 10 ** pad, Number.MAX_VALUE)];
  }
  // equal, or a few roundings apart (0.3 and 0.1 + 0.2): an axis a tenth around them
  if (hi - lo <= Math.abs(lo) * 1e-9) {
    const d = Math.abs(lo) * 0.1 || 1;
    return [lo - d, hi + d];
  }
  const pad = (hi / 2 - lo / 2) * 0.08; // halves: hi - lo may overflow near ±1.8e308
  return [Math.max(lo - pad, -Number.MAX_VALUE), Math.min(hi + pad, Number.MAX_VALUE)];
}

/** Values on one axis of a layer list (to size the axis). */
function axisValues(layers, axis) {
  const i = axis === "x" ? 0 : 1;
  const out = [];
  for (const layer of layers) {
    if (layer.kind === "points") for (const p of layer.data) out.push(p[axis]);
    else if (layer.kind === "line") for (const p of layer.points) out.push(p[i]);
    else if (layer.kind === "lines")
      for (const s of layer.series) for (const p of s.points) out.push(p[i]);
    else if (layer.kind === "cells") out.push(...(axis === "x" ? layer.xs : layer.ys));
  }
  return out;
}

/**
 * A plot in `el`. `chart.set({x, y, layers, empty, height})` draws it:
 *   x, y: {type: "linear" | "log" | "category", label, categories?, domain?}
 *   layers: {kind: "points", data: [{x, y, color, r?, hollow?, label?, pick?}]}
 *           {kind: "line", points: [[x, y]], color, width?, step?}
 *           {kind: "lines", series: [{points: [[x, y]], color, width?, end?: "cross" | "dot",
 *                                     label?, pick?}]}
 *           {kind: "cells", xs, ys, z: [[...]], color: (z) => css}
 * Hovering a point or a curve shows its label; clicking it calls `onPick(pick)`.
 */
export class Chart {
  constructor(el, { height = 260, onPick = null } = {}) {
    this.el = el;
    this.height = height;
    this.onPick = onPick;
    this.spec = null;
    this.targets = []; // hover targets: {x, y, label, pick}, or a curve's {xs, ys, label, pick}
    this.canvas = document.createElement("canvas");
    this.tip = document.createElement("div");
    this.tip.className = "tip";
    this.tip.hidden = true;
    el.classList.add("chart");
    el.replaceChildren(this.canvas, this.tip);
    el.chart = this;
    this.canvas.addEventListener("mousemove", (e) => this.hover(e));
    this.canvas.addEventListener("mouseleave", () => (this.tip.hidden = true));
    this.canvas.addEventListener("click", (e) => {
      const t = this.nearest(e);
      if (t && t.pick !== undefined && this.onPick) this.onPick(t.pick);
    });
    let width = 0;
    new ResizeObserver(() => {
      if (this.el.clientWidth !== width && this.spec) this.draw();
      width = this.el.clientWidth;
    }).observe(el);
  }

  set(spec) {
    this.spec = spec;
    this.draw();
  }

  draw() {
    const spec = this.spec;
    const width = Math.max(200, this.el.clientWidth);
    const height = spec.height || this.height;
    const ratio = window.devicePixelRatio || 1;
    this.canvas.width = width * ratio;
    this.canvas.height = height * ratio;
    this.canvas.style.width = `${width}px`;
    this.canvas.style.height = `${height}px`;
    const g = this.canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.font = FONT;
    this.targets = [];
    const layers = spec.layers || [];
    const count = layers.reduce((n, l) => n + layerSize(l), 0);
    this.el.dataset.points = count;
    if (!count) {
      g.fillStyle = INK;
      g.textAlign = "center";
      g.fillText(spec.empty || "no data yet", width / 2, height / 2);
      return;
    }
    const box = { x0: PAD.left, x1: width - PAD.right, y0: height - PAD.bottom, y1: PAD.top };
    this.sx = this.scale(spec.x || {}, layers, "x", [box.x0, box.x1]);
    this.sy = this.scale(spec.y || {}, layers, "y", [box.y0, box.y1]);
    this.axes(g, box, spec);
    g.save();
    g.beginPath();
    g.rect(box.x0, box.y1, box.x1 - box.x0, box.y0 - box.y1);
    g.clip();
    for (const layer of layers) DRAW[layer.kind](this, g, layer);
    g.restore();
  }

  scale(axis, layers, which, range) {
    const type = axis.type || "linear";
    if (type === "category") return new Scale(type, axis.categories, range);
    return new Scale(type, axis.domain || extent(axisValues(layers, which), type), range);
  }

  axes(g, box, spec) {
    g.strokeStyle = GRID;
    g.fillStyle = INK;
    g.lineWidth = 1;
    g.textAlign = "center";
    g.textBaseline = "top";
    for (const [v, label] of this.sx.ticks(Math.max(2, Math.floor((box.x1 - box.x0) / 90)))) {
      const x = Math.round(this.sx.map(v)) + 0.5;
      g.beginPath();
      g.moveTo(x, box.y1);
      g.lineTo(x, box.y0);
      g.stroke();
      g.fillText(label.slice(0, 14), x, box.y0 + 4);
    }
    g.textAlign = "right";
    g.textBaseline = "middle";
    for (const [v, label] of this.sy.ticks(5)) {
      const y = Math.round(this.sy.map(v)) + 0.5;
      g.beginPath();
      g.moveTo(box.x0, y);
      g.lineTo(box.x1, y);
      g.stroke();
      g.fillText(label.slice(0, 10), box.x0 - 5, y);
    }
    g.strokeStyle = INK;
    g.strokeRect(box.x0 + 0.5, box.y1 + 0.5, box.x1 - box.x0, box.y0 - box.y1);
    g.textAlign = "center";
    g.textBaseline = "bottom";
    if (spec.x?.label) g.fillText(spec.x.label, (box.x0 + box.x1) / 2, box.y0 + PAD.bottom - 2);
    if (spec.y?.label) {
      g.save();
      g.translate(12, (box.y0 + box.y1) / 2);
      g.rotate(-Math.PI / 2);
      g.textBaseline = "middle";
      g.fillText(spec.y.label, 0, 0);
      g.restore();
    }
  }

  nearest(e) {
    const r = this.canvas.getBoundingClientRect();
    const mx = e.clientX - r.left;
    const my = e.clientY - r.top;
    let best = null;
    let bestD = HOVER_PX * HOVER_PX;
    for (const t of this.targets) {
      if (t.xs) {
        for (let k = 0; k < t.xs.length; k += 1) {
          const d = (t.xs[k] - mx) ** 2 + (t.ys[k] - my) ** 2;
          if (d <= bestD) {
            best = { x: t.xs[k], y: t.ys[k], label: t.label, pick: t.pick };
            bestD = d;
          }
        }
        continue;
      }
      const d = (t.x - mx) ** 2 + (t.y - my) ** 2;
      if (d <= bestD) {
        best = t;
        bestD = d;
      }
    }
    return best;
  }

  hover(e) {
    const t = this.nearest(e);
    this.canvas.style.cursor = t && t.pick !== undefined ? "pointer" : "default";
    if (!t || !t.label) {
      this.tip.hidden = true;
      return;
    }
    this.tip.textContent = t.label;
    this.tip.hidden = false;
    const left = Math.min(t.x + 12, this.el.clientWidth - this.tip.offsetWidth - 4);
    this.tip.style.left = `${Math.max(0, left)}px`;
    this.tip.style.top = `${Math.max(0, t.y - this.tip.offsetHeight - 8)}px`;
  }

  target(x, y, label, pick) {
    if (label || pick !== undefined) this.targets.push({ x, y, label, pick });
  }
}

function layerSize(l) {
  if (l.kind === "points") return l.data.length;
  if (l.kind === "line") return l.points.length;
  if (l.kind === "lines") return l.series.reduce((n, s) => n + s.points.length, 0);
  if (l.kind === "cells") return l.z.length ? l.xs.length * l.ys.length : 0;
  return 0;
}

/** `points` in pixels, as two arrays (points off the axes left out). */
function project(chart, points) {
  const xs = new Float64Array(points.length);
  const ys = new Float64Array(points.length);
  let n = 0;
  for (const [x, y] of points) {
    xs[n] = chart.sx.map(x);
    ys[n] = chart.sy.map(y);
    if (Number.isFinite(xs[n]) && Number.isFinite(ys[n])) n += 1;
  }
  return [xs.subarray(0, n), ys.subarray(0, n)];
}

function polyline(g, [xs, ys], step) {
  if (xs.length === 1) {
    // one point strokes nothing: a dot, in the line's colour (a curve of one report)
    g.beginPath();
    g.arc(xs[0], ys[0], Math.max(2, g.lineWidth), 0, 2 * Math.PI);
    g.fillStyle = g.strokeStyle;
    g.fill();
    return;
  }
  g.beginPath();
  for (let k = 0; k < xs.length; k += 1) {
    if (k === 0) g.moveTo(xs[k], ys[k]);
    else if (step) {
      g.lineTo(xs[k], ys[k - 1]);
      g.lineTo(xs[k], ys[k]);
    } else g.lineTo(xs[k], ys[k]);
  }
  g.stroke();
}

function cross(g, x, y, r) {
  g.beginPath();
  g.moveTo(x - r, y - r);
  g.lineTo(x + r, y + r);
  g.moveTo(x - r, y + r);
  g.lineTo(x + r, y - r);
  g.stroke();
}

/** Edges of the cells centred on `centres` (pixel positions, sorted). */
function edges(centres) {
  if (centres.length === 1) return [centres[0] - 20, centres[0] + 20];
  const out = [centres[0] - (centres[1] - centres[0]) / 2];
  for (let i = 1; i < centres.length; i += 1) out.push((centres[i - 1] + centres[i]) / 2);
  const n = centres.length;
  out.push(centres[n - 1] + (centres[n - 1] - centres[n - 2]) / 2);
  return out;
}

const DRAW = {
  points(chart, g, layer) {
    for (const p of layer.data) {
      const x = chart.sx.map(p.x);
      const y = chart.sy.map(p.y);
      if (!Number.isFinite(x) || !Number.isFinite(y)) continue;
      g.beginPath();
      g.arc(x, y, p.r || 3.5, 0, 2 * Math.PI);
      if (p.hollow) {
        g.strokeStyle = p.color;
        g.lineWidth = 1.5;
        g.stroke();
      } else {
        g.fillStyle = p.color;
        g.fill();
      }
      chart.target(x, y, p.label, p.pick);
    }
  },
  line(chart, g, layer) {
    g.strokeStyle = layer.color;
    g.lineWidth = layer.width || 2;
    polyline(g, project(chart, layer.points), layer.step);
  },
  lines(chart, g, layer) {
    for (const s of layer.series) {
      g.strokeStyle = s.color;
      g.globalAlpha = s.alpha ?? 0.8;
      g.lineWidth = s.width || 1.2;
      const [xs, ys] = project(chart, s.points);
      polyline(g, [xs, ys], false);
      if (s.label || s.pick !== undefined) {
        chart.targets.push({ xs, ys, label: s.label, pick: s.pick });
      }
      if (s.end && xs.length) {
        const x = xs[xs.length - 1];
        const y = ys[ys.length - 1];
        g.globalAlpha = 1;
        g.lineWidth = 2;
        if (s.end === "cross") cross(g, x, y, 4);
        else {
          g.fillStyle = s.color;
          g.beginPath();
          g.arc(x, y, 3, 0, 2 * Math.PI);
          g.fill();
        }
      }
    }
    g.globalAlpha = 1;
  },
  cells(chart, g, layer) {
    const xs = edges(layer.xs.map((v) => chart.sx.map(v)));
    const ys = edges(layer.ys.map((v) => chart.sy.map(v)));
    layer.z.forEach((row, j) =>
      row.forEach((z, i) => {
        g.fillStyle = layer.color(z);
        g.fillRect(xs[i], ys[j], xs[i + 1] - xs[i] + 0.5, ys[j + 1] - ys[j] - 0.5);
      }),
    );
  },
};
