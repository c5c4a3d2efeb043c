// The SecureLLM dashboard: the gateway's management API (/admin/v1) polled every second with the
// admin token, kept in this tab's session storage and sent only as an Authorization header. Text
// from the server is always inserted as text (textContent), never as markup.
'use strict';

const POLL_MS = 1000;
const TOKEN = 'securellm-admin-token';
let timer = null;
let auditAfter = 0;
let auditRows = [];

const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function mib(b) {
  if (b === null || b === undefined) return '-';
  if (b >= 1 << 30) return (b / (1 << 30)).toFixed(1) + ' GiB';
  return (b / (1 << 20)).toFixed(0) + ' MiB';
}

function fillTable(id, rows) {
  const body = $(id).tBodies[0];
  body.replaceChildren(...rows.map((cells) => {
    const tr = el('tr');
    for (const c of cells) {
      const td = el('td');
      if (c instanceof Node) td.appendChild(c); else td.textContent = c === null || c === undefined ? '' : String(c);
      tr.appendChild(td);
    }
    return tr;
  }));
}

class Unauthorized extends Error {}

async function api(method, path, body) {
  const headers = { Authorization: 'Bearer ' + sessionStorage.getItem(TOKEN) };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch('/admin/v1' + path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    cache: 'no-store', credentials: 'omit',
  });
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (r.status === 401) throw new Unauthorized(data && data.error ? data.error.message : 'unauthorized');
  if (!r.ok) throw new Error(data && data.error ? data.error.message : 'HTTP ' + r.status);
  return data;
}

function showLogin(message) {
  if (timer) clearInterval(timer);
  timer = null;
  sessionStorage.removeItem(TOKEN);
  $('dashboard').hidden = true;
  $('logout').hidden = true;
  $('login').hidden = false;
  $('login-error').hidden = !message;
  $('login-error').textContent = message || '';
}

function renderStatus(st) {
  $('services').replaceChildren(...st.services.map((s) => {
    const p = el('p');
    p.appendChild(el('b', s.name + ' '));
    p.appendChild(el('span', s.address + ' '));
    p.appendChild(s.up ? el('span', 'up (' + s.latency_ms.toFixed(1) + ' ms)', 'up') : el('span', 'down (' + s.error + ')', 'down'));
    return p;
  }));
  $('gpus').replaceChildren(...(st.gpus || []).map((g) => {
    const box = el('div');
    box.className = 'gpu';
    box.appendChild(el('div', 'GPU ' + g.index + ' ' + g.name + (g.simulated ? ' (simulated)' : '') +
      ': leased ' + mib(g.leased_bytes) + ', foreign ' + mib(g.foreign_bytes) + ', reserve ' +
      mib(g.reserve_bytes) + ', free ' + mib(g.free_bytes) + ' of ' + mib(g.total_bytes) +
      (g.overcommitted ? ' OVER-COMMITTED' : '')));
    const bar = el('div', null, 'bar');
    const total = Math.max(g.total_bytes, 1);
    const free = Math.max(0, g.total_bytes - g.leased_bytes - g.foreign_bytes - g.reserve_bytes);
    for (const [cls, v] of [['leased', g.leased_bytes], ['foreign', g.foreign_bytes], ['reserve', g.reserve_bytes], ['free', free]]) {
      const s = el('span', null, cls);
      s.style.width = (100 * v / total).toFixed(2) + '%';
      bar.appendChild(s);
    }
    box.appendChild(bar);
    return box;
  }));
  fillTable('leases', (st.leases || []).map((l) => [l.holder, l.label, mib(l.bytes), l.priority, l.gpu_index,
    (l.idle ? 'idle' : 'busy') + (l.evict_by_ms ? ', evicting' : '')]));
  fillTable('queue', (st.queue || []).map((q) => [q.position, q.holder, q.label, mib(q.bytes), q.priority]));
  fillTable('instances', (st.instances || []).map((i) => [i.model_name, i.state, mib(i.lease_bytes),
    i.ready_at_ms && i.started_at_ms ? (i.ready_at_ms - i.started_at_ms) + ' ms' : '-',
    i.in_flight, i.requests_total, i.crash_count, i.last_error]));
  const unknown = Object.entries(st.unknown || {}).map(([k, v]) => k + ': ' + v).join('; ');
  $('status-error').hidden = !unknown;
  $('status-error').textContent = unknown;
}

