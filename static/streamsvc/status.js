// The status page: one snapshot a second over SSE, drawn without libraries.
"use strict";

const $ = (id) => document.getElementById(id);

function spark(canvas, values) {
  const ctx = canvas.getContext("2d");
  const w = (canvas.width = canvas.clientWidth);
  const h = (canvas.height = canvas.clientHeight);
  ctx.clearRect(0, 0, w, h);
  const max = Math.max(1, ...values);
  ctx.strokeStyle = "#3366cc";
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = (i / Math.max(1, values.length - 1)) * w;
    const y = h - (v / max) * (h - 4) - 2;
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
  ctx.fillStyle = "#667";
  ctx.fillText(`max ${max}`, 4, 10);
}

function rows(table, items) {
  table.replaceChildren(...items.map((cells) => {
    const tr = document.createElement("tr");
    for (const [text, cls] of cells) {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      tr.append(td);
    }
    return tr;
  }));
}

function render(data) {
  if (data.error) { $("feed-state").textContent = data.error; return; }
  $("feed-state").textContent = "live · " + new Date(data.now * 1000).toLocaleTimeString();
  const pool = data.pool || {};
  $("pool").textContent = pool.in_use !== undefined ? `${pool.in_use} / ${pool.global_max}` : "–";
  $("pool-users").textContent = (pool.busiest || []).map((u) => `${u.caller}: ${u.in_use}`).join(", ");
  $("queue-depth").textContent = data.queue.depth;
  $("queue-wait").textContent = `oldest wait ${data.queue.oldest_wait_seconds}s`;
  $("workers").textContent = data.queue.workers;
  $("workers-busy").textContent = `${data.queue.busy_workers} busy`;
  const t = data.history.ttft;
  $("ttft").textContent = t.p50 === null ? "–" : `${(t.p50 * 1000).toFixed(0)} ms`;
  $("ttft-count").textContent = t.p99 === null ? "" : `p99 ${(t.p99 * 1000).toFixed(0)} ms · ${t.count} samples`;
  for (const name of ["admitted", "rate_limited", "decided_local", "queued"]) {
    spark($("chart-" + name), data.history.series.map((s) => s[name] || 0));
  }
  rows($("breakers"), (data.breakers || []).map((b) => [[b.provider], [b.state, b.state]]));
  rows($("transitions"), data.transitions.map((e) => [
    [new Date(e.at * 1000).toLocaleTimeString()], [e.provider], [e.state, e.state], [e.reason],
  ]));
}

function connect() {
  const source = new EventSource("/status/events");
  source.addEventListener("status", (e) => render(JSON.parse(e.data)));
  source.onerror = () => { $("feed-state").textContent = "reconnecting…"; };
}

connect();
