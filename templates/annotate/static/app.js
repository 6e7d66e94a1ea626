// llamakit annotate: plain JS, no build step. Every text from the server is put in the page with
// textContent (never innerHTML), so HTML in prompts, answers or chats shows as text.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, value);
    else node[key] = value;
  }
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

async function api(method, path, body) {
  const options = { method, headers: {}, credentials: "same-origin" };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error("cannot reach the server (is it running?) — your last answer was kept if it said saved");
  }
  if (response.status === 401) {
    window.location.assign("/login");
    throw new Error("logged out");
  }
  let data = null;
  try { data = await response.json(); } catch (err) { data = null; }
  if (!response.ok) {
    const error = new Error((data && data.error) || `HTTP ${response.status}`);
    error.data = data;
    error.status = response.status;
    throw error;
  }
  return data;
}

// ---------------------------------------------------------------------------------------------------
// state

const S = {
  view: "rank",
  perItem: 1,
  item: null,          // {id, prompt, k, candidates: [{index, text}]} in display order
  top: [],             // tiers from the best, each a list of display positions
  bottom: [],          // tiers from the worst
  steps: [],           // placements, for undo: {side, pos}
  tieNext: false,
  prefix: null,        // "h" | "u" while waiting for a digit
  flags: { harmful: new Set(), unusable: new Set() },
  busy: false,
  history: [],         // item ids answered, for "previous"
  chat: null,
  chatModel: null,
  chatAvailable: false,
};

function setStatus(node, text, kind) {
  node.textContent = text || "";
  node.className = "status" + (kind ? " " + kind : "");
}

function showProgress(progress) {
  if (!progress) return;
  const open = progress.open;
  const total = progress.done + open;
  $("progress-bar").max = Math.max(total, 1);
  $("progress-bar").value = progress.done;
  $("progress-text").textContent =
    `${progress.done} done · ${open} left for you` + (progress.skipped ? ` · ${progress.skipped} skipped` : "") +
    ` · ${progress.complete}/${progress.items} items complete (${progress.per_item} per item)`;
  $("rank-view").dataset.done = String(progress.done);
}

// ---------------------------------------------------------------------------------------------------
// rank

function placed() {
  const set = new Set();
  for (const tier of S.top.concat(S.bottom)) for (const pos of tier) set.add(pos);
  return set;
}

function remaining() {
  const done = placed();
  const out = [];
  if (!S.item) return out;
  for (let pos = 0; pos < S.item.k; pos++) if (!done.has(pos)) out.push(pos);
  return out;
}

// Final tiers (display positions, best first) and which tier is unordered (its members were not compared).
function finalTiers() {
  const rest = remaining();
  const tiers = S.top.map((t) => t.slice());
  let unordered = null;
  if (rest.length) {
    if (rest.length > 1) unordered = tiers.length;
    tiers.push(rest);
  }
  for (let i = S.bottom.length - 1; i >= 0; i--) tiers.push(S.bottom[i].slice());
  return { tiers, unordered };
}

function canSubmit() {
  return S.item && (S.top.length + S.bottom.length > 0) && !S.busy;
}

function ordinal(n) {
  const s = ["th", "st", "nd", "rd"], v = n % 100;
  return n + (s[(v - 20) % 10] || s[v] || s[0]);
}

