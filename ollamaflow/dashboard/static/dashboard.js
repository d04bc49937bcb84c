// OllamaFlow dashboard: sign-in, the live feed (GET /v1.0/events, Server-Sent Events read with
// fetch), five views, and forms that steer the fleet through the admin API.
//
// No framework and no build step. Everything that comes from the network (names, models,
// errors, paths) is written with textContent through el(); never as HTML.

const TOKEN_KEY = "ollamaflow.adminToken"; // sessionStorage: the browser session only
const THEME_KEY = "ollamaflow.theme"; // localStorage: "light" or "dark"
const VIEWS = ["fleet", "frontends", "models", "requests", "steer"];
const MAX_REQUESTS = 200;
const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 15000;
// The daemon sends a keep-alive comment after 15 s of silence: three missed means a dead link.
const FEED_SILENCE_MS = 45000;
const MAX_LOADED_SHOWN = 3;

const REFUSED_AT_SIGNIN =
  "That token was refused: the daemon answered 401 (AuthenticationFailed). " +
  "Check it against AdminBearerTokens in ollamaflow.json.";
const REFUSED_LATER =
  "Your token was refused: the daemon answered 401. It may have been rotated; sign in again.";
const UNREACHABLE =
  "The daemon cannot be reached: check that it is running and that this page is served by it.";

// ---------------------------------------------------------------------------------------------
// DOM helpers

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

/** el("td", {class: "num", "data-testid": "x", onclick: fn}, child, "text", [more]).
 *  Attributes set to null, undefined or false are left out; true sets an empty attribute.
 *  Children may be nodes, strings, numbers, arrays of those, or null (skipped). */
function el(tag, attrs = {}, ...children) {
  return build(document.createElement(tag), attrs, children);
}

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

