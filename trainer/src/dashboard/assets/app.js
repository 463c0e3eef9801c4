// The lora-train dashboard page: polls the server's JSON routes and redraws, so a run's
// curves grow while it trains. Every value from a file goes into the page as text
// (textContent / attributes), never as HTML.
'use strict';

const POLL_MS = 2000;
const MAX_DRAWN = 3000;
const SVG_NS = 'http://www.w3.org/2000/svg';
const COLORS = ['#2563eb', '#dc2626', '#16a34a', '#9333ea', '#ea580c', '#0891b2', '#db2777', '#65a30d', '#4f46e5', '#b45309'];
// Keys of a metrics row that are bookkeeping, not a curve of their own.
const NOT_CURVES = new Set(['step', 'tokens', 'loss_tokens', 'eval_tokens', 'elapsed_s', 'epoch', 'loss', 'eval_loss', 'lr', 'grad_norm']);

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === 'class') e.className = v; else e.setAttribute(k, v);
  }
  for (const k of kids.flat()) {
    if (k === undefined || k === null) continue;
    e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  }
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function fmt(x, digits = 4) {
  if (x === undefined || x === null) return '-';
  if (typeof x !== 'number') return String(x);
  if (Number.isInteger(x)) return String(x);
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(2) : x.toFixed(digits);
}

