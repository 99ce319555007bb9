// Admin view: the back-end API with the key the user typed in (session storage, sent only to
// this hub): operators, departments, chats, tokens, the sessions report and the event feed.

import { $, el, fill, hub, statusBadge, session, chatLabel, time, header } from './common.js';

const PERMISSIONS = ['change_online_status', 'change_visibility', 'change_always_online', 'set_operator_status', 'open_all'];
const REFRESH_MS = 2000;

header('admin.html');
let key = session.get('api_key');
/** Visitor tokens of the chats created from this page (the hub never shows them again). */
const visitorTokens = new Map();
const knownDepartments = new Set(JSON.parse(session.get('departments') ?? '[]'));

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const res = await fetch(`${hub}/api/v1${path}`, {
    method,
    headers: { Authorization: `Bearer ${key}`, ...(body === undefined ? {} : { 'Content-Type': 'application/json' }) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    // not JSON: reported below
  }
  if (!res.ok) throw new ApiError(res.status, json?.error?.code ?? `http_${res.status}`, json?.error?.message ?? text);
  return json;
}

/** Runs an action, shows its error in `box`, refreshes the lists after it. */
async function act(box, fn) {
  fill($(box));
  try {
    const r = await fn();
    await refresh();
    return r;
  } catch (e) {
    fill($(box), `${e.code ?? 'error'}: ${e.message}`);
    if (e.status === 401) fill($(box), 'the API key was refused: ', el('button', { type: 'button', onclick: forget }, 'type it again'));
    return null;
  }
}

function forget() {
  session.remove('api_key');
  location.reload();
}

const ids = (s) => s.split(/[\s,]+/).filter(Boolean).map(Number);

function start() {
  $('#app').classList.remove('hidden');
  $('#forget').addEventListener('click', forget);
  fill($('#op-perms'), PERMISSIONS.map((p) => el('label', {}, el('input', { type: 'checkbox', 'data-perm': p, checked: p.startsWith('change_') }), p)));

  $('#operator-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const id = Number($('#op-id').value);
    const body = {
      name: $('#op-name').value,
      departments: ids($('#op-departments').value),
      watch_departments: ids($('#op-watch').value),
      permissions: PERMISSIONS.filter((p) => $(`[data-perm="${p}"]`).checked),
      max_chats: Number($('#op-max').value || 0),
      exclude_autoassign: $('#op-exclude').checked,
      auto_accept: $('#op-auto').checked,
    };
    act('#operator-error', () => api('PUT', `/operators/${id}`, body));
  });

  $('#department-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const id = Number($('#dep-id').value);
    const body = { name: $('#dep-name').value, bot: $('#dep-bot').checked, disabled: $('#dep-disabled').checked };
    if ($('#dep-assignment').value) body.assignment = $('#dep-assignment').value;
    if ($('#dep-max').value) body.max_chats = Number($('#dep-max').value);
    if ($('#dep-timeout').value) body.accept_timeout = $('#dep-timeout').value;
    if ($('#dep-pending').value) body.pending_max = Number($('#dep-pending').value);
    remember(id);
    act('#department-error', () => api('PUT', `/departments/${id}`, body));
  });

  $('#chat-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const department = Number($('#chat-department').value);
    const body = { department, bot: $('#chat-bot').checked };
    if ($('#chat-visitor').value) body.visitor = { name: $('#chat-visitor').value };
    if ($('#chat-priority').value) body.priority = Number($('#chat-priority').value);
    remember(department);
    const r = await act('#chat-error', () => api('POST', '/chats', body));
    if (r) {
      visitorTokens.set(r.chat.id, r.visitor_token);
      fill($('#chat-created'), el('div', { class: 'notice', 'data-created': r.chat.id }, `Chat ${chatLabel(r.chat)} created (${r.chat.status}). `,
        el('a', { href: visitorLink(r.chat), target: '_blank', id: 'visitor-link' }, 'open the visitor page')));
      await refresh();
    }
  });
  $('#chat-filter').addEventListener('change', refresh);
  $('#feed-toggle').addEventListener('click', toggleFeed);

  refresh();
  report();
  // The report moves with the clock (running sessions) and with new operators: refreshed too.
  setInterval(() => document.visibilityState === 'visible' && (refresh(), report()), REFRESH_MS);
}

