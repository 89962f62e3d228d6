// The status page: one snapshot a second over SSE, drawn without libraries.
"use strict";

const $ = (id) => document.getElementById(id);

const COLORS = ["#3366cc", "#c62828"];

// Draw one or more series (null = no data) on a shared scale.
function spark(canvas, values, ...more) {
  const ctx = canvas.getContext("2d");
  const w = (canvas.width = canvas.clientWidth);
  const h = (canvas.height = canvas.clientHeight);
  ctx.clearRect(0, 0, w, h);
  const all = [values, ...more];
  const max = Math.max(1e-9, ...all.flat().filter((v) => v !== null));
  all.forEach((series, n) => {
    ctx.strokeStyle = COLORS[n % COLORS.length];
    ctx.beginPath();
    let pen = false;
    series.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      const x = (i / Math.max(1, series.length - 1)) * w;
      const y = h - (v / max) * (h - 4) - 2;
      if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      pen = true;
    });
    ctx.stroke();
  });
  ctx.fillStyle = "#667";
  ctx.fillText(`max ${Number(max.toPrecision(3))}`, 4, 10);
}

function when(epoch) {
  return epoch ? new Date(epoch * 1000).toLocaleTimeString() : "";
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
  const series = data.history.series;
  for (const name of ["limit_admitted", "rate_limited", "decided_local", "queued"]) {
    spark($("chart-" + name), series.map((s) => s[name] || 0));
  }
  // Levels are sampled while a status page is open; gaps stay gaps.
  for (const name of ["pool_in_use", "queue_depth"]) {
    spark($("chart-" + name), series.map((s) => (name in s ? s[name] : null)));
  }
  const ttft = data.history.ttft_series || [];
  spark($("chart-ttft"), ttft.map((b) => b.p50), ttft.map((b) => b.p99));
  rows($("breakers"), (data.breakers || []).map((b) => [
    [b.provider], [b.state, b.state],
    [`${b.window_failures}/${b.window_calls} failed, ${b.failures} in a row`],
    [b.next_probe_at ? `probe at ${when(b.next_probe_at)}` : ""],
  ]));
  rows($("transitions"), data.transitions.map((e) => [
    [when(e.at)], [e.provider], [e.state, e.state], [e.reason],
  ]));
}

function connect() {
  const source = new EventSource("/status/events");
  source.addEventListener("status", (e) => render(JSON.parse(e.data)));
  source.onerror = () => { $("feed-state").textContent = "reconnecting…"; };
}

connect();