function renderRanking() {
  if (!S.item) return;
  const { tiers, unordered } = finalTiers();
  const anything = S.top.length + S.bottom.length > 0;
  const label = new Map();
  tiers.forEach((tier, t) => {
    for (const pos of tier) {
      if (!anything) label.set(pos, "");
      else if (t === unordered) label.set(pos, "unranked");
      else label.set(pos, (tier.length > 1 ? "tie " : "") + ordinal(t + 1));
    }
  });
  if (anything && S.bottom.length && unordered !== null) {
    // a best/worst pick reads better as "best" / "worst"
    S.bottom.forEach((tier, i) => tier.forEach((pos) => label.set(pos, i === 0 ? "worst" : `${ordinal(i + 1)} worst`)));
  }
  const cards = $("candidates").children;
  for (let pos = 0; pos < cards.length; pos++) {
    const card = cards[pos];
    const text = label.get(pos) || "";
    const badge = card.querySelector(".rank-badge");
    badge.textContent = text;
    card.classList.toggle("ranked", !!text && text !== "unranked");
    card.classList.toggle("top-ranked", anything && tiers[0].includes(pos) && unordered !== 0);
    card.classList.toggle("harmful", S.flags.harmful.has(pos));
    card.classList.toggle("unusable", S.flags.unusable.has(pos));
    card.querySelector(".flag-harmful").setAttribute("aria-pressed", String(S.flags.harmful.has(pos)));
    card.querySelector(".flag-unusable").setAttribute("aria-pressed", String(S.flags.unusable.has(pos)));
  }
  const parts = tiers.map((tier, t) => {
    const keys = tier.map((pos) => String(pos + 1));
    return t === unordered ? "(" + keys.join(" ") + ")" : keys.join(" = ");
  });
  $("ranking-line").textContent = anything ? parts.join("  >  ") : "press the number of the best answer";
  $("prefix").textContent = S.prefix === "h" ? "flag harmful: which answer?" :
    S.prefix === "u" ? "flag unusable: which answer?" : S.tieNext ? "tie with the last: which answer?" : "";
  $("submit").disabled = !canSubmit();
}

function resetRank() {
  S.top = []; S.bottom = []; S.steps = []; S.tieNext = false; S.prefix = null;
  S.flags = { harmful: new Set(), unusable: new Set() };
  $("better").value = "";
  $("better-box").hidden = true;
}

function showItem(item, answer) {
  S.item = item;
  resetRank();
  const view = $("rank-view");
  if (!item) {
    view.dataset.itemId = "";
    $("rank-task").hidden = true;
    $("rank-done").hidden = false;
    return;
  }
  view.dataset.itemId = item.id;
  $("rank-task").hidden = false;
  $("rank-done").hidden = true;
  $("item-id").textContent = "· " + item.id;
  $("prompt").textContent = item.prompt;
  const box = $("candidates");
  box.replaceChildren();
  item.candidates.forEach((candidate, pos) => {
    const card = el("div", { class: "card", "data-pos": String(pos), "data-index": String(candidate.index) });
    const head = el("div", { class: "card-head" });
    head.append(el("kbd", { class: "key" }, pos + 1), el("span", { class: "rank-badge" }));
    const flagH = el("button", { class: "flag flag-harmful", type: "button", title: `H then ${pos + 1}` }, "harmful");
    const flagU = el("button", { class: "flag flag-unusable", type: "button", title: `U then ${pos + 1}` }, "unusable");
    flagH.addEventListener("click", (e) => { e.stopPropagation(); toggleFlag("harmful", pos); });
    flagU.addEventListener("click", (e) => { e.stopPropagation(); toggleFlag("unusable", pos); });
    head.append(el("span", { class: "spacer" }), flagH, flagU);
    card.append(head, el("div", { class: "text card-text" }, candidate.text));
    card.addEventListener("click", () => place(pos, false));
    box.append(card);
  });
  if (answer && answer.tiers) {
    // revising an earlier answer: put it back on screen
    const posOf = new Map(item.candidates.map((c, pos) => [c.index, pos]));
    const tiers = answer.tiers.map((tier) => tier.map((i) => posOf.get(i)));
    const cut = answer.unordered === null || answer.unordered === undefined ? tiers.length : answer.unordered;
    S.top = tiers.slice(0, cut);
    S.bottom = answer.unordered === null || answer.unordered === undefined ? [] : tiers.slice(cut + 1).reverse();
    for (const kind of ["harmful", "unusable"])
      for (const i of (answer.flags && answer.flags[kind]) || []) S.flags[kind].add(posOf.get(i));
    if (answer.better) { $("better").value = answer.better; $("better-box").hidden = false; }
  }
  renderRanking();
}