function visitorLink(chat) {
  return `widget.html?department=${chat.department}#chat=${chat.id}&token=${encodeURIComponent(visitorTokens.get(chat.id))}`;
}

function remember(d) {
  knownDepartments.add(d);
  session.set('departments', JSON.stringify([...knownDepartments]));
}

let refreshing = false;
async function refresh() {
  if (refreshing) return;
  refreshing = true;
  try {
    const filter = $('#chat-filter').value;
    // "open" asks for each open status: the list is paged and closed chats are kept for a day.
    const statuses = filter === 'open' ? ['bot', 'pending', 'active'] : [filter];
    const [ops, ...lists] = await Promise.all([api('GET', '/operators'), ...statuses.map((st) => api('GET', `/chats${st ? `?status=${st}` : ''}`))]);
    const chats = { chats: lists.flatMap((l) => l.chats).sort((a, b) => a.id - b.id) };
    const open = chats.chats;
    for (const o of ops.operators) [...o.departments, ...o.watch_departments].forEach((d) => knownDepartments.add(d));
    for (const c of chats.chats) knownDepartments.add(c.department);
    const deps = await Promise.all([...knownDepartments].sort((a, b) => a - b).map((d) => api('GET', `/departments/${d}`)));
    renderOperators(ops.operators);
    renderChats(open, ops.operators);
    renderDepartments(deps);
  } catch (e) {
    if (e.status === 401) fill($('#operator-error'), 'the API key was refused: ', el('button', { type: 'button', onclick: forget }, 'type it again'));
  } finally {
    refreshing = false;
  }
}

function renderOperators(list) {
  fill($('#operators'), list.length ? list.map((o) => el('tr', { 'data-operator': o.id },
    el('td', {}, String(o.id)), el('td', {}, o.name), el('td', {}, o.departments.join(', ')), el('td', {}, o.watch_departments.join(', ')),
    el('td', {}, statusBadge(o.status, o.status_reason), o.misconfigured ? el('span', { class: 'warning' }, 'online & invisible') : null),
    el('td', {}, String(o.connections)), el('td', {}, `${o.active_chats}+${o.pending_chats}`),
    el('td', { class: 'muted' }, [o.online ? 'online' : 'offline', o.invisible ? 'invisible' : 'visible', o.always_online ? 'always online' : 'activity'].join(' · ')),
    el('td', {},
      el('button', { type: 'button', 'data-token': o.id, onclick: () => mint(o) }, 'Token'), ' ',
      el('button', { type: 'button', onclick: () => edit(o) }, 'Edit'), ' ',
      el('button', { type: 'button', onclick: () => act('#operator-error', () => api('PATCH', `/operators/${o.id}/status`, { online: !o.online })) }, o.online ? 'Set offline' : 'Set online'), ' ',
      el('button', { type: 'button', onclick: () => confirm(`Delete operator ${o.name}?`) && act('#operator-error', () => api('DELETE', `/operators/${o.id}`)) }, 'Delete'))))
    : el('tr', {}, el('td', { colspan: 9, class: 'muted' }, 'no operators yet: add one below')));
}

function edit(o) {
  $('#op-id').value = o.id;
  $('#op-name').value = o.name;
  $('#op-departments').value = o.departments.join(',');
  $('#op-watch').value = o.watch_departments.join(',');
  $('#op-max').value = o.max_chats;
  for (const p of PERMISSIONS) $(`[data-perm="${p}"]`).checked = o.permissions.includes(p);
  $('#op-exclude').checked = o.exclude_autoassign;
  $('#op-auto').checked = o.auto_accept;
}

