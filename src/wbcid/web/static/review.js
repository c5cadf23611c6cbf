// wbcid review: a gallery over the HTTP API; every string is shown with textContent (never as HTML).
"use strict";
const LABELS = ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil", "other"];
let queue = [];          // the API's review-queue order: flagged, then least confident
let cells = [];          // the order the keys walk: the gallery's, fixed until the next load so they move predictably
let selected = 0;
// "queue": one list in the queue's order, which docs/loop.md measured; "type": grouped by the current label
let view = localStorage.getItem("wbcid-review-view") === "type" ? "type" : "queue";
const undo = [];         // [{id, label, reviewed}] before each change (by id: a reload or a view may move the cell)

const $ = (sel) => document.querySelector(sel);
function el(tag, props = {}, children = []) {
  const node = Object.assign(document.createElement(tag), props);
  for (const child of children) node.append(child);
  return node;
}
function status(text) { $("#status").textContent = text; }

async function api(method, path, body) {
  const response = await fetch(path, {method, headers: {"Content-Type": "application/json"},
                                      body: body === undefined ? undefined : JSON.stringify(body)});
  if (!response.ok) {  // the server's reason (its "detail"), not a page of JSON
    const text = await response.text();
    let detail = text;
    try { detail = JSON.parse(text).detail ?? text; } catch {}
    const error = new Error(`${response.status} ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    error.status = response.status;
    throw error;
  }
  return response.json();
}

async function load() {
  const current = cells[selected]?.id;
  queue = (await api("GET", "/api/cells")).cells;
  renderGallery();
  await renderDifferential();
  const at = cells.findIndex((c) => c.id === current);  // the same cell again; at first, the first not yet verified
  select(at >= 0 ? at : Math.max(0, cells.findIndex((c) => !c.reviewed)));
}

function setView(name) {
  view = name;
  localStorage.setItem("wbcid-review-view", view);
  $("#view").value = view;
  load();
}

function caption(cell) {
  const mark = cell.reviewed ? "\u2713 " : cell.flagged ? "? " : "";
  const was = cell.reviewed && cell.label !== cell.model_label ? ` (model: ${cell.model_label})` : "";
  return `${mark}${cell.label} ${cell.confidence.toFixed(2)}${was}${cell.missing ? " (image missing)" : ""}`;
}

function tile(cell, index) {
  const node = el("div", {className: "tile", tabIndex: -1, title: cell.flagged && cell.why ? `flagged: ${cell.why}` : ""}, [
    el("img", {src: `/api/cells/${cell.id}/image`, loading: "lazy", alt: `cell ${cell.id}`}),
    el("div", {className: "caption", textContent: caption(cell)})]);
  node.dataset.id = cell.id;
  node.dataset.index = index;
  node.classList.toggle("flagged", cell.flagged && !cell.reviewed);
  node.classList.toggle("reviewed", cell.reviewed);
  node.classList.toggle("changed", cell.reviewed && cell.label !== cell.model_label);
  node.addEventListener("click", () => select(index));
  return node;
}

function groups() {
  if (view === "queue") return [["to verify first: flagged, then least confident", queue]];
  return LABELS.map((label) => [label, queue.filter((c) => c.label === label)]).filter(([, members]) => members.length);
}

function renderGallery() {
  const gallery = $("#gallery");
  gallery.replaceChildren();
  cells = [];
  for (const [title, members] of groups()) {
    const tiles = members.map((cell) => tile(cell, cells.push(cell) - 1));
    gallery.append(el("h2", {textContent: `${title} (${members.length})`}), el("div", {className: "tiles"}, tiles));
  }
}

function refreshTile(index) {
  const old = document.querySelector(`.tile[data-index="${index}"]`);
  const fresh = tile(cells[index], index);
  old.replaceWith(fresh);
  if (index === selected) fresh.classList.add("selected");
}

function select(index) {
  if (!cells.length) return;
  selected = Math.max(0, Math.min(index, cells.length - 1));
  document.querySelectorAll(".tile.selected").forEach((t) => t.classList.remove("selected"));
  const node = document.querySelector(`.tile[data-index="${selected}"]`);
  node.classList.add("selected");
  node.scrollIntoView({block: "nearest"});
  const cell = cells[selected];
  $("#selected").textContent = `cell ${cell.id}: model ${cell.model_label} (${cell.confidence.toFixed(2)}, OOD ${
    cell.ood_score === null ? "n/a" : cell.ood_score.toFixed(2)})${
    cell.flagged ? `, flagged${cell.why ? ` (${cell.why})` : ""}` : ""}; ` +
    `${cell.reviewed ? `verified by ${cell.reviewer} as ${cell.label}` : "not yet verified"}; from ${cell.image}` +
    (cell.missing ? " (not found there: moved or deleted? put it back to see the cell)" : "");
  $("#field").src = `/api/cells/${cell.id}/field`;
  $("#gradcam").src = `/api/cells/${cell.id}/gradcam`;
}

// Each change sends the cell's version this page showed: a cell someone else changed meanwhile is refused.
async function setLabel(label) {
  const cell = cells[selected];
  if (await save(selected, () => api("PUT", `/api/cells/${cell.id}`, {label, version: cell.version}))) {
    undo.push({id: cell.id, label: cell.label, reviewed: cell.reviewed});
    select(nextToVerify(selected));
  }
}

// Enter: the model's label for a cell not yet verified. A verified one is left as it is: a second round
// shows the first round's cells verified among the rest, and Enter replaced their labels by the model's.
function confirm() {
  const cell = cells[selected];
  if (!cell.reviewed) return setLabel(cell.model_label);
  status(`cell ${cell.id} is verified as ${cell.label} by ${cell.reviewer}: left as it is (1-5 or 0 change it)`);
  select(nextToVerify(selected));
}

function nextToVerify(index) {  // the next cell not yet verified, in the order shown; else simply the next
  const later = cells.findIndex((c, i) => i > index && !c.reviewed);
  return later >= 0 ? later : index + 1;
}

async function undoLast() {
  const last = undo.pop();
  if (!last) return status("nothing to undo");
  const index = cells.findIndex((c) => c.id === last.id);
  const version = cells[index].version;
  await save(index, () => last.reviewed ? api("PUT", `/api/cells/${last.id}`, {label: last.label, version})
                                        : api("DELETE", `/api/cells/${last.id}/review?version=${version}`));
  select(index);
}

async function save(index, request) {  // true once saved
  try {
    cells[index] = await request();
    refreshTile(index);
    await renderDifferential();
    status(`saved cell ${cells[index].id}: ${cells[index].label}`);
    return true;
  } catch (error) {
    status(`not saved: ${error.message}`);
    if (error.status === 409) await load();  // changed meanwhile: show the page as it is now
    return false;
  }
}

function percent(value) { return value === null ? "" : value.toFixed(1); }

function differentialRows(totals) {
  return Object.entries(totals.classes).map(([name, c]) => {
    const flag = c.flag ? `${c.flag.toUpperCase()} (${c.conclusive ? "conclusive" : "inconclusive"})` : "";
    const row = el("tr", {className: c.flag ? (c.conclusive ? "conclusive" : "inconclusive") : ""},
      [name, c.count, percent(c.percent), c.ci95 ? `${percent(c.ci95[0])}-${percent(c.ci95[1])}` : "",
       `${c.reference[0]}-${c.reference[1]}`, flag].map((text) => el("td", {textContent: String(text)})));
    row.dataset.type = name;
    return row;
  });
}

async function renderDifferential() {
  const totals = await api("GET", "/api/differential");
  $("#progress").textContent = `${totals.counted} counted; ${totals.verified} of ${totals.detected} verified, ` +
    `${totals.flagged} flagged and not yet reviewed, ${totals.other} not a WBC` +
    (totals.counted < 100 ? `; a 100-cell differential needs ${100 - totals.counted} more` : "");
  $("#differential tbody").replaceChildren(...differentialRows(totals));
  const specimens = $("#specimens");
  specimens.replaceChildren();
  for (const [name, t] of Object.entries(totals.specimens || {})) {
    specimens.append(el("h3", {textContent: `${name}: ${t.counted} counted, ${t.verified} verified`}),
                     el("table", {}, [el("tbody", {}, differentialRows(t))]));
  }
}

document.addEventListener("keydown", (event) => {
  if (["INPUT", "SELECT"].includes(event.target.tagName) || event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key;
  if (key >= "1" && key <= "5") setLabel(LABELS[Number(key) - 1]);
  else if (key === "0" || key === "x") setLabel("other");
  else if (key === "Enter") confirm();
  else if (key === "ArrowRight" || key === "ArrowDown") select(selected + 1);
  else if (key === "ArrowLeft" || key === "ArrowUp") select(selected - 1);
  else if (key === "u") undoLast();
  else if (key === "v") setView(view === "queue" ? "type" : "queue");
  else return;
  event.preventDefault();
});
document.querySelectorAll("#buttons button[data-label]").forEach((b) => b.addEventListener("click", () => setLabel(b.dataset.label)));
$("#confirm").addEventListener("click", confirm);
$("#undo").addEventListener("click", undoLast);  // a tablet or phone has no "u" key
$("#export").addEventListener("click", async () => {
  try {
    status((await api("POST", "/api/export")).summary);
  } catch (error) {
    status(`not exported: ${error.message}`);
  }
});
for (const [id, what] of [["field", "field view"], ["gradcam", "Grad-CAM"]]) {
  $(`#${id}`).addEventListener("error", async (event) => {  // an image the server refused: ask it why
    try { await api("GET", new URL(event.target.src).pathname); } catch (error) { status(`no ${what}: ${error.message}`); }
  });
}
$("#view").value = view;
$("#view").addEventListener("change", (event) => { event.target.blur(); setView(event.target.value); });
window.addEventListener("focus", load);  // another tab may have changed cells meanwhile
load();
