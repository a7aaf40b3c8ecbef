// The AgentVault operator console: a small vanilla module over the edge's own REST API.
//
// Adding a page: call page({id, title, render}) below. `render(main, params)` fills `main` (params are
// the hash path's parts after the page id, e.g. #/agents/<id> gives [id]); it may return a function the router
// calls when the page is left (to close a live stream). The API decides what a person may see: a page does not
// guess, it shows the API's refusal (403) plainly. Every API call goes through api(), which sends the
// CSRF header on changes and turns the API's error body into an ApiError shown by the router, never a blank page.

const CSRF_HEADER = "X-CSRF-Token";
const state = { session: null };
const pages = new Map();
let leave = null;

// ------------------------------------------------------------------------------------------- helpers

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.session) headers[CSRF_HEADER] = state.session.csrf_token;
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
    });
  } catch (err) {
    throw new ApiError(0, `the edge cannot be reached (${err.message})`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const message = (data && data.error && data.error.message) || `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message, data);
  }
  return data;
}

// Builds an element; children are nodes or strings (always text, never parsed as HTML).
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

function qs(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) if (value !== "" && value !== undefined) q.set(key, value);
  const text = q.toString();
  return text ? `?${text}` : "";
}

export function errorBox(err, what) {
  const refused = err.status === 403 || err.status === 401;
  return h(
    "div",
    { class: refused ? "error refused" : "error", role: "alert", "data-status": String(err.status ?? "") },
    refused ? `Not allowed: ${what ? what + " — " : ""}${err.message}` : `${what ? what + ": " : ""}${err.message}`,
  );
}

function showBanner(message) {
  const banner = document.getElementById("banner");
  banner.textContent = message;
  banner.hidden = !message;
}

function table(columns, rows, empty) {
  if (!rows.length) return h("p", { class: "muted empty" }, empty || "Nothing here.");
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c.title)))),
    h(
      "tbody",
      {},
      rows.map((row) => h("tr", { dataset: { id: row.id || "" } }, columns.map((c) => h("td", {}, c.cell(row))))),
    ),
  );
}

function when(stamp) {
  return stamp ? new Date(stamp).toLocaleString() : "—";
}

export function page(spec) {
  pages.set(spec.id, spec);
}

// ------------------------------------------------------------------------------------------- sign-in

function renderSignIn(main, note) {
  // Already shown (a hash change while signed out): keep it, and whatever the person is typing into it.
  if (!note && main.querySelector("#sign-in")) return;
  document.getElementById("nav").hidden = true;
  document.getElementById("sign-out").hidden = true;
  document.getElementById("who").textContent = "";
  const input = h("input", {
    id: "credential",
    name: "credential",
    type: "password",
    autocomplete: "off",
    required: true,
    placeholder: "API key or bearer token",
  });
  const status = h("p", { id: "sign-in-status", role: "status" }, note || "");
  const form = h(
    "form",
    { id: "sign-in", class: "card" },
    h("h1", {}, "Sign in"),
    h("p", { class: "muted" }, "With an admin or member API key (or a bearer token the mesh accepts)."),
    h("label", { for: "credential" }, "Credential"),
    input,
    h("button", { type: "submit" }, "Sign in"),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    status.textContent = "Checking…";
    try {
      state.session = await api("POST", "/console/api/session", { credential: input.value });
      input.value = "";
      if (!location.hash || location.hash === "#/sign-in") location.hash = "#/overview"; // hashchange routes
      else await route();
    } catch (err) {
      status.textContent = `Sign-in refused: ${err.message}`;
      status.className = "error";
    }
  });
  main.replaceChildren(form);
}

async function signOut() {
  try {
    await api("DELETE", "/console/api/session");
  } catch (err) {
    showBanner(`Sign-out: ${err.message}`);
  }
  state.session = null;
  location.hash = "#/sign-in";
  await route();
}

// ------------------------------------------------------------------------------------------- router

function renderNav() {
  const nav = document.getElementById("nav");
  const current = (location.hash.slice(2).split("/")[0] || "overview").toLowerCase();
  nav.replaceChildren(
    ...[...pages.values()].map((p) =>
      h("a", { href: `#/${p.id}`, class: p.id === current ? "active" : null, dataset: { page: p.id } }, p.title),
    ),
  );
  nav.hidden = false;
  document.getElementById("who").textContent = `${state.session.name} (${state.session.role})`;
  document.getElementById("sign-out").hidden = false;
}

async function route() {
  if (leave) {
    try {
      leave();
    } catch {
      /* a page's cleanup never stops navigation */
    }
    leave = null;
  }
  showBanner("");
  const main = document.getElementById("main");
  if (!state.session) {
    try {
      state.session = await api("GET", "/console/api/session");
    } catch (err) {
      renderSignIn(main, err.status === 401 ? "" : err.message);
      return;
    }
  }
  const [id, ...params] = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const spec = pages.get(id || "overview");
  renderNav();
  if (!spec) {
    main.replaceChildren(h("p", { class: "error" }, `No page “${id}”.`));
    return;
  }
  document.title = `${spec.title} · AgentVault console`;
  main.replaceChildren(h("h1", {}, spec.title));
  const body = h("section", { id: `page-${spec.id}` });
  main.append(body);
  try {
    const cleanup = await spec.render(body, params);
    if (typeof cleanup === "function") leave = cleanup;
  } catch (err) {
    if (err.status === 401) {
      state.session = null;
      renderSignIn(main, "Your session ended; sign in again.");
      return;
    }
    body.replaceChildren(errorBox(err, spec.title));
  }
}

// ------------------------------------------------------------------------------------------- pages

async function count(path, key) {
  try {
    const data = await api("GET", path);
    const items = (data && data[key]) || [];
    return { items, more: Boolean(data && data.next_page_token) };
  } catch (err) {
    return { error: err };
  }
}

function tile(label, result, text, link) {
  const value = result.error
    ? h("span", { class: "tile-error", title: result.error.message }, result.error.status === 403 ? "not allowed" : "error")
    : text;
  return h(
    "a",
    { class: "tile", href: link, dataset: { tile: label } },
    h("span", { class: "tile-value" }, value),
    h("span", { class: "tile-label" }, label),
  );
}

