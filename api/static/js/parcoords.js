// Parallel coordinates on a canvas: one vertical axis per parameter plus the objective, one
// line per complete trial, coloured by its objective value.

import { bounds, el, num, param, rampGradient } from "./format.js";
import { Scale, extent } from "./plot.js";

const PAD = { left: 40, right: 60, top: 26, bottom: 24 };

/**
 * Draw into `el`. axes: [{name, type: "linear" | "log" | "category", categories?}];
 * rows: [{values: [one per axis], color}]. A missing value (inactive parameter) breaks the line.
 */
export function drawParallel(
  el,
  axes,
  rows,
  { height = 300, empty = "no complete trials yet" } = {},
) {
  let canvas = el.querySelector("canvas");
  if (!canvas) {
    canvas = document.createElement("canvas");
    el.classList.add("chart");
    el.replaceChildren(canvas);
  }
  const width = Math.max(300, el.clientWidth);
  const ratio = window.devicePixelRatio || 1;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.font = "11px system-ui, sans-serif";
  el.dataset.points = rows.length;
  if (!rows.length || axes.length < 2) {
    g.fillStyle = "#555";
    g.textAlign = "center";
    g.fillText(empty, width / 2, height / 2);
    return;
  }
  const step = (width - PAD.left - PAD.right) / (axes.length - 1);
  const scales = axes.map((a, i) => {
    const range = [height - PAD.bottom, PAD.top];
    if (a.type === "category") return new Scale("category", a.categories, range);
    const values = rows.map((r) => r.values[i]);
    return new Scale(a.type, extent(values, a.type), range);
  });
  g.lineWidth = 1;
  g.globalAlpha = rows.length > 500 ? 0.35 : 0.7;
  for (const row of rows) {
    g.strokeStyle = row.color;
    g.beginPath();
    let pen = false;
    row.values.forEach((v, i) => {
      // an inactive parameter breaks the line; a null choice has its place on its axis
      const missing = v === undefined || (v === null && scales[i].type !== "category");
      const y = missing ? NaN : scales[i].map(v);
      if (!Number.isFinite(y)) {
        pen = false;
        return;
      }
      const x = PAD.left + i * step;
      if (pen) g.lineTo(x, y);
      else g.moveTo(x, y);
      pen = true;
    });
    g.stroke();
  }
  g.globalAlpha = 1;
  axes.forEach((a, i) => drawAxis(g, PAD.left + i * step, scales[i], a.name, height));
}

function drawAxis(g, x, scale, name, height) {
  g.strokeStyle = "#333";
  g.beginPath();
  g.moveTo(x + 0.5, PAD.top);
  g.lineTo(x + 0.5, height - PAD.bottom);
  g.stroke();
  g.fillStyle = "#222";
  g.textAlign = "center";
  g.textBaseline = "bottom";
  g.fillText(name, x, PAD.top - 8);
  g.textAlign = "left";
  g.textBaseline = "middle";
  for (const [v, label] of scale.ticks(4)) {
    const y = scale.map(v);
    g.fillStyle = "rgba(255,255,255,0.8)";
    const text = String(label ?? param(v)).slice(0, 10);
    g.fillRect(x + 3, y - 6, g.measureText(text).width + 4, 12);
    g.fillStyle = "#333";
    g.fillText(text, x + 5, y);
  }
}

/** The colour scale under the plot: worst and best value of objective `o`. */
export function drawLegend(box, values, o) {
  const bar = el("span", { class: "ramp-bar" });
  bar.style.background = rampGradient(o.direction === "maximize");
  const [lo, hi] = bounds(values);
  box.replaceChildren(
    el("span", {}, num(lo)),
    bar,
    el("span", {}, num(hi)),
    el("span", { class: "muted" }, `${o.metric}: darker is better`),
  );
  box.hidden = !values.length;
}
