/* tlb dashboard: plain ES2020 over the server's HTTP API (/healthz, /v1/*).
   No framework, no build step, nothing fetched from elsewhere. Part of tlb (MIT OR Apache-2.0). */
'use strict';

const TOKEN_KEY = 'tlb.token';
const JOB_STATES = ['QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED', 'PAUSED', 'STOPPED']
  .map((s) => 'JOB_STATE_' + s);
const ACTIVE = new Set(['JOB_STATE_QUEUED', 'JOB_STATE_RUNNING']);
const CANCELLABLE = new Set(['JOB_STATE_QUEUED', 'JOB_STATE_RUNNING', 'JOB_STATE_PAUSED']);
const COLORS = ['#2563eb', '#dc2626', '#16a34a', '#d97706', '#7c3aed', '#0891b2', '#db2777', '#4b5563'];
const app = { version: '', auth: true, me: null, view: null };

/* ---------- DOM helpers ---------- */

const $ = (sel, root = document) => root.querySelector(sel);
const SVG_NS = 'http://www.w3.org/2000/svg';
const PROPS = new Set(['value', 'checked', 'disabled', 'hidden']);

function build(el, attrs, kids) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (PROPS.has(k)) el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid == null || kid === false) continue;
    el.append(kid instanceof Node ? kid : String(kid));
  }
  return el;
}
const h = (tag, attrs, ...kids) => build(document.createElement(tag), attrs, kids);
const s = (tag, attrs, ...kids) => build(document.createElementNS(SVG_NS, tag), attrs, kids);
const card = (title, ...kids) => h('section', { class: 'card' }, title && h('h2', {}, title), ...kids);

/* ---------- formatting ---------- */

const shortId = (id) => (id || '').slice(0, 8);
const stateName = (st) => (st || 'JOB_STATE_UNSPECIFIED').replace('JOB_STATE_', '').toLowerCase();
const isNum = (x) => typeof x === 'number' && Number.isFinite(x);
const pct = (x) => (isNum(x) ? (x * 100).toFixed(1) + ' %' : '—');
const fixed = (x, d = 3) => (isNum(x) ? x.toFixed(d) : '—');
const when = (ts) => (ts ? new Date(ts).toLocaleString() : '—');
const badge = (st) => h('span', { class: 'badge state-' + stateName(st) }, stateName(st));

function duration(seconds) {
  if (!isNum(seconds) || seconds < 0) return '—';
  const t = Math.round(seconds), m = Math.floor(t / 60), hrs = Math.floor(m / 60);
  if (hrs) return `${hrs}h ${m % 60}m`;
  return m ? `${m}m ${t % 60}s` : `${t}s`;
}

function datasetLabel(d) {
  if (!d) return '—';
  if (d.id) return `upload:${d.id}`;
  return d.uri || `${d.format || '?'}:${d.path || ''}`;
}

function progressBar(fraction, id) {
  const f = Math.max(0, Math.min(1, isNum(fraction) ? fraction : 0));
  return h('div', { class: 'bar', id, role: 'progressbar', 'aria-valuenow': Math.round(f * 100) },
    h('span', { style: `width:${(f * 100).toFixed(1)}%` }));
}

/* ---------- API ---------- */

const getToken = () => sessionStorage.getItem(TOKEN_KEY) || '';

async function api(path, { method = 'GET', body, signal, raw = false } = {}) {
  const headers = {};
  const token = getToken();
  if (token) headers.Authorization = 'Bearer ' + token;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(path, {
    method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!res.ok) throw await apiError(res);
  if (raw) return res;
  const text = await res.text();
  return text ? JSON.parse(text) : {};
}

async function apiError(res) {
  let message = res.statusText || `HTTP ${res.status}`, status = '';
  try {
    const body = await res.json();
    message = body.message || message;
    status = body.status || '';
  } catch (_) { /* not JSON */ }
  return Object.assign(new Error(message), { http: res.status, status });
}

const role = () => (app.me ? app.me.role : '');
function can(action, job) {
  const r = role();
  if (action === 'train') return r === 'admin' || r === 'train';
  if (action === 'export') return r === 'admin';
  if (action === 'cancel') {
    if (!job || !CANCELLABLE.has(job.state)) return false;
    return r === 'admin' || (r === 'train' && job.createdBy === app.me.name);
  }
  return false;
}

/* ---------- errors and sign-in ---------- */

function showError(err) {
  if (!err || err.name === 'AbortError') return;
  const status = err.status ? `${err.status}: ` : err.http ? `HTTP ${err.http}: ` : '';
  $('#error-text').textContent = status + (err.message || String(err));
  $('#error').hidden = false;
  if (err.http === 401) showAuthPrompt(err.message);
}

function clearError() {
  $('#error').hidden = true;
  $('#error-text').textContent = '';
}

function showAuthPrompt(message) {
  const input = $('#token-input');
  input.classList.add('needs-token');
  input.focus();
  $('#view').replaceChildren(h('section', { class: 'card prompt', id: 'auth-prompt' },
    h('h2', {}, 'Sign in'),
    h('p', {}, 'This server needs an access token. Paste yours into the token field above and press Save.'),
    message && h('p', { class: 'muted small' }, `Server said: ${message}`)));
}

async function refreshIdentity() {
  app.me = null;
  if (getToken() || !app.auth) {
    try {
      app.me = await api('/v1/whoami');
    } catch (err) {
      showError(err);
    }
  }
  renderWhoami();
  renderNav();
}

function renderWhoami() {
  const el = $('#whoami');
  el.replaceChildren();
  el.dataset.role = role();
  el.dataset.name = app.me ? app.me.name : '';
  if (!app.me) return el.append(getToken() ? 'token not accepted' : 'not signed in');
  el.append(h('span', { class: 'who-name' }, app.me.name || 'anonymous'), ' ',
    h('span', { class: 'role role-' + app.me.role }, app.me.role));
  $('#token-input').classList.remove('needs-token');
}

async function saveToken(event) {
  event.preventDefault();
  const input = $('#token-input');
  const value = input.value.trim();
  if (!value) return input.focus();
  sessionStorage.setItem(TOKEN_KEY, value);
  input.value = '';
  clearError();
  await refreshIdentity();
  route();
}

async function forgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  clearError();
  await refreshIdentity();
  route();
}