page({
  id: "overview",
  title: "Overview",
  async render(main) {
    const [agents, peers, approvals, dead] = await Promise.all([
      count("/api/v1/agents?page_size=500", "agents"),
      count("/api/v1/federation/peers?page_size=500", "peers"),
      count("/api/v1/approvals?status=pending&page_size=500", "approvals"),
      count("/api/v1/deadLetters?page_size=500", "messages"),
    ]);
    const n = (r) => `${r.items.length}${r.more ? "+" : ""}`;
    const byHealth = {};
    for (const peer of peers.items || []) {
      const health = peer.health_status || "unspecified";
      byHealth[health] = (byHealth[health] || 0) + 1;
    }
    const health = Object.entries(byHealth)
      .map(([k, v]) => `${v} ${k}`)
      .join(", ");
    main.append(
      h(
        "div",
        { class: "tiles" },
        tile("Agents", agents, agents.items && n(agents), "#/agents"),
        tile("Peers", peers, peers.items && (peers.items.length ? health : "0"), "#/peers"),
        tile("Pending approvals", approvals, approvals.items && n(approvals), "#/approvals"),
        tile("Dead letters", dead, dead.items && n(dead), "#/dead-letters"),
      ),
    );
  },
});

const CAPABILITY_KINDS = ["", "tool", "resource", "prompt", "skill"];
const SHARINGS = ["", "local", "federated", "public"];

page({
  id: "agents",
  title: "Agents",
  async render(main, params) {
    if (params[0]) return renderAgent(main, params[0]);
    const field = (name, label, extra = {}) =>
      h("label", {}, label, h(extra.options ? "select" : "input", { name, ...extra.attrs }, ...(extra.options || []).map((o) => h("option", { value: o }, o || "any"))));
    const form = h(
      "form",
      { id: "agent-search", class: "filters" },
      field("search", "Search"),
      field("tag", "Tag"),
      field("agent_type", "Type"),
      field("capability_name", "Capability"),
      field("capability_kind", "Kind", { options: CAPABILITY_KINDS }),
      field("sharing", "Sharing", { options: SHARINGS }),
      field("owner", "Owner"),
      h("button", { type: "submit" }, "Search"),
    );
    const results = h("div", { id: "agent-results" });
    const search = async () => {
      const filters = Object.fromEntries(new FormData(form).entries());
      results.replaceChildren(h("p", { class: "muted" }, "Searching…"));
      try {
        const data = await api("GET", `/api/v1/agents${qs({ ...filters, page_size: 100 })}`);
        results.replaceChildren(
          table(
            [
              { title: "Name", cell: (a) => h("a", { href: `#/agents/${encodeURIComponent(a.id)}` }, a.name) },
              { title: "DID", cell: (a) => a.did },
              { title: "Version", cell: (a) => a.version },
              { title: "Tags", cell: (a) => (a.tags || []).join(", ") },
              { title: "Health", cell: (a) => a.health_status },
              { title: "Sharing", cell: (a) => a.sharing },
            ],
            data.agents || [],
            "No agent matches.",
          ),
          data.next_page_token ? h("p", { class: "muted" }, "More agents match: narrow the search.") : "",
        );
      } catch (err) {
        results.replaceChildren(errorBox(err, "Search"));
      }
    };
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      search();
    });
    main.append(form, results);
    await search();
  },
});

async function renderAgent(main, id) {
  const agent = await api("GET", `/api/v1/agents/${encodeURIComponent(id)}`);
  const dl = (pairs) => h("dl", {}, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v || "—")]));
  main.append(
    h("p", {}, h("a", { href: "#/agents" }, "← all agents")),
    h("h2", { id: "agent-name" }, agent.name),
    dl([
      ["ID", agent.id],
      ["DID", agent.did],
      ["Version", agent.version],
      ["Type", agent.agent_type],
      ["Description", agent.description],
      ["Owner", agent.owner],
      ["Sharing", agent.sharing],
      ["Health", agent.health_status],
      ["Tags", (agent.tags || []).join(", ")],
      ["Endpoints", (agent.endpoints || []).map((e) => e.url || JSON.stringify(e)).join(", ")],
      ["Updated", when(agent.update_time)],
    ]),
    h("h3", {}, "Capabilities"),
    table(
      [
        { title: "Name", cell: (c) => c.name },
        { title: "Kind", cell: (c) => c.kind },
        { title: "Version", cell: (c) => c.version },
        { title: "Description", cell: (c) => c.description },
      ],
      agent.capabilities || [],
      "No capabilities.",
    ),
    h("h3", {}, "Agent card"),
  );
  const card = h("pre", { id: "agent-card", class: "json" }, "Loading…");
  main.append(card);
  try {
    card.textContent = JSON.stringify(await api("GET", `/api/v1/agents/${encodeURIComponent(id)}/agent-card.json`), null, 2);
  } catch (err) {
    card.replaceWith(errorBox(err, "Agent card"));
  }
  return agentHealth(main, agent);
}

// The health monitor's checks of the agent (those with a health_check_url), redrawn live on each change.
async function agentHealth(main, agent) {
  const holder = h("div", { id: "agent-health", class: "peer-charts" });
  const live = h("p", { id: "agent-health-live", class: "muted" });
  main.append(h("h3", {}, "Health history"), live, holder);
  const draw = async () => {
    const history = await api("GET", `/api/v1/agents/${encodeURIComponent(agent.id)}/healthHistory?limit=200`);
    const checks = history.checks || [];
    holder.dataset.checks = String(checks.length);
    if (!checks.length) {
      holder.replaceChildren(
        h("p", { class: "muted empty" }, agent.health_check_url ? "Not checked yet." : "Not checked: the agent has no health check URL."),
      );
      return;
    }
    const last = checks[0];
    holder.replaceChildren(
      h(
        "p",
        { class: "muted summary" },
        `${checks.length} checks; last ${when(last.time)}: `,
        h("span", { class: `health ${last.status}`, dataset: { status: last.status } }, last.status),
        last.error ? ` — ${last.error}` : "",
      ),
      h("div", { class: "chart-label" }, "Status"),
      statusChart(checks),
      h("div", { class: "chart-label" }, "Latency"),
      latencyChart(checks),
      h("div", { class: "chart-label" }, "Errors"),
      errorChart(checks),
    );
  };
  try {
    await draw();
  } catch (err) {
    holder.replaceChildren(errorBox(err, "Health history"));
    return undefined;
  }
  // Only status changes come on the stream (an agent's first check is one): the history is read again once the
  // stream listens, or a first check made while the page loaded would never show.
  return watch(
    "/api/v1/federation/health:watch",
    live,
    (event) => {
      if (event.subject_kind === "agent" && event.subject_id === agent.id) draw().catch(() => undefined);
    },
    () => draw().catch(() => undefined),
  );
}

