"use strict";
// The attention page. Everything it shows comes from the JSON block #data, written by tfkit/report.py;
// nothing is fetched. Text from the input only ever goes through textContent and fillText.

const DATA = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
// head -1 is the mean of the heads; current is the chosen matrix, decoded (null: not in the page)
const state = { module: 0, head: 0, current: null, hover: null, picked: new Set() };

// -- decoding ------------------------------------------------------------------------------------
function bytes(base64) {
  const text = atob(base64);
  const out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

async function inflate(base64) {
  const stream = new Blob([bytes(base64)]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

const SQUARE = Float32Array.from({ length: 256 }, (_, q) => (q / 255) ** 2); // weights are stored as 255·√w
const decoded = new Map(); // a module's weights are inflated once, when first opened

function weightsOf(key, base64) {
  if (!decoded.has(key)) decoded.set(key, inflate(base64).then((codes) => {
    const values = new Float32Array(codes.length);
    for (let i = 0; i < codes.length; i++) values[i] = SQUARE[codes[i]];
    return values;
  }));
  return decoded.get(key);
}

function array(a) { // a recipe's array: {shape, lo, hi, bytes} in 8 bits over [lo, hi]
  const step = (a.hi - a.lo) / 255;
  return { shape: a.shape, values: Float32Array.from(bytes(a.bytes), (q) => a.lo + q * step) };
}

async function matrix(m, head) {
  const mod = DATA.modules[m];
  if (!mod.weights) return null;
  const all = await weightsOf(m, mod.weights);
  const [heads, rows, cols] = mod.shape, size = rows * cols;
  let values = all.subarray(head * size, (head + 1) * size);
  if (head < 0) {
    values = new Float32Array(size);
    for (let h = 0; h < heads; h++) for (let i = 0; i < size; i++) values[i] += all[h * size + i] / heads;
  }
  return { name: mod.name, head, rows, cols, values, queries: DATA.axes[mod.queries], keys: DATA.axes[mod.keys] };
}

const largest = (values) => values.reduce((a, b) => Math.max(a, b), 1e-12);

// -- colour --------------------------------------------------------------------------------------
const VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142],
  [31, 158, 137], [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37]];
const HEAT = Array.from({ length: 256 }, (_, i) => {
  const x = (i / 255) * (VIRIDIS.length - 1), k = Math.min(Math.floor(x), VIRIDIS.length - 2), f = x - k;
  return VIRIDIS[k].map((c, n) => Math.round(c + f * (VIRIDIS[k + 1][n] - c)));
});
const GRAY = Array.from({ length: 256 }, (_, i) => [i, i, i]);
const level = (v) => Math.max(0, Math.min(255, Math.round(v * 255)));

// values (rows × cols, scaled to [0, 1] by `scale`) as one pixel per cell, stretched over (x, y, w, h);
// attention is coloured by √w on a fixed 0-1 scale, so heads compare and a diffuse head is not saturated
function paint(ctx, values, rows, cols, x, y, w, h, { scale = 1, colours = HEAT, alpha = 255, channels = 1, root = false } = {}) {
  const image = new ImageData(cols, rows);
  for (let i = 0; i < rows * cols; i++) {
    const v = root ? Math.sqrt(values[i]) : values[i] * scale;
    const rgb = channels === 3 ? null : colours[level(v)];
    for (let c = 0; c < 3; c++) image.data[4 * i + c] = rgb ? rgb[c] : level(values[3 * i + c]);
    image.data[4 * i + 3] = channels === 3 ? 255 : alpha === "weight" ? level(0.75 * v) : alpha;
  }
  const cells = document.createElement("canvas");
  cells.width = cols;
  cells.height = rows;
  cells.getContext("2d").putImageData(image, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(cells, x, y, w, h);
}

function blank(canvas, width, height) {
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, width, height);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#222";
  return ctx;
}

function notEmbedded(canvas) {
  const mod = DATA.modules[state.module];
  const ctx = blank(canvas, 520, 40);
  ctx.fillText(`${mod.name} is not in this page (past its cap of ${DATA.cap.toLocaleString()} weights): see attention.npz`, 8, 24);
}

// -- the heatmap, with the recipe's key-aligned bands (a spectrogram, a series) drawn above it -----
const BAND = 90;
// a band with an axis is drawn only over modules whose keys are that axis (a series over patches, not over variables)
const aligned = () => DATA.panels.filter((p) => p.align === "keys" && (!p.axis || p.axis === DATA.modules[state.module].keys));

const MEASURE = document.createElement("canvas").getContext("2d");
MEASURE.font = "11px system-ui, sans-serif";
const labelSpace = (labels) => Math.min(140, Math.max(30, ...labels.map((t) => MEASURE.measureText(t).width)) + 10);

function heatmapLayout(m) {
  const cell = Math.max(1, Math.min(24, Math.floor(640 / Math.max(m.rows, m.cols))));
  const step = Math.ceil(12 / cell); // label every step-th token so that labels never overlap
  const bands = aligned().length * (BAND + 6);
  return { cell, step, left: Math.max(labelSpace(m.queries), aligned().length ? 70 : 0), top: 6 + bands, bottom: labelSpace(m.keys) };
}

function drawHeatmap() {
  const canvas = $("heatmap"), m = state.current;
  if (!m) return notEmbedded(canvas);
  const L = heatmapLayout(m);
  const widest = Math.max(m.cols, ...aligned().map((panel) => panel.span ?? 0));
  const ctx = blank(canvas, L.left + Math.ceil(widest * L.cell) + 12, L.top + m.rows * L.cell + L.bottom);
  let y = 6;
  for (const panel of aligned()) {
    const width = (panel.span ?? m.cols) * L.cell; // span: how many key cells the band covers
    drawBand(ctx, panel, L.left, y, width, BAND);
    ctx.fillStyle = "#222";
    ctx.fillText(panel.title, 4, y + BAND / 2, L.left - 8);
    y += BAND + 6;
  }
  paint(ctx, m.values, m.rows, m.cols, L.left, L.top, m.cols * L.cell, m.rows * L.cell, { root: true });
  ctx.fillStyle = "#222";
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  for (let i = 0; i < m.rows; i += L.step) ctx.fillText(m.queries[i], L.left - 4, L.top + (i + 0.5) * L.cell, L.left - 8);
  ctx.save();
  ctx.translate(L.left, L.top + m.rows * L.cell + 4);
  ctx.rotate(-Math.PI / 2);
  for (let j = 0; j < m.cols; j += L.step) ctx.fillText(m.keys[j], 0, (j + 0.5) * L.cell, L.bottom - 8);
  ctx.restore();
  drawBoundaries(ctx, m, L);
}

function drawBoundaries(ctx, m, L) { // where a second segment starts, on either axis
  const mod = DATA.modules[state.module];
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = 1;
  const at = (axis) => DATA.boundaries[axis];
  if (at(mod.keys) !== undefined) {
    const x = L.left + at(mod.keys) * L.cell;
    ctx.beginPath(); ctx.moveTo(x, L.top); ctx.lineTo(x, L.top + m.rows * L.cell); ctx.stroke();
  }
  if (at(mod.queries) !== undefined) {
    const y = L.top + at(mod.queries) * L.cell;
    ctx.beginPath(); ctx.moveTo(L.left, y); ctx.lineTo(L.left + m.cols * L.cell, y); ctx.stroke();
  }
}

function pointer(canvas, event) { // canvas pixel under the mouse, however CSS scales the canvas
  const box = canvas.getBoundingClientRect();
  return [(event.clientX - box.left) * (canvas.width / box.width), (event.clientY - box.top) * (canvas.height / box.height)];
}

function readHeatmap(event) {
  const m = state.current;
  if (!m) return;
  const L = heatmapLayout(m), [x, y] = pointer($("heatmap"), event);
  const i = Math.floor((y - L.top) / L.cell), j = Math.floor((x - L.left) / L.cell);
  if (i < 0 || j < 0 || i >= m.rows || j >= m.cols) return;
  $("readout").textContent = `query ${i} ${JSON.stringify(m.queries[i])} → key ${j} ${JSON.stringify(m.keys[j])}: ${m.values[i * m.cols + j].toFixed(4)}`;
}

// -- the recipe's views ---------------------------------------------------------------------------
function drawBand(ctx, panel, x, y, width, height) {
  if (panel.kind === "image") {
    const a = array(panel.pixels), [rows, cols] = a.shape, channels = a.shape[2] ?? 1;
    paint(ctx, a.values, rows, cols, x, y, width, height, { channels, colours: panel.colormap === "heat" ? HEAT : GRAY });
  } else if (panel.kind === "plot") {
    drawPlot(ctx, panel, x, y, width, height);
  }
}

function drawPlot(ctx, panel, x, y, width, height) {
  const lines = Object.entries(panel.lines), values = lines.flatMap(([, v]) => v);
  const lo = Math.min(...values), hi = Math.max(...values), range = hi > lo ? hi - lo : 1;
  const palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
  ctx.strokeStyle = "#ccc";
  ctx.strokeRect(x, y, width, height);
  lines.forEach(([name, v], n) => {
    ctx.strokeStyle = ctx.fillStyle = palette[n % palette.length];
    ctx.beginPath();
    v.forEach((value, t) => {
      const px = x + ((t + 0.5) / v.length) * width, py = y + height - ((value - lo) / range) * height;
      t ? ctx.lineTo(px, py) : ctx.moveTo(px, py);
    });
    ctx.stroke();
    ctx.fillText(name, x + 4, y + 12 + 12 * n);
  });
}

function card(title, { png, extra } = {}) {
  const section = document.createElement("section"), h2 = document.createElement("h2");
  section.className = "card";
  h2.textContent = title;
  section.append(h2);
  if (png) {
    const actions = document.createElement("span"), button = document.createElement("button");
    actions.className = "actions";
    button.textContent = "PNG";
    button.dataset.png = png;
    actions.append(button, ...(extra ?? []));
    h2.append(actions);
  }
  return section;
}

function canvasFor(section, id) {
  const canvas = document.createElement("canvas");
  canvas.id = id;
  section.append(canvas);
  return canvas;
}

// image: the picture, the chosen head's row `query` over the `keys` slice laid out on `grid`, and
// each of `maps` laid over it
function drawImagePanel(panel, canvas) {
  const a = array(panel.pixels), [rows, cols] = a.shape, channels = a.shape[2] ?? 1;
  const size = Math.max(1, Math.floor(200 / Math.max(rows, cols))), w = cols * size, h = rows * size;
  const overlays = [];
  const m = state.current;
  if (panel.overlay && m) {
    const [start, stop] = panel.overlay.keys, row = m.values.subarray(panel.overlay.query * m.cols + start, panel.overlay.query * m.cols + stop);
    overlays.push([`${m.queries[panel.overlay.query]} → ${m.head < 0 ? "mean of heads" : "head " + m.head}`, row, panel.overlay.grid]);
  }
  for (const [label, map] of Object.entries(panel.maps ?? {})) {
    const b = array(map);
    overlays.push([label, b.values, b.shape]);
  }
  const count = Math.max(1, overlays.length);
  const ctx = blank(canvas, count * (w + 12), h + 22);
  (overlays.length ? overlays : [[panel.title, null, null]]).forEach(([label, heat, grid], n) => {
    const x = n * (w + 12);
    paint(ctx, a.values, rows, cols, x, 18, w, h, { channels, colours: panel.colormap === "heat" ? HEAT : GRAY });
    if (heat) paint(ctx, heat, grid[0], grid[1], x, 18, w, h, { scale: 1 / largest(heat), alpha: "weight" });
    ctx.fillStyle = "#222";
    ctx.fillText(label, x, 12, w);
  });
}

function alignmentSource(panel) { // the chosen module if the panel is about it, else its last (the top layer)
  const chosen = DATA.modules[state.module].name;
  const name = panel.modules.includes(chosen) ? chosen : panel.modules[panel.modules.length - 1];
  const m = DATA.modules.findIndex((mod) => mod.name === name);
  return [m, name === chosen ? state.head : -1];
}

// alignment: the rows relabelled (what each query predicts), the hard alignment boxed, as Pharaoh i-j
function drawAlignment(panel, canvas, text, m) {
  if (!m) return notEmbedded(canvas);
  const cell = Math.max(4, Math.min(22, Math.floor(480 / Math.max(m.rows, m.cols)))), left = labelSpace(panel.rows), top = labelSpace(m.keys);
  const ctx = blank(canvas, left + m.cols * cell + 12, top + m.rows * cell + 12);
  paint(ctx, m.values, m.rows, m.cols, left, top, m.cols * cell, m.rows * cell, { root: true });
  const pairs = [];
  ctx.strokeStyle = "#d62728";
  ctx.lineWidth = 2;
  for (let j = 0; j < m.rows; j++) {
    const row = m.values.subarray(j * m.cols, (j + 1) * m.cols), i = row.indexOf(Math.max(...row));
    pairs.push(`${i}-${j}`);
    ctx.strokeRect(left + i * cell + 1, top + j * cell + 1, cell - 2, cell - 2);
  }
  ctx.fillStyle = "#222";
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  panel.rows.forEach((label, j) => ctx.fillText(label, left - 4, top + (j + 0.5) * cell, left - 8));
  ctx.save();
  ctx.translate(left, top - 4);
  ctx.rotate(-Math.PI / 2);
  ctx.textAlign = "left";
  m.keys.forEach((label, i) => ctx.fillText(label, 0, (i + 0.5) * cell, top - 8));
  ctx.restore();
  text.textContent = `${m.name}, ${m.head < 0 ? "mean of heads" : "head " + m.head} (Pharaoh, key-query):\n${pairs.join(" ")}`;
}

const views = []; // [draw(), ...] of the recipe's panels, redrawn on every selection

function buildPanels() {
  DATA.panels.forEach((panel, n) => {
    if (panel.align === "keys") return; // drawn into the heatmap
    const where = panel.place === "above" ? $("above") : $("panels");
    if (panel.kind === "text") {
      const section = card(panel.title);
      for (const line of panel.lines) {
        const p = document.createElement("p");
        p.textContent = line;
        section.append(p);
      }
      where.append(section);
    } else if (panel.kind === "table") {
      const section = card(panel.title), table = document.createElement("table");
      section.append(table);
      where.append(section);
      sortableTable(table, panel.columns, panel.rows);
    } else if (panel.kind === "image" || panel.kind === "plot") {
      const section = card(panel.title, { png: `panel-${n}` }), canvas = canvasFor(section, `panel-${n}`);
      where.append(section);
      views.push(() => panel.kind === "image" ? drawImagePanel(panel, canvas) : drawPlot(blank(canvas, 640, 160), panel, 8, 8, 624, 144));
    } else if (panel.kind === "alignment") {
      const download = document.createElement("button");
      download.textContent = "Pharaoh";
      const section = card(panel.title, { png: `panel-${n}`, extra: [download] }), canvas = canvasFor(section, `panel-${n}`);
      const text = document.createElement("p");
      text.className = "pharaoh";
      text.id = `pharaoh-${n}`;
      section.append(text);
      where.append(section);
      download.addEventListener("click", () => save(new Blob([text.textContent.split("\n")[1] + "\n"], { type: "text/plain" }), "alignment.txt"));
      views.push(async () => drawAlignment(panel, canvas, text, await matrix(...alignmentSource(panel))));
    }
  });
}

// -- the token view (bertviz style) ----------------------------------------------------------------
const TOKENS = { label: 130, gap: 220 };

function tokenLayout(m) {
  const n = Math.max(m.rows, m.cols), row = n <= 40 ? 18 : Math.max(3, Math.floor(720 / n));
  return { row, step: Math.ceil(11 / row), right: TOKENS.label + TOKENS.gap };
}

function drawTokens() {
  const canvas = $("tokens"), m = state.current;
  if (!m) return notEmbedded(canvas);
  const L = tokenLayout(m), ctx = blank(canvas, 2 * TOKENS.label + TOKENS.gap, Math.max(m.rows, m.cols) * L.row + 8);
  const at = (q, k) => m.values[q * m.cols + k];
  const hover = state.hover;
  let queries = [...Array(m.rows).keys()];
  if (hover?.side === "query") queries = [hover.index];
  else if (state.picked.size) queries = [...state.picked];
  const y = (i) => 4 + (i + 0.5) * L.row;
  ctx.lineWidth = 1.5;
  for (const q of queries) {
    for (let k = 0; k < m.cols; k++) {
      if (hover?.side === "key" && k !== hover.index) continue;
      const w = at(q, k);
      if (w < 0.004) continue; // invisible anyway: skipping keeps 512 × 512 lines cheap
      ctx.strokeStyle = `rgba(31, 119, 180, ${w})`;
      ctx.beginPath(); ctx.moveTo(TOKENS.label, y(q)); ctx.lineTo(L.right, y(k)); ctx.stroke();
    }
  }
  const sums = new Float32Array(m.cols); // what the chosen queries give each key, together
  for (const q of queries) for (let k = 0; k < m.cols; k++) sums[k] += at(q, k);
  if (state.picked.size || hover?.side === "query") {
    ctx.fillStyle = "rgba(255, 127, 14, 0.45)";
    for (let k = 0; k < m.cols; k++) ctx.fillRect(L.right + 4, y(k) - L.row / 2, Math.min(1, sums[k]) * (TOKENS.label - 8), L.row - 1);
  }
  ctx.textBaseline = "middle";
  for (let i = 0; i < m.rows; i += L.step) {
    ctx.font = state.picked.has(i) ? "bold 11px system-ui, sans-serif" : "11px system-ui, sans-serif";
    ctx.fillStyle = state.picked.has(i) ? "#d62728" : "#222";
    ctx.textAlign = "right";
    ctx.fillText(m.queries[i], TOKENS.label - 4, y(i), TOKENS.label - 8);
  }
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#222";
  ctx.textAlign = "left";
  for (let k = 0; k < m.cols; k += L.step) ctx.fillText(m.keys[k], L.right + 6, y(k), TOKENS.label - 10);
  const top = sums.indexOf(Math.max(...sums));
  const who = hover?.side === "query" ? `query ${hover.index} ${JSON.stringify(m.queries[hover.index])}`
    : hover?.side === "key" ? `key ${hover.index} ${JSON.stringify(m.keys[hover.index])}`
    : state.picked.size ? `queries ${[...state.picked].sort((a, b) => a - b).join(", ")} summed` : "all queries";
  $("tokens-note").textContent = hover?.side === "key"
    ? `${who}: receives ${sums[hover.index].toFixed(4)} in all`
    : `${who}: most attended key ${top} ${JSON.stringify(m.keys[top])} (${sums[top].toFixed(4)})`;
}

function tokenUnder(event) {
  const m = state.current;
  if (!m) return null;
  const L = tokenLayout(m), [x, y] = pointer($("tokens"), event), index = Math.floor((y - 4) / L.row);
  if (x < TOKENS.label && index >= 0 && index < m.rows) return { side: "query", index };
  if (x > L.right && index >= 0 && index < m.cols) return { side: "key", index };
  return null;
}

// -- thumbnails and the per-head table ------------------------------------------------------------
async function buildGrid() {
  for (const [m, mod] of DATA.modules.entries()) {
    const row = document.createElement("div"), name = document.createElement("span");
    row.className = "module";
    name.className = "name";
    name.textContent = mod.name;
    row.append(name);
    $("grid").append(row);
    const thumbs = await weightsOf(`thumbs ${m}`, mod.thumbs), [rows, cols] = mod.thumb_shape;
    for (let h = 0; h < mod.shape[0]; h++) {
      const canvas = document.createElement("canvas"), values = thumbs.subarray(h * rows * cols, (h + 1) * rows * cols);
      canvas.width = cols;
      canvas.height = rows;
      canvas.dataset.module = m;
      canvas.dataset.head = h;
      canvas.title = `${mod.name}, head ${h}`;
      paint(canvas.getContext("2d"), values, rows, cols, 0, 0, cols, rows, { root: true });
      canvas.addEventListener("click", () => select(m, h).then(() => $("heatmap").scrollIntoView({ block: "center" })));
      row.append(canvas);
    }
  }
}

function sortableTable(table, columns, rows, open) {
  const head = table.createTHead().insertRow(), body = table.createTBody();
  // a column with any fraction in it shows every number with three decimals
  const fractions = columns.map((_, c) => rows.some((r) => typeof r[c] === "number" && !Number.isInteger(r[c])));
  const fill = () => {
    body.replaceChildren();
    for (const values of rows) {
      const tr = body.insertRow();
      values.forEach((v, c) => { tr.insertCell().textContent = fractions[c] && typeof v === "number" ? v.toFixed(3) : v ?? ""; });
      if (open) {
        tr.dataset.key = `${values[0]} ${values[1]}`;
        tr.addEventListener("click", () => open(values));
      }
    }
  };
  columns.forEach((title, c) => {
    const th = document.createElement("th");
    th.textContent = title;
    th.addEventListener("click", () => {
      const order = th.dataset.order === "desc" ? "asc" : "desc";
      for (const other of head.cells) delete other.dataset.order;
      th.dataset.order = order;
      const sign = order === "asc" ? 1 : -1;
      rows.sort((a, b) => sign * (typeof a[c] === "number" && typeof b[c] === "number" ? a[c] - b[c] : String(a[c]).localeCompare(String(b[c]))));
      fill();
      markCurrent();
    });
    head.append(th);
  });
  fill();
}

function markCurrent() {
  const name = DATA.modules[state.module].name;
  for (const tr of $("heads").tBodies[0].rows) tr.classList.toggle("current", tr.dataset.key === `${name} ${state.head}`);
  for (const canvas of $("grid").querySelectorAll("canvas"))
    canvas.classList.toggle("current", +canvas.dataset.module === state.module && +canvas.dataset.head === state.head);
}

// -- choosing a module and head -------------------------------------------------------------------
function fillHeads() {
  const heads = DATA.modules[state.module].shape[0];
  const options = [["-1", "mean of heads"], ...[...Array(heads).keys()].map((h) => [String(h), `head ${h}`])];
  $("head").replaceChildren(...options.map(([value, text]) => new Option(text, value)));
  $("head").value = String(state.head);
}

async function select(m, head) {
  state.module = m;
  state.head = Math.min(head, DATA.modules[m].shape[0] - 1);
  state.picked.clear();
  state.hover = null;
  $("module").value = String(m);
  fillHeads();
  $("status").textContent = "decoding…";
  const ticket = (state.ticket = (state.ticket ?? 0) + 1);
  const current = await matrix(m, state.head);
  if (ticket !== state.ticket) return; // a later choice came while this one decoded
  state.current = current;
  const mod = DATA.modules[m];
  $("status").textContent = `${mod.queries} → ${mod.keys}, ${mod.shape[1]} × ${mod.shape[2]}`;
  $("readout").textContent = state.current ? "point at a cell for its weight" : "";
  drawHeatmap();
  drawTokens();
  await Promise.all(views.map((draw) => draw()));
  markCurrent();
  document.body.dataset.ready = `${m} ${state.head}`; // for tests: the views show this selection
}

// -- export --------------------------------------------------------------------------------------
function save(blob, name) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

const fileName = (suffix) => `${DATA.modules[state.module].name}-${state.head < 0 ? "mean" : "head" + state.head}${suffix}`;
const csvCell = (text) => (/[",\n]/.test(text) ? `"${text.replaceAll('"', '""')}"` : text);

function exportCsv() {
  const m = state.current;
  if (!m) return;
  const lines = [["query \\ key", ...m.keys].map(csvCell).join(",")];
  for (let i = 0; i < m.rows; i++) lines.push([csvCell(m.queries[i]), ...Array.from(m.values.subarray(i * m.cols, (i + 1) * m.cols), (v) => v.toFixed(6))].join(","));
  save(new Blob([lines.join("\n") + "\n"], { type: "text/csv" }), fileName(".csv"));
}

// -- start ---------------------------------------------------------------------------------------
async function start() {
  $("module").replaceChildren(...DATA.modules.map((mod, m) => new Option(mod.weights ? mod.name : `${mod.name} (not in the page)`, String(m))));
  $("module").addEventListener("change", () => select(+$("module").value, state.head));
  $("head").addEventListener("change", () => select(state.module, +$("head").value));
  const heatmap = $("heatmap"), tokens = $("tokens");
  heatmap.addEventListener("mousemove", readHeatmap);
  tokens.addEventListener("mousemove", (event) => { state.hover = tokenUnder(event); drawTokens(); });
  tokens.addEventListener("mouseleave", () => { state.hover = null; drawTokens(); });
  tokens.addEventListener("click", (event) => {
    const token = tokenUnder(event);
    if (token?.side !== "query") return;
    state.picked.has(token.index) ? state.picked.delete(token.index) : state.picked.add(token.index);
    state.hover = null;
    drawTokens();
  });
  $("csv").addEventListener("click", exportCsv);
  document.addEventListener("click", (event) => {
    const id = event.target.dataset?.png;
    if (id) $(id).toBlob((blob) => save(blob, fileName(`-${id}.png`)), "image/png");
  });
  const index = new Map(DATA.modules.map((mod, m) => [mod.name, m]));
  sortableTable($("heads"), DATA.table.columns, DATA.table.rows, ([name, head]) => select(index.get(name), head));
  buildPanels();
  await select(0, 0);
  await buildGrid();
  markCurrent();
  document.body.dataset.loaded = "yes";
}

start();
