// Shared helpers of the console pages: DOM building without innerHTML, status badges,
// the hub's base URL, keys kept in the tab's session storage, the operator sign-in.

import { operator } from './presence-hub.js';

/** The hub that served this page. */
export const hub = location.origin;

export const $ = (sel, root = document) => root.querySelector(sel);

/** `el('td', {class: 'x', onclick: f}, 'text', child)`: text is always text, never HTML. */
export function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(e.dataset, v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

/** Replaces the children of `node`. */
export function fill(node, ...children) {
  node.replaceChildren();
  for (const c of children.flat()) if (c) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
}

/** "online" / "offline (why)" as a badge. */
export function statusBadge(online, reason, { big = false } = {}) {
  const on = online === true || online === 'online';
  return el('span', { class: 'status' },
    el('span', { class: `badge ${on ? 'online' : 'offline'}${big ? ' big' : ''}`, 'data-status': on ? 'online' : 'offline' }, on ? 'online' : 'offline'),
    reason ? el('span', { class: 'reason', 'data-reason': reason }, reasonText(reason)) : null);
}

const REASONS = {
  set_offline: 'set offline',
  inactive: 'inactive',
  disconnected: 'disconnected',
  logged_out: 'logged out',
  operators: 'operators online',
  bot: 'bot answers',
  none: 'nobody online',
  disabled: 'disabled',
  closed: 'outside online hours',
  queue_full: 'queue full',
};
export function reasonText(r) {
  return REASONS[r] ?? r;
}

export function time(at) {
  if (!at) return '';
  const d = new Date(at);
  return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit' });
}

/** The connection indicator in the header. */
export function connIndicator(client, node) {
  const show = (text, cls) => fill(node, el('span', { class: `badge ${cls}`, 'data-conn': text }, text));
  show('connecting', 'offline');
  client.on('open', () => show('connected', 'online'));
  client.on('close', (c) => show(c.reconnect ? `reconnecting in ${Math.round(c.delay / 100) / 10} s` : 'closed', 'offline'));
}

/** A value from the URL's hash or query (the hash keeps tokens out of server logs). */
export function param(name) {
  const hash = new URLSearchParams(location.hash.slice(1));
  return hash.get(name) ?? new URLSearchParams(location.search).get(name);
}

/** Kept for this tab only, sent only to this hub. */
export const session = {
  get: (k) => sessionStorage.getItem(`presence-hub.${k}`),
  set: (k, v) => sessionStorage.setItem(`presence-hub.${k}`, v),
  remove: (k) => sessionStorage.removeItem(`presence-hub.${k}`),
};

/** The operator token: from `#token=` (then moved to session storage) or the session. */
export function takeToken() {
  const t = param('token');
  if (t) {
    session.set('token', t);
    history.replaceState(null, '', location.pathname + location.search);
  }
  return session.get('token');
}

export function chatLabel(c) {
  const who = c.visitor && typeof c.visitor.name === 'string' ? c.visitor.name : 'visitor';
  return `#${c.id} ${who}`;
}

export function messageLine(m) {
  const who = m.from.kind === 'visitor' ? (m.from.name ?? 'visitor') : (m.from.name ?? m.from.kind);
  return el('div', { class: `msg ${m.from.kind}${m.whisper ? ' whisper' : ''}`, 'data-id': m.id },
    el('span', { class: 'muted' }, time(m.at), ' '),
    el('span', { class: 'who' }, who + (m.whisper ? ' (whisper)' : '') + ':'),
    el('span', { class: 'text' }, m.text));
}

/** Header with navigation, shared by every page. */
export function header(current) {
  const pages = [['operator.html', 'Operator'], ['supervisor.html', 'Supervisor'], ['widget.html', 'Widget demo'], ['admin.html', 'Admin']];
  const h = el('header', {},
    el('h1', {}, 'presence-hub'),
    el('nav', {}, pages.map(([href, text]) => el('a', { href, 'aria-current': href === current ? 'page' : null }, text))),
    el('span', { class: 'conn', id: 'conn' }));
  document.body.prepend(h);
  return $('#conn', h);
}

/**
 * The page's operator connection. With a token (from the URL or this tab's session) the app is
 * shown and connected; without one the sign-in form is shown and null returned. `name(id)`
 * names operators in chat panels ("Ann (me)").
 */
export function signedInOperator(conn) {
  const token = takeToken();
  if (!token) {
    $('#signin').classList.remove('hidden');
    $('#signin-form').addEventListener('submit', (e) => {
      e.preventDefault();
      session.set('token', $('#token').value.trim());
      location.reload();
    });
    return null;
  }
  $('#app').classList.remove('hidden');
  const op = operator(hub, { token });
  connIndicator(op, conn);
  const name = (id) => (op.state.operator?.id === id ? `${op.state.operator.name} (me)` : (op.state.operators.get(id)?.name ?? `#${id}`));
  return { op, name };
}