async function pollAudit() {
  // Page forwards from the last row seen; keep the newest 20.
  for (let page = 0; page < 20; page++) {
    const r = await api('GET', '/audit?limit=1000&after_id=' + auditAfter);
    for (const row of r.rows) {
      auditAfter = Math.max(auditAfter, row.id);
      auditRows.push(row);
    }
    auditRows = auditRows.slice(-1000);
    if (!r.truncated) break;
  }
  const now = Date.now();
  const recent = auditRows.filter((r) => r.time_ms > now - 10000 && !r.endpoint.includes('/admin/'));
  const errors = recent.filter((r) => r.status >= 400).length;
  $('rates').textContent = 'API requests/s (last 10 s): ' + (recent.length / 10).toFixed(1) +
    ', errors/s: ' + (errors / 10).toFixed(1);
  fillTable('audit', auditRows.slice(-20).reverse().map((r) => [r.id, new Date(r.time_ms).toISOString(),
    r.subject, r.endpoint, r.model, r.status]));
}

async function pollKeys() {
  const r = await api('GET', '/keys');
  fillTable('keys', r.keys.map((k) => {
    const b = el('button', 'Revoke');
    b.type = 'button';
    b.className = 'revoke';
    b.dataset.id = k.id;
    b.addEventListener('click', () => revoke(k.id));
    return [k.id, k.name, k.secret_prefix, k.models.join(', ') || '*', k.priority === null ? '' : k.priority, b];
  }));
}

async function poll() {
  try {
    const st = await api('GET', '/status');
    renderStatus(st);
    await pollKeys();
    await pollAudit();
    $('updated').textContent = 'updated ' + new Date().toLocaleTimeString();
  } catch (e) {
    if (e instanceof Unauthorized) return showLogin(e.message);
    $('status-error').hidden = false;
    $('status-error').textContent = e.message;
  }
}

async function revoke(id) {
  try {
    await api('DELETE', '/keys/' + encodeURIComponent(id));
    await pollKeys();
  } catch (e) {
    if (e instanceof Unauthorized) return showLogin(e.message);
    $('key-error').hidden = false;
    $('key-error').textContent = e.message;
  }
}

async function start() {
  $('login').hidden = true;
  $('dashboard').hidden = false;
  $('logout').hidden = false;
  await poll();
  if (!timer && sessionStorage.getItem(TOKEN)) timer = setInterval(poll, POLL_MS);
}

document.addEventListener('DOMContentLoaded', () => {
  $('login-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN, $('token').value.trim());
    $('token').value = '';
    try {
      await api('GET', '/status');
    } catch (e) {
      return showLogin(e instanceof Unauthorized ? e.message : 'the gateway did not answer: ' + e.message);
    }
    start();
  });
  $('logout').addEventListener('click', () => showLogin(''));
  $('key-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const models = $('key-models').value.split(',').map((s) => s.trim()).filter((s) => s);
    try {
      const r = await api('POST', '/keys', { name: $('key-name').value, models });
      $('key-secret').hidden = false;
      $('key-secret').textContent = 'New key ' + r.key.id + ' (shown once): ' + r.secret;
      $('key-error').hidden = true;
      $('key-name').value = '';
      $('key-models').value = '';
      await pollKeys();
    } catch (e) {
      if (e instanceof Unauthorized) return showLogin(e.message);
      $('key-error').hidden = false;
      $('key-error').textContent = e.message;
    }
  });
  if (sessionStorage.getItem(TOKEN)) start(); else showLogin('');
});
