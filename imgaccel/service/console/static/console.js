// Live updates for the imgaccel console: polls the API (under /ui, where the session cookie
// goes) every 2 s and updates the page in place. Everything is set with textContent; without
// JavaScript the pages are plain server-rendered HTML.
"use strict";
(function () {
  const PERIOD = 2000;
  const TERMINAL_JOB = ["succeeded", "failed", "skipped"];
  const TERMINAL_TASK = ["succeeded", "failed", "cancelled"];

  function size(n) {
    n = n || 0;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? String(n) : n.toFixed(1)) + " " + units[i];
  }
  function duration(start, end) {
    if (!start) return "";
    const s = (end || Date.now() / 1000) - start;
    return s < 120 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
  }
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined) e.textContent = text;
    if (cls) e.className = cls;
    return e;
  }
  function setText(root, field, text) {
    const e = root.querySelector('[data-field="' + field + '"]');
    if (e && e.textContent !== text) e.textContent = text;
    return e;
  }
  async function getJSON(url) {
    const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (r.status === 401) { location.href = "/ui/login"; throw new Error("logged out"); }
    if (!r.ok) throw new Error(url + ": " + r.status);
    return r.json();
  }
  function every(fn) {
    const live = document.getElementById("live");
    async function tick() {
      try { await fn(); if (live) live.textContent = ""; }
      catch (e) { if (live) live.textContent = "Live updates paused: " + e.message; }
      setTimeout(tick, PERIOD);
    }
    setTimeout(tick, PERIOD);
  }

  function jobRow(j) {
    const tr = el("tr");
    tr.dataset.id = j.id;
    const a = el("a", j.id);
    a.href = "/ui/jobs/" + encodeURIComponent(j.id);
    const td = el("td"); td.appendChild(a); tr.appendChild(td);
    const st = el("td"); st.appendChild(el("span", j.state, "state state-" + j.state)); tr.appendChild(st);
    const source = j.registry + "/" + j.repository + (j.tags.length ? ":" + j.tags.join(",") : "@" + j.digest);
    tr.appendChild(el("td", source + " → " + (j.target || "")));
    tr.appendChild(el("td", j.mode));
    tr.appendChild(el("td", size(j.size_before)));
    tr.appendChild(el("td", size(j.size_after)));
    tr.appendChild(el("td", duration(j.started_at, j.finished_at)));
    return tr;
  }

  function jobsPage(tbody) {
    every(async function () {
      const body = await getJSON(tbody.dataset.api);
      const rows = body.jobs.map(jobRow);
      if (!rows.length) {
        const tr = el("tr", undefined, "empty"); const td = el("td", "No jobs."); td.colSpan = 7;
        tr.appendChild(td); rows.push(tr);
      }
      tbody.replaceChildren(...rows);
    });
  }

  function jobPage(main) {
    const id = main.dataset.job;
    const wasTerminal = TERMINAL_JOB.includes(main.dataset.state);
    every(async function () {
      const j = await getJSON("/ui/api/v1/jobs/" + encodeURIComponent(id));
      if (!wasTerminal && TERMINAL_JOB.includes(j.state)) { location.reload(); return; }
      const st = setText(main, "state", j.state);
      if (st) st.className = "state state-" + j.state;
      setText(main, "target", j.target || "");
      setText(main, "attempts", String(j.attempts));
      const err = setText(main, "error", j.last_error || j.skip_reason || "none");
      if (err) err.className = (j.last_error || j.skip_reason) ? "error" : "quiet";
      const p = j.progress || {};
      const bar = main.querySelector('[data-field="progress"]');
      if (bar) { bar.max = p.bytes_total || 1; bar.value = p.bytes_done || 0; }
      setText(main, "bytes", size(p.bytes_done) + " of " + size(p.bytes_total));
      if (p.layers_started !== undefined) {
        setText(main, "layers", "Layers: " + p.layers_done + " done of " + p.layers_started + " started (" +
          p.layers_reused + " reused); " + j.layers + " in the image.");
      }
    });
  }

  function prewarmPage(box) {
    every(async function () {
      const body = await getJSON(box.dataset.api);
      for (const t of body.tasks) {
        const card = box.querySelector('[data-task="' + CSS.escape(t.id) + '"]');
        if (!card) continue;
        if (!TERMINAL_TASK.includes(card.dataset.state) && TERMINAL_TASK.includes(t.state)) {
          // finished: reload for the "save as template" form, unless the user is typing
          const active = document.activeElement;
          if (!active || !active.matches("input, textarea, select")) { location.reload(); return; }
        }
        const st = setText(card, "state", t.state);
        if (st) st.className = "state state-" + t.state;
        setText(card, "bytes", size(t.bytes_done) + " of " + size(t.bytes_total));
        setText(card, "message", t.message || "");
        for (const g of t.targets) {
          const row = card.querySelector('[data-target="' + CSS.escape(g.name) + '"]');
          if (!row) continue;
          setText(row, "tstate", g.state);
          setText(row, "tbytes", size(g.bytes_done) + " of " + size(g.bytes_total));
          const bar = row.querySelector("progress");
          if (bar) { bar.max = g.bytes_total || 1; bar.value = g.bytes_done; }
        }
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    const jobs = document.getElementById("jobs");
    if (jobs) jobsPage(jobs);
    const main = document.querySelector("main[data-job]");
    if (main) jobPage(main);
    const tasks = document.getElementById("tasks");
    if (tasks) prewarmPage(tasks);
  });
})();