function place(pos, fromBottom) {
  if (!S.item || S.busy || pos >= S.item.k) return;
  if (placed().has(pos)) {
    setStatus($("status"), `answer ${pos + 1} is placed already (⌫ undoes)`, "warn");
    return;
  }
  const side = fromBottom ? S.bottom : S.top;
  if (S.tieNext && S.steps.length) {
    const last = S.steps[S.steps.length - 1];
    const tiers = last.side === "bottom" ? S.bottom : S.top;
    tiers[tiers.length - 1].push(pos);
    S.steps.push({ side: last.side, pos, tie: true });
  } else {
    side.push([pos]);
    S.steps.push({ side: fromBottom ? "bottom" : "top", pos, tie: false });
  }
  S.tieNext = false;
  setStatus($("status"), "");
  renderRanking();
}

function undo() {
  if (S.prefix || S.tieNext) { S.prefix = null; S.tieNext = false; renderRanking(); return; }
  const step = S.steps.pop();
  if (!step) return;
  const tiers = step.side === "bottom" ? S.bottom : S.top;
  if (step.tie) tiers[tiers.length - 1] = tiers[tiers.length - 1].filter((p) => p !== step.pos);
  else tiers.pop();
  renderRanking();
}

function tieAll() {
  if (!S.item || S.busy) return;
  resetRankKeepText();
  S.top = [[...Array(S.item.k).keys()]];
  S.steps = [{ side: "top", pos: -1, tie: false }];
  renderRanking();
}

function resetRankKeepText() {
  S.top = []; S.bottom = []; S.steps = []; S.tieNext = false; S.prefix = null;
}

function toggleFlag(kind, pos) {
  if (!S.item || pos >= S.item.k) return;
  const set = S.flags[kind];
  if (set.has(pos)) set.delete(pos); else set.add(pos);
  S.prefix = null;
  renderRanking();
}

async function submit() {
  if (!canSubmit()) {
    if (S.item && !S.busy) setStatus($("status"), "rank at least the best or the worst answer first", "warn");
    return;
  }
  const { tiers, unordered } = finalTiers();
  const index = (pos) => S.item.candidates[pos].index;
  const flags = {};
  for (const kind of ["harmful", "unusable"]) if (S.flags[kind].size) flags[kind] = [...S.flags[kind]].map(index);
  const better = $("better").value.trim();
  const itemId = S.item.id;
  S.busy = true;
  $("submit").disabled = true;
  setStatus($("status"), "saving…", "busy");
  try {
    const data = await api("POST", "/api/rank", {
      item_id: itemId, tiers: tiers.map((t) => t.map(index)), unordered, flags, better: better || null,
    });
    S.history.push(itemId);
    showProgress(data.progress);
    S.busy = false;
    showItem(data.item);
    setStatus($("status"), `saved ✓ (${data.progress.done} done)`, "ok");
  } catch (err) {
    S.busy = false;
    if (err.status === 409 && err.data && err.data.progress) {
      // others filled this item while it sat here (the lease ran out): retrying cannot work, go on
      showProgress(err.data.progress);
      showItem(err.data.item);
      setStatus($("status"), "not saved: " + err.message, "warn");
      return;
    }
    setStatus($("status"), "not saved: " + err.message + " — press Enter to try again", "error");
    renderRanking();
  }
}

async function skip() {
  if (!S.item || S.busy) return;
  S.busy = true;
  try {
    const data = await api("POST", "/api/skip", { item_id: S.item.id });
    showProgress(data.progress);
    S.busy = false;
    showItem(data.item);
    setStatus($("status"), "skipped", "ok");
  } catch (err) {
    S.busy = false;
    setStatus($("status"), "skip failed: " + err.message, "error");
  }
}