function build(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** Replaces a node's children with el()'s kinds of children (null is skipped). */
function setChildren(node, ...children) {
  node.replaceChildren();
  return build(node, {}, children);
}

/** Replaces a container's children, keeping keyboard focus on the control with the same
 *  data-focus-key (lists that the feed rebuilds while someone tabs through them). */
function replaceKeepingFocus(container, children) {
  const active = document.activeElement;
  const key = active && container.contains(active) ? active.dataset.focusKey : undefined;
  container.replaceChildren(...children);
  if (key) container.querySelector(`[data-focus-key="${CSS.escape(key)}"]`)?.focus();
}

/** Rebuilds only when `signature` differs from the last one given for that container. */
const lastSignature = new WeakMap();
function changed(container, signature) {
  if (lastSignature.get(container) === signature) return false;
  lastSignature.set(container, signature);
  return true;
}

// ---------------------------------------------------------------------------------------------
// Formatting

const sum = (items, f) => items.reduce((total, item) => total + (Number(f(item)) || 0), 0);

function formatBytes(n) {
  if (!Number.isFinite(n) || n <= 0) return "0 B";
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)} GB`;
  if (n >= 1e6) return `${Math.round(n / 1e6)} MB`;
  if (n >= 1e3) return `${Math.round(n / 1e3)} kB`;
  return `${n} B`;
}

function formatRate(v) {
  if (!Number.isFinite(v) || v === 0) return "0";
  if (v >= 100) return Math.round(v).toLocaleString();
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(2);
}

function formatMs(ms) {
  if (ms === null || ms === undefined || !Number.isFinite(Number(ms))) return "—";
  ms = Number(ms);
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

const formatCount = (n) => (Number(n) || 0).toLocaleString();

/** A UTC ISO time from the daemon, in the browser's local time. */
function localTime(iso, withDate = false) {
  if (!iso) return "—";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso);
  const time = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return withDate ? `${date.toLocaleDateString()} ${time}` : time;
}

/** An hour's start (usage rows), as "Nov 30, 14:00" in local time. */
function localHour(iso) {
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return String(iso ?? "—");
  return date.toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

/** "in 42 s", "3 min ago": how far a UTC ISO time is from now. */
function relative(iso) {
  const seconds = Math.round((new Date(iso).getTime() - Date.now()) / 1000);
  if (!Number.isFinite(seconds)) return "";
  const span = Math.abs(seconds);
  const text = span < 90 ? `${span} s` : span < 5400 ? `${Math.round(span / 60)} min` : `${Math.round(span / 3600)} h`;
  return seconds >= 0 ? `in ${text}` : `${text} ago`;
}

function hostPort(backend) {
  const host = String(backend.Hostname ?? "localhost");
  return `${host.includes(":") ? `[${host}]` : host}:${backend.Port ?? 11434}`;
}

/** The name Ollama would compare: lower case, ":latest" when no tag is given. */
function modelKey(name) {
  const lower = String(name).toLowerCase();
  const lastPart = lower.slice(lower.lastIndexOf("/") + 1);
  return lastPart.includes(":") ? lower : `${lower}:latest`;
}

const splitList = (text) => text.split(",").map((s) => s.trim()).filter(Boolean);
const enc = encodeURIComponent;

// ---------------------------------------------------------------------------------------------
// State: the feed's latest sections, and what the page itself keeps.

const state = {
  token: null,
  view: "fleet",
  hello: null,
  daemon: null,
  backends: [],
  models: {},
  frontends: [],
  series: null,
  requests: [], // newest first
  requestIds: new Set(),
  apiKeys: null,
};

function resetData() {
  Object.assign(state, {
    hello: null, daemon: null, backends: [], models: {}, frontends: [], series: null,
    requests: [], requestIds: new Set(), apiKeys: null,
  });
}

// ---------------------------------------------------------------------------------------------
// Sign-in, sign-out and the admin API

function readToken() {
  try { return sessionStorage.getItem(TOKEN_KEY); } catch { return null; }
}

function storeToken(token) {
  try {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch { /* storage disabled: the token lives in memory only */ }
}

const authHeaders = () => ({ Authorization: `Bearer ${state.token}` });

function showSigninError(message) {
  const box = $("[data-testid=signin-error]");
  box.textContent = message ?? "";
  box.hidden = !message;
}

/** Checks a token with GET /v1.0/health, then opens the dashboard. `stored` is true for the
 *  token kept from earlier in this session, which opens the dashboard even while the daemon
 *  is away (the feed keeps retrying). */
async function signIn(token, stored = false) {
  const button = $("#signin");
  // aria-disabled, not disabled: disabling the focused button would drop keyboard focus.
  if (button.getAttribute("aria-disabled") === "true") return;
  button.setAttribute("aria-disabled", "true");
  showSigninError("");
  try {
    let response;
    try {
      response = await fetch("/v1.0/health", { headers: { Authorization: `Bearer ${token}` }, cache: "no-store" });
    } catch {
      if (stored) return enterApp(token, null);
      return showSigninError(UNREACHABLE);
    }
    if (response.status === 401) {
      storeToken(null);
      return showSignin(stored ? REFUSED_LATER : REFUSED_AT_SIGNIN);
    }
    const body = await readBody(response);
    if (!response.ok) return showSigninError(`The daemon answered ${response.status}: ${errorText(body)}`);
    enterApp(token, body);
  } finally {
    button.removeAttribute("aria-disabled");
    // Refused or unreachable: the token field, selected, ready to be typed again.
    if (!$("#signin-view").hidden && !$("[data-testid=signin-error]").hidden) $("#token").select();
  }
}

function enterApp(token, health) {
  state.token = token;
  storeToken(token);
  resetData();
  state.daemon = health && typeof health === "object" ? health : null;
  $("#signin-view").hidden = true;
  $("#app").hidden = false;
  showView(viewFromHash());
  startFeed();
}

function showSignin(message) {
  $("#app").hidden = true;
  $("#signin-view").hidden = false;
  $("#token").value = "";
  showSigninError(message);
  $("#token").focus();
}

/** Forgets the token and every piece of data; `message` says why, if it was not asked for. */
function signOut(message) {
  stopFeed();
  state.token = null;
  storeToken(null);
  resetData();
  showSignin(message);
}

class ApiFailure extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function readBody(response) {
  const text = await response.text();
  if (!text) return null;
  try { return JSON.parse(text); } catch { return text; }
}

/** The admin API's error body: its Description, else its Message. */
function errorText(body) {
  if (body && typeof body === "object") return body.Description || body.Message || JSON.stringify(body);
  return body ? String(body).slice(0, 300) : "no details";
}

/** One admin API call: resolves to {status, data}; rejects with an ApiFailure whose message
 *  is fit to show. A 401 signs out (the token was rotated or removed). */
async function api(method, path, body) {
  const init = { method, headers: authHeaders(), cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiFailure(0, UNREACHABLE);
  }
  const data = await readBody(response);
  if (response.status === 401) {
    signOut(REFUSED_LATER);
    throw new ApiFailure(401, REFUSED_LATER);
  }
  if (!response.ok) throw new ApiFailure(response.status, errorText(data));
  return { status: response.status, data };
}

// ---------------------------------------------------------------------------------------------
// The live feed: fetch + a small SSE parser, reconnecting with backoff.

const feed = { running: false, controller: null, delay: BACKOFF_MIN_MS, retryTimer: 0, watchdog: 0 };

function startFeed() {
  stopFeed();
  feed.running = true;
  feed.delay = BACKOFF_MIN_MS;
  connectFeed();
}

function stopFeed() {
  feed.running = false;
  clearTimeout(feed.retryTimer);
  clearTimeout(feed.watchdog);
  feed.controller?.abort();
  feed.controller = null;
}

async function connectFeed() {
  const controller = new AbortController();
  feed.controller = controller;
  setFeedStatus(feed.delay === BACKOFF_MIN_MS ? "connecting" : "reconnecting");
  let reason = "the feed ended";
  try {
    const response = await fetch("/v1.0/events", {
      headers: authHeaders(), signal: controller.signal, cache: "no-store",
    });
    if (response.status === 401) {
      if (feed.controller === controller) signOut(REFUSED_LATER);
      return;
    }
    if (!response.ok || !response.body) {
      reason = `the daemon answered ${response.status}: ${errorText(await readBody(response))}`;
    } else {
      armWatchdog(controller);
      await readEvents(response.body, () => armWatchdog(controller), onFeedEvent);
    }
  } catch (error) {
    reason = controller.signal.aborted ? "no data for 45 s" : "the daemon cannot be reached";
  }
  // Stopped (sign-out) or replaced by a newer connection: nothing more to do.
  if (!feed.running || feed.controller !== controller) return;
  clearTimeout(feed.watchdog);
  controller.abort();
  scheduleReconnect(reason);
}

function scheduleReconnect(reason) {
  const delay = feed.delay;
  feed.delay = Math.min(feed.delay * 2, BACKOFF_MAX_MS);
  setFeedStatus("reconnecting", `${reason}; next try in ${Math.round(delay / 1000)} s`);
  feed.retryTimer = setTimeout(connectFeed, delay);
}

/** Restarts the silence timer: any bytes (events or keep-alive comments) prove the link. */
function armWatchdog(controller) {
  clearTimeout(feed.watchdog);
  feed.watchdog = setTimeout(() => controller.abort(), FEED_SILENCE_MS);
}

/** Reads an SSE body to its end: events are separated by a blank line, made of "event:" and
 *  "data:" lines (several data lines join with "\n"); lines starting with ":" are comments. */
async function readEvents(body, onBytes, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  let type = "";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onBytes();
    let text = pending + value;
    // A chunk ending in "\r" may be half of "\r\n": keep it for the next chunk.
    const carry = text.endsWith("\r") ? "\r" : "";
    if (carry) text = text.slice(0, -1);
    const lines = text.split(/\r\n|\r|\n/);
    pending = lines.pop() + carry;
    for (const line of lines) {
      if (line === "") {
        if (data.length) onEvent(type || "message", data.join("\n"));
        type = "";
        data = [];
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let fieldValue = colon < 0 ? "" : line.slice(colon + 1);
      if (fieldValue.startsWith(" ")) fieldValue = fieldValue.slice(1);
      if (field === "event") type = fieldValue;
      else if (field === "data") data.push(fieldValue);
    }
  }
}

/** What each feed section does to the page's state. */
const SECTIONS = {
  hello: (d) => { state.hello = d; },
  daemon: (d) => { state.daemon = d; },
  backends: (d) => { state.backends = Array.isArray(d) ? d : []; },
  models: (d) => { state.models = d && typeof d === "object" ? d : {}; },
  frontends: (d) => { state.frontends = Array.isArray(d) ? d : []; },
  series: (d) => { state.series = d; },
  requests: (d) => addRequests(Array.isArray(d) ? d : [d]),
  config: () => { if (state.view === "steer") loadApiKeys(); },
};

function onFeedEvent(type, text) {
  const handle = SECTIONS[type];
  if (!handle) return; // a section this page does not know yet
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    console.warn("OllamaFlow feed: event", type, "is not JSON");
    return;
  }
  if (feed.delay !== BACKOFF_MIN_MS || feedState() !== "live") {
    feed.delay = BACKOFF_MIN_MS;
    setFeedStatus("live");
  }
  handle(data);
  scheduleRender();
}

/** Requests arrive oldest first; a reconnection sends the last 50 again: skip those seen. */
function addRequests(items) {
  const fresh = [];
  for (const request of items) {
    if (!request || typeof request !== "object") continue;
    const id = request.Id ?? `${request.Time}|${request.Method}|${request.Path}|${request.Status}`;
    if (state.requestIds.has(id)) continue;
    state.requestIds.add(id);
    fresh.push({ ...request, _id: id });
  }
  if (!fresh.length) return;
  state.requests = fresh.reverse().concat(state.requests);
  for (const dropped of state.requests.splice(MAX_REQUESTS)) state.requestIds.delete(dropped._id);
}

const feedState = () => $("[data-testid=feed-status]").dataset.state;

const FEED_TEXT = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…" };

function setFeedStatus(status, detail = "") {
  const badge = $("[data-testid=feed-status]");
  badge.dataset.state = status;
  badge.textContent = FEED_TEXT[status];
  badge.title = detail || (status === "live" ? "receiving the daemon's live feed" : "");
  $("#views").classList.toggle("stale", status === "reconnecting");
}

// ---------------------------------------------------------------------------------------------
// Views and rendering

function viewFromHash() {
  const view = location.hash.slice(1);
  return VIEWS.includes(view) ? view : "fleet";
}

function showView(view) {
  state.view = view;
  for (const button of $$("nav.views button")) {
    if (button.dataset.view === view) button.setAttribute("aria-current", "page");
    else button.removeAttribute("aria-current");
  }
  for (const panel of $$("[data-panel]")) panel.hidden = panel.dataset.panel !== view;
  document.title = `${view[0].toUpperCase()}${view.slice(1)} · OllamaFlow`;
  if (view === "steer" && state.token) loadApiKeys();
  scheduleRender();
}

let renderQueued = false;

/** At most one render per frame, however many sections arrive together. */
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    if (state.token) render();
  });
}

function render() {
  renderHeader();
  RENDERERS[state.view]();
}

function renderHeader() {
  const hello = state.hello;
  const text = hello
    ? `v${hello.Version}${hello.Worker ? ` · worker ${hello.Worker}` : ""} · up since ${localTime(hello.StartedUtc, true)}`
    : state.daemon?.Version ? `v${state.daemon.Version}` : "";
  $("[data-testid=daemon-version]").textContent = text;
}

// -- Fleet ------------------------------------------------------------------------------------

/** healthy | unhealthy | unknown (never checked) | draining (Active false). */
function healthOf(backend) {
  if (backend.Active === false) return "draining";
  if (!backend.HealthySinceUtc && !backend.UnhealthySinceUtc) return "unknown";
  return backend.Healthy ? "healthy" : "unhealthy";
}

const HEALTH_TEXT = { healthy: "● healthy", unhealthy: "▲ unhealthy", unknown: "? not checked yet", draining: "◐ draining" };

function renderFleet() {
  const backends = state.backends;
  const counts = { healthy: 0, unhealthy: 0, unknown: 0, draining: 0 };
  for (const backend of backends) counts[healthOf(backend)] += 1;
  const inFlight = state.daemon?.ActiveRequests ?? sum(backends, (b) => b.ActiveRequests);
  const queues = state.daemon?.Queues ?? state.frontends.map((f) => f.Queue ?? {});
  const queued = sum(queues, (q) => q.QueueDepth);
  setChildren($("[data-testid=fleet-summary]"),
    el("strong", {}, `Healthy ${counts.healthy} of ${backends.length} backends`),
    counts.unhealthy ? el("span", { class: "bad" }, ` · ${counts.unhealthy} unhealthy`) : null,
    counts.draining ? ` · ${counts.draining} draining` : null,
    counts.unknown ? ` · ${counts.unknown} not checked yet` : null,
    el("span", { class: "sep" }, " | "),
    `${formatCount(inFlight)} requests in flight · ${formatCount(queued)} queued`,
  );
  const tiles = backends.length
    ? backends.map(backendTile)
    : [el("p", { class: "empty" }, state.hello ? "No backends yet: add one in Steer." : "Waiting for the live feed…")];
  $("#backend-tiles").replaceChildren(...tiles);
}

function backendTile(backend) {
  const health = healthOf(backend);
  const id = backend.Identifier;
  return el("article", {
    class: `tile health-${health}`, "data-testid": "backend-tile", "data-backend": id, "data-health": health,
  },
  el("header", { class: "tile-head" },
    el("h3", { class: "tile-name", title: backend.Name || id }, backend.Name || id),
    el("span", { class: `badge health-${health}`, "data-testid": "health-badge" }, healthLabel(backend, health))),
  el("div", { class: "tile-sub muted" }, backend.Name ? `${id} · ` : "", hostPort(backend),
    backend.InRotation === false && health === "healthy" ? " · out of rotation" : ""),
  healthReason(backend, health),
  inFlightMeter(backend),
  loadedModels(backend),
  placementLine(backend),
  el("div", { class: "sparks" },
    sparkline(seriesOf(id, "Requests"), "req/s", "spark-requests"),
    sparkline(seriesOf(id, "Tokens"), "tok/s", "spark-tokens")));
}

function healthLabel(backend, health) {
  if (health !== "draining") return HEALTH_TEXT[health];
  return backend.ActiveRequests ? `◐ draining · ${backend.ActiveRequests} running` : "◐ drained";
}

/** Why a backend is not serving: its last error, and since when. */
function healthReason(backend, health) {
  if (health === "healthy") return null;
  const since = health === "unhealthy" && backend.UnhealthySinceUtc ? `since ${localTime(backend.UnhealthySinceUtc)}: ` : "";
  const text = backend.LastError
    ? `${since}${backend.LastError}`
    : health === "draining" ? "gets no new requests (put it back in Steer)" : since ? `${since}failing checks` : "";
  if (!text) return null;
  return el("p", { class: `tile-reason ${health === "unhealthy" ? "bad" : "muted"}`, "data-testid": "backend-error", title: text }, text);
}

function inFlightMeter(backend) {
  const max = Math.max(1, Number(backend.MaxParallelRequests) || 1);
  const active = Number(backend.ActiveRequests) || 0;
  const fill = el("div", { class: `meter-fill${active >= max ? " full" : ""}` });
  fill.style.width = `${Math.min(100, (active / max) * 100)}%`;
  return el("div", { class: "inflight", "data-testid": "inflight" },
    el("span", { class: "inflight-text" }, `${active} / ${max} in flight`),
    el("div", {
      class: "meter", role: "meter", "aria-label": "requests in flight",
      "aria-valuemin": 0, "aria-valuemax": max, "aria-valuenow": Math.min(active, max),
    }, fill));
}

/** What ModelAware placement did on this backend, when it did anything. */
function placementLine(backend) {
  const p = backend.Placement;
  if (!p || !(p.Loads || p.Evictions || p.Preloads || p.AffinityHits)) return null;
  const text = `${p.Loads} loads (${p.Preloads} ahead of demand) · ${p.Evictions} evicted · ${p.AffinityHits} conversations kept`;
  return el("p", { class: "tile-placement muted", "data-testid": "placement", title: "ModelAware placement on this backend" }, text);
}

function loadedModels(backend) {
  const loaded = (state.models[backend.Identifier] ?? []).filter((m) => m.Loaded);
  const running = backend.ActiveRequestsByModel ?? {};
  if (!loaded.length) return el("p", { class: "models-loaded muted", "data-testid": "loaded-models" }, "no model loaded");
  const items = loaded.slice(0, MAX_LOADED_SHOWN).map((m) =>
    el("li", {},
      el("span", { class: "model-name", title: m.Name }, m.Name),
      el("span", { class: "muted" }, `${formatBytes(m.SizeVram ?? m.Size)}${running[m.Name] ? ` · ${running[m.Name]} running` : ""}`)));
  if (loaded.length > MAX_LOADED_SHOWN) items.push(el("li", { class: "muted more" }, `+${loaded.length - MAX_LOADED_SHOWN} more`));
  return el("ul", { class: "models-loaded", "data-testid": "loaded-models", "aria-label": "loaded models" }, items);
}

/** One backend's counts per bucket, oldest first, without a bucket still filling: the last
 *  one is when the series ends after now (EndUtc is the end of its last bucket). */
function seriesOf(identifier, kind) {
  const series = state.series;
  const counts = series?.Backends?.[identifier]?.[kind];
  const end = Date.parse(series?.EndUtc ?? "");
  const filling = !(end <= Date.now());
  const complete = Array.isArray(counts) ? (filling ? counts.slice(0, -1) : counts) : [];
  return { counts: complete, seconds: Number(series?.BucketSeconds) || 10 };
}

/** A small chart of a rate over the last 15 minutes; "now" is the last complete bucket. */
function sparkline({ counts, seconds }, unit, testid) {
  const rates = counts.map((c) => (Number(c) || 0) / seconds);
  const now = rates.length ? rates[rates.length - 1] : 0;
  const peak = rates.length ? Math.max(...rates) : 0;
  const summary = `${unit} over the last 15 minutes: now ${formatRate(now)}, peak ${formatRate(peak)}`;
  return el("figure", { class: "spark", "data-testid": testid },
    el("figcaption", {},
      el("span", { class: "spark-now", "data-testid": `${testid}-value` }, formatRate(now)),
      el("span", { class: "muted" }, ` ${unit}`),
      el("span", { class: "muted spark-peak" }, `peak ${formatRate(peak)}`)),
    sparkSvg(rates, peak, summary));
}

function sparkSvg(rates, peak, label) {
  const width = Math.max(1, rates.length - 1);
  const height = 100;
  const y = (v) => (peak > 0 ? height - 4 - (v / peak) * (height - 8) : height - 4).toFixed(1);
  const points = rates.map((v, i) => `${i},${y(v)}`);
  const chart = svg("svg", {
    viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none", role: "img", "aria-label": label,
  }, svg("title", {}, label));
  if (points.length > 1) {
    chart.append(
      svg("path", { class: "spark-area", d: `M0,${height} L${points.join(" L")} L${width},${height} Z` }),
      svg("path", { class: "spark-line", d: `M${points.join(" L")}`, "vector-effect": "non-scaling-stroke" }));
  }
  return chart;
}

// -- Frontends --------------------------------------------------------------------------------

/** A stable color slot per backend, by its place in the fleet (text always names it too). */
function colorSlot(identifier) {
  const index = state.backends.findIndex((b) => b.Identifier === identifier);
  return `c${(index < 0 ? 7 : index) % 8}`;
}

function renderFrontends() {
  const rows = state.frontends.map(frontendRow);
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 9, class: "empty" }, "No frontends yet.")));
  $("#frontend-rows").replaceChildren(...rows);
}

function frontendRow(frontend) {
  const queue = frontend.Queue ?? state.daemon?.Queues?.find((q) => q.Identifier === frontend.Identifier) ?? {};
  const recent = frontend.Recent ?? {};
  const missing = new Set(frontend.MissingBackends ?? queue.MissingBackends ?? []);
  const backends = (frontend.Backends ?? []).map((id) =>
    el("span", { class: missing.has(id) ? "chip warn" : "chip" }, missing.has(id) ? `${id} (missing)` : id));
  return el("tr", { "data-testid": "frontend-row", "data-frontend": frontend.Identifier },
    el("th", { scope: "row" }, el("div", {}, frontend.Name || frontend.Identifier),
      frontend.Name ? el("div", { class: "muted small" }, frontend.Identifier) : null,
      frontend.Active === false ? el("div", { class: "warn small" }, "inactive") : null),
    el("td", { class: "mono" }, frontend.Hostname ?? "*"),
    el("td", {}, backends.length ? backends : el("span", { class: "muted" }, "none")),
    el("td", { class: "num" }, `${formatCount(queue.QueueDepth)} (${formatCount(queue.PeakQueueDepth)})`),
    el("td", { class: "num" }, `${formatMs(queue.AverageQueueWaitMs)} / ${formatMs(queue.MaxQueueWaitMs)}`),
    el("td", { class: `num${queue.Rejected || queue.TimedOut ? " warn" : ""}` }, `${formatCount(queue.Rejected)} / ${formatCount(queue.TimedOut)}`),
    el("td", { class: `num${recent.TooManyRequests ? " warn" : ""}` }, formatCount(recent.TooManyRequests)),
    el("td", { class: "num" }, `${formatCount(recent.Requests)} / `,
      el("span", { class: recent.Errors ? "bad" : "" }, formatCount(recent.Errors))),
    el("td", {}, shareBar(recent.Backends ?? {})));
}

/** Where a frontend's requests went: a stacked bar, and the same as text. */
function shareBar(perBackend) {
  const entries = Object.entries(perBackend).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1]);
  const total = sum(entries, ([, n]) => n);
  if (!total) return el("span", { class: "muted" }, "no requests");
  const bar = el("div", { class: "stack", "aria-hidden": "true" });
  for (const [id, n] of entries) {
    const part = el("span", { class: `stack-part ${colorSlot(id)}`, title: `${id}: ${n}` });
    part.style.width = `${(n / total) * 100}%`;
    bar.append(part);
  }
  const text = entries.map(([id, n]) => `${id} ${Math.round((n / total) * 100)}%`).join(" · ");
  return el("div", { class: "share", "data-testid": "frontend-share" }, bar, el("div", { class: "small" }, text));
}

// -- Models -----------------------------------------------------------------------------------

/** loaded | pulling | present | failed | missing, for one backend's entry of a model. */
function cellState(model) {
  if (!model) return "missing";
  if (model.Loaded) return "loaded";
  if (model.Pulling) return "pulling";
  if (model.Present) return "present";
  if (model.Failed) return "failed";
  return "missing";
}

/** Rows of the matrix: every model a backend lists or a frontend requires. */
function modelRows() {
  const rows = new Map();
  const row = (name) => {
    const key = modelKey(name);
    if (!rows.has(key)) rows.set(key, { name, cells: {}, requiredBy: new Set(), required: false });
    return rows.get(key);
  };
  for (const [backend, models] of Object.entries(state.models)) {
    for (const model of Array.isArray(models) ? models : []) {
      const r = row(model.Name);
      r.cells[backend] = model;
      if (model.Required) r.required = true;
    }
  }
  for (const frontend of state.frontends) {
    for (const name of frontend.RequiredModels ?? []) row(name).requiredBy.add(frontend.Identifier);
  }
  return [...rows.values()].sort((a, b) => a.name.localeCompare(b.name));
}

function renderModels() {
  const backends = state.backends;
  const head = [el("th", { scope: "col" }, "Model")].concat(backends.map((b) =>
    el("th", { scope: "col", "data-backend": b.Identifier },
      el("div", {}, b.Name || b.Identifier),
      el("div", { class: `small health-text-${healthOf(b)}` }, HEALTH_TEXT[healthOf(b)]))));
  $("#models-head").replaceChildren(...head);
  const rows = modelRows().map((r) => modelRow(r, backends));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: backends.length + 1, class: "empty" }, "No models on any backend yet.")));
  $("#models-rows").replaceChildren(...rows);
}

function modelRow(row, backends) {
  const required = row.required || row.requiredBy.size > 0;
  const by = [...row.requiredBy].join(", ");
  return el("tr", { "data-testid": "model-row", "data-model": row.name, "data-required": String(required) },
    el("th", { scope: "row" },
      el("span", { class: "model-name" }, row.name),
      required ? el("span", { class: "chip required", title: by ? `required by ${by}` : "required" }, "required") : null),
    backends.map((b) => modelCell(row.name, b.Identifier, row.cells[b.Identifier])));
}

function modelCell(name, backend, model) {
  const cellStatus = cellState(model);
  return el("td", {
    class: `cell state-${cellStatus}`, "data-testid": "model-cell", "data-model": name, "data-backend": backend, "data-state": cellStatus,
  }, CELL_CONTENT[cellStatus](model));
}

const CELL_CONTENT = {
  loaded: (m) => [el("span", { class: "mark" }, "● loaded"), m.SizeVram ? el("span", { class: "muted small" }, ` ${formatBytes(m.SizeVram)} VRAM`) : null],
  present: (m) => [el("span", { class: "mark" }, "✓ present"), m.Size ? el("span", { class: "muted small" }, ` ${formatBytes(m.Size)}`) : null],
  pulling: (m) => pullProgress(m.Pulling),
  failed: (m) => [
    el("div", { class: "mark" }, `✗ failed${m.Failed.Attempts ? ` (${m.Failed.Attempts}×)` : ""}`),
    el("div", { class: "small cell-error", title: m.Failed.Error ?? "" }, m.Failed.Error ?? ""),
    m.Failed.NextRetryUtc ? el("div", { class: "small muted" }, `retry at ${localTime(m.Failed.NextRetryUtc)} (${relative(m.Failed.NextRetryUtc)})`) : null,
  ],
  missing: () => el("span", { class: "muted", "aria-label": "missing" }, "–"),
};

function pullProgress(pull) {
  if (pull.Queued) return [el("span", { class: "mark" }, "↓ queued"), el("progress", { "aria-label": "pull queued" })];
  const total = Number(pull.Total) || 0;
  const done = Number(pull.Completed) || 0;
  const percent = total ? Math.floor((done / total) * 100) : 0;
  const bar = total ? el("progress", { max: total, value: done }) : el("progress", {}); // indeterminate until sizes are known
  bar.setAttribute("aria-label", `pulled ${percent}%`);
  // The matrix is rebuilt at each update: start the stripes where the clock says, so they
  // keep moving smoothly instead of jumping back (the stylesheet's cycle is 800 ms).
  bar.style.setProperty("--phase", `-${Date.now() % 800}ms`);
  return [
    el("div", { class: "mark" }, `↓ ${total ? `${percent}%` : "pulling"}`, total ? el("span", { class: "muted small" }, ` of ${formatBytes(total)}`) : null),
    bar,
    pull.Status ? el("div", { class: "small muted pull-status", title: pull.Status }, pull.Status) : null,
  ];
}

// -- Requests ---------------------------------------------------------------------------------

function statusClass(status) {
  if (!status || status >= 500) return "bad";
  if (status >= 400) return "warn";
  if (status >= 300) return "info";
  return "ok";
}

function renderRequests() {
  const rows = state.requests.map(requestRow);
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 10, class: "empty" }, "No requests yet.")));
  $("#request-rows").replaceChildren(...rows);
}

function requestRow(r) {
  const outcome = r.Outcome && r.Outcome !== "ok" ? ` ${r.Outcome}` : "";
  const tps = Number(r.TokensPerSecond);
  return el("tr", { "data-testid": "request-row", "data-status": r.Status ?? "" },
    el("td", { class: "mono", title: r.Time ?? "" }, localTime(r.Time)),
    el("td", { class: "mono" }, r.Method ?? ""),
    el("td", { class: "mono path", title: r.Path ?? "" }, r.Path ?? ""),
    el("td", {}, r.Frontend ?? ""),
    el("td", { class: "model-name", title: r.Model ?? "" }, r.Model ?? ""),
    el("td", {}, r.Backend ?? ""),
    el("td", { class: "muted" }, r.Key && r.Key !== "anonymous" ? r.Key : ""),
    el("td", { class: `num status ${statusClass(r.Status)}`, "data-testid": "request-status" }, `${r.Status ?? "—"}${outcome}`),
    el("td", { class: "num" }, formatMs(r.DurationMs)),
    el("td", { class: "num" }, Number.isFinite(tps) && r.TokensPerSecond !== null ? tps.toFixed(1) : "—"));
}

// -- Steer: lists -----------------------------------------------------------------------------

function renderSteer() {
  renderSteerBackends();
  renderSteerFrontends();
  renderBackendChoices();
  renderPullChoices();
}

const actionButton = (action, id, text, extra = {}) =>
  el("button", { type: "button", class: "small-button", "data-action": action, "data-id": id, "data-focus-key": `${action}:${id}`, ...extra }, text);

function renderSteerBackends() {
  const container = $("#steer-backend-rows");
  const backends = state.backends;
  const signature = JSON.stringify(backends.map((b) => [b.Identifier, b.Name, b.Hostname, b.Port, healthOf(b), b.ActiveRequests]));
  if (!changed(container, signature)) return;
  const rows = backends.map((b) => {
    const health = healthOf(b);
    return el("tr", { "data-testid": "steer-backend-row", "data-backend": b.Identifier },
      el("th", { scope: "row" }, b.Name ? `${b.Name} (${b.Identifier})` : b.Identifier),
      el("td", { class: "mono" }, hostPort(b)),
      el("td", {}, el("span", { class: `health-text-${health}` }, healthLabel(b, health))),
      el("td", { class: "actions" },
        actionButton("edit", b.Identifier, "Edit", { "aria-label": `Edit backend ${b.Identifier}` }),
        health === "draining"
          ? actionButton("putback", b.Identifier, "Put back", { "aria-label": `Put backend ${b.Identifier} back` })
          : actionButton("drain", b.Identifier, "Drain", { "aria-label": `Drain backend ${b.Identifier}` }),
        actionButton("remove", b.Identifier, "Remove", { class: "small-button danger", "aria-label": `Remove backend ${b.Identifier}` })));
  });
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 4, class: "empty" }, "No backends.")));
  replaceKeepingFocus(container, rows);
}

function renderSteerFrontends() {
  const container = $("#steer-frontend-rows");
  const frontends = state.frontends;
  const signature = JSON.stringify(frontends.map((f) => [f.Identifier, f.Name, f.Hostname, f.Backends]));
  if (!changed(container, signature)) return;
  const rows = frontends.map((f) =>
    el("tr", { "data-testid": "steer-frontend-row", "data-frontend": f.Identifier },
      el("th", { scope: "row" }, f.Name ? `${f.Name} (${f.Identifier})` : f.Identifier),
      el("td", { class: "mono" }, f.Hostname ?? "*"),
      el("td", {}, (f.Backends ?? []).join(", ") || el("span", { class: "muted" }, "none")),
      el("td", { class: "actions" },
        actionButton("edit", f.Identifier, "Edit", { "aria-label": `Edit frontend ${f.Identifier}` }),
        actionButton("remove", f.Identifier, "Remove", { class: "small-button danger", "aria-label": `Remove frontend ${f.Identifier}` }))));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 4, class: "empty" }, "No frontends.")));
  replaceKeepingFocus(container, rows);
}

/** The frontend form's backend checkboxes: every known backend, plus any the record being
 *  edited lists that does not exist (yet). Ticked boxes stay ticked across rebuilds. */
function renderBackendChoices(checked = checkedBackends(), extra = []) {
  const container = $("#frontend-backend-choices");
  const ids = state.backends.map((b) => b.Identifier);
  for (const id of [...extra, ...checked]) if (!ids.includes(id)) ids.push(id);
  if (!changed(container, JSON.stringify([ids, [...checked]]))) return;
  const boxes = ids.map((id) =>
    el("label", { class: "check" },
      el("input", { type: "checkbox", name: "Backends", value: id, checked: checked.includes(id), "data-focus-key": `backend:${id}` }),
      ` ${id}`));
  replaceKeepingFocus(container, boxes.length ? boxes : [el("span", { class: "muted" }, "no backends yet")]);
}

const checkedBackends = () => $$("#frontend-form input[name=Backends]:checked").map((box) => box.value);

function renderPullChoices() {
  const select = $("#pull-form select[name=Frontend]");
  const ids = state.frontends.map((f) => f.Identifier);
  if (!changed(select, JSON.stringify(ids))) return;
  const chosen = select.value;
  select.replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
  if (ids.includes(chosen)) select.value = chosen;
}

async function loadApiKeys() {
  const container = $("#apikey-rows");
  try {
    const { data } = await api("GET", "/v1.0/apikeys");
    state.apiKeys = Array.isArray(data) ? data : [];
    renderApiKeys();
  } catch (error) {
    if (error.status !== 401) container.replaceChildren(el("tr", {}, el("td", { colspan: 5, class: "bad" }, error.message)));
  }
}

function keyLimits(key) {
  const parts = [];
  if (key.RequestsPerMinute) parts.push(`${formatCount(key.RequestsPerMinute)} req/min`);
  if (key.TokensPerMinute) parts.push(`${formatCount(key.TokensPerMinute)} tok/min`);
  if (key.MaxConcurrentRequests) parts.push(`${key.MaxConcurrentRequests} at once`);
  if (key.Priority) parts.push(`priority ${key.Priority}`);
  return parts.join(" · ") || "no limits";
}

function renderApiKeys() {
  const rows = (state.apiKeys ?? []).map((key) =>
    el("tr", { "data-testid": "apikey-row", "data-apikey": key.Identifier },
      el("th", { scope: "row" }, key.Name ? `${key.Name} (${key.Identifier})` : key.Identifier,
        key.Active === false ? el("span", { class: "chip warn" }, "inactive") : null,
        key.ExpiresUtc ? el("div", { class: "small muted" }, `expires ${localTime(key.ExpiresUtc, true)}`) : null),
      el("td", { class: "mono" }, key.KeyPrefix ? `${key.KeyPrefix}…` : ""),
      el("td", { class: "small" },
        `frontends: ${(key.Frontends ?? []).join(", ") || "all"}`, el("br"),
        `models: ${(key.Models ?? []).join(", ") || "all"}`,
        key.AllowModelManagement ? el("div", {}, "manages models") : null),
      el("td", { class: "small" }, keyLimits(key)),
      el("td", { class: "actions" },
        actionButton("usage", key.Identifier, "Usage", { "aria-label": `Usage of key ${key.Identifier}` }),
        actionButton("delete", key.Identifier, "Delete", { class: "small-button danger", "aria-label": `Delete key ${key.Identifier}` }))));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 5, class: "empty" }, "No API keys.")));
  replaceKeepingFocus($("#apikey-rows"), rows);
}

const RENDERERS = {
  fleet: renderFleet,
  frontends: renderFrontends,
  models: renderModels,
  requests: renderRequests,
  steer: renderSteer,
};

// ---------------------------------------------------------------------------------------------
// Steer: forms

/** Shows an error (text or a node) or a result in a form's message boxes. */
function formMessage(form, { error = null, result = null } = {}) {
  const errorBox = $("[data-testid=form-error]", form);
  const resultBox = $("[data-testid=form-result]", form);
  errorBox.replaceChildren(...(error ? [error] : []));
  errorBox.hidden = !error;
  resultBox.replaceChildren(...(result ? [result] : []));
  resultBox.hidden = !result;
}

/** Runs a form's action, one at a time per form; failures land in its error box. The submit
 *  button is marked aria-disabled meanwhile (disabling it would drop keyboard focus). */
async function withForm(form, action) {
  if (form.dataset.busy) return;
  form.dataset.busy = "true";
  const submit = $("button[type=submit]", form);
  submit?.setAttribute("aria-disabled", "true");
  formMessage(form);
  try {
    await action();
  } catch (error) {
    if (error instanceof ApiFailure) formMessage(form, { error: error.message });
    else throw error;
  } finally {
    delete form.dataset.busy;
    submit?.removeAttribute("aria-disabled");
  }
}

const fieldText = (form, name) => form.elements[name].value.trim();

/** A number field: an integer when it reads as one; empty is left out (the default); anything
 *  else is sent as typed, so the daemon's own message explains what it accepts. */
function integer(form, name) {
  const text = fieldText(form, name);
  if (text === "") return undefined;
  const n = Number(text);
  return Number.isInteger(n) ? n : text;
}

const optionalText = (form, name) => fieldText(form, name) || undefined;

/** A record read with GET, with the form's fields put in (undefined: back to the default). */
function merged(record, fields) {
  const out = { ...record };
  for (const [key, fieldValue] of Object.entries(fields)) {
    if (fieldValue === undefined) delete out[key];
    else out[key] = fieldValue;
  }
  return out;
}

/** Create or edit mode: in edit mode the Identifier is fixed and the title says which. */
function setFormMode(form, noun, identifier = null) {
  if (identifier) form.dataset.editing = identifier;
  else delete form.dataset.editing;
  form.elements.Identifier.readOnly = Boolean(identifier);
  $(".form-title", form).textContent = identifier ? `Edit ${noun} ${identifier}` : `Add a ${noun}`;
  $("button[type=submit]", form).textContent = identifier ? "Save changes" : `Add ${noun}`;
  $("[data-action=reset]", form).textContent = identifier ? "Cancel edit" : "Clear";
}

function clearForm(form, kind) {
  form.reset();
  setFormMode(form, kind);
  if (kind === "frontend") {
    lastSignature.delete($("#frontend-backend-choices"));
    renderBackendChoices([]);
  }
}

// -- Backends

const backendPath = (id) => `/v1.0/backends/${enc(id)}`;

function backendFields(form) {
  return {
    Identifier: fieldText(form, "Identifier"),
    Name: optionalText(form, "Name"),
    Hostname: optionalText(form, "Hostname"),
    Port: integer(form, "Port"),
    MaxParallelRequests: integer(form, "MaxParallelRequests"),
    Weight: integer(form, "Weight"),
    Labels: splitList(fieldText(form, "Labels")),
    Active: form.elements.Active.checked,
  };
}

function fillBackendForm(form, record) {
  for (const name of ["Identifier", "Name", "Hostname", "Port", "MaxParallelRequests", "Weight"]) {
    form.elements[name].value = record[name] ?? "";
  }
  form.elements.Labels.value = (record.Labels ?? []).join(", ");
  form.elements.Active.checked = record.Active !== false;
}

async function submitBackend(form) {
  const fields = backendFields(form);
  const editing = form.dataset.editing;
  if (editing) {
    // A PUT replaces the whole record: read it fresh, change the form's fields, send it back.
    const { data: current } = await api("GET", backendPath(editing));
    await api("PUT", backendPath(editing), merged(current, fields));
    clearForm(form, "backend");
    formMessage(form, { result: `Saved backend ${editing}.` });
  } else {
    const { data } = await api("PUT", "/v1.0/backends", fields);
    clearForm(form, "backend");
    formMessage(form, { result: `Added backend ${data?.Identifier ?? fields.Identifier}: it joins once it passes its health checks.` });
  }
}

async function editBackend(form, id) {
  const { data } = await api("GET", backendPath(id));
  fillBackendForm(form, data);
  setFormMode(form, "backend", id);
  form.elements.Name.focus();
}

/** DELETE; a 409 (frontends list it) offers forcing through a second, explicit button. */
async function removeBackend(form, id, force = false) {
  try {
    await api("DELETE", `${backendPath(id)}${force ? "?force=true" : ""}`);
    if (form.dataset.editing === id) clearForm(form, "backend");
    formMessage(form, { result: `Removed backend ${id}${force ? " and took it out of its frontends" : ""}.` });
  } catch (error) {
    if (!(error instanceof ApiFailure) || error.status !== 409 || force) throw error;
    formMessage(form, {
      error: el("span", {}, `${error.message} `,
        el("button", {
          type: "button", class: "small-button danger", "data-testid": "force-remove", "data-backend": id,
          onclick: () => withForm(form, () => removeBackend(form, id, true)),
        }, `Remove ${id} anyway, and from those frontends`)),
    });
  }
}

async function drainBackend(form, id) {
  const { data } = await api("POST", `${backendPath(id)}/drain`);
  const running = Number(data?.ActiveRequests) || 0;
  formMessage(form, {
    result: running
      ? `Draining ${id}: it gets no new requests; ${running} still running.`
      : `${id} is drained: no requests running, it can be removed.`,
  });
}

async function putBackBackend(form, id) {
  const { data } = await api("GET", backendPath(id));
  await api("PUT", backendPath(id), { ...data, Active: true });
  formMessage(form, { result: `${id} is active again: it takes requests while it is healthy.` });
}

// -- Frontends

const frontendPath = (id) => `/v1.0/frontends/${enc(id)}`;

function frontendFields(form) {
  return {
    Identifier: fieldText(form, "Identifier"),
    Name: optionalText(form, "Name"),
    Hostname: optionalText(form, "Hostname"),
    Backends: checkedBackends(),
    RequiredModels: splitList(fieldText(form, "RequiredModels")),
    MaxQueueDepth: integer(form, "MaxQueueDepth"),
    RequireApiKey: form.elements.RequireApiKey.checked,
  };
}

function fillFrontendForm(form, record) {
  for (const name of ["Identifier", "Name", "Hostname", "MaxQueueDepth"]) form.elements[name].value = record[name] ?? "";
  form.elements.RequiredModels.value = (record.RequiredModels ?? []).join(", ");
  form.elements.RequireApiKey.checked = Boolean(record.RequireApiKey);
  lastSignature.delete($("#frontend-backend-choices")); // rebuild even if the same record again
  renderBackendChoices(record.Backends ?? [], record.Backends ?? []);
}

async function submitFrontend(form) {
  const fields = frontendFields(form);
  const editing = form.dataset.editing;
  if (editing) {
    const { data: current } = await api("GET", frontendPath(editing));
    await api("PUT", frontendPath(editing), merged(current, fields));
    clearForm(form, "frontend");
    formMessage(form, { result: `Saved frontend ${editing}.` });
  } else {
    const { data } = await api("PUT", "/v1.0/frontends", fields);
    clearForm(form, "frontend");
    formMessage(form, { result: `Added frontend ${data?.Identifier ?? fields.Identifier}.` });
  }
}

async function editFrontend(form, id) {
  const { data } = await api("GET", frontendPath(id));
  fillFrontendForm(form, data);
  setFormMode(form, "frontend", id);
  form.elements.Name.focus();
}

async function removeFrontend(form, id) {
  await api("DELETE", frontendPath(id));
  if (form.dataset.editing === id) clearForm(form, "frontend");
  formMessage(form, { result: `Removed frontend ${id}.` });
}

// -- Pull a model: make it required on a frontend; the daemon's model sync pulls it.

async function submitPull(form) {
  const frontendId = form.elements.Frontend.value;
  const model = fieldText(form, "Model");
  if (!frontendId) throw new ApiFailure(0, "Choose a frontend first (add one above if there is none).");
  if (!model) throw new ApiFailure(0, "Name the model to pull, such as llama3:latest.");
  const { data: frontend } = await api("GET", frontendPath(frontendId));
  const required = frontend.RequiredModels ?? [];
  const where = (frontend.Backends ?? []).join(", ") || "its backends (it has none yet)";
  const watch = el("button", { type: "button", class: "link", onclick: () => { location.hash = "models"; } }, "Models view");
  if (required.some((name) => modelKey(name) === modelKey(model))) {
    formMessage(form, { result: el("span", {}, `${frontendId} already requires ${model}: the daemon keeps it on ${where}. See the `, watch, ".") });
    return;
  }
  await api("PUT", frontendPath(frontendId), { ...frontend, RequiredModels: [...required, model] });
  form.elements.Model.value = "";
  formMessage(form, {
    result: el("span", {}, `${model} is now required on ${frontendId}: the daemon pulls it onto ${where}. Progress shows in the `, watch, "."),
  });
}

// -- API keys

const keyPath = (id) => `/v1.0/apikeys/${enc(id)}`;

function apiKeyFields(form) {
  return {
    Identifier: optionalText(form, "Identifier"),
    Name: optionalText(form, "Name"),
    Frontends: splitList(fieldText(form, "Frontends")),
    Models: splitList(fieldText(form, "Models")),
    RequestsPerMinute: integer(form, "RequestsPerMinute"),
    TokensPerMinute: integer(form, "TokensPerMinute"),
    MaxConcurrentRequests: integer(form, "MaxConcurrentRequests"),
    Priority: integer(form, "Priority"),
    AllowModelManagement: form.elements.AllowModelManagement.checked,
  };
}

async function submitApiKey(form) {
  const { data } = await api("PUT", "/v1.0/apikeys", apiKeyFields(form));
  form.reset();
  formMessage(form, { result: `Created key ${data.Identifier}.` });
  showSecret(data.Key);
  await loadApiKeys();
}

/** The secret, which the daemon answers once: shown with a copy button until the next key. */
function showSecret(secret) {
  const box = $("[data-testid=apikey-secret]");
  $("[data-testid=apikey-key]").value = secret ?? "";
  $("[data-testid=copy-result]").textContent = "";
  box.hidden = !secret;
}

async function copySecret() {
  const input = $("[data-testid=apikey-key]");
  const result = $("[data-testid=copy-result]");
  try {
    await navigator.clipboard.writeText(input.value);
    result.textContent = "Copied.";
  } catch {
    // No clipboard API (an insecure origin): select it, for Ctrl+C.
    input.focus();
    input.select();
    result.textContent = document.execCommand?.("copy") ? "Copied." : "Selected: press Ctrl+C to copy.";
  }
}

async function deleteApiKey(form, id) {
  await api("DELETE", keyPath(id));
  showSecret(null); // a deleted key's secret is of no use to anyone
  const usage = $("#apikey-usage");
  if (usage.dataset.key === id) usage.hidden = true;
  formMessage(form, { result: `Deleted key ${id} and its usage.` });
  await loadApiKeys();
}

async function showUsage(id) {
  const box = $("#apikey-usage");
  box.dataset.key = id;
  box.hidden = false;
  box.replaceChildren(el("p", { class: "muted" }, `Reading the usage of ${id}…`));
  let data;
  try {
    ({ data } = await api("GET", `${keyPath(id)}/usage`));
  } catch (error) {
    box.replaceChildren(el("p", { class: "bad" }, error.message));
    return;
  }
  const head = el("p", {}, el("strong", {}, `Usage of ${id}`), ` since ${localHour(data.SinceUtc)}`,
    " ", el("button", { type: "button", class: "small-button ghost", onclick: () => { box.hidden = true; } }, "Close"));
  const rows = (data.Usage ?? []).map((u) =>
    el("tr", { "data-testid": "usage-row" },
      el("td", { class: "nowrap" }, localHour(u.HourUtc)), el("td", { class: "model-name" }, u.Model),
      el("td", { class: "num" }, formatCount(u.Requests)), el("td", { class: "num" }, formatCount(u.Errors)),
      el("td", { class: "num" }, formatCount(u.PromptTokens)), el("td", { class: "num" }, formatCount(u.CompletionTokens))));
  if (!rows.length) {
    box.replaceChildren(head, el("p", { class: "muted" }, "No requests in that time."));
    return;
  }
  const t = data.Totals ?? {};
  setChildren(box, head, el("table", { class: "grid compact" },
    el("thead", {}, el("tr", {}, ["Hour", "Model", "Requests", "Errors", "Prompt tokens", "Completion tokens"].map((h, i) =>
      el("th", { scope: "col", class: i > 1 ? "num" : null }, h)))),
    el("tbody", {}, rows),
    el("tfoot", {}, el("tr", {}, el("th", { scope: "row", colspan: 2 }, "Total"),
      [t.Requests, t.Errors, t.PromptTokens, t.CompletionTokens].map((n) => el("td", { class: "num" }, formatCount(n)))))),
  data.Truncated ? el("p", { class: "muted small" }, "Only the first rows are shown.") : null);
}

// ---------------------------------------------------------------------------------------------
// Wiring

/** Buttons in the Steer lists act on the form below them; their results show in that form. */
function wireList(listSelector, form, actions) {
  $(listSelector).addEventListener("click", (event) => {
    const button = event.target.closest("button[data-action]");
    const action = button && actions[button.dataset.action];
    if (!action) return;
    withForm(form, () => action(form, button.dataset.id));
  });
}

function wireForm(form, submit, kind) {
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    withForm(form, () => submit(form));
  });
  const reset = $("[data-action=reset]", form);
  if (reset) reset.addEventListener("click", () => { clearForm(form, kind); formMessage(form); });
}

function wireSteer() {
  const backendForm = $("#backend-form");
  const frontendForm = $("#frontend-form");
  const keyForm = $("#apikey-form");
  wireForm(backendForm, submitBackend, "backend");
  wireForm(frontendForm, submitFrontend, "frontend");
  wireForm($("#pull-form"), submitPull);
  wireForm(keyForm, submitApiKey);
  wireList("#steer-backend-rows", backendForm, {
    edit: editBackend, remove: (form, id) => removeBackend(form, id), drain: drainBackend, putback: putBackBackend,
  });
  wireList("#steer-frontend-rows", frontendForm, { edit: editFrontend, remove: removeFrontend });
  wireList("#apikey-rows", keyForm, { usage: (_form, id) => showUsage(id), delete: deleteApiKey });
  $("[data-testid=copy-key]").addEventListener("click", copySecret);
}

// -- Theme: prefers-color-scheme unless the toggle chose one (kept in localStorage).

function storedTheme() {
  try { return localStorage.getItem(THEME_KEY); } catch { return null; }
}

const darkQuery = matchMedia("(prefers-color-scheme: dark)");
const effectiveTheme = () => document.documentElement.dataset.theme || (darkQuery.matches ? "dark" : "light");

function applyTheme(theme) {
  if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;
  const next = effectiveTheme() === "dark" ? "light" : "dark";
  const button = $("#theme-toggle");
  button.textContent = next === "dark" ? "☾ Dark" : "☀ Light";
  button.setAttribute("aria-label", `Switch to the ${next} theme`);
}

function toggleTheme() {
  const next = effectiveTheme() === "dark" ? "light" : "dark";
  try { localStorage.setItem(THEME_KEY, next); } catch { /* not kept */ }
  applyTheme(next);
}

function init() {
  applyTheme(storedTheme());
  darkQuery.addEventListener("change", () => applyTheme(storedTheme()));
  $("#theme-toggle").addEventListener("click", toggleTheme);
  $("#signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const token = $("#token").value.trim();
    if (!token) return showSigninError("Enter the admin token.");
    signIn(token);
  });
  $("#signout").addEventListener("click", () => signOut());
  for (const button of $$("nav.views button")) {
    button.addEventListener("click", () => {
      if (location.hash === `#${button.dataset.view}`) showView(button.dataset.view);
      else location.hash = button.dataset.view;
    });
  }
  addEventListener("hashchange", () => { if (state.token) showView(viewFromHash()); });
  wireSteer();
  // Relative times ("retry in 42 s") and the models' view age between feed events.
  setInterval(() => { if (state.token && state.view === "models") scheduleRender(); }, 5000);
  const token = readToken();
  if (token) signIn(token, true);
  else showSignin();
}

init();
