// captioner review: a little plain JavaScript, no build step. Every text from the server is set with
// textContent (never innerHTML), so a caption holding HTML stays text.
"use strict";

(() => {
  let csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

  function flash(message, bad = false) {
    const el = $("#flash");
    el.textContent = message;
    el.classList.toggle("bad", bad);
    el.hidden = false;
    clearTimeout(flash.timer);
    flash.timer = setTimeout(() => { el.hidden = true; }, bad ? 8000 : 3000);
  }

  async function api(method, url, body, retried = false) {
    const res = await fetch(url, {
      method,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (res.status === 403 && data && /CSRF/.test(data.error || "") && !retried) {
      // The server restarted with a new signing key while this page was open: take a fresh token, try once more.
      const fresh = await fetch(location.href, { credentials: "same-origin" }).then((r) => r.text());
      const m = fresh.match(/<meta name="csrf-token" content="([0-9a-f]+)">/);
      if (m) { csrf = m[1]; return api(method, url, body, true); }
    }
    if (!res.ok) {
      const err = new Error((data && data.error) || `${res.status} ${res.statusText}`);
      err.status = res.status;
      err.data = data;
      throw err;
    }
    return data;
  }

  const act = (promise) => promise.catch((err) => flash(err.message, true));

  function fmtRate(rate) { return rate == null ? "-" : `${rate.toFixed(1)}/s`; }
  function fmtEta(s) {
    if (s == null || !isFinite(s)) return "-";
    s = Math.round(s);
    if (s < 90) return `${s}s`;
    if (s < 5400) return `${Math.round(s / 60)}min`;
    return `${(s / 3600).toFixed(1)}h`;
  }

  function fillCounters(root, j) {
    const set = (sel, text) => { const el = $(sel, root); if (el) el.textContent = text; };
    const state = $(".state", root);
    if (state) { state.textContent = j.state; state.className = `state state-${j.state}`; }
    const bar = $("progress", root);
    if (bar) { bar.max = j.total || 1; bar.value = j.done || 0; }
    set(".done", `${j.done}/${j.total}`);
    if (j.kind === "caption") { set(".ok", j.ok); set(".error", j.error); set(".pending", j.pending); }
    set(".rate", fmtRate(j.rate));
    set(".eta", fmtEta(j.eta_s));
  }

  // --- jobs list: progress over server-sent events, workers and queues by polling ------------------------
  function jobRow(j) {
    const tr = document.createElement("tr");
    tr.dataset.job = j.id;
    const cells = ["name", "kind", "state", "progress", "ok", "error", "pending", "rate", "eta"].map(() => document.createElement("td"));
    const link = document.createElement("a");
    link.href = `/jobs/${encodeURIComponent(j.id)}`;
    link.textContent = j.name || j.id;
    cells[0].append(link);
    cells[1].textContent = j.kind;
    cells[2].className = "state";
    cells[3].append(document.createElement("progress"), " ");
    const done = document.createElement("span");
    done.className = "done";
    cells[3].append(done);
    ["ok", "error", "pending", "rate", "eta"].forEach((cls, i) => { cells[4 + i].className = cls; });
    tr.append(...cells);
    return tr;
  }

  function initJobs() {
    const body = $("#jobs tbody");
    const events = new EventSource("/events/jobs");
    events.onmessage = (ev) => {
      for (const j of JSON.parse(ev.data)) {
        let tr = $$("tr[data-job]", body).find((r) => r.dataset.job === j.id);
        if (!tr) { tr = jobRow(j); body.prepend(tr); $$("tr.none", body).forEach((r) => r.remove()); }
        fillCounters(tr, j);
      }
    };
    const list = (sel, items, text) => {
      const ul = $(sel);
      ul.replaceChildren(...(items.length ? items : [null]).map((it) => {
        const li = document.createElement("li");
        li.textContent = it === null ? "none" : text(it);
        if (it === null) li.className = "sub";
        return li;
      }));
    };
    const poll = () => fetch("/api/workers", { credentials: "same-origin" })
      .then((r) => r.json())
      .then((w) => {
        list("#caption-workers", w.caption, (c) => `${c.name}: ${c.model_version || "loading"}${c.device ? ` on ${c.device}` : ""}`);
        list("#training-workers", w.training, (t) => t.name);
        list("#queues", Object.entries(w.queues), ([q, n]) => `${q}: ${n} waiting`);
      })
      .catch(() => {})
      .finally(() => setTimeout(poll, 5000));
    poll();
  }

  function initJobHead() {
    const head = $(".job-head");
    if (!head) return;
    const events = new EventSource(`/events/jobs?job=${encodeURIComponent(head.dataset.job)}`);
    events.onmessage = (ev) => { const [j] = JSON.parse(ev.data); if (j) fillCounters(head, j); };
  }

  // --- cards: marks, corrections in place, selection, keyboard --------------------------------------------
  const jobId = () => $("#grid").dataset.job;
  const itemUrl = (id) => `/api/jobs/${encodeURIComponent(jobId())}/items/${encodeURIComponent(id)}`;
  const cards = () => $$(".card");
  const cardOf = (id) => cards().find((c) => c.dataset.item === id);

  function updateCard(card, row) {
    card.dataset.version = row.review_version || 0;
    const corrected = $(".corrected", card);
    corrected.textContent = row.corrected || "";
    corrected.hidden = !row.corrected;
    card.classList.toggle("is-corrected", Boolean(row.corrected));
    setMark(card, row.mark || null);
    $(".reviewed", card).textContent = row.reviewer ? `${row.reviewer}, just now` : "";
  }

  function setMark(card, mark) {
    card.dataset.mark = mark || "";
    const badge = $(".mark", card);
    badge.textContent = mark || "";
    badge.className = `mark mark-${mark || "none"}`;
  }

  async function mark(ids, value, reason) {
    if (!ids.length) { flash("select items first (x)", true); return; }
    const body = { ids, mark: value };
    if (reason) body.reason = reason;
    const res = await api("POST", `/api/jobs/${encodeURIComponent(jobId())}/marks`, body);
    ids.forEach((id) => { const c = cardOf(id); if (c && c.dataset.status === "ok") setMark(c, value); });
    flash(`${res.changed} item(s) ${value || "unmarked"}`);
  }

  function edit(card) {
    if (card.dataset.status !== "ok") { flash("this item has no caption to correct yet", true); return; }
    if ($("textarea", card)) { $("textarea", card).focus(); return; }
    const box = document.createElement("textarea");
    box.rows = 3;
    box.maxLength = 2000;
    box.className = "inline-edit";
    box.value = $(".corrected", card).textContent || ($(".caption", card) || {}).textContent || "";
    $(".corrected", card).after(box);
    box.focus();
    box.select();
    box.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape") { ev.preventDefault(); box.remove(); card.focus(); }
      if (ev.key === "Enter" && !ev.shiftKey) {
        ev.preventDefault();
        act(api("POST", `${itemUrl(card.dataset.item)}/correction`, { text: box.value, base_version: Number(card.dataset.version || 0) }).then((row) => {
          updateCard(card, row);
          box.remove();
          card.focus();
          flash("correction saved");
        }).catch((err) => {
          if (err.status === 409 && err.data && err.data.current) {
            updateCard(card, err.data.current);
            box.value = err.data.current.corrected || err.data.current.caption || "";
          }
          throw err;
        }));
      }
    });
  }

  const selected = () => cards().filter((c) => $(".select", c).checked).map((c) => c.dataset.item);
  function toggle(card, on) {
    const box = $(".select", card);
    box.checked = on === undefined ? !box.checked : on;
    card.classList.toggle("selected", box.checked);
  }

  function move(card, key) {
    const all = cards();
    const i = all.indexOf(card);
    const perRow = Math.max(1, all.filter((c) => c.offsetTop === all[0].offsetTop).length);
    const step = { ArrowRight: 1, l: 1, ArrowLeft: -1, h: -1, ArrowDown: perRow, j: perRow, ArrowUp: -perRow, k: -perRow }[key];
    const next = all[Math.min(all.length - 1, Math.max(0, i + step))];
    if (next) { next.focus(); next.scrollIntoView({ block: "nearest" }); }
  }

  function onGridKey(ev) {
    const typing = ev.target.matches("input, textarea, select");
    if (typing || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const card = ev.target.closest ? ev.target.closest(".card") : null;
    const key = ev.key;
    if (key === "/") { ev.preventDefault(); const s = $("#search"); if (s) s.focus(); return; }
    if (key === "n") { const next = $("#next-page"); if (next) next.click(); return; }
    if (key === "X") { const all = cards(); const on = !all.every((c) => $(".select", c).checked); all.forEach((c) => toggle(c, on)); return; }
    if (key === "A") { act(mark(selected(), "accepted")); return; }
    if (!card) {
      if (["ArrowRight", "ArrowDown", "j", "l"].includes(key) && cards().length) { ev.preventDefault(); cards()[0].focus(); }
      return;
    }
    if (["ArrowRight", "ArrowLeft", "ArrowDown", "ArrowUp", "h", "j", "k", "l"].includes(key)) { ev.preventDefault(); move(card, key); }
    else if (key === "Enter") { if (document.body.dataset.page === "job") location.href = card.dataset.href; }
    else if (key === "e") { ev.preventDefault(); edit(card); }
    else if (key === "a") act(mark([card.dataset.item], "accepted"));
    else if (key === "r") act(mark([card.dataset.item], "rejected"));
    else if (key === "u") act(mark([card.dataset.item], null));
    else if (key === "x" || key === " ") { ev.preventDefault(); toggle(card); }
  }

  async function bulk(action) {
    const filter = Object.fromEntries(new URLSearchParams(location.search).entries());
    delete filter.cursor; delete filter.limit;
    const body = { action, filter };
    if (action === "again") Object.assign(body, { max_length: $("#again-max-length").value, num_beams: $("#again-num-beams").value, prompt: $("#again-prompt").value });
    let b = await api("POST", `/api/jobs/${encodeURIComponent(jobId())}/bulk`, body);
    const bar = $("#bulk-progress");
    const out = $("#bulk-result");
    bar.hidden = false;
    for (;;) {
      bar.max = b.total || 1;
      bar.value = b.done;
      out.textContent = `${action}: ${b.done}/${b.total} item(s), ${b.changed} changed${b.state === "running" ? "..." : ` (${b.state})`}`;
      if (b.state !== "running") break;
      await new Promise((r) => setTimeout(r, 300));
      b = await api("GET", `/api/bulk/${encodeURIComponent(b.id)}`);
    }
    if (b.state === "failed") throw new Error(b.error);
    flash(`${b.changed} item(s) changed`);
  }

  function initGrid() {
    document.addEventListener("keydown", onGridKey);
    $$(".card .select").forEach((box) => box.addEventListener("change", () => toggle(box.closest(".card"), box.checked)));
    $$(".card .caption, .card .corrected").forEach((p) => p.addEventListener("dblclick", () => edit(p.closest(".card"))));
    const cameFrom = location.hash.startsWith("#item-") ? cardOf(decodeURIComponent(location.hash.slice(6))) : null;
    const first = cameFrom || cards()[0];
    if (first && document.body.dataset.page === "job") { first.focus(); first.scrollIntoView({ block: "nearest" }); }
    $$("#bulk-filter [data-bulk]").forEach((b) => b.addEventListener("click", () => act(bulk(b.dataset.bulk))));
    const assignForm = $("#assign-form");
    if (assignForm) assignForm.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const filter = Object.fromEntries(new URLSearchParams(location.search).entries());
      delete filter.cursor; delete filter.limit; delete filter.sort;
      act(api("POST", `/api/jobs/${encodeURIComponent(jobId())}/assign`, { reviewer: assignForm.elements.reviewer.value, filter })
        .then(() => location.reload()));
    });
    const on = (name, fn) => { const b = $(`.bulk [data-act="${name}"], .train [data-act="${name}"]`); if (b) b.addEventListener("click", () => act(fn())); };
    on("select-all", async () => { const all = cards(); const all_on = !all.every((c) => $(".select", c).checked); all.forEach((c) => toggle(c, all_on)); });
    on("accept", () => mark(selected(), "accepted"));
    on("reject", () => mark(selected(), "rejected"));
    on("unmark", () => mark(selected(), null));
    on("again", async () => {
      const ids = selected();
      const body = { ids, max_length: $("#again-max-length").value, num_beams: $("#again-num-beams").value, prompt: $("#again-prompt").value };
      const res = await api("POST", `/api/jobs/${encodeURIComponent(jobId())}/retry`, body);
      flash(`${res.requeued} item(s) sent to be captioned again`);
    });
    on("export", async () => {
      const res = await api("POST", `/api/jobs/${encodeURIComponent(jobId())}/export`, {});
      $("#export-result").textContent = `${res.rows} reviewed item(s) written to ${res.path}/metadata.jsonl`;
    });
    const form = $("#train-form");
    if (form) {
      form.addEventListener("submit", (ev) => {
        ev.preventDefault();
        const data = Object.fromEntries(new FormData(form).entries());
        data.promote = form.elements.promote.checked;
        if (!data.promote) delete data.require_no_worse;
        act(api("POST", `/api/jobs/${encodeURIComponent(jobId())}/train`, data).then((res) => {
          const out = $("#train-result");
          const link = document.createElement("a");
          link.href = `/jobs/${encodeURIComponent(res.train_job)}`;
          link.textContent = res.train_job;
          out.replaceChildren(`Fine-tune queued on ${res.rows} reviewed item(s): `, link);
        }));
      });
    }
  }

  // --- one item: navigation, zoom, the edit form, conflicts, undo ----------------------------------------------
  function initZoom() {
    const box = $("#zoom-box");
    const img = $("#zoom-image");
    if (!box || !img) return;
    let scale = 1;
    const apply = () => { img.style.width = scale > 1 ? `${Math.round(scale * 100)}%` : ""; box.classList.toggle("zoomed", scale > 1); };
    const zoom = (how) => {
      scale = how === "in" ? Math.min(8, scale * 1.5) : how === "out" ? Math.max(1, scale / 1.5) : 1;
      apply();
    };
    $$("[data-zoom]").forEach((b) => b.addEventListener("click", () => zoom(b.dataset.zoom)));
    const full = () => { img.src = img.dataset.full; $("#full-res").disabled = true; flash("full resolution"); };
    $("#full-res").addEventListener("click", full);
    let drag = null;
    box.addEventListener("mousedown", (ev) => { drag = { x: ev.clientX, y: ev.clientY, l: box.scrollLeft, t: box.scrollTop }; ev.preventDefault(); });
    document.addEventListener("mouseup", () => { drag = null; });
    document.addEventListener("mousemove", (ev) => {
      if (!drag) return;
      box.scrollLeft = drag.l - (ev.clientX - drag.x);
      box.scrollTop = drag.t - (ev.clientY - drag.y);
    });
    return { zoom, full };
  }

  function initItem() {
    const card = $(".card");
    const view = $("#grid");
    const form = $("#edit-form");
    const box = $("#correction");
    const zoom = initZoom();
    const version = () => Number(view.dataset.version || 0);
    const reload = () => { location.reload(); };
    const showConflict = (err) => {
      if (err.status !== 409 || !err.data || !err.data.current) throw err;
      const cur = err.data.current;
      const panel = $("#conflict");
      $(".theirs", panel).textContent = `${cur.reviewer || "someone"}: ${cur.corrected || cur.caption || ""}${cur.mark ? ` (${cur.mark})` : ""}`;
      panel.hidden = false;
      throw err;
    };
    document.addEventListener("keydown", (ev) => {
      if (ev.target.matches("input, textarea, select") || ev.ctrlKey || ev.metaKey || ev.altKey) return;
      const id = card.dataset.item;
      const go = (sel) => { const a = $(sel); if (a) location.href = a.href; };
      if (ev.key === "Escape") location.href = $("#back").href;
      else if (ev.key === "n" || ev.key === "ArrowRight") go("#next-item");
      else if (ev.key === "p" || ev.key === "ArrowLeft") go("#prev-item");
      else if ((ev.key === "+" || ev.key === "=") && zoom) zoom.zoom("in");
      else if (ev.key === "-" && zoom) zoom.zoom("out");
      else if (ev.key === "0" && zoom) zoom.zoom("reset");
      else if (ev.key === "f" && zoom) zoom.full();
      else if (ev.key === "e" && box) { ev.preventDefault(); box.focus(); }
      else if (ev.key === "a" && form) act(mark([id], "accepted").then(reload));
      else if (ev.key === "r" && form) act(reject());
      else if (ev.key === "u" && form) act(mark([id], null).then(reload));
      else if (ev.key === "z" && form) act(undo());
    });
    if (!form) return;
    const reason = () => [$("#reason").value, $("#reason-text").value.trim()].filter(Boolean).join(": ");
    const reject = () => mark([card.dataset.item], "rejected", reason()).then(reload);
    const undo = () => api("POST", `${itemUrl(card.dataset.item)}/undo`, { base_version: version() }).then(reload, showConflict);
    const save = () => act(api("POST", `${itemUrl(card.dataset.item)}/correction`, { text: box.value, base_version: version() })
      .then(reload, showConflict));
    form.addEventListener("submit", (ev) => { ev.preventDefault(); save(); });
    box.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); save(); }
      if (ev.key === "Escape") { ev.preventDefault(); box.blur(); }
    });
    $('[data-act="clear"]', form).addEventListener("click", () => act(api("DELETE", `${itemUrl(card.dataset.item)}/correction?base_version=${version()}`).then(reload, showConflict)));
    $('[data-act="accept"]', form).addEventListener("click", () => act(mark([card.dataset.item], "accepted").then(reload)));
    $('[data-act="reject"]', form).addEventListener("click", () => act(reject()));
    $('[data-act="undo"]', form).addEventListener("click", () => act(undo()));
    $("#take-theirs").addEventListener("click", reload);
  }

  // --- model versions: promote (gated), roll back, evaluate -------------------------------------------------
  function initModels() {
    $$(".model-actions").forEach((box) => {
      const version = box.dataset.version;
      const url = (what) => `/api/models/${encodeURIComponent(version)}/${what}`;
      const out = $(".model-result", box);
      const done = (text) => { out.textContent = text; };
      const promote = $(".promote-form", box);
      if (promote) promote.addEventListener("submit", (ev) => {
        ev.preventDefault();
        const data = Object.fromEntries(new FormData(promote).entries());
        act(api("POST", url("promote"), data).then((res) => {
          done(`promoted ${res.promoted}${res.comparison ? `: ${res.comparison.said}` : " (no gate)"}`);
        }).catch((err) => { done(err.message); throw err; }));
      });
      const back = $('[data-model-act="rollback"]', box);
      if (back) back.addEventListener("click", () => act(api("POST", url("rollback"), {}).then((res) => done(`rolled back to ${res.promoted} (was ${res.previous})`))));
      const evaluate = $(".evaluate-form", box);
      evaluate.addEventListener("submit", (ev) => {
        ev.preventDefault();
        act(api("POST", url("evaluate"), Object.fromEntries(new FormData(evaluate).entries()))
          .then((res) => done(`evaluation of ${res.version} on ${res.dataset} queued: reload to see its scores`)));
      });
    });
  }

  const page = document.body.dataset.page;
  if (page === "models") initModels();
  if (page === "jobs") initJobs();
  if (page === "job" || page === "train-job") initJobHead();
  if (page === "job") initGrid();
  if (page === "item") initItem();
})();