async function back() {
  if (S.busy) return;
  try {
    if (!S.history.length) S.history = (await api("GET", "/api/history")).items.reverse();
    const current = S.item && S.item.id;
    let id = S.history.pop();
    while (id && id === current) id = S.history.pop();
    if (!id) { setStatus($("status"), "no earlier answer to go back to", "warn"); return; }
    const data = await api("GET", "/api/items/" + encodeURIComponent(id));
    showItem(data.item, data.answer);
    setStatus($("status"), "revising an earlier answer — Enter saves it, then the next item shows", "warn");
  } catch (err) {
    setStatus($("status"), err.message, "error");
  }
}

async function loadNext() {
  const data = await api("GET", "/api/next");
  showProgress(data.progress);
  showItem(data.item);
}

function rankKey(e) {
  const digit = /^(Digit|Numpad)([1-9])$/.exec(e.code);
  if (digit) {
    const pos = Number(digit[2]) - 1;
    if (S.prefix === "h") toggleFlag("harmful", pos);
    else if (S.prefix === "u") toggleFlag("unusable", pos);
    else place(pos, e.shiftKey);
    return true;
  }
  switch (e.key) {
    case "=": S.tieNext = S.steps.length > 0; renderRanking(); return true;
    case "Backspace": undo(); return true;
    case "Enter": submit(); return true;
    case "Escape": S.prefix = null; S.tieNext = false; renderRanking(); return true;
    case "t": case "T": tieAll(); return true;
    case "h": case "H": S.prefix = "h"; renderRanking(); return true;
    case "u": case "U": S.prefix = "u"; renderRanking(); return true;
    case "e": case "E": $("better-box").hidden = false; $("better").focus(); return true;
    case "s": case "S": skip(); return true;
    case "b": case "B": back(); return true;
    default: return false;
  }
}

// ---------------------------------------------------------------------------------------------------
// chat

function authorLabel(message, mode) {
  if (message.author === "model") return "model";
  if (message.author === "model+human") return "model, edited by you";
  return mode === "self" && message.role === "assistant" ? "you, as the assistant" : "you";
}

function renderChat(chat) {
  S.chat = chat;
  $("chat-empty").hidden = !!chat;
  $("chat-box").hidden = !chat;
  if (!chat) return;
  $("chat-box").dataset.chatId = chat.id;
  $("chat-title").textContent = chat.mode === "model" ? `You play the user; ${chat.model || "the model"} answers`
    : "You write both the user's and the assistant's turns";
  $("chat-status").textContent = chat.status;
  const box = $("transcript");
  box.replaceChildren();
  if (chat.system) box.append(el("div", { class: "msg system" }, "system: " + chat.system));
  for (const m of chat.messages) {
    const msg = el("div", { class: `msg ${m.role}`, "data-position": String(m.position), "data-author": m.author });
    const head = el("div", { class: "msg-head" });
    head.append(el("span", { class: "role" }, m.role), el("span", { class: "muted" }, " · " + authorLabel(m, chat.mode)));
    const body = el("div", { class: "text msg-text" }, m.content);
    msg.append(head, body);
    if (chat.status === "open") {
      const edit = el("button", { class: "edit", type: "button" }, "edit");
      edit.addEventListener("click", () => editMessage(msg, m));
      head.append(edit);
    }
    box.append(msg);
  }
  box.scrollTop = box.scrollHeight;
  const last = chat.messages[chat.messages.length - 1];
  const nextRole = !last || last.role === "assistant" ? "user" : "assistant";
  const open = chat.status === "open";
  $("composer").disabled = !open || (chat.mode === "model" && nextRole !== "user");
  $("composer-role").textContent = open ? `You write as: ${chat.mode === "model" ? "user" : nextRole}` : `This chat is ${chat.status}.`;
  $("composer").dataset.role = nextRole;
  $("send").disabled = $("composer").disabled;
  $("finish").disabled = !open;
  $("discard").disabled = !open;
  $("retry").hidden = !(open && chat.mode === "model" && last && last.role === "user");
}