/* ---------- navigation ---------- */

const NAV = [['jobs', 'Jobs'], ['compare', 'Compare'], ['models', 'Models'],
  ['playground', 'Playground'], ['new', 'New job']];

function renderNav() {
  const current = (location.hash.match(/^#\/(\w+)/) || [])[1] || 'jobs';
  const links = NAV.filter(([key]) => key !== 'new' || can('train'))
    .map(([key, label]) => h('a', {
      href: '#/' + key, id: 'nav-' + key, class: key === current ? 'active' : null,
    }, label));
  $('#nav').replaceChildren(...links);
}

const ROUTES = [
  [/^#\/jobs\/([^/?]+)$/, jobView],
  [/^#\/jobs$/, jobsView],
  [/^#\/compare$/, compareView],
  [/^#\/models$/, modelsView],
  [/^#\/playground$/, playgroundView],
  [/^#\/new$/, newJobView],
];

function route() {
  if (app.view) app.view.abort();
  app.view = new AbortController();
  const signal = app.view.signal;
  const [path, query] = (location.hash || '#/jobs').split('?');
  const main = $('#view');
  main.replaceChildren();
  renderNav();
  for (const [re, view] of ROUTES) {
    const m = path.match(re);
    if (!m) continue;
    const ctx = { params: m.slice(1).map(decodeURIComponent), query: new URLSearchParams(query || ''), signal };
    Promise.resolve().then(() => view(main, ctx)).catch((err) => signal.aborted || showError(err));
    return;
  }
  main.append(card('Not found', h('p', {}, 'No such view. '), h('a', { href: '#/jobs' }, 'Back to the jobs')));
}

/** Runs `tick(isCurrent)` now and again every `ms` while it returns true and the view lasts;
 *  the returned function restarts it at once (an older round's answer is then stale). */
function poll(ctx, ms, tick) {
  let timer = 0, round = 0;
  const loop = async (mine) => {
    let again = false;
    try {
      again = await tick(() => mine === round && !ctx.signal.aborted);
    } catch (err) {
      if (!ctx.signal.aborted) showError(err);
    }
    if (again && mine === round && !ctx.signal.aborted) timer = setTimeout(() => loop(mine), ms);
  };
  ctx.signal.addEventListener('abort', () => clearTimeout(timer));
  const restart = () => { clearTimeout(timer); loop(++round); };
  restart();
  return restart;
}

/* ---------- SVG line chart ---------- */

function niceTicks(lo, hi, count, integer) {
  if (!(hi - lo > 1e-12)) {
    const pad = Math.abs(lo) * 0.1 || 1;
    lo -= pad; hi += pad;
  }
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((x) => raw <= x * 1.0000001);
  if (integer) step = Math.max(1, Math.ceil(step));
  const first = Math.floor(lo / step + 1e-9) * step;
  const ticks = [];
  for (let v = first; v < hi + step * 0.999; v += step) ticks.push(+v.toPrecision(12));
  return ticks;
}

/** Decimals that show every multiple of `step` exactly (at most 6). */
function decimals(step) {
  let d = 0;
  while (d < 6 && Math.abs(Math.round(step * 10 ** d) - step * 10 ** d) > 1e-6) d++;
  return d;
}

function tickText(v, step, format) {
  if (format === 'pct') return `${(v * 100).toFixed(decimals(step * 100))}%`;
  if (v !== 0 && Math.abs(v) < 1e-3) return v.toExponential(1);
  if (Math.abs(v) >= 1e4) return `${+(v / 1000).toFixed(1)}k`;
  return v.toFixed(decimals(step));
}

function chartScales(series, box, opts) {
  const pts = series.flatMap((x) => x.points).filter(([x, y]) => isNum(x) && isNum(y));
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const xt = niceTicks(xs.length ? Math.min(0, ...xs) : 0, xs.length ? Math.max(...xs) : 1, 6, opts.integerX);
  const yt = niceTicks(ys.length ? Math.min(...ys) : 0, ys.length ? Math.max(...ys) : 1, 4, false);
  const [x0, x1, y0, y1] = [xt[0], xt[xt.length - 1], yt[0], yt[yt.length - 1]];
  return {
    xt, yt,
    x: (v) => box.l + ((v - x0) / (x1 - x0 || 1)) * (box.w - box.l - box.r),
    y: (v) => box.h - box.b - ((v - y0) / (y1 - y0 || 1)) * (box.h - box.t - box.b),
  };
}

function chartAxes(sc, box, opts) {
  const g = s('g', { class: 'axes' });
  const yStep = sc.yt[1] - sc.yt[0] || 1, xStep = sc.xt[1] - sc.xt[0] || 1;
  for (const v of sc.yt) {
    const y = sc.y(v);
    g.append(s('line', { class: 'grid', x1: box.l, x2: box.w - box.r, y1: y, y2: y }),
      s('text', { x: box.l - 6, y: y + 4, 'text-anchor': 'end' }, tickText(v, yStep, opts.yFormat)));
  }
  for (const v of sc.xt) {
    const x = sc.x(v);
    g.append(s('line', { class: 'tick', x1: x, x2: x, y1: box.h - box.b, y2: box.h - box.b + 4 }),
      s('text', { x, y: box.h - box.b + 16, 'text-anchor': 'middle' }, tickText(v, xStep)));
  }
  g.append(s('line', { class: 'axis', x1: box.l, x2: box.w - box.r, y1: box.h - box.b, y2: box.h - box.b }),
    s('line', { class: 'axis', x1: box.l, x2: box.l, y1: box.t, y2: box.h - box.b }),
    s('text', { class: 'label', x: (box.l + box.w - box.r) / 2, y: box.h - 4, 'text-anchor': 'middle' }, opts.xLabel || ''));
  return g;
}

function chartLegend(series, box) {
  const g = s('g', { class: 'legend' });
  let x = box.l;
  for (const ser of series) {
    g.append(s('rect', { x, y: 6, width: 12, height: 4, rx: 2, fill: ser.color, opacity: ser.faint ? 0.45 : 1 }),
      s('text', { x: x + 16, y: 12 }, ser.name));
    x += 30 + ser.name.length * 6.5;
  }
  return g;
}

function chartSeries(ser, sc) {
  const pts = ser.points.filter(([x, y]) => isNum(x) && isNum(y));
  const d = pts.map(([x, y], i) => `${i ? 'L' : 'M'}${sc.x(x).toFixed(1)},${sc.y(y).toFixed(1)}`).join('');
  const g = s('g', { class: 'series-group' },
    s('path', {
      class: 'series' + (ser.faint ? ' faint' : ''), d, stroke: ser.color,
      'data-points': pts.length, 'data-name': ser.name,
    }));
  if (!ser.faint && pts.length <= 60) {
    for (const [x, y] of pts) g.append(s('circle', { class: 'dot', cx: sc.x(x), cy: sc.y(y), r: 2.5, fill: ser.color }));
  }
  return g;
}

/** An SVG line chart: `series` = [{name, color, points: [[x, y]…], faint}]. */
function lineChart(opts) {
  const box = { w: 560, h: 250, l: 52, r: 14, t: 24, b: 34 };
  const sc = chartScales(opts.series, box, opts);
  const svg = s('svg', {
    class: 'chart', id: opts.id, viewBox: `0 0 ${box.w} ${box.h}`, role: 'img', 'aria-label': opts.title,
  }, chartAxes(sc, box, opts), chartLegend(opts.series, box), ...opts.series.map((ser) => chartSeries(ser, sc)));
  return h('figure', { class: 'chart-card' }, h('figcaption', {}, opts.title), svg);
}

function drawChart(slot, opts) {
  slot.replaceChildren(lineChart(opts));
}

/* ---------- jobs list ---------- */

async function cancelJob(id, after) {
  try {
    await api(`/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: 'POST', body: {} });
    if (after) await after();
  } catch (err) {
    showError(err);
  }
}

function jobRow(job, selected, onChange, reload) {
  const total = job.epochsTotal || 0, done = job.epochsCompleted || 0;
  const m = job.latestMetrics || {};
  const pick = h('input', {
    type: 'checkbox', class: 'pick', checked: selected.has(job.jobId), 'aria-label': 'pick ' + job.jobId,
    onchange: (e) => { e.target.checked ? selected.add(job.jobId) : selected.delete(job.jobId); onChange(); },
  });
  const action = can('cancel', job) && h('button', {
    type: 'button', class: 'cancel small-btn', disabled: job.cancelRequested,
    onclick: () => cancelJob(job.jobId, reload),
  }, job.cancelRequested ? 'Cancelling…' : 'Cancel');
  return h('tr', { 'data-job-id': job.jobId, 'data-state': job.state },
    h('td', {}, pick),
    h('td', {}, h('a', { href: '#/jobs/' + encodeURIComponent(job.jobId), title: job.jobId }, h('code', {}, shortId(job.jobId)))),
    h('td', {}, badge(job.state)),
    h('td', {}, job.preset || '—'),
    h('td', {}, datasetLabel(job.dataset)),
    h('td', {}, job.createdBy || '—'),
    h('td', { class: 'num' }, `${done}/${total || '?'}`),
    h('td', {}, progressBar(total ? done / total : 0)),
    h('td', { class: 'num best-val' }, pct(job.bestValAccuracy)),
    h('td', { class: 'num' }, pct(m.valAccuracy)),
    h('td', { class: 'num' }, pct(job.testAccuracy)),
    h('td', {}, action || ''));
}

function jobsTable() {
  const cols = ['', 'Job', 'State', 'Preset', 'Dataset', 'Created by', 'Epochs', 'Progress',
    'Best val acc', 'Latest val acc', 'Test acc', ''];
  const tbody = h('tbody');
  const table = h('table', { id: 'jobs-table', class: 'table' },
    h('thead', {}, h('tr', {}, cols.map((c) => h('th', {}, c)))), tbody);
  return { table, tbody };
}

async function jobsView(main, ctx) {
  const selected = new Set();
  const filter = h('select', { id: 'state-filter', 'aria-label': 'State' },
    h('option', { value: '' }, 'all states'), JOB_STATES.map((st) => h('option', { value: st }, stateName(st))));
  const compare = h('button', {
    type: 'button', id: 'compare-selected', disabled: true,
    onclick: () => { location.hash = '#/compare?ids=' + [...selected].map(encodeURIComponent).join(','); },
  }, 'Compare selected');
  const onPick = () => { compare.disabled = selected.size < 2; };
  const { table, tbody } = jobsTable();
  const note = h('p', { class: 'muted small', id: 'jobs-note' });
  main.append(card('Jobs', h('div', { class: 'toolbar' }, filter, compare,
    can('train') && h('a', { class: 'button', href: '#/new' }, 'New job')), h('div', { class: 'scroll' }, table), note));
  const load = async (isCurrent) => {
    const state = filter.value ? `&state=${filter.value}` : '';
    const res = await api(`/v1/jobs?page_size=100${state}`, { signal: ctx.signal });
    if (!isCurrent()) return false;
    const jobs = res.jobs || [];
    tbody.replaceChildren(...jobs.map((j) => jobRow(j, selected, onPick, reload)));
    if (!jobs.length) tbody.append(h('tr', {}, h('td', { colspan: 11, class: 'empty' }, 'No jobs yet.')));
    note.textContent = res.nextPageToken ? 'Showing the newest 100 jobs.' : `${jobs.length} job(s).`;
    onPick();
    return jobs.some((j) => ACTIVE.has(j.state));
  };
  const reload = poll(ctx, 2000, load);
  filter.addEventListener('change', () => { selected.clear(); reload(); });
}

/* ---------- one job: SSE, header, charts ---------- */

/** Splits an SSE byte stream into (event, data) pairs. */
function sseParser(onEvent) {
  let buf = '', kind = 'message', data = [];
  const line = (text) => {
    if (text === '') {
      if (data.length) onEvent(kind, data.join('\n'));
      kind = 'message'; data = [];
    } else if (!text.startsWith(':')) {
      const i = text.indexOf(':');
      const field = i < 0 ? text : text.slice(0, i);
      let value = i < 0 ? '' : text.slice(i + 1);
      if (value.startsWith(' ')) value = value.slice(1);
      if (field === 'event') kind = value;
      else if (field === 'data') data.push(value);
    }
  };
  return (chunk) => {
    buf += chunk;
    let nl;
    while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
      const len = buf.startsWith('\r\n', nl) ? 2 : 1;
      line(buf.slice(0, nl));
      buf = buf.slice(nl + len);
    }
  };
}

async function readEvents(path, signal, onEvent) {
  const res = await api(path, { signal, raw: true });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  const feed = sseParser((kind, text) => {
    let data = null;
    try { data = JSON.parse(text); } catch (_) { data = { message: text }; }
    onEvent(kind, data);
  });
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    feed(value);
  }
}

/** Follows a job's events until `end`, reconnecting after dropped connections. */
async function followJob(id, ctx, onEvent) {
  let ended = false;
  for (let attempt = 0; attempt < 30 && !ended && !ctx.signal.aborted; attempt++) {
    try {
      await readEvents(`/v1/jobs/${encodeURIComponent(id)}/events`, ctx.signal, (kind, data) => {
        if (kind === 'end') ended = true;
        onEvent(kind, data);
      });
    } catch (err) {
      if (ctx.signal.aborted) return;
      if (err.http) return showError(err);
    }
    if (!ended) await new Promise((r) => setTimeout(r, 2000));
  }
}

function jobHeader(job, onCancel) {
  const dl = (pairs) => h('dl', { class: 'facts' }, pairs.map(([k, v]) => h('div', {}, h('dt', {}, k), h('dd', {}, v))));
  const started = job.startedAt && Date.parse(job.startedAt);
  const ended = job.finishedAt ? Date.parse(job.finishedAt) : Date.now();
  let config = job.configJson || '';
  try { config = JSON.stringify(JSON.parse(config), null, 2); } catch (_) { /* shown as sent */ }
  return card(null,
    h('div', { class: 'title-row' }, h('h2', {}, 'Job ', h('code', { id: 'job-id' }, job.jobId)),
      h('span', { id: 'job-state' }, badge(job.state)),
      job.cancelRequested && h('span', { class: 'muted' }, 'cancel requested'),
      can('cancel', job) && !job.cancelRequested && h('button', { type: 'button', class: 'cancel', onclick: onCancel }, 'Cancel')),
    dl([['Preset', job.preset || '—'], ['Dataset', datasetLabel(job.dataset)],
      ['Created by', job.createdBy || '—'], ['Created', when(job.createdAt)], ['Started', when(job.startedAt)],
      ['Finished', when(job.finishedAt)], ['Run time', started ? duration((ended - started) / 1000) : '—'],
      ['Epochs', `${job.epochsCompleted || 0}/${job.epochsTotal || '?'}`], ['Test accuracy', pct(job.testAccuracy)],
      ['Device', [job.device, job.worker].filter(Boolean).join(' @ ') || '—'],
      ['Attempt', `${job.attempt || 0} (restarts ${job.restarts || 0})`],
      ['Search', job.searchId ? `${shortId(job.searchId)} trial ${job.trial ?? '?'}` : '—']]),
    job.error && h('pre', { class: 'job-error', id: 'job-error' }, job.error),
    (job.warnings || []).length > 0 && h('ul', { class: 'warnings', id: 'job-warnings' },
      job.warnings.map((w) => h('li', {}, w))),
    h('details', {}, h('summary', {}, 'Configuration'), h('pre', { id: 'job-config' }, config)));
}

function jobProgress(job, p) {
  let fraction = job.epochsTotal ? (job.epochsCompleted || 0) / job.epochsTotal : 0;
  let text = `${stateName(job.state)} · epoch ${job.epochsCompleted || 0}/${job.epochsTotal || '?'}`;
  if (p && ACTIVE.has(job.state)) {
    const total = Number(p.totalSteps), step = Number(p.globalStep);
    if (total > 0) fraction = step / total;
    text = `epoch ${p.epoch}/${job.epochsTotal || '?'} · step ${p.stepInEpoch}/${p.stepsPerEpoch}` +
      ` · loss ${fixed(p.loss)} · ${fixed(p.imagesPerSec, 0)} img/s · ETA ${duration(p.etaSeconds)}`;
  }
  if (job.state === 'JOB_STATE_SUCCEEDED') fraction = 1;
  return h('div', { class: 'progress-line' }, progressBar(fraction, 'job-progress'), h('span', { id: 'job-progress-text' }, text));
}

function checkpointsTable(cps) {
  const rows = cps.map((c) => h('tr', { 'data-checkpoint-id': c.checkpointId, class: c.best ? 'best' : null },
    h('td', { class: 'star', title: c.best ? 'best by validation accuracy' : '' }, c.best ? '★' : ''),
    h('td', {}, h('code', {}, c.checkpointId)), h('td', { class: 'num' }, c.epoch),
    h('td', { class: 'num' }, pct(c.valAccuracy)), h('td', {}, when(c.createdAt))));
  if (!rows.length) rows.push(h('tr', {}, h('td', { colspan: 5, class: 'empty' }, 'No checkpoints yet.')));
  return h('table', { id: 'checkpoints-table', class: 'table' },
    h('thead', {}, h('tr', {}, ['Best', 'Checkpoint', 'Epoch', 'Val acc', 'Created'].map((c) => h('th', {}, c)))),
    h('tbody', {}, rows));
}

function jobCharts(slots, st) {
  const ep = [...st.epochs.values()].sort((a, b) => a.epoch - b.epoch);
  const line = (key) => ep.map((m) => [m.epoch, m[key]]);
  const [blue, red, , amber] = COLORS;
  drawChart(slots.loss, { id: 'chart-loss', title: 'Loss', xLabel: 'epoch', integerX: true, series: [
    { name: 'train', color: blue, points: line('trainLoss') },
    { name: 'val', color: red, points: line('valLoss') },
    { name: 'step (live)', color: amber, faint: true, points: st.steps.map((p) => [p.x, p.loss]) }] });
  drawChart(slots.acc, { id: 'chart-accuracy', title: 'Accuracy', xLabel: 'epoch', integerX: true, yFormat: 'pct', series: [
    { name: 'train', color: blue, points: line('trainAccuracy') },
    { name: 'val', color: red, points: line('valAccuracy') }] });
  drawChart(slots.lr, { id: 'chart-lr', title: 'Learning rate', xLabel: 'epoch', integerX: true, series: [
    { name: 'lr', color: COLORS[4], points: line('lr') }] });
  drawChart(slots.speed, { id: 'chart-speed', title: 'Images / s', xLabel: 'epoch', integerX: true, series: [
    { name: 'epoch', color: COLORS[2], points: line('imagesPerSec') },
    { name: 'step (live)', color: amber, faint: true, points: st.steps.map((p) => [p.x, p.imagesPerSec]) }] });
}

function jobLayout(main) {
  const el = {
    header: h('div'), progress: h('div', { class: 'card' }), cps: h('div'),
    slots: { loss: h('div'), acc: h('div'), lr: h('div'), speed: h('div') },
  };
  main.append(el.header, el.progress,
    h('div', { class: 'charts' }, Object.values(el.slots).map((slot) => h('div', { class: 'card' }, slot))),
    card('Checkpoints', el.cps));
  return el;
}

async function jobView(main, ctx) {
  const id = ctx.params[0], enc = encodeURIComponent(id), signal = ctx.signal;
  const st = { job: null, epochs: new Map(), steps: [], progress: null };
  const el = jobLayout(main);
  let pending = 0;
  const redraw = () => { pending = pending || setTimeout(() => { pending = 0; jobCharts(el.slots, st); }, 150); };
  const loadEpochs = async () => {
    const res = await api(`/v1/jobs/${enc}/epochs`, { signal });
    for (const m of res.epochs || []) st.epochs.set(m.epoch, m);
    redraw();
  };
  const loadCheckpoints = async () => {
    const res = await api(`/v1/jobs/${enc}/checkpoints`, { signal });
    el.cps.replaceChildren(checkpointsTable(res.checkpoints || []));
  };
  const showJob = (job) => {
    st.job = job;
    el.header.replaceChildren(jobHeader(job, () => cancelJob(id, async () => showJob(await api(`/v1/jobs/${enc}`, { signal })))));
    el.progress.replaceChildren(jobProgress(job, st.progress));
  };
  const [job] = await Promise.all([api(`/v1/jobs/${enc}`, { signal }), loadEpochs(), loadCheckpoints()]);
  showJob(job);
  jobCharts(el.slots, st);
  const handlers = {
    state: showJob,
    epoch: (m) => { st.epochs.set(m.epoch, m); redraw(); },
    progress: (p) => {
      st.progress = p;
      st.steps.push({ x: p.epoch - 1 + p.stepInEpoch / (p.stepsPerEpoch || 1), loss: p.loss, imagesPerSec: p.imagesPerSec });
      if (st.job) el.progress.replaceChildren(jobProgress(st.job, p));
      redraw();
    },
    checkpoint: () => loadCheckpoints().catch(showError),
    warning: (w) => st.job && showJob({ ...st.job, warnings: [...(st.job.warnings || []), w.message] }),
    end: (e) => {
      if (e.code) showError(Object.assign(new Error(e.message), { status: e.status }));
      Promise.all([api(`/v1/jobs/${enc}`, { signal }).then(showJob), loadEpochs(), loadCheckpoints()]).catch(showError);
    },
  };
  if (!ACTIVE.has(job.state) && job.state !== 'JOB_STATE_PAUSED') return;
  await followJob(id, ctx, (kind, data) => handlers[kind] && handlers[kind](data));
}

/* ---------- compare ---------- */

/** {"a": {"b": 1}} → {"a.b": 1} */
function flatten(obj, prefix = '', out = {}) {
  for (const [k, v] of Object.entries(obj || {})) {
    if (v && typeof v === 'object' && !Array.isArray(v)) flatten(v, prefix + k + '.', out);
    else out[prefix + k] = JSON.stringify(v);
  }
  return out;
}

function differingParams(configs) {
  const keys = [...new Set(configs.flatMap((c) => Object.keys(c)))].sort();
  return keys.filter((k) => new Set(configs.map((c) => c[k])).size > 1);
}

function compareTable(runs) {
  const configs = runs.map((r) => {
    try { return flatten(JSON.parse(r.job.configJson || '{}')); } catch (_) { return {}; }
  });
  const diff = differingParams(configs);
  const bestVal = (r) => Math.max(...r.epochs.map((m) => m.valAccuracy).filter(isNum));
  const row = (param, cells, cls) => h('tr', { 'data-param': param, class: cls },
    h('th', { scope: 'row' }, param), cells.map((c) => h('td', { class: 'num' }, c)));
  const rows = diff.map((k) => row(k, configs.map((c) => (c[k] === undefined ? '—' : c[k].replace(/^"|"$/g, '')))));
  if (!diff.length) rows.push(h('tr', {}, h('td', { colspan: runs.length + 1, class: 'empty' }, 'No hyper-parameter differs.')));
  rows.push(row('best val accuracy', runs.map((r) => pct(bestVal(r))), 'summary'),
    row('test accuracy', runs.map((r) => pct(r.job.testAccuracy)), 'summary'),
    row('epochs completed', runs.map((r) => `${r.job.epochsCompleted || 0}/${r.job.epochsTotal || '?'}`), 'summary'));
  return h('table', { id: 'compare-table', class: 'table' },
    h('thead', {}, h('tr', {}, h('th', {}, 'Parameter'), runs.map((r) => h('th', {},
      h('a', { href: '#/jobs/' + encodeURIComponent(r.job.jobId) }, h('code', {}, shortId(r.job.jobId))))))),
    h('tbody', {}, rows));
}

async function compareView(main, ctx) {
  const ids = (ctx.query.get('ids') || '').split(',').map((x) => x.trim()).filter(Boolean);
  if (!ids.length) {
    main.append(card('Compare', h('p', {}, 'Pick two or more jobs on the ', h('a', { href: '#/jobs' }, 'Jobs'),
      ' view and press “Compare selected”.')));
    return;
  }
  const accSlot = h('div'), lossSlot = h('div'), tableSlot = h('div', { class: 'scroll' });
  main.append(h('div', { class: 'charts' }, h('div', { class: 'card' }, accSlot), h('div', { class: 'card' }, lossSlot)),
    card('Differences', tableSlot));
  poll(ctx, 3000, async () => {
    const runs = await Promise.all(ids.map(async (id) => {
      const enc = encodeURIComponent(id);
      const [job, ep] = await Promise.all([api(`/v1/jobs/${enc}`, { signal: ctx.signal }),
        api(`/v1/jobs/${enc}/epochs`, { signal: ctx.signal })]);
      return { job, epochs: ep.epochs || [] };
    }));
    const series = (key) => runs.map((r, i) => ({
      name: `${shortId(r.job.jobId)} ${r.job.preset || ''}`.trim(), color: COLORS[i % COLORS.length],
      points: r.epochs.map((m) => [m.epoch, m[key]]),
    }));
    drawChart(accSlot, { id: 'chart-compare-accuracy', title: 'Validation accuracy', xLabel: 'epoch', yFormat: 'pct', integerX: true, series: series('valAccuracy') });
    drawChart(lossSlot, { id: 'chart-compare-loss', title: 'Validation loss', xLabel: 'epoch', integerX: true, series: series('valLoss') });
    tableSlot.replaceChildren(compareTable(runs));
    return runs.some((r) => ACTIVE.has(r.job.state));
  });
}

/* ---------- models ---------- */

async function exportModel(model, button) {
  button.disabled = true;
  try {
    const res = await api(`/v1/models/${encodeURIComponent(model.modelId)}/export`, { raw: true });
    const blob = await res.blob();
    const named = /filename="?([^";]+)"?/.exec(res.headers.get('Content-Disposition') || '');
    const a = h('a', { href: URL.createObjectURL(blob), download: named ? named[1] : `${model.modelId}.safetensors` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10000);
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
}

function modelRow(m) {
  const exportBtn = can('export') && h('button', { type: 'button', class: 'export small-btn' }, 'Export');
  if (exportBtn) exportBtn.addEventListener('click', () => exportModel(m, exportBtn));
  return h('tr', { 'data-model-id': m.modelId, 'data-job': m.jobId, class: m.isDefault ? 'default' : null },
    h('td', {}, h('code', {}, m.modelId)),
    h('td', {}, h('a', { href: '#/jobs/' + encodeURIComponent(m.jobId) }, h('code', {}, shortId(m.jobId)))),
    h('td', { class: 'num' }, m.epoch), h('td', { class: 'num' }, pct(m.valAccuracy)),
    h('td', { class: 'num', title: (m.labels || []).join(', ') }, (m.labels || []).length),
    h('td', {}, m.isDefault ? h('span', { class: 'badge default' }, '★ default') : ''),
    h('td', {}, h('div', { class: 'actions' }, h('a', {
      class: 'button small-btn secondary', href: '#/playground?model=' + encodeURIComponent(m.modelId),
    }, 'Try'), exportBtn)));
}

async function modelsView(main, ctx) {
  const res = await api('/v1/models', { signal: ctx.signal });
  const rows = (res.models || []).map(modelRow);
  if (!rows.length) rows.push(h('tr', {}, h('td', { colspan: 7, class: 'empty' }, 'No models yet: train a job first.')));
  main.append(card('Models', h('div', { class: 'scroll' }, h('table', { id: 'models-table', class: 'table' },
    h('thead', {}, h('tr', {}, ['Model', 'Job', 'Epoch', 'Val acc', 'Labels', 'Default', ''].map((c) => h('th', {}, c)))),
    h('tbody', {}, rows)))));
}

/* ---------- playground ---------- */

const INFERNO = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
function heat(v, alpha) {
  const t = Math.max(0, Math.min(1, v)) * (INFERNO.length - 1), i = Math.min(INFERNO.length - 2, Math.floor(t)), f = t - i;
  const c = INFERNO[i].map((a, k) => Math.round(a + (INFERNO[i + 1][k] - a) * f));
  return `rgba(${c.join(',')},${alpha})`;
}

/** Draws one chunk's weights (head, latent) over the image at the chunk's grid cells. */
function drawChunkMap(canvas, img, att, chunkIndex, head, latent) {
  const g = canvas.getContext('2d'), S = canvas.width;
  g.imageSmoothingEnabled = false;
  g.drawImage(img, 0, 0, S, S);
  g.fillStyle = 'rgba(15,23,42,0.6)';
  g.fillRect(0, 0, S, S);
  const chunk = (att.chunks || [])[chunkIndex];
  if (!chunk) return;
  const L = att.numLatents || 1, C = att.chunkSize || 1, gw = att.gridWidth || 1, gh = att.gridHeight || 1;
  const row = (chunk.weights || []).slice((head * L + latent) * C, (head * L + latent + 1) * C).map(Number);
  const max = Math.max(1e-12, ...row.filter(isNum));
  const cw = S / gw, ch = S / gh, iw = img.naturalWidth / gw, ih = img.naturalHeight / gh;
  row.forEach((w, t) => {
    const cell = (chunk.firstToken || 0) + t;
    if (cell >= gw * gh) return;
    const cx = cell % gw, cy = Math.floor(cell / gw);
    g.drawImage(img, cx * iw, cy * ih, iw, ih, cx * cw, cy * ch, cw, ch);
    g.fillStyle = heat(w / max, 0.55);
    g.fillRect(cx * cw, cy * ch, cw, ch);
    g.strokeStyle = 'rgba(255,255,255,0.9)';
    g.strokeRect(cx * cw + 0.5, cy * ch + 0.5, cw - 1, ch - 1);
    g.fillStyle = '#fff';
    g.font = `${Math.max(10, Math.round(cw / 5))}px system-ui, sans-serif`;
    g.fillText(`${(w * 100).toFixed(0)}%`, cx * cw + 4, cy * ch + Math.max(12, cw / 5) + 2);
  });
}

function predictionsList(preds) {
  return h('ol', { class: 'predictions', id: 'predictions' }, preds.map((p, i) => h('li', { 'data-class-index': p.classIndex },
    h('span', { class: 'label', id: i === 0 ? 'top-class' : null }, p.label || `class ${p.classIndex}`),
    progressBar(p.probability), h('span', { class: 'num' }, pct(p.probability)))));
}

function slider(id, label, max, onInput) {
  const out = h('output', { for: id }, '0');
  const input = h('input', { type: 'range', id, min: 0, max: Math.max(0, max), step: 1, value: 0, disabled: max < 1 });
  input.addEventListener('input', () => { out.value = input.value; onInput(); });
  return { input, el: h('label', { class: 'slider' }, h('span', {}, label), input, out) };
}

function attentionPanel(slot, img, att) {
  const canvas = h('canvas', { id: 'chunk-canvas', width: 256, height: 256, class: 'pixel' });
  const draw = () => drawChunkMap(canvas, img, att, +chunk.input.value, +head.input.value, +latent.input.value);
  const chunk = slider('chunk-slider', 'chunk', (att.chunks || []).length - 1, draw);
  const head = slider('head-slider', 'head', (att.numHeads || 1) - 1, draw);
  const latent = slider('latent-slider', 'latent', (att.numLatents || 1) - 1, draw);
  const p = att.prediction || {};
  slot.replaceChildren(
    h('div', { class: 'attention' },
      h('figure', {}, h('img', { id: 'attention-overlay', alt: 'image and attention overlay', src: 'data:image/png;base64,' + (att.overlayPng || '') }),
        h('figcaption', { class: 'muted small' }, `slow-stream attention (max over latents, mean over heads) · ${p.label || '?'} ${pct(p.probability)}`)),
      h('figure', {}, canvas, h('figcaption', { class: 'muted small' },
        `chunk map: ${att.numChunks || (att.chunks || []).length} chunks of ${att.chunkSize} tokens on a ${att.gridHeight}×${att.gridWidth} grid`))),
    h('div', { class: 'sliders' }, chunk.el, head.el, latent.el));
  draw();
}

const fileBase64 = (file) => new Promise((resolve, reject) => {
  const reader = new FileReader();
  reader.onload = () => resolve(String(reader.result).split(',')[1] || '');
  reader.onerror = () => reject(reader.error);
  reader.readAsDataURL(file);
});

async function analyse(file, ui, seq) {
  if (!/^image\//.test(file.type || 'image/')) throw new Error(`${file.name} is not an image`);
  const b64 = await fileBase64(file);
  ui.preview.src = 'data:' + (file.type || 'image/png') + ';base64,' + b64;
  ui.preview.hidden = false;
  ui.results.replaceChildren(h('p', { class: 'muted' }, 'Classifying…'));
  ui.attention.replaceChildren(h('p', { class: 'muted' }, 'Computing attention…'));
  await ui.preview.decode();
  const model = ui.model.value.trim();
  const image = { encoded: b64 };
  const [cls, att] = await Promise.allSettled([
    api('/v1/classify', { method: 'POST', body: { model, images: [image], topK: 5 } }),
    api('/v1/attention', { method: 'POST', body: { model, image, renderOverlay: true, overlaySize: 256, sideBySide: true } })]);
  if (seq !== ui.seq) return;
  if (cls.status === 'fulfilled') {
    const preds = ((cls.value.results || [])[0] || {}).predictions || [];
    ui.results.replaceChildren(predictionsList(preds), h('p', { class: 'muted small', id: 'answered-by' }, `model ${cls.value.model || '?'}`));
  } else { ui.results.replaceChildren(); showError(cls.reason); }
  if (att.status === 'fulfilled') attentionPanel(ui.attention, ui.preview, att.value);
  else { ui.attention.replaceChildren(); showError(att.reason); }
}

function dropZone(onFile) {
  const input = h('input', { type: 'file', id: 'playground-file', accept: 'image/png,image/jpeg' });
  input.addEventListener('change', () => input.files[0] && onFile(input.files[0]));
  const zone = h('label', { id: 'drop-zone', class: 'drop', for: 'playground-file' },
    h('strong', {}, 'Drop an image here'), h('span', { class: 'muted small' }, 'or choose a PNG/JPEG file'), input);
  zone.addEventListener('dragover', (e) => { e.preventDefault(); zone.classList.add('over'); });
  zone.addEventListener('dragleave', () => zone.classList.remove('over'));
  zone.addEventListener('drop', (e) => {
    e.preventDefault();
    zone.classList.remove('over');
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) onFile(file);
  });
  return zone;
}

async function playgroundView(main, ctx) {
  const list = h('datalist', { id: 'model-list' });
  const ui = {
    seq: 0, model: h('input', { id: 'playground-model', list: 'model-list', placeholder: 'default model', value: ctx.query.get('model') || '' }),
    preview: h('img', { id: 'playground-image', class: 'preview pixel', alt: 'the image', hidden: true }),
    results: h('div', { id: 'classify-results' }), attention: h('div', { id: 'attention-panel' }),
  };
  const onFile = (file) => {
    clearError();
    const seq = ++ui.seq;
    analyse(file, ui, seq).catch(showError);
  };
  main.append(h('div', { class: 'grid-2' },
    card('Image', h('label', { class: 'field' }, h('span', {}, 'Model (job, search or checkpoint id; empty = default)'), ui.model, list),
      dropZone(onFile), ui.preview),
    card('Top classes', ui.results)), card('Attention', ui.attention));
  const res = await api('/v1/models', { signal: ctx.signal });
  list.replaceChildren(...(res.models || []).flatMap((m) => [
    h('option', { value: m.jobId }, `job ${shortId(m.jobId)}${m.isDefault ? ' (default)' : ''}`),
    h('option', { value: m.modelId }, `checkpoint, epoch ${m.epoch}`)]));
}

/* ---------- new job ---------- */

const OVERRIDES = [
  ['epochs', 'Epochs', 'int'], ['batch-size', 'Batch size', 'int', 'batchSize'], ['lr', 'Learning rate', 'float'],
  ['weight-decay', 'Weight decay', 'float', 'weightDecay'], ['seed', 'Seed', 'uint64'],
  ['max-minutes', 'Max minutes', 'float', 'maxMinutes'],
];

function parseOverride(label, kind, text) {
  if (kind === 'uint64') {
    if (!/^\d+$/.test(text)) throw new Error(`${label} must be a whole number`);
    return text;
  }
  const v = Number(text);
  if (!Number.isFinite(v) || (kind === 'int' && !Number.isInteger(v))) {
    throw new Error(`${label} must be ${kind === 'int' ? 'a whole number' : 'a number'}`);
  }
  return v;
}

function trainingRequest(form) {
  const config = {};
  for (const [id, label, kind, key] of OVERRIDES) {
    const text = $('#new-' + id, form).value.trim();
    if (text !== '') config[key || id] = parseOverride(label, kind, text);
  }
  const format = $('#new-format', form).value, uploaded = $('#new-dataset-id', form).value.trim();
  const dataset = uploaded ? { format, id: uploaded } : { format, path: $('#new-path', form).value.trim() };
  return { preset: $('#new-preset', form).value, config, dataset };
}

const field = (label, control, hint) => h('label', { class: 'field' }, h('span', {}, label), control,
  hint && h('small', { class: 'muted' }, hint));
const options = (values, chosen) => values.map((v) => h('option', { value: v, selected: v === chosen }, v));

function newJobForm(onSubmit) {
  const overrides = OVERRIDES.map(([id, label, kind]) => field(label, h('input', {
    id: 'new-' + id, inputmode: kind === 'float' ? 'decimal' : 'numeric', placeholder: 'preset', autocomplete: 'off',
  })));
  return h('form', { id: 'new-form', class: 'form', onsubmit: onSubmit },
    h('div', { class: 'form-grid' },
      field('Preset', h('select', { id: 'new-preset' }, options(['tiny', 'cpu-small', 'reference'], 'cpu-small')),
        'tiny: seconds (tests) · cpu-small: ~25 min on 2 cores · reference: the paper'),
      field('Dataset format', h('select', { id: 'new-format' }, options(['cifar10', 'cifar100', 'image-folder'], 'cifar10'))),
      field('Path under the datasets root', h('input', { id: 'new-path', value: 'cifar10-mini' })),
      field('…or uploaded dataset id', h('input', { id: 'new-dataset-id', placeholder: 'e.g. pets' }), 'used instead of the path when set')),
    h('h3', {}, 'Overrides ', h('small', { class: 'muted' }, '(empty = the preset’s)')),
    h('div', { class: 'form-grid' }, overrides),
    h('div', { class: 'toolbar' }, h('button', { type: 'submit', id: 'new-start' }, 'Start')));
}

async function newJobView(main) {
  if (!can('train')) {
    main.append(card('New job', h('p', { id: 'new-denied' }, app.me
      ? `Your role (${app.me.role}) cannot start jobs.` : 'Sign in with a train or admin token to start jobs.')));
    return;
  }
  const form = newJobForm(async (event) => {
    event.preventDefault();
    clearError();
    const button = $('#new-start', form);
    button.disabled = true;
    try {
      const res = await api('/v1/jobs', { method: 'POST', body: trainingRequest(form) });
      location.hash = '#/jobs/' + encodeURIComponent(res.jobId);
    } catch (err) {
      showError(err);
    } finally {
      button.disabled = false;
    }
  });
  main.append(card('New training job', form));
}

/* ---------- start ---------- */

async function start() {
  $('#token-form').addEventListener('submit', saveToken);
  $('#token-forget').addEventListener('click', forgetToken);
  $('#error-close').addEventListener('click', clearError);
  window.addEventListener('hashchange', () => { clearError(); route(); });
  try {
    const health = await (await fetch('/healthz')).json();
    app.version = health.version || '';
    app.auth = health.auth !== false;
    $('#version').textContent = app.version;
  } catch (err) {
    showError(err);
  }
  await refreshIdentity();
  if (!location.hash || location.hash === '#' || location.hash === '#/') history.replaceState(null, '', '#/jobs');
  route();
}

start();
