// Formatting numbers and times, colour scales, and building DOM nodes.

/** A number in at most 4 significant digits ("-" for none). */
export function num(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "-";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2).replace(/\.?0+e/, "e");
  return String(Number(v.toPrecision(4)));
}

/** A parameter value as text (strings as they are, other choices as JSON). */
/** Trial `t`'s value of parameter `name`, undefined where it has none (inactive): its own
 * key only, so a parameter named `toString` or `__proto__` reads as any other. */
export function paramOf(t, name) {
  return Object.hasOwn(t.params, name) ? t.params[name] : undefined;
}

export function param(v) {
  if (typeof v === "number") return num(v);
  if (typeof v === "string") return v;
  return v === undefined ? "-" : JSON.stringify(v);
}

/** "12 s ago", "5 min ago", "3 h ago", or the date. */
export function ago(iso, now = Date.now()) {
  const s = Math.max(0, (now - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return new Date(iso).toLocaleDateString();
}

export function seconds(s) {
  if (s === null || s === undefined) return "-";
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

// A perceptual colour scale (viridis, 6 stops), from low to high.
const STOPS = [
  [68, 1, 84],
  [65, 68, 135],
  [42, 120, 142],
  [34, 168, 132],
  [122, 209, 81],
  [253, 231, 37],
];

/** Colour of t in [0, 1] on the scale. */
export function ramp(t) {
  const x = Math.min(1, Math.max(0, Number.isFinite(t) ? t : 0)) * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(x));
  const f = x - i;
  const c = STOPS[i].map((a, k) => Math.round(a + (STOPS[i + 1][k] - a) * f));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

/**
 * [lowest, highest] of the finite numbers in `values` ([Infinity, -Infinity] when none). A loop,
 * not `Math.min(...values)`: spreading a long array (a study's curves hold well over 100,000
 * points) overflows the call stack.
 */
export function bounds(values) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const v of values) {
    if (!Number.isFinite(v)) continue;
    if (v < lo) lo = v;
    if (v > hi) hi = v;
  }
  return [lo, hi];
}

/**
 * A function from objective value to colour where better values are darker, for a study
 * that minimises (`direction` "minimize") or maximises.
 */
export function valueColors(values, direction) {
  const [lo, hi] = bounds(values);
  const span = hi > lo ? hi - lo : 1;
  return (v) => {
    const t = (v - lo) / span;
    return ramp(direction === "maximize" ? 1 - t : t);
  };
}

/** CSS gradient of the scale, for legends. */
export function rampGradient(reverse = false) {
  const stops = STOPS.map((c) => `rgb(${c.join(",")})`);
  return `linear-gradient(to right, ${(reverse ? stops.reverse() : stops).join(", ")})`;
}

export const STATE_COLORS = {
  complete: "#2a7ab0",
  running: "#2ca02c",
  waiting: "#9e9e9e",
  pruned: "#e6820e",
  failed: "#d62728",
  paused: "#8c6bb1",
};

/** `el("a", {href: "x", class: "y"}, "text", child)`: a DOM element. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined));
  return node;
}
