// hearth's chat page: no build step, no network but this server. Model output is
// Markdown rendered by marked with raw HTML escaped, then sanitized by DOMPurify;
// conversations live in localStorage.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const store = {
    get(k, d) {
      try { const v = localStorage.getItem("hearth." + k); return v === null ? d : JSON.parse(v); } catch { return d; }
    },
    set(k, v) {
      try { localStorage.setItem("hearth." + k, JSON.stringify(v)); } catch (e) { console.warn("localStorage:", e); }
    },
  };

  let convs = store.get("conversations", []); // [{id, title, model, messages: [{role, content, ...}]}]
  let current = store.get("current", null);
  const settings = Object.assign({ system: "", temperature: 0.7, max_tokens: 512, model: "" }, store.get("settings", {}));
  let controller = null; // the AbortController of the answer streaming now
  let loaded = new Set(); // models the server holds (/api/ps)

  // -- Markdown, safely ---------------------------------------------------------------
  const esc = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  // raw HTML in an answer is shown as the text it is, never parsed
  window.marked.use({
    gfm: true, breaks: true,
    renderer: { html: (t) => (t.block ? `<p class="raw">${esc(t.text)}</p>` : esc(t.text)) },
  });
  window.DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer"); }
  });
  const PURIFY = { FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select"], FORBID_ATTR: ["style"] };

  function renderMarkdown(target, text) {
    target.innerHTML = window.DOMPurify.sanitize(window.marked.parse(text), PURIFY);
    for (const pre of target.querySelectorAll("pre")) {
      const b = el("button", "copy", "copy");
      b.type = "button";
      b.addEventListener("click", () => navigator.clipboard && navigator.clipboard.writeText(pre.querySelector("code")?.textContent ?? pre.textContent));
      pre.prepend(b);
    }
  }

  // -- the API, with the key when the server wants one ------------------------------------
  let asking = null;
  function askKey(wrong) {
    if (!asking) {
      asking = new Promise((resolve) => {
        const dlg = $("key-dialog");
        $("key-error").hidden = !wrong;
        $("key").value = "";
        dlg.addEventListener("close", () => {
          asking = null;
          const k = $("key").value.trim();
          if (dlg.returnValue === "ok" && k) store.set("apiKey", k);
          resolve(dlg.returnValue === "ok" && !!k);
        }, { once: true });
        dlg.returnValue = "";
        dlg.showModal();
      });
    }
    return asking;
  }

  async function api(path, opts = {}) {
    for (;;) {
      const key = store.get("apiKey", "");
      const headers = { ...(opts.headers || {}) };
      if (key) headers.Authorization = "Bearer " + key;
      if (opts.body !== undefined) headers["Content-Type"] = "application/json";
      const r = await fetch(path, { ...opts, headers });
      if (r.status !== 401 || !(await askKey(!!key))) return r;
    }
  }

  async function errorText(r) {
    try {
      const e = (await r.json()).error;
      return typeof e === "string" ? e : (e && e.message) || `${r.status} ${r.statusText}`;
    } catch { return `${r.status} ${r.statusText}`; }
  }

  // -- models ---------------------------------------------------------------------------
  function setModelState(kind, text) {
    const s = $("model-state");
    s.dataset.state = kind;
    s.textContent = text;
  }
  function showModelState() {
    const m = $("model").value;
    if (m) setModelState(loaded.has(m) ? "ready" : "unloaded", loaded.has(m) ? "loaded" : "loads on first use");
  }

  async function refreshModels() {
    const sel = $("model");
    try {
      const h = await fetch("health"); // 503 "loading" while the startup models load
      const starting = h.status === 503 && (await h.json()).status === "loading";
      const [r, ps] = await Promise.all([api("v1/models"), api("api/ps")]);
      if (!r.ok) throw new Error(await errorText(r));
      const ids = (await r.json()).data.map((d) => d.id);
      loaded = new Set(ps.ok ? (await ps.json()).models.map((m) => m.name) : []);
      const want = sel.value || settings.model;
      sel.replaceChildren(...ids.map((id) => {
        const o = el("option", "", loaded.has(id) ? `${id} ●` : id);
        o.value = id;
        return o;
      }));
      if (ids.includes(want)) sel.value = want;
      if (sel.dataset.loading === sel.value) return;
      if (starting) {
        setModelState("loading", "the server is loading its models…");
        setTimeout(refreshModels, 1000);
      } else showModelState();
    } catch (e) { setModelState("error", e.message); }
  }

  async function pickModel() {
    const m = $("model").value;
    settings.model = m;
    store.set("settings", settings);
    if (loaded.has(m)) return showModelState();
    // Ollama's way to load a model: an empty prompt
    $("model").dataset.loading = m;
    setModelState("loading", `loading ${m}…`);
    try {
      const r = await api("api/generate", { method: "POST", body: JSON.stringify({ model: m, prompt: "", stream: false }) });
      if (!r.ok) throw new Error(await errorText(r));
      delete $("model").dataset.loading;
      await refreshModels();
    } catch (e) {
      delete $("model").dataset.loading;
      if ($("model").value === m) setModelState("error", `${m}: ${e.message}`);
    }
  }

  // -- conversations ----------------------------------------------------------------------
  const conv = () => convs.find((c) => c.id === current);
  function save() { store.set("conversations", convs); store.set("current", current); }

  function renderList() {
    const ul = $("conversations");
    ul.replaceChildren(...convs.map((c) => {
      const li = el("li", c.id === current ? "current" : "");
      const open = el("button", "open", c.title);
      open.type = "button";
      open.addEventListener("click", () => { if (!controller) select(c.id); });
      const del = el("button", "delete", "×");
      del.type = "button";
      del.title = "Delete";
      del.setAttribute("aria-label", "Delete");
      del.addEventListener("click", () => { if (!controller || c.id !== current) remove(c.id); });
      li.append(open, del);
      return li;
    }));
  }

  function select(id) {
    current = id;
    save();
    const c = conv();
    if (c && c.model && [...$("model").options].some((o) => o.value === c.model)) { $("model").value = c.model; showModelState(); }
    renderList();
    renderMessages();
  }

  function remove(id) {
    convs = convs.filter((c) => c.id !== id);
    if (current === id) current = null;
    save();
    renderList();
    renderMessages();
  }

  function statsText(s) {
    const parts = [];
    if (s.tps !== undefined) parts.push(`${s.tps.toFixed(1)} tok/s${s.estimated ? " (est.)" : ""}`);
    if (s.ttft !== null && s.ttft !== undefined) parts.push(`ttft ${s.ttft < 1 ? (s.ttft * 1000).toFixed(0) + " ms" : s.ttft.toFixed(2) + " s"}`);
    if (s.n !== undefined) parts.push(`${s.n} tokens`);
    return parts.join(" · ");
  }

  function messageView(m) {
    const div = el("div", `msg ${m.role}`);
    const body = el("div", "body");
    const foot = el("div", "stats");
    div.append(body, foot);
    const view = {
      div,
      paint() {
        if (m.role === "user") body.textContent = m.content;
        else renderMarkdown(body, m.content);
        const s = [];
        if (m.stats) s.push(statsText(m.stats));
        if (m.model) s.push(m.model);
        if (m.stopped) s.push("stopped");
        foot.textContent = s.join(" · ");
        foot.hidden = !s.length;
        if (m.stats) Object.assign(foot.dataset, { tps: m.stats.tps ?? "", ttft: m.stats.ttft ?? "" });
        if (m.error) div.append(el("div", "error", m.error));
      },
      status(text) { foot.hidden = false; foot.textContent = text; },
      queued: false,
      update() { // at most one render per frame while tokens stream in
        if (view.queued) return;
        view.queued = true;
        requestAnimationFrame(() => { view.queued = false; renderMarkdown(body, m.content); });
      },
    };
    view.paint();
    return view;
  }

  function renderMessages() {
    const box = $("messages");
    const c = conv();
    box.replaceChildren(...(c ? c.messages.map((m) => messageView(m).div) : [el("p", "empty", "Start a conversation below.")]));
    box.scrollTop = box.scrollHeight;
  }

  // -- one answer, streamed ------------------------------------------------------------------
  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
  }

  async function send() {
    const text = $("prompt").value.trim();
    const model = $("model").value;
    if (!text || controller) return;
    let c = conv();
    if (!c) {
      c = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 7), title: text.slice(0, 60), messages: [] };
      convs.unshift(c);
      current = c.id;
    }
    const history = c.messages.filter((m) => m.content && !m.error).map((m) => ({ role: m.role, content: m.content }));
    const user = { role: "user", content: text };
    const a = { role: "assistant", content: "", model };
    c.messages.push(user, a);
    c.model = model;
    save();
    renderList();
    $("prompt").value = "";
    const box = $("messages");
    if (c.messages.length === 2) box.replaceChildren();
    box.append(messageView(user).div);
    const view = messageView(a);
    box.append(view.div);
    view.status(loaded.has(model) ? "…" : `loading ${model}…`);
    box.scrollTop = box.scrollHeight;

    const messages = [...(settings.system ? [{ role: "system", content: settings.system }] : []), ...history, user];
    controller = new AbortController();
    setBusy(true);
    const t0 = performance.now();
    let first = null, chunks = 0, timings = null;
    try {
      const r = await api("v1/chat/completions", {
        method: "POST", signal: controller.signal,
        body: JSON.stringify({
          model, messages, stream: true, stream_options: { include_usage: true },
          temperature: settings.temperature, max_tokens: settings.max_tokens,
        }),
      });
      if (!r.ok) throw new Error(await errorText(r));
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let i;
        while ((i = buf.indexOf("\n")) >= 0) {
          const line = buf.slice(0, i).trim();
          buf = buf.slice(i + 1);
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const ev = JSON.parse(data);
          if (ev.error) throw new Error(typeof ev.error === "string" ? ev.error : ev.error.message);
          if (ev.model) a.model = ev.model;
          if (ev.timings) timings = ev.timings;
          for (const ch of ev.choices || []) {
            const piece = (ch.delta && ch.delta.content) || "";
            if (!piece) continue;
            if (first === null) { first = performance.now(); loaded.add(model); }
            a.content += piece;
            chunks++;
            view.update();
          }
        }
      }
    } catch (e) {
      if (e.name === "AbortError") a.stopped = true;
      else a.error = e.message || String(e);
    } finally {
      controller = null;
      setBusy(false);
    }
    if (first !== null) {
      const ttft = (first - t0) / 1000;
      if (timings && timings.predicted_ms > 0) {
        a.stats = { tps: timings.predicted_per_second, ttft, n: timings.predicted_n };
      } else { // stopped: no timings from the server, count what arrived
        const secs = (performance.now() - first) / 1000;
        a.stats = { tps: secs > 0 ? (chunks - 1) / secs : 0, ttft, n: chunks, estimated: true };
      }
    }
    save();
    view.div.replaceWith(messageView(a).div);
    box.scrollTop = box.scrollHeight;
    refreshModels();
  }

  // -- wiring ---------------------------------------------------------------------------------
  $("system").value = settings.system;
  $("temperature").value = settings.temperature;
  $("max-tokens").value = settings.max_tokens;
  const setting = (id, key, parse) => $(id).addEventListener("change", () => {
    const v = parse($(id).value);
    if (v === v) { settings[key] = v; store.set("settings", settings); } // NaN: keep the old value
  });
  setting("system", "system", String);
  setting("temperature", "temperature", parseFloat);
  setting("max-tokens", "max_tokens", (v) => parseInt(v, 10));
  $("model").addEventListener("change", pickModel);
  $("new-chat").addEventListener("click", () => { if (!controller) { current = null; save(); renderList(); renderMessages(); $("prompt").focus(); } });
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());

  if (current && !conv()) current = null;
  renderList();
  renderMessages();
  refreshModels();
})();
