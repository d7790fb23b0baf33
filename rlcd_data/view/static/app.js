// rlcd-data view: the overview, browsing and the blind spot-check. Dataset text is untrusted: it only ever
// reaches the page as textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, offset: 0, limit: 20, total: 0, spot: null, position: 0 };

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + "%");
const interval = (ci) => (ci ? `${pct(ci[0])}–${pct(ci[1])}` : "");

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function table(head, rows) {
  const t = el("table");
  const tr = el("tr");
  head.forEach((h) => tr.appendChild(el("th", h)));
  t.appendChild(tr);
  rows.forEach((r) => {
    const row = el("tr");
    r.forEach((c) => row.appendChild(el("td", c)));
    t.appendChild(row);
  });
  return t;
}

// Overview

function showReport(info) {
  const box = $("report");
  box.replaceChildren();
  if (info.report_error) { box.appendChild(el("p", "The report failed: " + info.report_error, "error")); return; }
  const r = info.report;
  if (!r) { box.textContent = "computing the report…"; setTimeout(refreshInfo, 2000); return; }
  const sep = r.lexical_separability;
  box.appendChild(table(["figure", "value"], [
    ["pairs", String(r.pairs)],
    ["identical / near-identical pairs", `${r.identical} / ${r.near_identical}`],
    ["lexical separability", sep ? `${pct(sep.accuracy)} (95% ${interval(sep.ci95)})` : "too few pairs"],
    ["longer response is chosen", pct(r.longer_is_chosen)],
    ["mean soft label", r.soft_label_mean === null ? "–" : r.soft_label_mean.toFixed(3)],
  ]));
  const ul = el("ul", null, "verdicts");
  r.verdicts.forEach((v) => ul.appendChild(el("li", v)));
  box.appendChild(ul);
}

function showAgreement(a) {
  const box = $("agreement");
  box.replaceChildren();
  if (!a) { box.textContent = "No judgments yet: the Spot-check tab asks you about a blind sample."; return; }
  box.appendChild(el("p", `People agree with the labels in ${pct(a.agreement)} of ${a.n} decisive judgments ` +
    `(95% interval ${interval(a.interval)}); ${a.ties} of ${a.judgments} were "can't tell".`, "headline"));
  const rows = Object.entries(a.annotators).map(([name, f]) => [name, String(f.judgments), String(f.ties), pct(f.agreement), interval(f.interval)]);
  box.appendChild(table(["annotator", "judgments", "can't tell", "agreement", "95% interval"], rows));
  if (a.per_descriptor) {
    box.appendChild(table(["descriptor pair", "judgments", "agreement", "95% interval"],
      Object.entries(a.per_descriptor).map(([d, f]) => [d, String(f.judgments), pct(f.agreement), interval(f.interval)])));
  }
  if (a.by_confidence) {
    box.appendChild(table(["chosen_probability", "judgments", "agreement"],
      a.by_confidence.filter((b) => b.judgments).map((b) => [`${b.bin[0]}–${b.bin[1]}`, String(b.judgments), pct(b.agreement)])));
  }
  if (a.between_annotators.length) {
    box.appendChild(table(["annotators", "rows in common", "same choice"],
      a.between_annotators.map((b) => [b.annotators.join(" & "), String(b.rows), pct(b.same_choice)])));
  }
}

async function refreshInfo() {
  const info = await api("/api/info");
  state.info = info;
  $("source").textContent = `${info.source} · ${info.rows} pairs`;
  showReport(info);
  showAgreement(info.agreement);
  return info;
}

async function start() {
  const info = await refreshInfo();
  const plots = $("plots");
  info.plots.forEach((name, i) => {
    const img = el("img");
    img.src = `/api/plot/${i}`;
    img.alt = name;
    plots.appendChild(img);
  });
  const select = $("descriptor");
  info.descriptors.forEach((d) => {
    const option = el("option", d.pair);
    option.value = String(d.index);
    select.appendChild(option);
  });
  $("label-filter").hidden = !info.soft_labels;
  $("annotator").value = localStorage.getItem("rlcd-annotator") || "";
  route();
  loadRows(0);
  const saved = JSON.parse(localStorage.getItem("rlcd-spot") || "null");
  if (saved && saved.source === info.source) {
    $("size").value = saved.size;
    $("seed").value = saved.seed;
    if (location.hash === "#spot" && $("annotator").value) beginSpot();
  }
}

// Browse

function filterQuery() {
  const params = new URLSearchParams({ offset: state.offset, limit: state.limit });
  ["q", "descriptor", "label_min", "label_max", "length_min", "length_max"].forEach((id) => {
    if ($(id).value !== "") params.set(id, $(id).value);
  });
  if ($("flagged").checked) params.set("flagged", "1");
  return params.toString();
}