function editMessage(node, message) {
  const area = el("textarea", { class: "edit-area", rows: 4 });
  area.value = message.content;
  const save = el("button", { type: "button", class: "primary" }, "save");
  const cancel = el("button", { type: "button" }, "cancel");
  const body = node.querySelector(".msg-text");
  body.replaceChildren(area, el("br"), save, cancel);
  area.focus();
  cancel.addEventListener("click", () => renderChat(S.chat));
  save.addEventListener("click", async () => {
    try {
      renderChat(await api("PUT", `/api/chats/${S.chat.id}/messages/${message.position}`, { content: area.value }));
      setStatus($("chat-status-line"), "saved ✓", "ok");
    } catch (err) {
      setStatus($("chat-status-line"), "not saved: " + err.message, "error");
    }
  });
}

async function loadChats(selectId) {
  const data = await api("GET", "/api/chats");
  const list = $("chats");
  list.replaceChildren();
  for (const c of data.chats.slice().reverse()) {
    const li = el("li", { class: "chat-item" + (S.chat && S.chat.id === c.id ? " active" : ""), "data-chat-id": c.id });
    li.append(el("span", { class: "badge " + c.status }, c.status),
      el("span", { class: "muted" }, ` ${c.mode === "model" ? "with model" : "both sides"} · ${c.turns} turns `),
      el("div", { class: "chat-preview" }, c.first || "(empty)"));
    li.addEventListener("click", async () => { renderChat(await api("GET", "/api/chats/" + c.id)); loadChats(); });
    list.append(li);
  }
  if (selectId) renderChat(await api("GET", "/api/chats/" + selectId));
}

async function newChat(mode) {
  if (mode === "model" && !S.chatAvailable) {
    setStatus($("chat-status-line"), "no model configured (start the app with --teacher)", "warn");
    return;
  }
  try {
    const system = $("system").value.trim();
    const chat = await api("POST", "/api/chats", { mode, system: system || null });
    renderChat(chat);
    await loadChats();
    $("composer").focus();
  } catch (err) {
    setStatus($("chat-status-line"), err.message, "error");
  }
}

async function send(thenFinish) {
  if (!S.chat || S.busy) return;
  const content = $("composer").value;
  S.busy = true;
  try {
    if (content.trim()) {
      const role = S.chat.mode === "model" ? "user" : $("composer").dataset.role;
      setStatus($("chat-status-line"), S.chat.mode === "model" ? "waiting for the model…" : "saving…", "busy");
      $("send").disabled = true;
      try {
        renderChat(await api("POST", `/api/chats/${S.chat.id}/messages`, { role, content }));
        $("composer").value = "";
      } catch (err) {
        if (err.data && err.data.chat) { renderChat(err.data.chat); $("composer").value = ""; }
        throw err;
      }
    }
    if (thenFinish) {
      renderChat(await api("POST", `/api/chats/${S.chat.id}/finish`));
      setStatus($("chat-status-line"), "chat finished and saved ✓", "ok");
    } else {
      setStatus($("chat-status-line"), "saved ✓", "ok");
    }
  } catch (err) {
    setStatus($("chat-status-line"), err.message, "error");
  } finally {
    S.busy = false;
    if (S.chat) renderChat(S.chat);
    if (!$("composer").disabled) $("composer").focus();
  }
  loadChats().catch(() => {});  // the list on the left; the chat itself is saved already
}

async function retry() {
  if (!S.chat || S.busy) return;
  S.busy = true;
  setStatus($("chat-status-line"), "waiting for the model…", "busy");
  try {
    renderChat(await api("POST", `/api/chats/${S.chat.id}/reply`));
    setStatus($("chat-status-line"), "saved ✓", "ok");
  } catch (err) {
    setStatus($("chat-status-line"), err.message, "error");
  } finally {
    S.busy = false;
  }
}

