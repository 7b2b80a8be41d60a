// The job page (app/ui/__init__.py): plain JavaScript on the public REST API, with the key the
// person types in. Every tenant-supplied string reaches the page through text nodes (`h`), never
// as HTML.

const KEY = "gatt.api_key";
const POLL_MS = 2000;
const STATS_DIALOGUES = 2000; // reward statistics read at most this many sampled dialogues
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const main = document.getElementById("main");
const forget = document.getElementById("forget");
let view = { stop() {} }; // the view on screen; stop() ends its polling

// --- helpers -------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, String(value));
  if (text !== undefined) el.textContent = text;
  return el;
}

class ApiError extends Error {
  constructor(status, error) {
    super(error ? `${status} ${error.code}: ${error.message}` : `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, { etag, blob } = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY)}` };
  if (etag) headers["If-None-Match"] = etag;
  const response = await fetch(path, { headers });
  if (response.status === 304) return { changed: false, etag };
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    throw new ApiError(response.status, body && body.error);
  }
  const body = blob ? await response.blob() : await response.json();
  return { changed: true, etag: response.headers.get("ETag"), body };
}

async function post(path, body) {
  const response = await fetch(path, {
    method: "POST",
    headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY)}`, "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json().catch(() => null);
  if (!response.ok) throw new ApiError(response.status, answer && answer.error);
  return answer;
}

async function everyPage(path, limit, after = null, most = Infinity) {
  const rows = [];
  while (rows.length < most) {
    const { body } = await api(`${path}?limit=${limit}${after === null ? "" : `&after=${after}`}`);
    rows.push(...body.data);
    if (!body.has_more) break;
    after = body.next_after;
  }
  return rows;
}

const fmt = (x, digits = 3) => (typeof x === "number" && isFinite(x) ? Number(x.toPrecision(digits)).toString() : "–");
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  return s >= 3600 ? `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`
    : s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}
const status = (job) => h("span", { class: `status ${job.status}`, "data-status": job.status }, job.status);
function bar(fraction, label) {
  const fill = h("div");
  fill.style.width = `${(100 * Math.min(Math.max(fraction, 0), 1)).toFixed(1)}%`; // CSSOM: the CSP allows no style attributes
  return h("div", { class: "bar", role: "progressbar", "aria-label": label, "aria-valuenow": Math.round(fraction * 100) }, fill);
}

function median(values) {
  const v = [...values].sort((a, b) => a - b);
  if (!v.length) return NaN;
  const m = Math.floor(v.length / 2);
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
}

// A line chart of [x, y] points: axes, min/max labels, a dot per point when there are few.
function chart(name, points, xLabel) {
  const W = 560, H = 200, L = 52, R = 12, T = 12, B = 30;
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, "data-chart": name, "data-points": points.length });
  svg.append(s("title", {}, name));
  if (!points.length) {
    svg.append(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no steps yet"));
    return svg;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  if (y0 === y1) [y0, y1] = [y0 - Math.abs(y0 || 1) * 0.1, y1 + Math.abs(y1 || 1) * 0.1];
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  svg.append(
    s("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }),
    s("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    s("text", { x: L - 6, y: Y(y1) + 4, "text-anchor": "end" }, fmt(y1)),
    s("text", { x: L - 6, y: Y(y0) + 4, "text-anchor": "end" }, fmt(y0)),
    s("text", { x: L, y: H - 10, "text-anchor": "start" }, fmt(x0)),
    s("text", { x: W - R, y: H - 10, "text-anchor": "end" }, fmt(x1)),
    s("text", { x: (L + W - R) / 2, y: H - 10, "text-anchor": "middle" }, xLabel),
    s("polyline", { class: "line", points: points.map(([x, y]) => `${X(x).toFixed(1)},${Y(y).toFixed(1)}`).join(" ") }),
  );
  if (points.length <= 40) for (const [x, y] of points) svg.append(s("circle", { class: "dot", cx: X(x), cy: Y(y), r: 2.5 }));
  return svg;
}

// --- the key -------------------------------------------------------------------------------

function keyForm(message) {
  const input = h("input", { type: "password", name: "key", autocomplete: "off", placeholder: "gatt_…", required: true });
  const problem = h("p", { class: "error" }, message || "");
  const form = h("form", { class: "key card", onsubmit: async (e) => {
      e.preventDefault();
      sessionStorage.setItem(KEY, input.value.trim());
      try {
        await api("/v1/jobs?limit=1");
        route();
      } catch (err) {
        sessionStorage.removeItem(KEY);
        problem.textContent = `That key does not work: ${err.message}`;
      }
    } },
    h("h1", {}, "Your team's jobs"),
    h("p", { class: "muted" }, "An API key of your team. It stays in this tab and is sent only to this server."),
    input, problem, h("button", { class: "primary", type: "submit" }, "Open"));
  main.replaceChildren(form);
  input.focus();
}

forget.addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  route();
});

// --- the jobs list ---------------------------------------------------------------------------

function jobsView() {
  const body = h("tbody");
  const more = h("button", { type: "button", hidden: true }, "More");
  let next = null, appended = false;
  const row = (job) => h("tr", { "data-job": job.id },
    h("td", {}, h("a", { href: `#/jobs/${job.id}` }, job.name || job.id.slice(0, 8))),
    h("td", {}, status(job)),
    h("td", {}, job.stage || "–"),
    h("td", {}, bar(job.overall_progress, "job progress")),
    h("td", { class: "num" }, job.status === "running" ? duration(job.overall_eta_s) : ""),
    h("td", {}, when(job.created_at)));
  async function load(append) {
    const { body: page } = await api(`/v1/jobs?limit=25${append && next ? `&after=${next}` : ""}`);
    const rows = page.data.map(row);
    if (append) body.append(...rows); else body.replaceChildren(...rows);
    appended ||= append;
    next = page.next_after;
    more.hidden = !page.has_more;
    if (!rows.length && !append) body.append(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No jobs yet.")));
  }
  more.addEventListener("click", () => load(true));
  main.replaceChildren(h("h1", {}, "Jobs"), h("section", { class: "card" },
    h("table", { id: "jobs" }, h("thead", {}, h("tr", {},
      h("th", {}, "Job"), h("th", {}, "Status"), h("th", {}, "Stage"), h("th", {}, "Progress"),
      h("th", { class: "num" }, "Time left"), h("th", {}, "Created"))), body), more));
  load(false).catch(showError);
  // Kept fresh while it shows the first page only: a refresh would drop the pages added below.
  const timer = setInterval(() => document.hidden || appended || load(false).catch(showError), 5000);
  return { stop: () => clearInterval(timer) };
}