async function mint(o) {
  const r = await act('#operator-error', () => api('POST', '/tokens', { operator: o.id, ttl: '8h' }));
  if (!r) return;
  const frag = `#token=${encodeURIComponent(r.token)}`;
  fill($('#token-box'), el('div', { class: 'notice', 'data-token-for': o.id }, `Token for ${o.name} (8 h): `,
    el('a', { href: `operator.html${frag}`, target: '_blank', id: 'operator-link' }, 'operator view'), ' · ',
    el('a', { href: `supervisor.html${frag}`, target: '_blank', id: 'supervisor-link' }, 'supervisor view'), ' · ',
    el('code', { id: 'token-text' }, r.token)));
}

function renderDepartments(list) {
  fill($('#departments'), list.length ? list.map((d) => el('tr', { 'data-department': d.id },
    el('td', {}, String(d.id)), el('td', {}, d.name), el('td', {}, statusBadge(d.online, d.reason)),
    el('td', {}, `${d.operators_online ?? '?'}/${d.operators ?? '?'} online`), el('td', {}, `${d.queued_chats ?? 0} queued, ${d.pending_chats ?? 0} pending, ${d.active_chats ?? 0} active`),
    el('td', { class: 'muted' }, `${d.assignment}, max ${d.max_chats}, accept ${d.accept_timeout}${d.pending_max ? `, pending max ${d.pending_max}` : ''}${d.bot ? ', bot' : ''}${d.disabled ? ', disabled' : ''}`)))
    : el('tr', {}, el('td', { colspan: 6, class: 'muted' }, 'no departments seen yet')));
}

function renderChats(list, operators) {
  const name = (id) => operators.find((o) => o.id === id)?.name ?? `#${id}`;
  fill($('#chats'), list.length ? list.map((c) => el('tr', { 'data-chat': c.id },
    el('td', {}, chatLabel(c)), el('td', {}, String(c.department)), el('td', { 'data-chat-status': c.status }, c.status),
    el('td', {}, c.owner ? name(c.owner) : 'queue'), el('td', {}, time(c.created_at)),
    el('td', {},
      visitorTokens.has(c.id) ? el('a', { href: visitorLink(c), target: '_blank' }, 'visitor') : null, ' ',
      c.status === 'bot' ? el('button', { type: 'button', onclick: () => act('#chat-error', () => api('PATCH', `/chats/${c.id}`, { status: 'pending' })) }, 'Hand to humans') : null, ' ',
      c.status !== 'closed' ? el('button', { type: 'button', 'data-close': c.id, onclick: () => act('#chat-error', () => api('POST', `/chats/${c.id}/close`)) }, 'Close') : null)))
    : el('tr', {}, el('td', { colspan: 6, class: 'muted' }, 'no chats')));
}

/** The sessions report (GET /api/v1/reports/online); older hubs answer 404. */
async function report() {
  try {
    const r = await api('GET', '/reports/online');
    fill($('#report'),
      el('p', { class: 'muted' }, `${new Date(r.from).toLocaleString()} – ${new Date(r.to).toLocaleString()}`),
      el('table', {}, el('thead', {}, el('tr', {}, el('th', {}, 'operator'), el('th', {}, 'online'), el('th', {}, 'sessions'))),
        el('tbody', {}, (r.operators ?? []).map((o) => el('tr', { 'data-operator': o.id }, el('td', {}, o.name ?? `#${o.id}`), el('td', {}, duration(o.online_seconds)), el('td', {}, String(o.sessions)))))),
      el('button', { type: 'button', onclick: report }, 'Refresh'));
  } catch (e) {
    fill($('#report'), el('p', { class: 'muted', id: 'report-unavailable' }, e.status === 404 ? 'Not available on this hub (no GET /api/v1/reports/online).' : `${e.code}: ${e.message}`));
  }
}