function approvalRow(approval, onAnswer) {
  const pending = approval.status === "pending";
  const answer = (verb) => async (event) => {
    const button = event.currentTarget;
    button.disabled = true;
    try {
      onAnswer(await api("POST", `/api/v1/approvals/${encodeURIComponent(approval.id)}:${verb}`, {}));
    } catch (err) {
      button.disabled = false;
      showBanner(`Could not ${verb}: ${err.message}`);
    }
  };
  return h(
    "li",
    { class: `approval ${approval.status}`, dataset: { id: approval.id, status: approval.status } },
    h(
      "div",
      { class: "approval-head" },
      h("strong", {}, approval.action),
      " on ",
      h("code", {}, approval.target),
      " by ",
      h("code", {}, approval.caller),
      h("span", { class: "badge" }, approval.status),
    ),
    approval.purpose ? h("p", {}, "Purpose: ", approval.purpose) : "",
    h("ul", { class: "reasons" }, (approval.reasons || []).map((r) => h("li", {}, r))),
    h(
      "p",
      { class: "muted" },
      `Asked ${when(approval.create_time)}; expires ${when(approval.expire_time)}`,
      approval.decided_by ? `; answered by ${approval.decided_by}` : "",
      (approval.policy_ids || []).length ? `; policies ${approval.policy_ids.join(", ")}` : "",
    ),
    pending
      ? h(
          "div",
          { class: "actions" },
          h("button", { type: "button", class: "approve", onclick: answer("approve") }, "Approve"),
          h("button", { type: "button", class: "deny", onclick: answer("deny") }, "Deny"),
        )
      : "",
  );
}

page({
  id: "approvals",
  title: "Approvals",
  async render(main) {
    const list = h("ul", { id: "approvals", class: "approvals" });
    const live = h("p", { id: "live", class: "muted" }, "Connecting to live updates…");
    const byId = new Map();
    const put = (approval) => {
      const row = approvalRow(approval, put);
      const old = byId.get(approval.id);
      byId.set(approval.id, row);
      if (old) old.replaceWith(row);
      else list.prepend(row);
      empty.hidden = byId.size > 0;
    };
    const empty = h("p", { class: "muted empty" }, "No approval is waiting.");
    main.append(live, empty, list);
    const data = await api("GET", "/api/v1/approvals?status=pending&page_size=200");
    for (const approval of (data.approvals || []).reverse()) put(approval);
    empty.hidden = byId.size > 0;
    // Live: the WatchApprovals stream as Server-Sent Events, with answered ones too so that rows change state.
    const source = new EventSource("/api/v1/approvals:watch?include_answered=true");
    source.onopen = () => {
      live.textContent = "Live: new approvals and answers appear as they happen.";
      live.dataset.live = "open";
    };
    source.onmessage = (event) => {
      const item = JSON.parse(event.data);
      if (item.approval && item.approval.id) put(item.approval);
    };
    source.addEventListener("error", (event) => {
      if (event.data) {
        try {
          live.textContent = `Live updates stopped: ${JSON.parse(event.data).error.message}`;
        } catch {
          live.textContent = "Live updates stopped.";
        }
        source.close();
      } else {
        live.textContent = "Live updates interrupted; reconnecting…";
        live.dataset.live = "retrying";
      }
    });
    return () => source.close();
  },
});

page({
  id: "dead-letters",
  title: "Dead letters",
  async render(main) {
    const holder = h("div", { id: "dead-letters" });
    main.append(holder);
    const load = async () => {
      const data = await api("GET", "/api/v1/deadLetters?page_size=200");
      holder.replaceChildren(
        table(
          [
            { title: "Message", cell: (m) => h("code", {}, m.id) },
            { title: "From", cell: (m) => (m.sender && (m.sender.agent_id || m.sender.name)) || "—" },
            { title: "To", cell: (m) => (m.recipient && (m.recipient.agent_id || m.recipient.name)) || "—" },
            { title: "Why", cell: (m) => m.status_reason || m.status },
            { title: "Attempts", cell: (m) => String(m.attempts ?? 0) },
            { title: "Updated", cell: (m) => when(m.update_time || m.create_time) },
            {
              title: "",
              cell: (m) =>
                h(
                  "button",
                  {
                    type: "button",
                    class: "replay",
                    onclick: async (event) => {
                      event.currentTarget.disabled = true;
                      try {
                        const replayed = await api("POST", `/api/v1/deadLetters/${encodeURIComponent(m.id)}:replay`, {});
                        showBanner(`Replayed ${replayed.id}: now ${replayed.status}.`);
                        await load();
                      } catch (err) {
                        showBanner(`Replay refused: ${err.message}`);
                        event.currentTarget.disabled = false;
                      }
                    },
                  },
                  "Replay",
                ),
            },
          ],
          data.messages || [],
          "The dead-letter queue is empty.",
        ),
      );
    };
    await load();
  },
});

// ------------------------------------------------------------------------------------------- streams and forms

// The API's field violations (google.rpc.BadRequest) of an ApiError: field path -> [descriptions].
export function violations(err) {
  const found = {};
  const details = (err && err.body && err.body.error && err.body.error.details) || [];
  for (const detail of details) {
    for (const v of detail.field_violations || []) (found[v.field] = found[v.field] || []).push(v.description);
  }
  return found;
}

// Shows each violation next to the control whose data-field names it (or a parent of it); the rest in `rest`.
function showViolations(form, found, rest) {
  for (const old of form.querySelectorAll(".field-error")) old.remove();
  const left = [];
  for (const [field, messages] of Object.entries(found)) {
    // The field itself, else the nearest parent that has a control (arguments/a/b, then arguments/a).
    let control = null;
    for (let path = field; !control; path = path.replace(/[./][^./]*$/, "")) {
      control = form.querySelector(`[data-field="${CSS.escape(path)}"]`);
      if (!/[./]/.test(path)) break;
    }
    const note = h("p", { class: "field-error", role: "alert", dataset: { errorFor: field } }, messages.join("; "));
    if (control) control.after(note);
    else left.push(h("li", {}, `${field}: ${messages.join("; ")}`));
  }
  if (rest) rest.replaceChildren(...(left.length ? [h("ul", { class: "error" }, left)] : []));
}