// --- one job -------------------------------------------------------------------------------

function jobView(id) {
  const summary = h("section", { class: "card", id: "summary" });
  const curves = h("div", { class: "grid", id: "curves" });
  const rewards = h("section", { class: "card", id: "rewards" }, h("h2", {}, "Reward per sampling batch"), h("p", { class: "muted" }, "After sampling."));
  const rounds = h("section", { class: "card", id: "rounds", hidden: true });
  const evaluation = h("section", { class: "card", id: "evaluation" }, h("h2", {}, "Evaluation"), h("p", { class: "muted" }, "After the job."));
  const samples = h("section", { class: "card", id: "samples" });
  const training = h("section", { class: "card", id: "training-set" });
  main.replaceChildren(h("p", {}, h("a", { href: "#/" }, "← Jobs")), summary, curves, rewards, rounds, evaluation, samples, training);

  let etag = null, timer = null, stopped = false, metrics = [], loaded = new Set();
  async function poll() {
    const { changed, etag: tag, body: job } = await api(`/v1/jobs/${id}`, { etag });
    etag = tag;
    if (changed) await render(job);
    if (!stopped && !(changed && TERMINAL.has(job.status))) timer = setTimeout(() => poll().catch(showError), POLL_MS);
  }
  async function render(job) {
    renderSummary(summary, job);
    const after = metrics.length ? metrics[metrics.length - 1].step : 0;
    metrics.push(...(await everyPage(`/v1/jobs/${id}/metrics`, 10000, after)));
    curves.replaceChildren(
      h("section", { class: "card" }, h("h2", {}, "Loss"), chart("loss", metrics.map((m) => [m.step, m.values.loss]), "step")),
      h("section", { class: "card" }, h("h2", {}, "Learning rate"), chart("learning_rate", metrics.map((m) => [m.step, m.values.learning_rate]), "step")));
    const sampled = job.stage && job.stage !== "synthesize" && job.stage !== "sample" || TERMINAL.has(job.status);
    if (sampled && !loaded.has("samples")) {
      loaded.add("samples");
      renderRewards(rewards, job, await everyPage(`/v1/jobs/${id}/samples`, 500, null, STATS_DIALOGUES).catch(() => []));
      browser(samples, "Samples", `/v1/jobs/${id}/samples`, sampleRow);
      browser(training, "Training set", `/v1/jobs/${id}/training-set`, trainingRow);
    }
    if ((job.config.rounds?.count ?? 1) > 1) {
      const { body } = await api(`/v1/jobs/${id}/rounds`);
      renderRounds(rounds, body);
    }
    if (job.status === "succeeded" && !loaded.has("evaluation") && job.config.evaluation.enabled) {
      loaded.add("evaluation");
      renderEvaluation(evaluation, id).catch((err) => evaluation.append(h("p", { class: "error" }, err.message)));
    }
  }
  poll().catch(showError);
  return { stop() { stopped = true; clearTimeout(timer); } };
}