function duration(s) {
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  return h ? `${h} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

/** The live event feed: GET /api/v1/events/stream read with fetch (EventSource cannot send
 * the API key), parsed as Server-Sent Events. */
let feed = null;
async function toggleFeed() {
  if (feed) {
    feed.abort();
    feed = null;
    return;
  }
  feed = new AbortController();
  const signal = feed.signal;
  $('#feed-toggle').textContent = 'Stop';
  fill($('#feed-state'), 'connecting…');
  try {
    const open = (query) => fetch(`${hub}/api/v1/events/stream${query}`, { headers: { Authorization: `Bearer ${key}`, Accept: 'text/event-stream' }, signal });
    // From now on (`after=$`); a hub that does not take `$` on the stream gets the plain form.
    let res = await open('?after=$');
    if (res.status === 400) res = await open('');
    if (res.status === 404) {
      fill($('#feed-state'), el('span', { id: 'feed-unavailable' }, 'Not available on this hub (no GET /api/v1/events/stream).'));
      return;
    }
    if (!res.ok) {
      fill($('#feed-state'), `the feed answered ${res.status}`);
      return;
    }
    fill($('#feed-state'), el('span', { id: 'feed-live' }, 'live'));
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value.replace(/\r\n?/g, '\n');
      let cut;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        showEvent(buf.slice(0, cut));
        buf = buf.slice(cut + 2);
      }
    }
    fill($('#feed-state'), 'ended');
  } catch (e) {
    if (e.name !== 'AbortError') fill($('#feed-state'), `error: ${e.message}`);
    else fill($('#feed-state'), 'stopped');
  } finally {
    if (!signal.aborted) feed = null;
    $('#feed-toggle').textContent = 'Start';
  }
}

function showEvent(block) {
  let type = 'message';
  const data = [];
  for (const line of block.split('\n')) {
    if (line.startsWith(':')) continue; // a comment (ping)
    const i = line.indexOf(':');
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? '' : line.slice(i + 1).replace(/^ /, '');
    if (field === 'event') type = value;
    else if (field === 'data') data.push(value);
  }
  if (!data.length) return;
  const raw = data.join('\n');
  let ev = null;
  try {
    ev = JSON.parse(raw);
  } catch {
    // shown raw
  }
  const box = $('#feed');
  box.prepend(el('div', { 'data-event': type, 'data-json': raw, title: raw },
    el('span', { class: 'muted' }, ev?.at ? `${time(ev.at)} ` : ''), el('strong', {}, type), ' ', ev ? summary(type, ev) : raw));
  while (box.children.length > 200) box.lastChild.remove();
}

/** One readable line per event; the whole JSON is the row's tooltip. */
function summary(type, e) {
  const reason = (r) => (r ? ` (${r})` : '');
  switch (type) {
    case 'operator_status':
      return e.operator ? `${e.operator.name} #${e.operator.id} ${e.operator.status}${reason(e.operator.status_reason)}` : '';
    case 'department_status':
      return `department ${e.department} ${e.online ? 'online' : 'offline'}${reason(e.reason)}`;
    case 'chat':
      return e.chat ? `chat #${e.chat.id} ${e.chat.status}, owner ${e.chat.owner ?? 'none'}` : '';
    case 'chat_assigned':
      return e.chat ? `chat #${e.chat.id} to operator ${e.chat.owner}${reason(e.reason)}` : '';
    case 'message':
      return e.message ? `chat #${e.chat} ${e.message.from?.name ?? e.message.from?.kind}${e.message.whisper ? ' (whisper)' : ''}: ${e.message.text}` : '';
    case 'session':
      return `operator ${e.operator} was online ${e.seconds ?? '?'} s${reason(e.end_reason)}`;
    default:
      return JSON.stringify(e);
  }
}

if (!key) {
  $('#signin').classList.remove('hidden');
  $('#key-form').addEventListener('submit', (e) => {
    e.preventDefault();
    session.set('api_key', $('#api-key').value.trim());
    location.reload();
  });
} else {
  start();
}
