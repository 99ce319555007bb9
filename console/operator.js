// Operator view: own status and settings, colleagues, departments, the queue and the chats.

import { $, el, fill, statusBadge, session, chatLabel, header, signedInOperator } from './common.js';
import { ChatPanel } from './chatpanel.js';

const SETTINGS = [
  ['online', 'Online', 'change_online_status'],
  ['invisible', 'Invisible', 'change_visibility'],
  ['always_online', 'Always online', 'change_always_online'],
];

const conn = header('operator.html');
const signed = signedInOperator(conn);
if (signed) start(signed);

function start({ op, name }) {
  const panel = new ChatPanel(op, name);
  const assigned = new Set();

  op.on('state', render);
  op.on('warning', (f) => fill($('#warnings'), el('div', { class: 'warning', 'data-warning': f.code }, f.message)));
  op.on('chat_assigned', (f) => {
    assigned.add(f.chat.id);
    $('#notices').prepend(el('div', { class: 'notice', 'data-assigned': f.chat.id },
      `Chat ${chatLabel(f.chat)} assigned to you (${f.reason}). `,
      el('button', { type: 'button', onclick: () => panel.open(f.chat.id) }, 'Open')));
  });
  op.on('close', (c) => {
    // 1008 right after connecting: the token was refused or the operator is unknown.
    if (!c.wasOpen && c.reconnect && !op.state.operator) fill($('#me'), el('span', { class: 'error' }, 'cannot connect: is the token valid? '), el('button', { type: 'button', onclick: signOut }, 'Sign in again'));
  });
  $('#logout').addEventListener('click', async () => {
    await op.logout().catch(() => {});
    signOut();
  });

  function signOut() {
    op.close();
    session.remove('token');
    location.reload();
  }

  function render(s) {
    const me = s.operator;
    if (!me) return;
    fill($('#me'),
      el('div', { class: 'row' }, el('strong', { id: 'me-name' }, me.name), el('span', { class: 'muted' }, `#${me.id}`), el('span', { id: 'me-status' }, statusBadge(me.status, me.status_reason))),
      el('div', { class: 'muted' }, `${me.connections} connection(s) · ${me.active_chats} active, ${me.pending_chats} pending chat(s)${me.inactive ? ' · inactive' : ''}`));
    if (!me.misconfigured) fill($('#warnings'));
    else if (!$('#warnings').children.length) fill($('#warnings'), el('div', { class: 'warning', 'data-warning': 'online_invisible' }, 'Online & Invisible: auto-assigned chats will not turn active when you open them.'));
    fill($('#settings'), SETTINGS.map(([key, label, perm]) => {
      const allowed = me.permissions.includes(perm);
      return el('label', { title: allowed ? '' : `needs the permission ${perm}` },
        el('input', { type: 'checkbox', id: `set-${key}`, checked: me[key], disabled: !allowed, onchange: (e) => change(key, e.target) }), label);
    }));
    fill($('#departments'), [...s.departments.values()].sort((a, b) => a.department - b.department).map((d) =>
      el('tr', { 'data-department': d.department }, el('td', {}, String(d.department), me.watch_departments.includes(d.department) ? el('span', { class: 'muted' }, ' (watched)') : null),
        el('td', {}, statusBadge(d.online, d.reason), d.opens_at ? el('span', { class: 'muted' }, ` opens ${new Date(d.opens_at).toLocaleString()}`) : null))));
    // A notice stays while its chat waits for Ann's accept; it goes once she took it (or lost it).
    for (const n of [...$('#notices').children]) {
      const c = s.chats.get(Number(n.dataset.assigned));
      if (!c || c.status !== 'pending' || c.owner !== me.id) n.remove();
    }
    const watcherOnly = (o) => !o.departments.some((d) => me.departments.includes(d) || me.watch_departments.includes(d));
    fill($('#colleagues'), [...s.operators.values()].sort((a, b) => a.name.localeCompare(b.name)).map((o) =>
      el('tr', { 'data-operator': o.id }, el('td', {}, o.name, watcherOnly(o) ? el('span', { class: 'muted' }, ' (supervisor)') : null), el('td', {}, statusBadge(o.status, o.status_reason)), el('td', {}, String(o.connections)), el('td', {}, `${o.active_chats}+${o.pending_chats}`))));
    const chats = [...s.chats.values()].sort((a, b) => (a.status === 'pending' ? 0 : 1) - (b.status === 'pending' ? 0 : 1) || b.priority - a.priority || a.id - b.id);
    fill($('#chats'), chats.length ? chats.map((c) =>
      el('tr', { 'data-chat': c.id, class: c.owner === me.id ? 'mine' : '' },
        el('td', {}, chatLabel(c)), el('td', {}, String(c.department)), el('td', { 'data-chat-status': c.status }, c.status),
        el('td', {}, c.owner ? name(c.owner) : 'queue'),
        el('td', {}, el('button', { type: 'button', 'data-open': c.id, onclick: () => panel.open(c.id).catch((e) => alert(`${e.code}: ${e.message}`)) }, c.status === 'pending' && c.owner === me.id ? 'Accept' : 'Open')))) : el('tr', {}, el('td', { colspan: 5, class: 'muted' }, 'no pending or active chats')));
  }

  async function change(key, input) {
    try {
      await op.setStatus({ [key]: input.checked });
    } catch (e) {
      input.checked = !input.checked;
      fill($('#warnings'), el('div', { class: 'warning' }, `${e.code}: ${e.message}`));
    }
  }
}