function renderSummary(card, job) {
  const progress = (label, fraction, detail, name) => h("div", { class: "progress-row", "data-progress": name },
    h("span", {}, label), bar(fraction, `${label} progress`), h("span", { class: "muted" }, detail));
  const overallLeft = job.status === "running" && job.overall_eta_s !== null ? `, ${duration(job.overall_eta_s)} left` : "";
  const stageLeft = job.status === "running" && job.eta_s ? `, ${duration(job.eta_s)} left` : "";
  card.replaceChildren(...[
    h("h1", {}, job.name || `Job ${job.id}`, " ", status(job)),
    job.status === "succeeded" ? h("p", {}, h("a", { href: `#/jobs/${job.id}/chat`, id: "chat-link" }, "Chat with its checkpoint and base model, side by side →")) : null,
    progress("Job", job.overall_progress, `${Math.round(job.overall_progress * 100)}%${overallLeft}`, "job"),
    job.stage && job.status === "running"
      ? progress(job.stage, job.progress, `${job.progress_done}/${job.progress_total}${stageLeft}`, "stage") : null,
    h("dl", { class: "facts" },
      h("dt", {}, "Id"), h("dd", { class: "mono" }, job.id),
      h("dt", {}, "Model"), h("dd", {}, job.model),
      h("dt", {}, "Stage"), h("dd", {}, job.stage || "–"),
      h("dt", {}, "Created"), h("dd", {}, when(job.created_at)),
      h("dt", {}, "Finished"), h("dd", {}, when(job.finished_at)),
      h("dt", {}, "Trained tokens"), h("dd", {}, job.trained_tokens.toLocaleString()),
      job.queue_position !== null && job.queue_position !== undefined ? [h("dt", {}, "Queue position"), h("dd", {}, job.queue_position)] : null,
      job.error ? [h("dt", {}, "Error"), h("dd", { class: "error" }, `${job.error.code}: ${job.error.message}`)] : null),
  ].filter(Boolean));
}

// Turns of each batch of `sampling.batch_prompts` dialogues, in the order they were sampled.
function renderRewards(card, job, rows) {
  const size = job.config.sampling.batch_prompts;
  const batches = [];
  for (const row of rows) {
    const i = Math.floor(row.index / size);
    (batches[i] = batches[i] || []).push(...row.turns);
  }
  const body = batches.map((turns, i) => {
    const totals = turns.flatMap((t) => t.candidates.map((c) => c.reward.total));
    return h("tr", {},
      h("td", { class: "num" }, i + 1),
      h("td", { class: "num" }, turns.length),
      h("td", { class: "num" }, fmt(turns.reduce((a, t) => a + t.stats.max_reward, 0) / turns.length)),
      h("td", { class: "num" }, fmt(median(totals))),
      h("td", { class: "num" }, fmt(turns.reduce((a, t) => a + t.stats.pass_rate, 0) / turns.length)),
      h("td", { class: "num" }, fmt(turns.filter((t) => t.chosen !== null).length / turns.length)));
  });
  card.replaceChildren(h("h2", {}, "Reward per sampling batch"),
    h("p", { class: "muted" }, `Batches of ${size} dialogues in sampling order (the first ${STATS_DIALOGUES} at most). Max: the best of the K candidates, averaged over turns; pass rate: the share of candidates at the threshold; kept: turns with a chosen reply.`),
    rows.length ? h("table", { id: "reward-table" }, h("thead", {}, h("tr", {},
      ...["Batch", "Turns", "Mean max", "Median", "Pass rate", "Kept"].map((t) => h("th", { class: "num" }, t)))),
    h("tbody", {}, body)) : h("p", { class: "muted" }, "No samples."));
}

