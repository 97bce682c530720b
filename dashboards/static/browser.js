// saestrata latent browser: plain JS, no dependencies, no fetch (data arrive as <script> files,
// so the page works from file:// and from `python -m http.server`). URL hash `#latent=N` selects a latent.
"use strict";
(function () {
  const D = window.DASH;
  const idx = D.index, vocab = D.vocab;
  D.blocks = D.blocks || {};
  const PAGE = 500;  // index rows rendered at once
  let sortKey = "density", sortDir = -1, shown = PAGE;

  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(x, digits) { return x === null || x === undefined ? "-" : Number(x).toPrecision(digits || 3); }
  function tokText(id) { return id < 0 ? "" : (vocab[id] !== undefined ? vocab[id] : "<" + id + ">"); }

  // ---- index ------------------------------------------------------------------------
  function facts() {
    document.getElementById("facts").textContent =
      `${idx.sae_name} (${idx.arch}, d_sae ${idx.d_sae}) on ${idx.hook}, ${idx.tokens} tokens of ${idx.store_name}; ` +
      `top ${idx.top_k} examples, +-${idx.context} tokens` + (idx.structure_kind ? `; ${idx.structure_kind}s: ${idx.groups.length}` : "");
    const sel = document.getElementById("group-filter");
    for (const g of idx.groups) sel.appendChild(el("option", { value: g }, g));
    if (!idx.groups.length) sel.parentElement.hidden = true;
  }

  function matches(row, q, group, hideDead) {
    if (hideDead && !row.fire_count) return false;
    if (group && row.group !== group) return false;
    if (!q) return true;
    const hay = row.top_tokens.concat(row.logit_top).join("\u0000").toLowerCase();
    return hay.includes(q) || String(row.latent) === q;
  }

  function renderIndex() {
    const q = document.getElementById("search").value.trim().toLowerCase();
    const group = document.getElementById("group-filter").value;
    const hideDead = document.getElementById("hide-dead").checked;
    const rows = idx.latents.filter(r => matches(r, q, group, hideDead));
    rows.sort((a, b) => {
      const x = a[sortKey], y = b[sortKey];
      if (x === y) return a.latent - b.latent;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * sortDir;
    });
    const body = document.querySelector("#latent-table tbody");
    body.textContent = "";
    for (const r of rows.slice(0, shown)) {
      const tr = el("tr", { "data-latent": r.latent });
      tr.appendChild(el("td", {}, r.latent));
      tr.appendChild(el("td", {}, r.group === null ? "" : r.group));
      tr.appendChild(el("td", {}, fmt(r.density)));
      tr.appendChild(el("td", {}, fmt(r.max)));
      tr.appendChild(el("td", {}, fmt(r.mean_firing)));
      tr.appendChild(el("td", { class: "tok" }, r.top_tokens.map(JSON.stringify).join(" ")));
      tr.appendChild(el("td", { class: "tok" }, r.logit_top.map(JSON.stringify).join(" ")));
      tr.addEventListener("click", () => { location.hash = "latent=" + r.latent; });
      body.appendChild(tr);
    }
    document.getElementById("count").textContent = `${rows.length} latents` + (rows.length > shown ? `, first ${shown} shown` : "");
    const more = document.getElementById("more");
    more.textContent = "";
    if (rows.length > shown) {
      const b = el("button", {}, "show more");
      b.addEventListener("click", () => { shown += PAGE; renderIndex(); });
      more.appendChild(b);
    }
    document.querySelectorAll("th[data-key]").forEach(th => {
      th.classList.toggle("sorted-asc", th.dataset.key === sortKey && sortDir > 0);
      th.classList.toggle("sorted-desc", th.dataset.key === sortKey && sortDir < 0);
    });
  }

  // ---- one latent -------------------------------------------------------------------
  function loadBlock(b, then) {
    if (D.blocks[b]) return then(D.blocks[b]);
    const s = el("script", { src: "data/" + idx.blocks[b].name + ".js" });
    s.onload = () => then(D.blocks[b]);
    s.onerror = () => { document.getElementById("latent-view").textContent = "cannot load " + s.src; };
    document.body.appendChild(s);
  }

  function exampleLine(ex, maxAct) {
    // ex = [global token index, value, token ids, acts]
    const [tokIndex, value, ids, acts] = ex;
    const div = el("div", { class: "example", "data-index": tokIndex });
    div.appendChild(el("span", { class: "val" }, fmt(value, 4)));
    const line = el("span", { class: "line" });
    div.appendChild(line);
    let peak = -1;
    ids.forEach((id, j) => { if (id >= 0 && (peak < 0 || acts[j] > acts[peak])) peak = j; });
    ids.forEach((id, j) => {
      const cls = ["tok"];
      if (id < 0) cls.push("outside");
      if (idx.special_ids.includes(id)) cls.push("special");
      if (j === idx.context) cls.push("centre");
      if (j === peak) cls.push("peak");
      const span = el("span", { class: cls.join(" "), "data-act": acts[j], title: `act ${fmt(acts[j], 4)}` }, tokText(id));
      const a = maxAct > 0 ? Math.max(0, Math.min(1, acts[j] / maxAct)) : 0;
      if (a > 0) span.style.background = `rgba(232, 114, 28, ${(0.15 + 0.85 * a).toFixed(3)})`;
      line.appendChild(span);
    });
    return div;
  }

  function histogram(counts) {
    const edges = idx.hist_edges;
    let lo = counts.findIndex(c => c > 0), hi = counts.length - 1 - [...counts].reverse().findIndex(c => c > 0);
    if (lo < 0) return el("div", {}, "never fired");
    const w = 360, h = 110, n = hi - lo + 1, bw = w / n, top = Math.max(...counts);
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", w); svg.setAttribute("height", h + 18); svg.setAttribute("class", "hist");
    for (let j = lo; j <= hi; j++) {
      const r = document.createElementNS(ns, "rect"), bh = h * counts[j] / top;
      r.setAttribute("x", (j - lo) * bw); r.setAttribute("y", h - bh); r.setAttribute("width", Math.max(bw - 1, 1));
      r.setAttribute("height", bh); r.setAttribute("class", "bar");
      const t = document.createElementNS(ns, "title");
      t.textContent = `${fmt(edges[j])} .. ${fmt(edges[j + 1])}: ${counts[j]}`; r.appendChild(t);
      svg.appendChild(r);
    }
    for (const [j, x] of [[lo, 0], [hi + 1, w - 40]]) {
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", x); t.setAttribute("y", h + 14); t.setAttribute("class", "axis"); t.textContent = fmt(edges[j], 2);
      svg.appendChild(t);
    }
    return svg;
  }

  function logitTable(title, rows) {
    const t = el("table", { class: "logits" });
    t.appendChild(el("caption", {}, title));
    for (const [s, v] of rows) {
      const tr = el("tr");
      tr.appendChild(el("td", { class: "tok" }, JSON.stringify(s)));
      tr.appendChild(el("td", { class: "v" }, fmt(v, 3)));
      t.appendChild(tr);
    }
    return t;
  }

  function renderLatent(i) {
    const view = document.getElementById("latent-view");
    const b = Math.floor(i / idx.block_size);
    if (!(i >= 0 && i < idx.d_sae)) { view.textContent = "no latent " + i; return; }
    loadBlock(b, block => {
      const L = block.latents[i - idx.blocks[b].first], row = idx.latents[i];
      view.textContent = "";
      const back = el("a", { href: "#", class: "back" }, "\u2190 all latents");
      view.appendChild(back);
      view.appendChild(el("h2", { id: "latent-title" }, `latent ${i}` + (row.group ? ` (${row.group})` : "")));
      const st = L.stats;
      view.appendChild(el("p", { class: "stats" },
        `density ${fmt(st.density)} (${st.fire_count} tokens), max ${fmt(st.max, 4)}, mean over firing tokens ` +
        `${fmt(st.mean_firing)}, mean over all tokens ${fmt(st.mean_all)}`));
      const s = L.structure;
      if (s && (s.parent >= 0 || (s.children && s.children.length))) {
        const p = el("p", { class: "structure" });
        if (s.parent >= 0) { p.append("parent: "); p.appendChild(el("a", { href: "#latent=" + s.parent }, s.parent)); p.append(" "); }
        if (s.children && s.children.length) {
          p.append("children: ");
          s.children.forEach(c => { p.appendChild(el("a", { href: "#latent=" + c }, c)); p.append(" "); });
        }
        view.appendChild(p);
      }
      const panels = el("div");
      const hp = el("div", { class: "panel" });
      hp.appendChild(el("h3", {}, "activation histogram (log-spaced bins)"));
      hp.appendChild(histogram(L.hist));
      panels.appendChild(hp);
      if (L.logits) {
        const lp = el("div", { class: "panel" });
        lp.appendChild(el("h3", {}, "logit effects (direction \u00b7 W_U)"));
        lp.appendChild(logitTable("top", L.logits.top));
        lp.appendChild(logitTable("bottom", L.logits.bottom));
        panels.appendChild(lp);
      }
      view.appendChild(panels);
      view.appendChild(el("h3", {}, `top ${L.top.length} activations`));
      const topDiv = el("div", { id: "top-examples" });
      const maxAct = st.max || 0;
      L.top.forEach(ex => topDiv.appendChild(exampleLine(ex, maxAct)));
      view.appendChild(topDiv);
      L.quantiles.slice().reverse().forEach((q, j) => {
        if (!q.examples.length) return;
        view.appendChild(el("h3", {}, `quantile interval ${L.quantiles.length - j} of ${L.quantiles.length}: ` +
          `activations ${fmt(q.bounds[0], 2)} .. ${fmt(q.bounds[1], 2)}`));
        const qd = el("div", { class: "quantile" });
        q.examples.forEach(ex => qd.appendChild(exampleLine(ex, maxAct)));
        view.appendChild(qd);
      });
      document.body.setAttribute("data-ready", "latent-" + i);
    });
  }

  function route() {
    const m = /latent=(\d+)/.exec(location.hash);
    document.getElementById("index-view").hidden = !!m;
    document.getElementById("latent-view").hidden = !m;
    if (m) renderLatent(parseInt(m[1], 10));
    else document.body.setAttribute("data-ready", "index");
  }

  facts();
  document.getElementById("search").addEventListener("input", () => { shown = PAGE; renderIndex(); });
  document.getElementById("group-filter").addEventListener("change", renderIndex);
  document.getElementById("hide-dead").addEventListener("change", renderIndex);
  document.querySelectorAll("th[data-key]").forEach(th => th.addEventListener("click", () => {
    if (sortKey === th.dataset.key) sortDir = -sortDir; else { sortKey = th.dataset.key; sortDir = th.dataset.key === "latent" ? 1 : -1; }
    renderIndex();
  }));
  window.addEventListener("hashchange", route);
  renderIndex();
  route();
})();