function duration(s) {
  if (s === undefined || s === null) return '-';
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)}h${String(Math.floor(s % 3600 / 60)).padStart(2, '0')}m` : s >= 60 ? `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s` : `${s}s`;
}

function status(s, alive) {
  const label = s === 'running' && alive === false ? 'running (process gone)' : s;
  return el('span', { class: `status ${s}`, 'data-status': s }, label || '-');
}

async function getJSON(url) {
  const r = await fetch(url, { cache: 'no-store' });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

// ---- charts: SVG line charts with axes, one polyline per series --------------------------

function niceTicks(lo, hi, n) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

// series: [{key, label, points: [[x, y], ...], dots}]
function lineChart(key, title, series) {
  const W = 520, H = 240, L = 56, R = 12, T = 10, B = 28;
  const pts = series.flatMap(s => s.points);
  const box = el('div', { class: 'chart-box' }, el('h3', {}, title));
  const chart = svg('svg', { class: 'chart', 'data-chart': key, width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  box.append(chart);
  if (!pts.length) {
    box.append(el('p', { class: 'muted' }, 'no points yet'));
    return box;
  }
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (const t of niceTicks(y0, y1, 4)) {
    chart.append(svg('line', { class: 'grid', x1: L, x2: W - R, y1: sy(t), y2: sy(t) }));
    const lab = svg('text', { x: L - 4, y: sy(t) + 3, 'text-anchor': 'end' }); lab.textContent = fmt(t, 3); chart.append(lab);
  }
  for (const t of niceTicks(x0, x1, 6).filter(t => Number.isInteger(t))) {
    const lab = svg('text', { x: sx(t), y: H - B + 14, 'text-anchor': 'middle' }); lab.textContent = t; chart.append(lab);
  }
  chart.append(svg('line', { class: 'axis', x1: L, x2: L, y1: T, y2: H - B }));
  chart.append(svg('line', { class: 'axis', x1: L, x2: W - R, y1: H - B, y2: H - B }));
  const xl = svg('text', { x: W - R, y: H - 2, 'text-anchor': 'end' }); xl.textContent = 'step'; chart.append(xl);
  const legend = el('div', { class: 'legend' });
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    // A long run is drawn through at most MAX_DRAWN of its points (data-points keeps the count).
    const every = Math.ceil(s.points.length / MAX_DRAWN);
    const drawn = every > 1 ? s.points.filter((_, j) => j % every === 0 || j === s.points.length - 1) : s.points;
    const line = svg('polyline', { stroke: color, 'data-series': s.key, 'data-points': s.points.length, points: drawn.map(p => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(' ') });
    const tip = svg('title'); tip.textContent = s.label; line.append(tip);
    chart.append(line);
    if (s.dots || s.points.length < 3) {
      for (const p of s.points) chart.append(svg('circle', { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: color }));
    }
    legend.append(el('span', { style: `--c: ${color}` }, `${s.label} (${s.points.length})`));
  });
  box.append(legend);
  return box;
}

function points(rows, key) {
  return rows.filter(r => typeof r[key] === 'number' && Number.isFinite(r[key])).map(r => [r.step, r[key]]);
}

// A run's charts: loss (train and eval), learning rate, gradient norm, then each of the
// method's own quantities (with its eval_ form on the same chart).
function runCharts(rows) {
  const charts = el('div', { class: 'charts' });
  charts.append(lineChart('loss', 'loss', [
    { key: 'loss', label: 'train loss', points: points(rows, 'loss') },
    { key: 'eval_loss', label: 'eval loss', points: points(rows, 'eval_loss'), dots: true },
  ]));
  charts.append(lineChart('lr', 'learning rate', [{ key: 'lr', label: 'lr', points: points(rows, 'lr') }]));
  charts.append(lineChart('grad_norm', 'gradient norm', [{ key: 'grad_norm', label: 'grad norm', points: points(rows, 'grad_norm') }]));
  const keys = new Set();
  for (const r of rows) for (const [k, v] of Object.entries(r)) if (typeof v === 'number' && !NOT_CURVES.has(k)) keys.add(k.replace(/^eval_/, ''));
  for (const k of [...keys].sort()) {
    if (k === 'perplexity') continue;
    const series = [];
    if (rows.some(r => typeof r[k] === 'number')) series.push({ key: k, label: k, points: points(rows, k) });
    if (rows.some(r => typeof r['eval_' + k] === 'number')) series.push({ key: 'eval_' + k, label: 'eval ' + k, points: points(rows, 'eval_' + k), dots: true });
    charts.append(lineChart(k, k, series));
  }
  return charts;
}

function kvTable(obj, cls = 'kv') {
  const t = el('table', { class: cls });
  for (const [k, v] of Object.entries(obj || {})) {
    const list = Array.isArray(v) && v.every(x => x === null || typeof x !== 'object');
    if (v !== null && typeof v === 'object' && !list) continue;
    t.append(el('tr', {}, el('td', {}, k), el('td', { class: typeof v === 'number' ? 'num' : '' }, list ? `[${v.map(x => fmt(x)).join(', ')}]` : fmt(v))));
  }
  return t;
}

function viewLink(root, path, text) {
  return el('a', { href: `/view/${root}${path ? '/' + path.split('/').map(encodeURIComponent).join('/') : ''}` }, text);
}

// ---- pages ---------------------------------------------------------------------------------

function jobsPage(data) {
  const out = [el('h1', {}, 'Jobs')];
  if (!data.jobs.length) out.push(el('p', { class: 'muted' }, 'No jobs in the store yet: start one with lora-train sft, dpo, sweep or run.'));
  else {
    const t = el('table', { id: 'jobs' }, el('tr', {}, ...['job', 'command', 'status', 'progress', 'loss', 'started', 'time', 'output'].map(h => el('th', {}, h))));
    for (const j of data.jobs) {
      const end = j.ended_at || Date.now() / 1000;
      const progress = j.total_steps ? `${j.step || 0} / ${j.total_steps}` : '-';
      t.append(el('tr', { 'data-job-id': j.id, 'data-status': j.status },
        el('td', { class: 'num' }, viewLink(j.root, '', `#${j.id}`)),
        el('td', {}, j.command),
        el('td', {}, status(j.status, j.alive)),
        el('td', { class: 'num' }, progress),
        el('td', { class: 'num' }, fmt(j.loss)),
        el('td', {}, j.started_at ? new Date(j.started_at * 1000).toLocaleString() : '-'),
        el('td', { class: 'num' }, j.started_at ? duration(end - j.started_at) : '-'),
        el('td', {}, j.output ? viewLink(j.root, '', j.output) : '-')));
    }
    out.push(t);
  }
  if (data.dirs && data.dirs.length) {
    out.push(el('h2', {}, 'Directories'));
    out.push(el('ul', {}, data.dirs.map(d => el('li', {}, viewLink(d.root, '', d.path)))));
  }
  return out;
}

