// The live page of `pkttrace serve`: JavaScript's standard library only.
//
// The drawing is the server's (diagram.svg, tracer/diagram.py); this script
// only changes texts and classes in it, by the ids the server gave.  Every
// `interval` seconds it reads flow.json: counters since serve started.  A
// rate is the difference between two reads divided by the time between them
// (the server's clock, `t`), so the first read shows totals only.  Names
// (netns, tables, drop reasons) come from the host: they are only ever set
// with textContent, never parsed as HTML.
"use strict";

(function () {
  const params = new URLSearchParams(window.location.search);
  let interval = Number(params.get("interval") || "2");
  if (!(interval >= 0.5 && interval <= 300)) {
    interval = 2;
  }
  let netns = params.has("netns") ? params.get("netns") : null;   // null: the server's first
  let prev = null;          // the previous flow.json answer (same netns)
  let layout = null;        // data-layout of the drawing shown
  let selected = null;      // the box whose details the panel shows
  let current = null;       // {flow, rates} of the last update
  let timer = null;
  let loop = 0;             // a netns change starts a new loop; the old one ends
  let updates = 0;

  const byId = (id) => document.getElementById(id);

  function fmtRate(r) {
    if (r === null || r === undefined) {
      return "–";
    }
    if (r === 0) {
      return "0/s";
    }
    if (r >= 1000) {
      return (r / 1000).toFixed(1) + "k/s";
    }
    if (r >= 100) {
      return r.toFixed(0) + "/s";
    }
    if (r >= 10) {
      return r.toFixed(1) + "/s";
    }
    return r.toFixed(2) + "/s";
  }

  function fmtCount(n) {
    return Number(n).toLocaleString("en-US");
  }

  function rate(cur, old, dt) {
    // a counter that went down was reset (the netns was traced anew)
    if (old === undefined || old === null || !(dt > 0) || cur < old) {
      return null;
    }
    return (cur - old) / dt;
  }

  function setText(id, text) {
    const el = byId(id);
    if (el) {
      el.textContent = text;
    }
  }

  function setClass(el, name, on) {
    if (el) {
      el.classList.toggle(name, on);
    }
  }

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) {
      td.className = cls;
    }
    tr.appendChild(td);
    return td;
  }

  function dropKey(d) {
    return [d.reason, d.stage, d.table, d.box].join("\u0000");
  }

  async function loadDrawing(ns) {
    const r = await fetch("diagram.svg?netns=" + encodeURIComponent(ns), {cache: "no-store"});
    if (!r.ok) {
      throw new Error("diagram.svg: HTTP " + r.status);
    }
    const doc = new DOMParser().parseFromString(await r.text(), "image/svg+xml");
    if (doc.documentElement.nodeName !== "svg") {
      throw new Error("diagram.svg: not an SVG document");
    }
    const svg = document.importNode(doc.documentElement, true);
    byId("drawing").replaceChildren(svg);
    layout = svg.getAttribute("data-layout");
    for (const g of svg.querySelectorAll("g.box")) {
      const box = g.getAttribute("data-box");
      g.addEventListener("click", () => select(box));
      g.addEventListener("keydown", (e) => {
        if (e.key === "Enter" || e.key === " ") {
          select(box);
        }
      });
    }
    if (selected) {
      select(selected);
    }
  }

  function compute(flow, old, dt) {
    const rates = {boxes: {}, drops: {}, edges: {}, other: {}, tables: {}, dropList: {}, fates: {}};
    for (const [id, b] of Object.entries(flow.boxes)) {
      const o = old ? old.boxes[id] : undefined;
      rates.boxes[id] = rate(b.packets, o && o.packets, dt);
      rates.drops[id] = rate(b.drops, o && o.drops, dt);
    }
    for (const kind of ["edges", "other", "fates"]) {
      for (const [k, n] of Object.entries(flow[kind])) {
        rates[kind][k] = rate(n, old ? (old[kind][k] || 0) : undefined, dt);
      }
    }
    for (const [hook, rows] of Object.entries(flow.tables)) {
      const before = {};
      if (old && old.tables[hook]) {
        for (const r of old.tables[hook]) {
          before[r.table] = r;
        }
      }
      rates.tables[hook] = rows.map((r) => ({
        packets: rate(r.packets, old ? (before[r.table] ? before[r.table].packets : 0) : undefined, dt),
        drops: rate(r.drops, old ? (before[r.table] ? before[r.table].drops : 0) : undefined, dt),
      }));
    }
    const before = {};
    if (old) {
      for (const d of old.drops) {
        before[dropKey(d)] = d.packets;
      }
    }
    for (const d of flow.drops) {
      rates.dropList[dropKey(d)] = rate(d.packets, old ? (before[dropKey(d)] || 0) : undefined, dt);
    }
    return rates;
  }

  function edgeClass(r, total) {
    if (!total || r === 0) {
      return "idle";
    }
    if (r === null) {
      return "f1";
    }
    return r >= 100 ? "f3" : r >= 10 ? "f2" : "f1";
  }

  function draw(flow, rates) {
    setText("caption", "netns " + (flow.selected || "(this host)"));
    for (const [id, b] of Object.entries(flow.boxes)) {
      const r = rates.boxes[id];
      setText("rate-" + id, id === "drop" ? "" : fmtRate(r) + "  (" + fmtCount(b.packets) + ")");
      const dr = rates.drops[id];
      setText("drop-" + id, b.drops ? "✕ " + fmtRate(dr) + "  (" + fmtCount(b.drops) + ")" : "");
      const g = byId("box-" + id);
      setClass(g, "busy", r > 0);
      setClass(g, "dropping", dr > 0);
    }
    for (const [k, n] of Object.entries(flow.edges)) {
      const id = k.replace(">", "-");
      const r = rates.edges[k];
      setText("el-" + id, n ? fmtRate(r) : "");
      const path = byId("edge-" + id);
      if (path) {
        path.setAttribute("class", "edge " + edgeClass(r, n));
      }
    }
    for (const [hook, rows] of Object.entries(flow.tables)) {
      rows.forEach((row, i) => {
        const r = rates.tables[hook][i];
        setText("tv-" + hook + "-" + i, fmtRate(r.packets) + (row.drops ? "  ✕ " + fmtRate(r.drops) : ""));
      });
    }
    // the drop box: the most frequent reasons
    for (let i = 0; i < 12; i++) {
      const d = flow.drops[i];
      let text = "";
      if (d) {
        const where = d.stage + (d.table ? " / " + d.table : "");
        text = fmtRate(rates.dropList[dropKey(d)]) + "  " + fmtCount(d.packets) + "  " + d.reason + " @ " + where;
        if (text.length > 52) {
          text = text.slice(0, 51) + "…";
        }
      }
      setText("dr-" + i, text);
    }
    const total = flow.boxes.drop.drops;
    setText("rate-drop", fmtRate(rates.drops.drop) + "  (" + fmtCount(total) + ")");
    fillDrops(byId("drops"), flow.drops, rates, true);
    fillCounts(byId("fates"), flow.fates, rates.fates, (k) => k);
    fillCounts(byId("other"), flow.other, rates.other, (k) => k.replace(">", " → "));
  }

  function fillDrops(table, drops, rates, withStage) {
    const tbody = table.tBodies[0];
    const rows = [];
    for (const d of drops) {
      const tr = document.createElement("tr");
      tr.className = "drop";
      cell(tr, d.reason);
      if (withStage) {
        cell(tr, d.stage);
      }
      cell(tr, d.table || "–");
      cell(tr, fmtRate(rates.dropList[dropKey(d)]), "num");
      cell(tr, fmtCount(d.packets), "num drop-count");
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
  }

  function fillCounts(table, counts, rates, label) {
    const rows = [];
    for (const [k, n] of Object.entries(counts).sort((a, b) => b[1] - a[1])) {
      const tr = document.createElement("tr");
      cell(tr, label(k));
      cell(tr, fmtRate(rates[k]), "num");
      cell(tr, fmtCount(n), "num");
      rows.push(tr);
    }
    table.tBodies[0].replaceChildren(...rows);
  }

  function select(box) {
    const svg = byId("drawing").firstElementChild;
    if (svg) {
      for (const g of svg.querySelectorAll("g.box.selected")) {
        g.classList.remove("selected");
      }
      setClass(byId("box-" + box), "selected", true);
    }
    selected = box;
    panel();
  }

  function panel() {
    if (!selected || !current) {
      return;
    }
    const {flow, rates} = current;
    const g = byId("box-" + selected);
    const title = g ? g.querySelector(".title") : null;
    const note = g ? g.querySelector(".note") : null;
    setText("panel-title", (title ? title.textContent : selected) + (note ? " — " + note.textContent : ""));
    const b = flow.boxes[selected];
    setText("panel-summary", selected === "drop"
      ? fmtCount(b.drops) + " packets dropped (" + fmtRate(rates.drops[selected]) + ")"
      : fmtCount(b.packets) + " packets (" + fmtRate(rates.boxes[selected]) + "), " + fmtCount(b.drops) +
        " dropped here (" + fmtRate(rates.drops[selected]) + ")");
    const rows = [];
    (flow.tables[selected] || []).forEach((t, i) => {
      const tr = document.createElement("tr");
      cell(tr, t.table);
      cell(tr, t.priority === null ? "–" : String(t.priority), "num");
      cell(tr, fmtRate(rates.tables[selected][i].packets) + " (" + fmtCount(t.packets) + ")", "num");
      cell(tr, fmtRate(rates.tables[selected][i].drops) + " (" + fmtCount(t.drops) + ")", "num");
      rows.push(tr);
    });
    byId("panel-tables").tBodies[0].replaceChildren(...rows);
    const here = flow.drops.filter((d) => selected === "drop" || d.box === selected).slice(0, 8);
    fillDrops(byId("panel-drops"), here, rates, false);
  }

  function fillNetns(flow) {
    const label = byId("netns-label");
    const sel = byId("netns");
    label.hidden = flow.netns.length < 2;
    const have = Array.from(sel.options, (o) => o.value);
    if (have.join("\u0000") !== flow.netns.join("\u0000")) {
      sel.replaceChildren(...flow.netns.map((n) => {
        const o = document.createElement("option");
        o.value = n;
        o.textContent = n || "(this host)";
        return o;
      }));
    }
    sel.value = flow.selected;
  }

  async function update(gen) {
    try {
      const url = "flow.json" + (netns !== null ? "?netns=" + encodeURIComponent(netns) : "");
      const r = await fetch(url, {cache: "no-store"});
      if (!r.ok) {
        throw new Error("flow.json: HTTP " + r.status);
      }
      const flow = await r.json();
      if (gen !== loop) {
        return;           // the netns was changed meanwhile: this answer is stale
      }
      netns = flow.selected;
      fillNetns(flow);
      if (flow.layout !== layout) {
        await loadDrawing(flow.selected);
      }
      const old = prev && prev.selected === flow.selected ? prev : null;
      const rates = compute(flow, old, old ? flow.t - old.t : 0);
      current = {flow, rates};
      draw(flow, rates);
      panel();
      prev = flow;
      updates += 1;
      document.body.setAttribute("data-updates", String(updates));
      const status = byId("status");
      status.classList.remove("error");
      status.textContent = "updated " + new Date().toLocaleTimeString() + (old ? "" : " (rates from the next read)");
    } catch (e) {
      const status = byId("status");
      status.classList.add("error");
      status.textContent = "error: " + e.message;
    } finally {
      if (gen === loop) {
        timer = window.setTimeout(() => update(gen), interval * 1000);
      }
    }
  }

  byId("netns").addEventListener("change", (e) => {
    netns = e.target.value;
    prev = null;
    layout = null;
    window.clearTimeout(timer);
    loop += 1;
    update(loop);
  });
  setText("interval", String(interval));
  update(loop);
}());