// POST that answers with Server-Sent Events (EventSource can only GET): `onEvent(name, data)` for each event.
// An error before the stream starts is the API's JSON error, thrown as an ApiError like api()'s.
async function postStream(path, body, onEvent, signal) {
  const headers = { Accept: "text/event-stream", "Content-Type": "application/json" };
  if (state.session) headers[CSRF_HEADER] = state.session.csrf_token;
  const response = await fetch(path, {
    method: "POST",
    headers,
    body: JSON.stringify(body),
    credentials: "same-origin",
    signal,
  });
  if (!response.ok || !(response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
    const text = await response.text();
    let data = null;
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
    throw new ApiError(response.status, (data && data.error && data.error.message) || response.statusText, data);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

// An EventSource on a watch stream, its state shown in `live` (data-live: open, retrying, stopped).
// `onOpen`, when given, runs each time the stream (re)opens: what changed before it was listening (while the page
// loaded, or during a reconnect) is read again then, since the stream only tells of changes.
function watch(path, live, onItem, onOpen) {
  const source = new EventSource(path);
  source.onopen = () => {
    live.textContent = "Live: changes appear as they happen.";
    live.dataset.live = "open";
    if (onOpen) onOpen();
  };
  source.onmessage = (event) => onItem(JSON.parse(event.data));
  source.addEventListener("error", (event) => {
    if (event.data) {
      try {
        live.textContent = `Live updates stopped: ${JSON.parse(event.data).error.message}`;
      } catch {
        live.textContent = "Live updates stopped.";
      }
      live.dataset.live = "stopped";
      source.close();
    } else {
      live.textContent = "Live updates interrupted; reconnecting…";
      live.dataset.live = "retrying";
    }
  });
  return () => source.close();
}

// ------------------------------------------------------------------------------------------- charts

// Inline SVG, drawn here from the data: no chart library, nothing fetched.
const SVG_NS = "http://www.w3.org/2000/svg";
const CHART_W = 600;
const CHART_H = 90;
const PAD = 4;

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) if (value !== undefined && value !== null) el.setAttribute(key, String(value));
  for (const child of children.flat()) if (child) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return el;
}

function chartFrame(kind, label, ...children) {
  return svg(
    "svg",
    { class: `chart ${kind}`, viewBox: `0 0 ${CHART_W} ${CHART_H}`, role: "img", "aria-label": label, preserveAspectRatio: "none" },
    svg("title", {}, label),
    svg("rect", { class: "chart-bg", x: 0, y: 0, width: CHART_W, height: CHART_H }),
    ...children,
  );
}

// Checks oldest first, each with its time as milliseconds since the epoch.
function timeline(checks) {
  const points = checks
    .map((c) => ({ ...c, t: Date.parse(c.time) }))
    .filter((c) => !Number.isNaN(c.t))
    .sort((a, b) => a.t - b.t);
  const t0 = points.length ? points[0].t : 0;
  const t1 = points.length ? points[points.length - 1].t : 1;
  const x = (t) => PAD + ((t - t0) / Math.max(1, t1 - t0)) * (CHART_W - 2 * PAD);
  return { points, x };
}

export function statusChart(checks) {
  const { points, x } = timeline(checks);
  const width = Math.max(2, (CHART_W - 2 * PAD) / Math.max(1, points.length));
  return chartFrame(
    "chart-status",
    `Status of the last ${points.length} checks, oldest left`,
    points.map((c) =>
      svg(
        "rect",
        { class: `bar status-${c.status}`, x: Math.min(x(c.t), CHART_W - PAD - width), y: PAD, width, height: CHART_H - 2 * PAD },
        svg("title", {}, `${new Date(c.t).toLocaleString()}: ${c.status}${c.error ? " — " + c.error : ""}`),
      ),
    ),
  );
}

export function latencyChart(checks) {
  const { points, x } = timeline(checks);
  const ok = points.filter((c) => c.status === "healthy");
  const max = Math.max(1, ...ok.map((c) => c.response_time_ms || 0));
  const y = (ms) => CHART_H - PAD - (ms / max) * (CHART_H - 2 * PAD);
  const path = ok.map((c) => `${x(c.t).toFixed(1)},${y(c.response_time_ms || 0).toFixed(1)}`).join(" ");
  return chartFrame(
    "chart-latency",
    `Response time of successful checks, up to ${Math.round(max)} ms`,
    ok.length > 1 ? svg("polyline", { class: "line", points: path }) : null,
    ok.map((c) =>
      svg(
        "circle",
        { class: "dot", cx: x(c.t).toFixed(1), cy: y(c.response_time_ms || 0).toFixed(1), r: 2.5 },
        svg("title", {}, `${new Date(c.t).toLocaleString()}: ${Math.round(c.response_time_ms || 0)} ms`),
      ),
    ),
    svg("text", { class: "axis", x: CHART_W - PAD, y: 12, "text-anchor": "end" }, `${Math.round(max)} ms`),
  );
}

// Failed checks per bucket of time.
export function errorChart(checks, buckets = 30) {
  const { points } = timeline(checks);
  const counts = new Array(buckets).fill(0);
  if (points.length) {
    const t0 = points[0].t;
    const span = Math.max(1, points[points.length - 1].t - t0);
    for (const c of points) if (c.status !== "healthy") counts[Math.min(buckets - 1, Math.floor(((c.t - t0) / span) * buckets))]++;
  }
  const max = Math.max(1, ...counts);
  const width = (CHART_W - 2 * PAD) / buckets;
  return chartFrame(
    "chart-errors",
    `Failed checks over time (${counts.reduce((a, b) => a + b, 0)} in all)`,
    counts.map((n, i) =>
      n
        ? svg("rect", {
            class: "bar failure",
            x: (PAD + i * width).toFixed(1),
            y: (CHART_H - PAD - (n / max) * (CHART_H - 2 * PAD)).toFixed(1),
            width: Math.max(1, width - 1).toFixed(1),
            height: ((n / max) * (CHART_H - 2 * PAD)).toFixed(1),
          })
        : null,
    ),
    svg("text", { class: "axis", x: CHART_W - PAD, y: 12, "text-anchor": "end" }, `max ${max} per bucket`),
  );
}

const ACTIONS = ["message.send", "agent.read", "tool.list", "tool.invoke", "session.handoff", "capability.request"];
const CALLER_KINDS = ["agent", "person", "service", "peer", "client"];
const TRUST_LEVELS = ["untrusted", "basic", "trusted", "blocked"];

function explainForm(out) {
  const select = (name, options) => h("select", { name }, options.map((o) => h("option", { value: o }, o)));
  const labelled = (label, control) => h("label", {}, label, control);
  const form = h(
    "form",
    { id: "explain", class: "filters" },
    labelled("Caller kind", select("caller_kind", CALLER_KINDS)),
    labelled("Caller id", h("input", { name: "caller_id", required: true })),
    labelled("Trust", select("trust_level", TRUST_LEVELS)),
    labelled("Action", select("action", ACTIONS)),
    labelled("Target agent id", h("input", { name: "agent_id", required: true })),
    labelled("Target tags (comma-separated)", h("input", { name: "tags" })),
    labelled("Tool / capability", h("input", { name: "name" })),
    h("button", { type: "submit" }, "Explain"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = Object.fromEntries(new FormData(form).entries());
    const body = {
      caller: { kind: f.caller_kind, id: f.caller_id, trust_level: f.trust_level },
      action: f.action,
      target: {
        agent_id: f.agent_id,
        name: f.name || undefined,
        tags: f.tags ? f.tags.split(",").map((t) => t.trim()).filter(Boolean) : [],
      },
    };
    out.replaceChildren(h("p", { class: "muted" }, "Asking the policy engine…"));
    try {
      const answer = await api("POST", "/api/v1/policies:explain", body);
      out.replaceChildren(
        h("p", {}, "Decision: ", h("strong", { id: "explain-decision", dataset: { decision: answer.decision } }, answer.decision)),
        h("ul", { class: "reasons" }, (answer.reasons || []).map((r) => h("li", {}, r))),
        h("p", { class: "muted" }, `Deciding policies: ${(answer.deciding_policy_ids || []).join(", ") || "none (default)"}`),
        (answer.not_applied || []).length
          ? h(
              "details",
              {},
              h("summary", {}, `${answer.not_applied.length + (answer.omitted || 0)} policies did not apply`),
              h("ul", {}, answer.not_applied.map((n) => h("li", {}, h("code", {}, n.policy_id), ": ", n.reason))),
            )
          : "",
      );
    } catch (err) {
      out.replaceChildren(errorBox(err, "Explain"));
    }
  });
  return form;
}

// ------------------------------------------------------------------------------------------- peers

// Health history is one call per peer: the page asks for at most this many, the first ones listed.
const PEER_HISTORY_LIMIT = 50;
const PEER_CHECKS = 200;
const LAST_SEARCH_KEY = "agentvault.console.lastFederatedSearch";

function peerStatus(status, down) {
  const word = status || "unspecified";
  return h("span", { class: `health ${word}${down ? " down" : ""}`, dataset: { status: word, down: down ? "true" : "false" } }, down ? `${word} (down)` : word);
}

function peerCharts(peer) {
  const holder = h("div", { class: "charts" }, h("p", { class: "muted" }, "Loading history…"));
  const section = h(
    "section",
    { class: "peer-charts", dataset: { peer: peer.id } },
    h("h3", {}, peer.name, " ", h("span", { class: "muted" }, peer.registry_url)),
    holder,
  );
  const draw = async () => {
    try {
      const history = await api("GET", `/api/v1/federation/health/peers/${encodeURIComponent(peer.id)}?limit=${PEER_CHECKS}`);
      const checks = history.checks || [];
      const s = history.summary || {};
      holder.replaceChildren(
        h(
          "p",
          { class: "muted summary" },
          `${checks.length} checks · ${s.uptime_percent !== undefined ? Number(s.uptime_percent).toFixed(1) : "0.0"}% up over 24 h`,
          s.avg_response_time_ms ? ` · avg ${Math.round(s.avg_response_time_ms)} ms` : "",
          s.error ? ` · last error: ${s.error}` : "",
        ),
        h("div", { class: "chart-label" }, "Status"),
        statusChart(checks),
        h("div", { class: "chart-label" }, "Latency"),
        latencyChart(checks),
        h("div", { class: "chart-label" }, "Errors"),
        errorChart(checks),
      );
      section.dataset.checks = String(checks.length);
    } catch (err) {
      holder.replaceChildren(errorBox(err, "Health history"));
    }
  };
  return { section, draw };
}

function federationStats(saved) {
  const stats = saved.stats || {};
  return h(
    "div",
    { id: "federation-stats" },
    h(
      "p",
      { class: "muted" },
      `Search “${saved.search || "*"}” at ${when(saved.at)}: ${stats.queried_registries || 0} asked, ${stats.successful_queries || 0} answered, `,
      `${stats.failed_queries || 0} failed, ${stats.skipped_registries || 0} skipped (down), ${stats.cached_queries || 0} from the cache, `,
      `${stats.total_federated_results || 0} agents from peers.`,
    ),
    table(
      [
        { title: "Peer", cell: (p) => p.name || p.peer_id },
        { title: "Outcome", cell: (p) => h("span", { class: `query ${p.status}`, dataset: { status: p.status } }, p.status) },
        { title: "Latency", cell: (p) => `${Math.round(p.latency_ms || 0)} ms` },
        { title: "Cached", cell: (p) => (p.from_cache ? "yes" : "no") },
        { title: "Agents", cell: (p) => String(p.result_count || 0) },
        { title: "Error", cell: (p) => p.error || "" },
      ],
      (stats.peers || []).map((p) => ({ ...p, id: p.peer_id })),
      "No peer was asked.",
    ),
  );
}

function federatedSearch() {
  const out = h("div", { id: "federation-result" });
  const saved = sessionStorage.getItem(LAST_SEARCH_KEY);
  if (saved) out.append(federationStats(JSON.parse(saved)));
  else out.append(h("p", { class: "muted" }, "No federated search from this console yet."));
  const form = h(
    "form",
    { id: "federated-search", class: "filters" },
    h("label", {}, "Search", h("input", { name: "search" })),
    h("label", { class: "inline" }, h("input", { type: "checkbox", name: "force_refresh" }), "bypass the cache"),
    h("button", { type: "submit" }, "Search the federation"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = new FormData(form);
    const query = { include_federated: "true", search: f.get("search"), force_refresh: f.get("force_refresh") ? "true" : "", page_size: 1 };
    out.replaceChildren(h("p", { class: "muted" }, "Asking the peers…"));
    try {
      const answer = await api("GET", `/api/v1/discovery/agents${qs(query)}`);
      const record = { search: query.search, at: new Date().toISOString(), stats: answer.federation_stats || {} };
      sessionStorage.setItem(LAST_SEARCH_KEY, JSON.stringify(record));
      out.replaceChildren(federationStats(record));
    } catch (err) {
      out.replaceChildren(errorBox(err, "Federated search"));
    }
  });
  return [form, out];
}

page({
  id: "peers",
  title: "Peers",
  async render(main) {
    const data = await api("GET", "/api/v1/federation/peers?page_size=500");
    const peers = data.peers || [];
    const live = h("p", { id: "peer-live", class: "muted" }, "Connecting to live health…");
    const statusCells = new Map();
    const charts = new Map();
    const rows = table(
      [
        { title: "Name", cell: (p) => p.name },
        { title: "Registry", cell: (p) => p.registry_url },
        {
          title: "Health",
          cell: (p) => {
            const cell = h("span", { class: "peer-status" }, peerStatus(p.health_status, p.is_down));
            statusCells.set(p.id, cell);
            return cell;
          },
        },
        { title: "Failures in a row", cell: (p) => String(p.consecutive_failures ?? 0) },
        { title: "Agents", cell: (p) => String(p.agent_count ?? 0) },
        { title: "Last check", cell: (p) => when(p.last_health_check) },
      ],
      peers,
      "No peers.",
    );
    main.append(live, h("div", { id: "peer-table" }, rows), h("h2", {}, "Health over time"));
    for (const peer of peers.slice(0, PEER_HISTORY_LIMIT)) {
      const chart = peerCharts(peer);
      charts.set(peer.id, chart);
      main.append(chart.section);
    }
    if (peers.length > PEER_HISTORY_LIMIT) main.append(h("p", { class: "muted" }, `Charts for the first ${PEER_HISTORY_LIMIT} peers only.`));
    main.append(h("h2", {}, "Last federated search"), ...federatedSearch());
    await Promise.all([...charts.values()].map((c) => c.draw()));
    // Live from the health monitor's WatchHealth: each status change redraws that peer's row and charts.
    const pending = new Map();
    return watch("/api/v1/federation/health:watch?include_current=true", live, (event) => {
      if (event.subject_kind !== "peer") return;
      const cell = statusCells.get(event.subject_id);
      if (cell) cell.replaceChildren(peerStatus(event.status, event.is_down));
      const chart = charts.get(event.subject_id);
      if (chart && !pending.has(event.subject_id)) {
        // A burst of changes redraws once.
        pending.set(event.subject_id, setTimeout(() => pending.delete(event.subject_id) && chart.draw(), 250));
      }
    });
  },
});

// ------------------------------------------------------------------------------------------- policies

function policyForm(policy, onSaved) {
  const editing = Boolean(policy && policy.id);
  const field = (name, label, control) =>
    h("div", { class: "field" }, h("label", { for: `policy-${name}` }, label), control);
  const name = h("input", { id: "policy-name", name: "name", value: (policy && policy.name) || "", dataset: { field: "policy.name" } });
  const description = h("input", {
    id: "policy-description",
    name: "description",
    value: (policy && policy.description) || "",
    dataset: { field: "policy.description" },
  });
  const text = h("textarea", { id: "policy-text", name: "text", rows: 8, spellcheck: "false", dataset: { field: "policy.text" } });
  text.value = (policy && policy.text) || 'permit(principal, action == Action::"agent.read", resource);';
  const enabled = h("input", { id: "policy-enabled", type: "checkbox", name: "enabled", checked: policy ? policy.enabled : true, dataset: { field: "policy.enabled" } });
  const rest = h("div", { class: "form-errors" });
  const status = h("p", { id: "policy-status", role: "status" });
  const form = h(
    "form",
    { id: "policy-form", class: "card wide", dataset: { mode: editing ? "edit" : "create" } },
    h("h2", {}, editing ? `Edit “${policy.name}”` : "New policy"),
    field("name", "Name", name),
    field("description", "Description", description),
    field("text", "Cedar policy", text),
    h("label", { class: "inline" }, enabled, "Enabled"),
    rest,
    h("div", { class: "actions" }, h("button", { type: "submit" }, editing ? "Save" : "Create"), h("a", { href: "#/policies" }, "Cancel")),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showViolations(form, {}, rest);
    status.textContent = "Saving…";
    const body = { name: name.value, description: description.value, text: text.value, enabled: enabled.checked };
    try {
      const saved = editing
        ? await api("PATCH", `/api/v1/policies/${encodeURIComponent(policy.id)}`, body)
        : await api("POST", "/api/v1/policies", body);
      status.textContent = `Saved “${saved.name}”.`;
      status.dataset.saved = saved.id;
      onSaved(saved);
    } catch (err) {
      const found = violations(err);
      if (Object.keys(found).length) {
        status.textContent = "Not saved: see the errors above.";
        showViolations(form, found, rest);
      } else {
        status.replaceChildren(errorBox(err, "Save"));
      }
    }
  });
  return form;
}