async function discard() {
  if (!S.chat) return;
  try {
    renderChat(await api("POST", `/api/chats/${S.chat.id}/discard`));
    await loadChats();
  } catch (err) {
    setStatus($("chat-status-line"), err.message, "error");
  }
}

function chatKey(e) {
  switch (e.key) {
    case "n": case "N": newChat(S.chatAvailable ? "model" : "self"); return true;
    case "m": case "M": newChat("self"); return true;
    case "i": case "/": if (!$("composer").disabled) $("composer").focus(); return true;
    default: return false;
  }
}

// ---------------------------------------------------------------------------------------------------
// views and keys

function showView(view) {
  S.view = view;
  $("rank-view").hidden = view !== "rank";
  $("chat-view").hidden = view !== "chat";
  $("tab-rank").classList.toggle("active", view === "rank");
  $("tab-chat").classList.toggle("active", view === "chat");
  if (view === "chat") loadChats().catch((err) => setStatus($("chat-status-line"), err.message, "error"));
}

function toggleHelp(show) {
  $("help").hidden = show === undefined ? !$("help").hidden : !show;
}

document.addEventListener("keydown", (e) => {
  const target = e.target;
  const typing = target && (target.tagName === "TEXTAREA" || target.tagName === "INPUT");
  if (typing) {
    if (e.key === "Escape") { target.blur(); e.preventDefault(); return; }
    if (target.id === "composer" && e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      send(e.ctrlKey || e.metaKey);
      return;
    }
    if (target.id === "better" && e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      target.blur();
      submit();
    }
    return;
  }
  if (e.altKey || e.metaKey || (e.ctrlKey && e.key !== "Enter")) return;
  let handled = true;
  if (!$("help").hidden && (e.key === "Escape" || e.key === "?")) toggleHelp(false);
  else if (e.key === "?") toggleHelp(true);
  else if (e.key === "r" || e.key === "R") showView("rank");
  else if (e.key === "c" || e.key === "C") showView("chat");
  else if (e.key === "g" || e.key === "G") document.body.classList.toggle("no-guidelines");
  else if (S.view === "rank") handled = rankKey(e);
  else if (S.view === "chat") {
    if (e.key === "Enter" && e.ctrlKey && S.chat) { send(true); }
    else handled = chatKey(e);
  } else handled = false;
  if (handled) e.preventDefault();
});

function wire() {
  $("tab-rank").addEventListener("click", () => showView("rank"));
  $("tab-chat").addEventListener("click", () => showView("chat"));
  $("toggle-guidelines").addEventListener("click", () => document.body.classList.toggle("no-guidelines"));
  $("toggle-help").addEventListener("click", () => toggleHelp());
  $("help").addEventListener("click", () => toggleHelp(false));
  $("submit").addEventListener("click", submit);
  $("undo").addEventListener("click", undo);
  $("tie-all").addEventListener("click", tieAll);
  $("write-better").addEventListener("click", () => { $("better-box").hidden = false; $("better").focus(); });
  $("skip").addEventListener("click", skip);
  $("back").addEventListener("click", back);
  $("new-model-chat").addEventListener("click", () => newChat("model"));
  $("new-self-chat").addEventListener("click", () => newChat("self"));
  $("send").addEventListener("click", () => send(false));
  $("finish").addEventListener("click", () => send(true));
  $("discard").addEventListener("click", discard);
  $("retry").addEventListener("click", retry);
}

async function start() {
  wire();
  try {
    const me = await api("GET", "/api/me");
    $("who").textContent = me.name;
    S.perItem = me.per_item;
    S.chatAvailable = me.chat.available;
    S.chatModel = me.chat.model;
    $("new-model-chat").disabled = !me.chat.available;
    $("model-name").textContent = me.chat.available ? `model: ${me.chat.model}` : "no model configured (--teacher)";
    await loadNext();
    document.body.dataset.ready = "1";
  } catch (err) {
    setStatus($("status"), err.message, "error");
  }
}

start();
