// Talking to the hpo API: the token, conditional GETs (ETag / If-None-Match) and errors.

const TOKEN_KEY = "hpo.token";
const BASE = "/api/v1/";
const MAX_TAGS = 500;

/** Raised on 401: the page shows the token prompt. */
export class Unauthorized extends Error {}

/** Any other non-2xx answer; `field` names the offending input when the API says. */
export class ApiError extends Error {
  constructor(status, body) {
    super(body?.message || `HTTP ${status}`);
    this.status = status;
    this.field = body?.field;
  }
}

/** What the page has asked so far (shown in the footer, read by the tests). */
export const stats = { requests: 0, notModified: 0, bytes: 0 };

const etags = new Map(); // URL -> the ETag of the answer we hold
const kept = new Map(); // URL -> that answer, for the GETs made with {keep: true}

/** Move `#token=...` from the URL into sessionStorage, so it is not left in the address bar. */
export function takeTokenFromUrl() {
  const match = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (match) {
    setToken(decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
}

function headers(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}`, ...extra } : extra;
}

async function send(method, path, { body, tag } = {}) {
  const h = headers(body ? { "Content-Type": "application/json" } : {});
  if (tag) h["If-None-Match"] = tag;
  const response = await fetch(BASE + path, {
    method,
    headers: h,
    body: body ? JSON.stringify(body) : undefined,
    cache: "no-store",
  });
  stats.requests += 1;
  if (response.status === 401) throw new Unauthorized("the API needs a token");
  return response;
}

async function decode(response) {
  const text = await response.text();
  stats.bytes += text.length;
  if (!response.ok) {
    let body = null; // an error answered by a proxy, or a server's plain 500, is no JSON
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      body = null;
    }
    throw new ApiError(response.status, body);
  }
  return text ? JSON.parse(text) : null;
}

/**
 * GET `path` (relative to /api/v1/). Resolves to the decoded body, or to `null` when the
 * server answered 304: nothing changed since the last answer to this URL. With
 * `{keep: true}` a 304 resolves to that last answer instead (the very same object).
 */
export async function get(path, { keep = false } = {}) {
  const response = await send("GET", path, { tag: etags.get(path) });
  if (response.status === 304) {
    stats.notModified += 1;
    return keep ? kept.get(path) : null;
  }
  const body = await decode(response);
  const tag = response.headers.get("ETag");
  if (tag) remember(path, tag, keep ? body : undefined);
  return body;
}

function remember(path, tag, body) {
  etags.delete(path);
  etags.set(path, tag);
  if (body !== undefined) kept.set(path, body);
  if (etags.size > MAX_TAGS) {
    const oldest = etags.keys().next().value;
    etags.delete(oldest);
    kept.delete(oldest);
  }
}

/** Forget the ETag of `path`: the next GET fetches it whole. */
export function forget(path) {
  etags.delete(path);
  kept.delete(path);
}

/** Forget every ETag (a new page starts from nothing). */
export function forgetAll() {
  etags.clear();
  kept.clear();
}

/**
 * Why studies with a trainable may wait, as the server's /healthz says: no server runs the
 * scheduler, the scheduler cannot start or reach Ray, or the cluster's node preflight
 * failed; null when none (or when the server cannot be asked: the page's own polls say so).
 */
export async function dispatchProblem() {
  let body;
  try {
    const response = await fetch("/healthz", { cache: "no-store" });
    body = await response.json();
  } catch {
    return null;
  }
  if (body?.error === "preflight_failed") return body.message;
  if (body?.scheduler_running === false) {
    return (
      "No hpo serve of this database runs the scheduler (each was started with " +
      "--no-scheduler or HPO_SCHEDULER=false, or the scheduler's server stopped): the " +
      "trials of studies with a trainable will not start until one does."
    );
  }
  const f = body?.executor_failure;
  if (!f) return null;
  return (
    `The scheduler cannot start or reach Ray (${f.tries} tries since ${f.since}; ` +
    `next in up to ${f.next_try_in_s} s): ${f.error}. ` +
    "The trials of studies with a trainable wait until it can."
  );
}

export async function patch(path, body) {
  return decode(await send("PATCH", path, { body }));
}

/** `path?query` with the null/undefined entries of `params` left out. */
export function url(path, params = {}) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined) q.set(k, v);
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}
