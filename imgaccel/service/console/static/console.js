// Live updates for the imgaccel console. An element with data-live="<url>" listens to that
// server-sent event stream (/ui/live/...), whose events carry HTML fragments rendered (and
// escaped) by the server from the same templates as the page:
//   {"items": [[key, html], ...]}  a list: keep the children whose data-key is unchanged,
//                                   replace changed ones, insert new ones in order, drop the rest;
//   {"html": ..., "final": bool}   one record: replace the element's content; final closes.
// Fragments are parsed in a <template> (inert) and the page's Content-Security-Policy allows
// no inline script. An element that holds the keyboard focus is not replaced while it does
// (the next update brings it up to date). Without JavaScript the pages are plain
// server-rendered HTML that reload themselves while something runs.
"use strict";
(function () {
  const shown = new WeakMap(); // element -> the fragment it was made from
  const loadedAt = Date.now();

  function parse(html) {
    const t = document.createElement("template");
    t.innerHTML = html;
    return t.content;
  }
  function focused(node) {
    const a = document.activeElement;
    return a && a !== document.body && node.contains(a);
  }

  function applyItems(box, items) {
    const known = new Map();
    for (const child of Array.from(box.children)) {
      if (child.dataset.key !== undefined) known.set(child.dataset.key, child);
    }
    let prev = null;
    const keep = new Set();
    for (const [key, html] of items) {
      keep.add(key);
      let node = known.get(key);
      if (!node || (shown.get(node) !== html && !focused(node))) {
        const fresh = parse(html).firstElementChild;
        if (!fresh) continue;
        shown.set(fresh, html);
        if (node) node.replaceWith(fresh);
        node = fresh;
      }
      const want = prev ? prev.nextElementSibling : box.firstElementChild;
      if (want !== node && !focused(node)) {
        if (prev) prev.after(node); else box.prepend(node);
      }
      prev = node;
    }
    for (const [key, node] of known) {
      if (!keep.has(key) && !focused(node)) node.remove();
    }
  }

  function listen(el) {
    const status = document.getElementById("live");
    const source = new EventSource(el.dataset.live);
    source.addEventListener("update", function (e) {
      const data = JSON.parse(e.data);
      if (status) status.textContent = "";
      if (data.items) {
        applyItems(el, data.items);
      } else if (data.html !== undefined) {
        if (!focused(el) || data.final) el.replaceChildren(parse(data.html));
        if (data.final) source.close();
      }
    });
    source.addEventListener("paused", function (e) {
      if (status) status.textContent = "Live updates paused: " + JSON.parse(e.data).error;
    });
    source.onerror = function () {
      if (source.readyState !== EventSource.CLOSED) {
        if (status) status.textContent = "Live updates paused: reconnecting to the service...";
      } else if (Date.now() - loadedAt > 5000) {
        location.reload(); // refused (logged out, or another token): the page says why
      } else if (status) {
        status.textContent = "Live updates stopped: reload the page.";
      }
    };
  }

  document.addEventListener("DOMContentLoaded", function () {
    if (!window.EventSource) return;
    for (const el of document.querySelectorAll("[data-live]")) listen(el);
  });
})();
