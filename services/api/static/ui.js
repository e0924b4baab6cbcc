// sandboxd dashboard: signs in from the URL fragment, then keeps the server-rendered page
// live from /ui/feed (server-sent events). No framework, no build step. Text from events is
// only ever set with textContent.
"use strict";

(function () {
  const signin = document.getElementById("signin");
  if (signin) {
    // /ui#token=... : the fragment never reaches the server (nor its logs); post it instead.
    const match = /(?:^#|&)token=([^&]+)/.exec(window.location.hash);
    if (match) {
      history.replaceState(null, "", window.location.pathname);
      document.getElementById("token").value = decodeURIComponent(match[1]);
      signin.submit();
    }
    return;
  }

  const sessions = document.querySelector("#sessions tbody");
  const nodes = document.querySelector("#nodes tbody");
  const feed = document.getElementById("feed");
  const state = document.getElementById("feed-state");
  const total = document.getElementById("total");
  const shown = document.getElementById("shown");
  const FEED_MAX = 200;
  const TERMINAL = new Set(["stopped", "failed", "lost"]);

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function duration(seconds) {
    const sign = seconds < 0 ? "-" : "";
    let s = Math.floor(Math.abs(seconds));
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (d) return `${sign}${d}d${h}h`;
    if (h) return `${sign}${h}h${String(m).padStart(2, "0")}m`;
    if (m) return `${sign}${m}m${String(s).padStart(2, "0")}s`;
    return `${sign}${s}s`;
  }

  function sessionRow(s) {
    const tr = document.createElement("tr");
    tr.dataset.chat = s.chat_id;
    tr.appendChild(el("td", s.chat_id, "mono"));
    const status = el("td");
    status.appendChild(el("span", s.status, `status s-${s.status}`));
    tr.appendChild(status);
    tr.appendChild(el("td", s.node_id));
    const ttl = el("td", "", "ttl");
    ttl.dataset.expires = s.expires_at;
    tr.appendChild(ttl);
    const labels = el("td");
    Object.keys(s.labels || {}).sort().forEach((k) => labels.appendChild(el("span", `${k}=${s.labels[k]}`, "label")));
    tr.appendChild(labels);
    return tr;
  }

  function findRow(chat) {
    for (const tr of sessions.rows) if (tr.dataset.chat === chat) return tr;
    return null;
  }

  function count(delta) {
    total.textContent = String(Math.max(0, Number(total.textContent) + delta));
  }

  function upsert(s) {
    const row = sessionRow(s);
    const old = findRow(s.chat_id);
    if (old) { old.replaceWith(row); return; }
    count(1);
    // Chat id order, as the server renders it.
    for (const tr of sessions.rows) {
      if (tr.dataset.chat > s.chat_id) { sessions.insertBefore(row, tr); return; }
    }
    sessions.appendChild(row);
  }

  function remove(chat) {
    const old = findRow(chat);
    if (old) { old.remove(); count(-1); }
  }

  function renderNodes(list) {
    nodes.replaceChildren(...list.map((n) => {
      const tr = document.createElement("tr");
      tr.dataset.node = n.node_id;
      tr.appendChild(el("td", n.node_id));
      tr.appendChild(el("td", `${n.live_sessions} / ${n.max_sessions === null ? "∞" : n.max_sessions}`));
      const cap = el("td");
      const meter = document.createElement("meter");
      meter.min = 0; meter.max = 100;
      meter.value = n.max_sessions ? Math.min(100, Math.round(100 * n.live_sessions / n.max_sessions)) : 0;
      cap.appendChild(meter);
      tr.appendChild(cap);
      const beat = el("td", "", "beat");
      beat.dataset.beat = n.beat_at || "";
      tr.appendChild(beat);
      tr.appendChild(el("td", n.draining ? "draining" : ""));
      return tr;
    }));
  }

  function tick() {
    const now = Date.now();
    for (const td of document.querySelectorAll("td.ttl")) {
      const left = (Date.parse(td.dataset.expires) - now) / 1000;
      td.textContent = duration(left);
      td.classList.toggle("expired", left <= 0);
    }
    for (const td of document.querySelectorAll("td.beat")) {
      td.textContent = td.dataset.beat ? `${duration((now - Date.parse(td.dataset.beat)) / 1000)} ago` : "never";
    }
  }

  function setTotal(n, count) {
    total.textContent = String(n);
    shown.textContent = n > count ? `(showing ${count} of ${n})` : "";
  }

  // What recent events said of each chat: the snapshot comes from the registry, which is
  // projected from the events a moment after them, so it may not show them yet.
  const RECENT_MS = 10000;
  const recent = new Map();

  async function resync() {
    const answer = await fetch("/ui/state", { credentials: "same-origin", cache: "no-store" });
    if (answer.status === 401) { window.location.assign("/ui"); return; }
    const snap = await answer.json();
    sessions.replaceChildren(...snap.sessions.map(sessionRow));
    renderNodes(snap.nodes);
    setTotal(snap.total, snap.shown);
    const cutoff = Date.now() - RECENT_MS;
    for (const [chat, seen] of recent) {
      if (seen.at < cutoff) { recent.delete(chat); continue; }
      apply(chat, seen.session);
    }
    tick();
  }

  function apply(chat, s) {
    if (s) upsert(s); else remove(chat);
  }

  function onEvent(item) {
    const li = el("li", null, `t-${item.type}`);
    li.appendChild(el("time", new Date(item.at).toLocaleTimeString()));
    li.appendChild(el("span", item.type, `status s-${item.type}`));
    li.appendChild(el("span", item.chat_id || `node ${item.node_id}`, "mono"));
    if (item.reason) li.appendChild(el("span", item.reason, "reason"));
    feed.prepend(li);
    while (feed.children.length > FEED_MAX) feed.lastChild.remove();
    const s = item.session;
    if (!item.chat_id || item.chat_id === "invalid") return;
    if (item.type === "rejected" || item.type === "reused") return;  // nothing changed
    const live = s && s.live && !TERMINAL.has(s.status) ? s : null;
    recent.set(item.chat_id, { at: Date.now(), session: live });
    apply(item.chat_id, live);
    tick();
  }

  function connect() {
    const source = new EventSource("/ui/feed");
    source.addEventListener("ready", () => {
      // Live once the page holds the state as of now (events since are applied on top).
      resync().then(() => {
        state.textContent = "live";
        document.body.dataset.feed = "live";
      }).catch(() => undefined);
    });
    source.addEventListener("event", (m) => onEvent(JSON.parse(m.data)));
    source.addEventListener("nodes", (m) => {
      const body = JSON.parse(m.data);
      renderNodes(body.nodes);
      setTotal(body.total, sessions.rows.length);
      tick();
    });
    source.addEventListener("resync", () => resync().catch(() => undefined));
    source.onerror = () => {
      state.textContent = "reconnecting…";
      document.body.dataset.feed = "down";
    };
  }

  tick();
  setInterval(tick, 1000);
  connect();
})();