function runSection(v) {
  const run = v.run || {};
  const rows = v.metrics || [];
  const last = rows.length ? rows[rows.length - 1] : {};
  const head = el('p', {}, status(run.status || 'running'), ' ', `${run.command || 'run'} · step ${last.step || 0}`,
    run.config && run.config.model ? ` · model ${run.config.model}` : '');
  const out = [head, runCharts(rows)];
  if (run.summary) { out.push(el('h2', {}, 'Summary')); out.push(kvTable(run.summary)); }
  return out;
}

function sweepSection(v) {
  const sweep = v.sweep || {};
  const cands = sweep.candidates || [];
  const curves = v.candidates || {};
  const order = [...cands].sort((a, b) => (a.eval_loss ?? Infinity) - (b.eval_loss ?? Infinity));
  const t = el('table', { id: 'scoreboard' }, el('tr', {}, ...['candidate', 'status', 'steps', 'eval loss before', 'eval loss', 'train loss', 'time', 'settings'].map(h => el('th', {}, h))));
  for (const c of order) {
    const cur = curves[c.name];
    const rows = cur ? cur.metrics : [];
    const step = rows.length ? rows[rows.length - 1].step : c.steps;
    t.append(el('tr', { class: c.name === sweep.winner ? 'winner' : '', 'data-candidate': c.name },
      el('td', {}, cur ? viewLink(v.root, cur.path, c.name) : c.name, c.name === sweep.winner ? ' ★' : ''),
      el('td', {}, status(c.status)),
      el('td', { class: 'num' }, `${step} / ${c.total_steps}`),
      el('td', { class: 'num' }, fmt(c.eval_loss_before)),
      el('td', { class: 'num' }, fmt(c.eval_loss)),
      el('td', { class: 'num' }, fmt(c.train_loss)),
      el('td', { class: 'num' }, duration(c.elapsed_s)),
      el('td', {}, Object.entries(c.overrides || {}).map(([k, x]) => `${k}=${x}`).join(' '))));
  }
  const names = cands.map(c => c.name).filter(n => curves[n]);
  const charts = el('div', { class: 'charts' },
    lineChart('sweep_eval_loss', 'eval loss, every candidate', names.map(n => ({ key: n, label: n, points: points(curves[n].metrics, 'eval_loss'), dots: true }))),
    lineChart('sweep_loss', 'train loss, every candidate', names.map(n => ({ key: n, label: n, points: points(curves[n].metrics, 'loss') }))));
  return [el('p', {}, status(sweep.status), ` ${cands.length} candidates · winner: ${sweep.winner || '-'} (by ${sweep.criterion || '-'})`),
    el('h2', {}, 'Scoreboard'), t, el('h2', {}, 'Curves'), charts];
}

// Every {labels, matrix} object in a report, with the path that leads to it.
function confusions(x, path, out) {
  if (Array.isArray(x)) x.forEach((y, i) => confusions(y, `${path}[${i}]`, out));
  else if (x && typeof x === 'object') {
    if (Array.isArray(x.labels) && Array.isArray(x.matrix)) out.push([path, x]);
    const name = typeof x.name === 'string' ? x.name : null;
    for (const [k, y] of Object.entries(x)) confusions(y, name ? `${name}: ${k}` : (path ? `${path}.${k}` : k), out);
  }
  return out;
}

function confusionTable(c) {
  const max = Math.max(1, ...c.matrix.flat());
  const t = el('table', { class: 'confusion' }, el('tr', {}, el('th', {}, 'true \\ predicted'), ...c.matrix[0].map((_, j) => el('th', {}, c.labels[j] ?? 'other'))));
  c.matrix.forEach((row, i) => t.append(el('tr', {}, el('th', {}, c.labels[i] ?? 'other'),
    ...row.map(n => el('td', { style: `background: rgba(37, 99, 235, ${(0.08 + 0.6 * n / max).toFixed(2)})` }, n)))));
  return t;
}