page({
  id: "policies",
  title: "Policies",
  async render(main, params) {
    if (params[0] === "new" || params[0] === "edit") {
      const policy = params[0] === "edit" ? await api("GET", `/api/v1/policies/${encodeURIComponent(params[1] || "")}`) : null;
      main.append(
        h("p", {}, h("a", { href: "#/policies" }, "← all policies")),
        policyForm(policy, (saved) => showBanner(`Saved policy “${saved.name}”.`)),
      );
      return undefined;
    }
    const out = h("div", { id: "explain-result" });
    main.append(h("h2", {}, "What would happen if…"), explainForm(out), out, h("h2", {}, "Policies"));
    main.append(h("p", {}, h("a", { href: "#/policies/new", id: "new-policy", class: "button" }, "New policy")));
    const list = h("div", { id: "policy-list" });
    main.append(list);
    try {
      const data = await api("GET", "/api/v1/policies?page_size=200");
      list.append(
        table(
          [
            { title: "Name", cell: (p) => h("a", { href: `#/policies/edit/${encodeURIComponent(p.id)}`, class: "edit" }, p.name) },
            { title: "Enabled", cell: (p) => (p.enabled ? "yes" : "no") },
            { title: "Description", cell: (p) => p.description || "" },
            { title: "Text", cell: (p) => h("pre", { class: "policy" }, p.text) },
          ],
          data.policies || [],
          "No policies.",
        ),
      );
    } catch (err) {
      list.append(errorBox(err, "Policies"));
    }
    return undefined;
  },
});