function rowView(r) {
  const box = el("div", null, "row");
  box.dataset.row = r.row;
  const meta = el("p", null, "meta");
  meta.appendChild(el("span", `#${r.row}`));
  if (r.descriptor) meta.appendChild(el("span", ` · ${r.descriptor}`));
  if (r.label !== null) meta.appendChild(el("span", ` · chosen_probability ${r.label.toFixed(3)}`));
  meta.appendChild(el("span", ` · chosen ${r.chosen_length}, rejected ${r.rejected_length} ${r.unit} `));
  if (r.flags === null) meta.appendChild(el("span", "flags: computing…"));
  else r.flags.forEach((f) => meta.appendChild(el("span", f, "flag")));
  box.appendChild(meta);
  box.appendChild(el("h4", "Conversation"));
  box.appendChild(el("pre", r.prompt.trimStart()));
  if (r.p_plus) {
    const details = el("details");
    details.appendChild(el("summary", "p+ and p- (what the simulator saw)"));
    details.appendChild(el("pre", r.p_plus));
    details.appendChild(el("pre", r.p_minus));
    box.appendChild(details);
  }
  const sides = el("div", null, "sides");
  [["Chosen", r.chosen], ["Rejected", r.rejected]].forEach(([name, text]) => {
    const side = el("div", null, "side");
    side.appendChild(el("h3", name));
    side.appendChild(el("pre", text));
    sides.appendChild(side);
  });
  box.appendChild(sides);
  return box;
}

async function loadRows(offset) {
  state.offset = Math.max(0, offset);
  const page = await api("/api/rows?" + filterQuery());
  state.total = page.total;
  $("count").textContent = `${page.total} matching pairs`;
  $("rows").replaceChildren(...page.rows.map(rowView));
  const last = Math.min(state.offset + state.limit, page.total);
  $("page").textContent = page.total ? `${state.offset + 1}–${last} of ${page.total}` : "";
  $("prev").disabled = state.offset === 0;
  $("next").disabled = last >= page.total;
}

// Spot-check

async function beginSpot() {
  const annotator = $("annotator").value.trim();
  const size = parseInt($("size").value, 10), seed = parseInt($("seed").value, 10);
  $("spot-error").textContent = "";
  try {
    const spot = await api(`/api/spot?${new URLSearchParams({ seed, size, annotator })}`);
    localStorage.setItem("rlcd-annotator", annotator);
    localStorage.setItem("rlcd-spot", JSON.stringify({ source: state.info.source, size, seed }));
    state.spot = { ...spot, annotator };
    if (document.activeElement) document.activeElement.blur();  // the keys now answer, not type
    const first = spot.items.findIndex((item) => !(String(item.row) in spot.judged));
    showItem(first === -1 ? spot.items.length : first);
  } catch (e) {
    $("spot-error").textContent = e.message;
  }
}

function showItem(position) {
  const spot = state.spot;
  state.position = Math.max(0, Math.min(position, spot.items.length));
  const done = Object.keys(spot.judged).length;
  const finished = state.position >= spot.items.length;
  $("spot-item").hidden = finished;
  $("spot-done").hidden = !finished || done < spot.items.length;
  if (finished) return;
  const item = spot.items[state.position];
  $("progress").textContent = `Pair ${state.position + 1} of ${spot.items.length} · ${done} judged`;
  $("question").textContent = spot.question;
  $("conversation").textContent = item.conversation.trimStart();
  $("left").textContent = item.left;
  $("right").textContent = item.right;
}

async function choose(choice) {
  const spot = state.spot;
  if (!spot || state.position >= spot.items.length) return;
  const item = spot.items[state.position];
  try {
    await api("/api/judge", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ annotator: spot.annotator, seed: spot.seed, size: spot.size, row: item.row, choice }),
    });
    $("spot-error").textContent = "";
    spot.judged[String(item.row)] = choice;
    const next = spot.items.findIndex((it, i) => i > state.position && !(String(it.row) in spot.judged));
    showItem(next === -1 ? spot.items.length : next);
    if (Object.keys(spot.judged).length === spot.items.length) refreshInfo();
  } catch (e) {
    $("spot-error").textContent = e.message;
  }
}

// Wiring

function route() {
  const name = (location.hash || "#overview").slice(1);
  ["overview", "browse", "spot"].forEach((s) => {
    $(s).hidden = s !== name;
    $(`nav-${s}`).classList.toggle("active", s === name);
  });
  if (name === "overview" && state.info) refreshInfo();
}

window.addEventListener("hashchange", route);
$("filters").addEventListener("submit", (e) => { e.preventDefault(); loadRows(0); });
$("prev").addEventListener("click", () => loadRows(state.offset - state.limit));
$("next").addEventListener("click", () => loadRows(state.offset + state.limit));
$("spot-setup").addEventListener("submit", (e) => { e.preventDefault(); beginSpot(); });
document.querySelectorAll("[data-choice]").forEach((b) => b.addEventListener("click", () => choose(b.dataset.choice)));
$("back").addEventListener("click", () => state.spot && showItem(state.position - 1));
document.addEventListener("keydown", (e) => {
  if ($("spot").hidden || !state.spot || e.target.tagName === "INPUT") return;
  const keys = { ArrowLeft: "left", 1: "left", ArrowRight: "right", 2: "right", ArrowDown: "tie", 0: "tie", t: "tie" };
  if (e.key in keys) { e.preventDefault(); choose(keys[e.key]); }
  if (e.key === "Backspace") { e.preventDefault(); showItem(state.position - 1); }
});
start().catch((e) => { document.body.prepend(el("p", "rlcd-data view: " + e.message, "error")); });
