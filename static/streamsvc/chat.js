// The demo chat page: POST with fetch streaming (EventSource cannot POST),
// parse the SSE frames ourselves and show every state the layers send.
"use strict";

const history = [];
let controller = null;
let countdown = null;

const $ = (id) => document.getElementById(id);

function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : "";
}

function setState(state, text) {
  const el = $("state");
  el.dataset.state = state;
  el.textContent = text;
}

function addEntry(role, text) {
  const item = document.createElement("li");
  item.className = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  item.append(who, body);
  $("history").append(item);
  return item;
}

// Count down a Retry-After: a rate limit refilling, or a breaker's next probe.
function startCountdown(seconds, state = "rate_limited", label = "rate limited — retry in") {
  clearInterval(countdown);
  let left = seconds;
  const tick = () => {
    setState(state, `${label} ${left}s`);
    if (left <= 0) {
      clearInterval(countdown);
      setState("idle", "ready");
    }
    left -= 1;
  };
  tick();
  countdown = setInterval(tick, 1000);
}

// Split an SSE byte stream into {event, data, id} frames (WHATWG rules).
async function* sseFrames(reader) {
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    buffer = buffer.replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const frame = { event: "message", data: [], id: null };
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const at = line.indexOf(":");
        const field = at < 0 ? line : line.slice(0, at);
        const val = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
        if (field === "data") frame.data.push(val);
        else if (field === "event") frame.event = val;
        else if (field === "id") frame.id = val;
      }
      if (frame.data.length) yield { ...frame, data: frame.data.join("\n") };
    }
    if (done) return;
  }
}

function describeDone(data, text) {
  const reason = data.finish_reason;
  if (reason === "length") {
    return text
      ? ["cut_off", "cut off: the answer hit its token limit"]
      : ["cut_off", "cut off before any text: the token budget ran out"];
  }
  return ["done", `done (${reason}, ${data.usage.total_tokens} tokens)`];
}

async function send(prompt) {
  history.push({ role: "user", content: prompt });
  addEntry("user", prompt);
  const answer = addEntry("assistant", "");
  const textEl = answer.querySelector(".text");
  const payload = { messages: history.slice() };
  const provider = $("provider").value.trim();
  const maxTokens = $("max-tokens").value.trim();
  if (provider) payload.provider = provider;
  if (maxTokens) payload.max_tokens = Number(maxTokens);

  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  setState("connecting", "connecting…");
  let text = "";
  let ended = false;
  try {
    const response = await fetch("/api/v1/chat/stream", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
      body: JSON.stringify(payload),
      signal: controller.signal,
      credentials: "same-origin",
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      const err = body.error || { code: "http_" + response.status, message: "" };
      answer.classList.add("failed");
      textEl.textContent = `[${err.code}] ${err.message}`;
      if (err.code === "rate_limited" && err.retry_after) {
        startCountdown(err.retry_after);
      } else if (err.code === "provider_unavailable" && err.retry_after) {
        startCountdown(err.retry_after, "provider_unavailable",
                       `provider unavailable (${err.message}) — next probe in`);
      } else if (err.code === "provider_unavailable") {
        setState("provider_unavailable", `provider unavailable — ${err.message}`);
      } else {
        setState("error", `error: ${err.code}`);
      }
      history.pop();
      return;
    }
    for await (const frame of sseFrames(response.body.getReader())) {
      const data = JSON.parse(frame.data);
      if (frame.event === "queued") {
        setState("queued", `queued #${data.position}`);
      } else if (frame.event === "start") {
        setState("streaming", `streaming from ${data.provider}…`);
      } else if (frame.event === "token") {
        text += data.text;
        textEl.textContent = text;
      } else if (frame.event === "done") {
        ended = true;
        const [state, label] = describeDone(data, text);
        answer.classList.toggle("cut-off", state === "cut_off");
        setState(state, label);
        if (text) history.push({ role: "assistant", content: text });
      } else if (frame.event === "error") {
        ended = true;
        answer.classList.add("failed");
        textEl.textContent = text + (text ? "\n" : "") + `[${data.code}] ${data.message}`;
        if (data.code === "provider_unavailable") {
          setState("provider_unavailable", `provider unavailable — ${data.message}`);
        } else {
          setState("error", `error: ${data.code}`);
        }
      }
    }
    if (!ended) {
      answer.classList.add("failed");
      setState("error", "error: the stream ended without done or error");
    }
  } catch (err) {
    if (err.name === "AbortError") {
      setState("stopped", "stopped");
      if (text) history.push({ role: "assistant", content: text });
    } else {
      setState("error", `error: ${err.message}`);
    }
  } finally {
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || controller) return;
  $("prompt").value = "";
  send(prompt);
});

$("stop").addEventListener("click", () => {
  if (controller) controller.abort();
});

setState("idle", "ready");