// ------------------------------------------------------------------------------------------- messages

function party(p) {
  if (!p) return "—";
  return [p.agent_id || p.did || p.principal_id || "", p.mesh ? `@${p.mesh}` : ""].join("");
}

function partsText(parts) {
  return (parts || [])
    .map((part) => {
      if (part.text !== undefined) return part.text;
      if (part.url !== undefined) return part.url;
      if (part.data !== undefined) return JSON.stringify(part.data);
      if (part.raw !== undefined) return `(${part.media_type || "bytes"}${part.filename ? ", " + part.filename : ""})`;
      return "";
    })
    .join("\n");
}

function messageRow(m) {
  return h(
    "li",
    { class: `message ${m.status}`, dataset: { id: m.id, status: m.status } },
    h(
      "div",
      { class: "message-head" },
      h("code", {}, party(m.sender)),
      " → ",
      h("code", {}, party(m.recipient)),
      h("span", { class: "badge message-status", dataset: { status: m.status } }, m.status),
      m.status_reason ? h("span", { class: "muted" }, ` ${m.status_reason}`) : "",
    ),
    m.parts ? h("pre", { class: "message-body" }, partsText(m.parts)) : "",
    h(
      "p",
      { class: "muted" },
      `${when(m.create_time)} · ${m.id}`,
      m.in_reply_to ? ` · reply to ${m.in_reply_to}` : "",
      m.attempts ? ` · ${m.attempts} attempts` : "",
      m.transport ? ` · via ${m.transport}` : "",
    ),
  );
}