// Multi-round jobs: the kept reward batch by batch, round after round (the paper's appendix plot).
function renderRounds(card, list) {
  card.hidden = false;
  const points = list.data.flatMap((r) => r.batches).map((b, i) => [i + 1, b.median_reward]).filter(([, y]) => y !== null);
  card.replaceChildren(h("h2", {}, `Rounds (${list.data.length} of ${list.count} done)`),
    h("p", { class: "muted" }, "Median over turns of the best candidate's reward, per sampling batch, the rounds one after another."),
    chart("round_reward", points, "batch, rounds in order"),
    h("table", { id: "rounds-table" }, h("thead", {}, h("tr", {},
      ...["Round", "Steps", "Mean best reward", "Pass rate", "Examples", "Final loss"].map((t) => h("th", { class: "num" }, t)))),
    h("tbody", {}, ...list.data.map((r) => h("tr", { "data-round": r.round },
      h("td", { class: "num" }, r.round),
      h("td", { class: "num" }, `${r.steps.first}–${r.steps.last}`),
      h("td", { class: "num" }, fmt(r.selection.mean_best_reward)),
      h("td", { class: "num" }, fmt(r.selection.pass_rate)),
      h("td", { class: "num" }, r.examples),
      h("td", { class: "num" }, r.final_loss === null ? "–" : fmt(r.final_loss)))))));
}

async function renderEvaluation(card, id) {
  const { body: report } = await api(`/v1/jobs/${id}/evaluation`);
  const loss = report.validation_loss || {};
  card.replaceChildren(h("h2", {}, "Evaluation: adherence by turn, before and after"),
    h("pre", { id: "adherence-table" }, report.table),
    loss.base && loss.gatt ? h("p", {}, `Validation loss: base ${fmt(loss.base.loss)}, after GAtt ${fmt(loss.gatt.loss)}`) : null);
  try {
    const { body: png } = await api(`/v1/jobs/${id}/evaluation/attention.png`, { blob: true });
    card.append(h("h2", {}, "Attention to the instruction"), h("img", { class: "attention", id: "attention-plot", alt: "attention on the instruction by turn", src: URL.createObjectURL(png) }));
  } catch (err) {
    if (err.status !== 404) throw err;
  }
}

// A row-by-row browser of samples or training rows (`after` = the row's position).
function browser(card, title, path, render) {
  const content = h("div");
  const position = h("span", { class: "muted" });
  const prev = h("button", { type: "button" }, "← Previous");
  const next = h("button", { type: "button" }, "Next →");
  let at = 0;
  async function show(i) {
    const { body } = await api(`${path}?limit=1&after=${i}`);
    if (!body.data.length) {
      content.replaceChildren(h("p", { class: "muted" }, "Nothing here."));
      prev.disabled = next.disabled = true;
      return;
    }
    at = i;
    content.replaceChildren(render(body.data[0]));
    position.textContent = `row ${i + 1}`;
    prev.disabled = i === 0;
    next.disabled = !body.has_more;
  }
  prev.addEventListener("click", () => show(at - 1).catch(showError));
  next.addEventListener("click", () => show(at + 1).catch(showError));
  card.replaceChildren(h("h2", {}, title), h("div", { class: "pager" }, prev, next, position), content);
  show(0).catch(showError);
}

function sampleRow(row) {
  return h("div", { class: "sample", "data-dialogue": row.index },
    h("p", {}, h("strong", {}, "Instruction: "), row.instruction.text),
    row.stopped ? h("p", { class: "muted" }, `Stopped: ${row.stopped}`) : null,
    row.turns.map((turn) => h("div", { class: "turn" },
      h("div", { class: "msg" }, h("span", { class: "role" }, `user, turn ${turn.turn + 1}`), row.users[turn.turn]),
      turn.candidates.map((c, i) => h("div", {
          class: `candidate${i === turn.chosen ? " chosen" : ""}${c.eligible ? "" : " ineligible"}`,
          "data-chosen": i === turn.chosen ? "true" : "false" },
        h("div", { class: "meta" },
          i === turn.chosen ? h("span", { class: "tag" }, "✓ chosen") : null,
          `reward ${fmt(c.reward.total)} · verifier ${fmt(c.reward.verifier)} · relevance ${fmt(c.reward.relevance)}`,
          c.eligible ? "" : " · not eligible", ` · ${c.reward.reason}`),
        h("div", { class: "text" }, c.text))))));
}