function workflowSection(v) {
  const wf = v.workflow || {};
  const out = [];
  const phases = wf.phases || [];
  if (phases.length) {
    out.push(el('h2', {}, 'Phases'));
    out.push(el('table', { id: 'phases' }, el('tr', {}, el('th', {}, 'phase'), el('th', {}, 'status')),
      phases.map(p => el('tr', {}, el('td', {}, p.name), el('td', {}, status(p.status))))));
  }
  for (const [path, c] of confusions(v.report, '', [])) {
    out.push(el('h2', {}, `Confusion matrix (${path})`));
    out.push(confusionTable(c));
  }
  for (const img of v.images || []) {
    out.push(el('h2', {}, img));
    out.push(el('img', { class: 'figure', alt: img, src: `/files/${v.root}/${v.path ? v.path + '/' : ''}${encodeURIComponent(img)}` }));
  }
  out.push(el('h2', {}, 'Final report'));
  out.push(v.report_md ? el('pre', { class: 'report', id: 'final-report' }, v.report_md) : el('p', { class: 'muted' }, 'not written yet'));
  return out;
}

function compareSection(v) {
  const c = v.compare || {};
  return [el('h2', {}, 'Result'), kvTable(c.summary, 'kv compare'), el('h2', {}, 'Settings'), kvTable(c.settings)];
}

function viewPage(v) {
  const crumbs = el('div', { class: 'crumbs' }, el('a', { href: '/' }, 'All jobs'), ' / ', viewLink(v.root, '', v.root));
  let acc = '';
  for (const part of (v.path || '').split('/').filter(Boolean)) {
    acc = acc ? `${acc}/${part}` : part;
    crumbs.append(' / ', viewLink(v.root, acc, part));
  }
  const job = v.job ? ` · job ${v.job.id} (${v.job.command})` : '';
  const out = [crumbs, el('h1', { 'data-kind': v.kind }, `${v.kind}: ${v.dir}`), el('p', { class: 'muted' }, `${v.kind}${job}`)];
  const section = { run: runSection, sweep: sweepSection, workflow: workflowSection, compare: compareSection }[v.kind];
  if (section) out.push(...section(v));
  if ((v.children || []).length) {
    out.push(el('h2', {}, 'Inside'));
    out.push(el('ul', { id: 'children' }, v.children.map(c => el('li', {}, viewLink(v.root, c.path, c.name), ` (${c.kind})`))));
  }
  return out;
}

// A run's rows, kept between polls: only the rows after the last one are fetched.
let cache = { url: null, rows: [] };

async function loadView(path) {
  const url = `/api/view/${path}`;
  const since = cache.url === url && cache.rows.length ? cache.rows[cache.rows.length - 1].step : null;
  let v = await getJSON(since === null ? url : `${url}?since=${since}`);
  if (v.kind === 'run') {
    const same = since !== null && cache.rows.length + v.metrics.length === v.metrics_total && JSON.stringify(v.since_row) === JSON.stringify(cache.rows[cache.rows.length - 1]);
    if (same) v.metrics = cache.rows.concat(v.metrics);
    else if (since !== null) v = await getJSON(url); // the file was rewritten (a resumed run): all of it again
    cache = { url, rows: v.metrics };
  }
  return v;
}

async function load() {
  const p = location.pathname;
  if (p === '/' || p === '') return jobsPage(await getJSON('/api/jobs'));
  const m = p.match(/^\/view\/(.+)$/);
  if (m) return viewPage(await loadView(m[1]));
  return [el('p', { class: 'error' }, `no page ${p}`)];
}

async function tick() {
  const app = document.getElementById('app');
  try {
    const nodes = await load();
    app.replaceChildren(...nodes);
    document.getElementById('updated').textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    document.getElementById('updated').textContent = `update failed: ${e.message}`;
    if (!app.querySelector('h1')) app.replaceChildren(el('p', { class: 'error', id: 'error' }, e.message));
  }
  setTimeout(tick, POLL_MS);
}

tick();