async function renderThread(main, conversation) {
  const live = h("p", { id: "thread-live", class: "muted" }, "Connecting to live status…");
  const list = h("ol", { id: "thread", class: "thread" });
  const empty = h("p", { class: "muted empty" }, "No message in this conversation (that you may see).");
  main.append(h("p", {}, h("a", { href: "#/messages" }, "← conversations")), h("h2", {}, "Conversation ", h("code", {}, conversation)), live, empty, list);
  const rows = new Map();
  const put = (m, status) => {
    const old = rows.get(m.id);
    // A watch event has the message without its content: keep the parts already shown.
    const merged = { ...(old ? old.message : {}), ...m, status: status || m.status };
    if (!(m.parts && m.parts.length) && old) merged.parts = old.message.parts;
    const row = messageRow(merged);
    rows.set(m.id, { row, message: merged });
    if (old) old.row.replaceWith(row);
    else list.append(row);
    empty.hidden = rows.size > 0;
  };
  const data = await api("GET", `/api/v1/messages${qs({ conversation_id: conversation, page_size: 200 })}`);
  for (const m of (data.messages || []).reverse()) put(m); // oldest first, as a thread reads
  empty.hidden = rows.size > 0;
  if (data.next_page_token) main.append(h("p", { class: "muted" }, "Only the latest 200 messages are shown."));
  return watch(`/api/v1/messages:watch${qs({ conversation_id: conversation })}`, live, (event) => {
    if (event.message && event.message.id) put(event.message, event.status);
  });
}

page({
  id: "messages",
  title: "Messages",
  async render(main, params) {
    if (params[0]) return renderThread(main, params[0]);
    const form = h(
      "form",
      { id: "conversation", class: "filters" },
      h("label", {}, "Conversation id", h("input", { name: "conversation_id", required: true })),
      h("button", { type: "submit" }, "Open the thread"),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      location.hash = `#/messages/${encodeURIComponent(new FormData(form).get("conversation_id").trim())}`;
    });
    main.append(form, h("h2", {}, "Recent conversations"));
    const data = await api("GET", "/api/v1/messages?page_size=200");
    const byConversation = new Map();
    for (const m of data.messages || []) {
      if (!m.conversation_id) continue;
      const seen = byConversation.get(m.conversation_id);
      if (seen) seen.count++;
      else byConversation.set(m.conversation_id, { id: m.conversation_id, latest: m, count: 1 });
    }
    main.append(
      table(
        [
          { title: "Conversation", cell: (c) => h("a", { href: `#/messages/${encodeURIComponent(c.id)}` }, c.id) },
          { title: "Latest", cell: (c) => `${party(c.latest.sender)} → ${party(c.latest.recipient)}` },
          { title: "Status", cell: (c) => c.latest.status },
          { title: "Messages", cell: (c) => (c.count >= 1 ? String(c.count) : "") },
          { title: "When", cell: (c) => when(c.latest.create_time) },
        ],
        [...byConversation.values()],
        "No recent conversation.",
      ),
    );
    return undefined;
  },
});

// ------------------------------------------------------------------------------------------- tools

const SCALARS = new Set(["string", "number", "integer", "boolean"]);

function isScalar(schema) {
  return schema && (SCALARS.has(schema.type) || Array.isArray(schema.enum));
}

function isFlatObject(schema) {
  return schema && schema.type === "object" && schema.properties && Object.values(schema.properties).every(isScalar);
}

// One control for a property; `path` is its place in the arguments (a/b), as the API names violations.
function schemaControl(name, schema, required, path) {
  const id = `arg-${path.replace(/[^A-Za-z0-9_-]/g, "_")}`;
  const label = h("label", { for: id }, schema.title || name, required ? " *" : "", schema.description ? h("span", { class: "muted" }, ` — ${schema.description}`) : "");
  const attrs = { id, name: path, required, dataset: { field: `arguments/${path}`, kind: "" } };
  let control;
  if (Array.isArray(schema.enum)) {
    attrs.dataset.kind = "enum";
    control = h("select", attrs, required ? "" : h("option", { value: "" }, "—"), schema.enum.map((v, i) => h("option", { value: String(i) }, JSON.stringify(v))));
    control.enumValues = schema.enum;
  } else if (schema.type === "boolean") {
    attrs.dataset.kind = "boolean";
    control = h("input", { ...attrs, type: "checkbox", required: false, checked: schema.default === true });
  } else if (schema.type === "number" || schema.type === "integer") {
    attrs.dataset.kind = schema.type;
    control = h("input", { ...attrs, type: "number", step: schema.type === "integer" ? "1" : "any", min: schema.minimum, max: schema.maximum, value: schema.default });
  } else if (schema.type === "string") {
    attrs.dataset.kind = "string";
    control = h("input", { ...attrs, type: "text", value: schema.default, maxlength: schema.maxLength });
  } else {
    attrs.dataset.kind = "json";
    control = h("textarea", { ...attrs, rows: 4, spellcheck: "false", placeholder: "JSON" });
    if (schema.default !== undefined) control.value = JSON.stringify(schema.default, null, 2);
  }
  return h("div", { class: "field" }, label, control);
}