function trainingRow(row) {
  // A DPO pair (training.objective dpo or sft+dpo) also shows the candidate trained against the kept reply.
  const rejected = row.rejected && h("div", { class: "msg rejected", "data-rejected": "true" },
    h("span", { class: "role" }, `rejected (${row.rejected.reason}, candidate ${row.rejected.candidate})`), row.rejected.text);
  return h("div", { class: "training" },
    h("p", { class: "muted" }, `Dialogue ${row.index}, history: ${row.history}, scope: ${row.scope}, ${row.trained_tokens} of ${row.tokens} tokens trained (highlighted).`),
    row.messages.map((m, i) => h("div", { class: `msg${row.trained[i] ? " trained" : ""}`, "data-trained": row.trained[i] ? "true" : "false" },
      h("span", { class: "role" }, m.role), m.content)),
    rejected);
}

// --- the playground --------------------------------------------------------------------------

// The same conversation with the base model and the checkpoint, side by side: the instruction is
// given once, attached to the first user turn as GAtt trains it (gatt/augment.py, `attach`), and
// each model keeps its own replies as its history. Greedy, so a reply can be reproduced.
function chatView(id) {
  const instruction = h("input", { type: "text", id: "instruction", placeholder: "An instruction to keep, e.g. Always answer in French." });
  const message = h("textarea", { id: "message", rows: 2, placeholder: "Your message", required: true });
  const send = h("button", { class: "primary", type: "submit", id: "send" }, "Send to both");
  const columns = {
    base: { log: h("div", { class: "chat-log", id: "chat-base" }), messages: [] },
    checkpoint: { log: h("div", { class: "chat-log", id: "chat-checkpoint" }), messages: [] },
  };
  const problem = h("p", { class: "error", id: "chat-error" });
  const form = h("form", { class: "chat-form", onsubmit: async (e) => {
      e.preventDefault();
      const text = message.value.trim();
      if (!text) return;
      const first = columns.base.messages.length === 0;
      const content = first && instruction.value.trim() ? `${instruction.value.trim()}\n\n${text}` : text;
      instruction.disabled = true;
      send.disabled = true;
      problem.textContent = "";
      message.value = "";
      try {
        await Promise.all(Object.entries(columns).map(async ([model, column]) => {
          column.messages.push({ role: "user", content });
          column.log.append(h("div", { class: "msg", "data-role": "user" }, h("span", { class: "role" }, "user"), content));
          const answer = await post(`/v1/jobs/${id}/chat`, { model, messages: column.messages });
          column.messages.push(answer.message);
          column.log.append(h("div", { class: "msg reply", "data-role": "assistant" },
            h("span", { class: "role" }, `${model}${answer.step ? ` (step ${answer.step})` : ""}${answer.finish_reason === "length" ? ", cut" : ""}`),
            answer.message.content));
        }));
      } catch (err) {
        problem.textContent = err.message;
        for (const column of Object.values(columns)) { // keep both histories the same length
          if (column.messages.length % 2) column.messages.pop();
        }
      } finally {
        send.disabled = false;
        message.focus();
      }
    } },
    h("label", {}, "Instruction, given once in the first turn", instruction),
    h("label", {}, "Message", message), send, problem);
  main.replaceChildren(
    h("p", {}, h("a", { href: `#/jobs/${id}` }, "← The job")),
    h("h1", {}, "Playground"),
    h("section", { class: "card" }, form),
    h("div", { class: "grid" },
      h("section", { class: "card" }, h("h2", {}, "Base model"), columns.base.log),
      h("section", { class: "card" }, h("h2", {}, "Checkpoint (after GAtt)"), columns.checkpoint.log)));
  message.focus();
  return { stop() {} };
}

// --- routing ---------------------------------------------------------------------------------

function showError(err) {
  if (err.status === 401) { // revoked while the page was open
    sessionStorage.removeItem(KEY);
    return route("That key was refused; type another.");
  }
  const shown = document.getElementById("error") || main.insertBefore(h("p", { class: "error", id: "error" }), main.firstChild);
  shown.textContent = err.message;
}

function route(message) {
  view.stop();
  if (!sessionStorage.getItem(KEY)) {
    forget.hidden = true;
    view = { stop() {} };
    return keyForm(message);
  }
  forget.hidden = false;
  const match = location.hash.match(/^#\/jobs\/([0-9a-f-]{36})(\/chat)?$/);
  view = !match ? jobsView() : match[2] ? chatView(match[1]) : jobView(match[1]);
}

window.addEventListener("hashchange", () => route());
route();