export function schemaForm(schema) {
  const fields = [];
  const props = (schema && schema.properties) || {};
  const required = new Set((schema && schema.required) || []);
  for (const [name, sub] of Object.entries(props)) {
    if (isFlatObject(sub)) {
      const inner = new Set(sub.required || []);
      fields.push(
        h(
          "fieldset",
          { dataset: { field: `arguments/${name}`, object: name } },
          h("legend", {}, sub.title || name, required.has(name) ? " *" : ""),
          Object.entries(sub.properties).map(([n, s]) => schemaControl(n, s, inner.has(n), `${name}/${n}`)),
        ),
      );
    } else {
      fields.push(schemaControl(name, sub || {}, required.has(name), name));
    }
  }
  return fields;
}

// The arguments from the form: empty optional fields left out, numbers as numbers, JSON parsed.
function formArguments(form) {
  const args = {};
  const problems = {};
  for (const control of form.querySelectorAll("[data-kind]")) {
    const path = control.name.split("/");
    const raw = control.value;
    let value;
    const kind = control.dataset.kind;
    if (kind === "boolean") value = control.checked;
    else if (raw === "") continue;
    else if (kind === "enum") value = control.enumValues[Number(raw)];
    else if (kind === "number" || kind === "integer") value = Number(raw);
    else if (kind === "json") {
      try {
        value = JSON.parse(raw);
      } catch (err) {
        problems[control.dataset.field] = [`is not JSON: ${err.message}`];
        continue;
      }
    } else value = raw;
    let target = args;
    for (const key of path.slice(0, -1)) target = target[key] = target[key] || {};
    target[path[path.length - 1]] = value;
  }
  return { args, problems };
}

function toolResult(result) {
  return h(
    "div",
    { id: "tool-result", class: result.is_error ? "error" : "result", dataset: { error: result.is_error ? "true" : "false" } },
    h("strong", {}, result.is_error ? "The tool failed" : "Result"),
    (result.content || []).map((block) =>
      block.type === "text" ? h("pre", { class: "content" }, block.text) : h("pre", { class: "json" }, JSON.stringify(block, null, 2)),
    ),
    result.structured_content ? h("pre", { class: "json structured" }, JSON.stringify(result.structured_content, null, 2)) : "",
  );
}

async function renderTool(main, agentId, name) {
  const data = await api("GET", `/api/v1/tools${qs({ agent_id: agentId })}`);
  const tool = (data.tools || []).find((t) => t.name === name);
  main.append(h("p", {}, h("a", { href: "#/tools" }, "← all tools")));
  if (!tool) {
    main.append(h("p", { class: "error" }, `No tool “${name}” of this agent that you may use.`));
    return undefined;
  }
  let schema = {};
  try {
    schema = JSON.parse(tool.input_schema || "{}");
  } catch {
    schema = {};
  }
  const rest = h("div", { class: "form-errors" });
  const progress = h("div", { id: "tool-progress" });
  const out = h("div", { id: "tool-output" });
  const button = h("button", { type: "submit" }, "Call");
  const form = h(
    "form",
    // novalidate: the API checks the arguments against the schema and its answer is shown by each field.
    { id: "tool-form", class: "card wide", novalidate: true },
    h("h2", {}, tool.title || tool.name, " ", h("span", { class: "muted" }, `on ${tool.agent_name || tool.agent_id}`)),
    tool.description ? h("p", {}, tool.description) : "",
    ...schemaForm(schema),
    rest,
    button,
  );
  let controller = null;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showViolations(form, {}, rest);
    const { args, problems } = formArguments(form);
    if (Object.keys(problems).length) {
      showViolations(form, problems, rest);
      return;
    }
    button.disabled = true;
    progress.replaceChildren(h("p", { class: "muted" }, "Calling…"));
    out.replaceChildren();
    controller = new AbortController();
    const bar = h("progress", { id: "tool-progress-bar" });
    const steps = h("ol", { class: "progress-steps" });
    try {
      await postStream(
        `/api/v1/agents/${encodeURIComponent(agentId)}/tools/${encodeURIComponent(name)}:invoke`,
        { arguments: args },
        (kind, item) => {
          if (kind === "error") {
            out.replaceChildren(errorBox(new ApiError(0, (item.error && item.error.message) || "the call failed", item), "Call"));
          } else if (item.progress) {
            const p = item.progress;
            if (p.total) {
              bar.max = p.total;
              bar.value = p.progress || 0;
            }
            steps.append(h("li", { dataset: { progress: String(p.progress || 0) } }, `${p.progress || 0}${p.total ? "/" + p.total : ""}${p.message ? " — " + p.message : ""}`));
            progress.replaceChildren(bar, steps);
          } else if (item.approval_pending) {
            progress.append(h("p", { class: "muted" }, `Waiting for approval ${item.approval_pending.approval_id}: `, (item.approval_pending.reasons || []).join("; ")));
          } else if (item.result) {
            out.replaceChildren(toolResult(item.result));
          }
        },
        controller.signal,
      );
      if (!steps.children.length) progress.replaceChildren();
    } catch (err) {
      const found = violations(err);
      if (Object.keys(found).length) showViolations(form, found, rest);
      else if (err.name !== "AbortError") out.replaceChildren(errorBox(err, "Call"));
      progress.replaceChildren();
    } finally {
      button.disabled = false;
    }
  });
  main.append(form, progress, out);
  return () => controller && controller.abort();
}

page({
  id: "tools",
  title: "Tools",
  async render(main, params) {
    if (params[0] && params[1]) return renderTool(main, params[0], params[1]);
    const data = await api("GET", "/api/v1/tools");
    main.append(
      table(
        [
          { title: "Agent", cell: (t) => t.agent_name || t.agent_id },
          {
            title: "Tool",
            cell: (t) => h("a", { href: `#/tools/${encodeURIComponent(t.agent_id)}/${encodeURIComponent(t.name)}`, class: "try" }, t.title || t.name),
          },
          { title: "Name", cell: (t) => h("code", {}, t.name) },
          { title: "Description", cell: (t) => t.description || "" },
        ],
        (data.tools || []).map((t) => ({ ...t, id: `${t.agent_id}/${t.name}` })),
        "No tool you may use.",
      ),
    );
    return undefined;
  },
});

// ------------------------------------------------------------------------------------------- start

document.getElementById("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", route);
window.addEventListener("unhandledrejection", (event) => showBanner(`Unexpected error: ${event.reason}`));
route();
