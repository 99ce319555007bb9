// Supervisor view: every watched (and own) department's state, its operators and chats with
// owners; watch a chat invisibly.

import { $, el, fill, statusBadge, chatLabel, header, signedInOperator } from './common.js';
import { ChatPanel } from './chatpanel.js';

const conn = header('supervisor.html');
const signed = signedInOperator(conn);
if (signed) start(signed);

function start({ op, name }) {
  const panel = new ChatPanel(op, name);
  op.on('state', render);

  async function setOnline(o) {
    try {
      await op.setStatus({ operator: o.id, online: !o.online });
    } catch (e) {
      alert(`${e.code}: ${e.message}`);
    }
  }

  function render(s) {
    const me = s.operator;
    if (!me) return;
    fill($('#me'), el('div', { class: 'row' }, el('strong', {}, me.name), el('span', { class: 'muted' }, `#${me.id} · watches ${me.watch_departments.join(', ') || 'nothing'} · works in ${me.departments.join(', ') || 'nothing'}`)));
    // Opening a pending chat of a department one works in takes it unless invisible.
    const risky = me.departments.length > 0 && !me.invisible;
    fill($('#visibility'), risky ? el('div', { class: 'warning' }, 'You are visible and work in departments: opening one of their pending chats takes it. ',
      me.permissions.includes('change_visibility') ? el('button', { type: 'button', onclick: () => op.setStatus({ invisible: true }) }, 'Go invisible') : null) : null);
    // With set_operator_status a supervisor may switch the operators of these departments.
    const canSet = me.permissions.includes('set_operator_status');
    const ids = [...s.departments.keys()].sort((a, b) => a - b);
    const all = [me, ...s.operators.values()];
    fill($('#departments'), ids.map((d) => {
      const dep = s.departments.get(d);
      const members = all.filter((o) => o.departments.includes(d));
      const watchers = all.filter((o) => o.watch_departments.includes(d));
      const chats = [...s.chats.values()].filter((c) => c.department === d).sort((a, b) => a.id - b.id);
      return el('section', { 'data-department': d },
        el('h2', {}, `Department ${d} `, statusBadge(dep.online, dep.reason)),
        el('table', {}, el('thead', {}, el('tr', {}, el('th', {}, 'operator'), el('th', {}, 'status'), el('th', {}, 'chats'), el('th', {}))),
          el('tbody', {}, members.length ? members.map((o) => el('tr', { 'data-operator': o.id }, el('td', {}, o.name), el('td', {}, statusBadge(o.status, o.status_reason)), el('td', {}, `${o.active_chats} active, ${o.pending_chats} pending`),
            el('td', {}, canSet && o.id !== me.id ? el('button', { type: 'button', 'data-set-online': o.id, onclick: () => setOnline(o) }, o.online ? 'Set offline' : 'Set online') : null)))
            : el('tr', {}, el('td', { colspan: 4, class: 'muted' }, 'no operators work here')))),
        watchers.length ? el('p', { class: 'muted' }, `watched by ${watchers.map((o) => o.name).join(', ')}`) : null,
        el('table', {}, el('thead', {}, el('tr', {}, el('th', {}, 'chat'), el('th', {}, 'status'), el('th', {}, 'owner'), el('th', {}))),
          el('tbody', {}, chats.length ? chats.map((c) => el('tr', { 'data-chat': c.id, class: panel.chat?.id === c.id ? 'selected' : '' },
            el('td', {}, chatLabel(c)), el('td', { 'data-chat-status': c.status }, c.status), el('td', {}, c.owner ? name(c.owner) : 'queue'),
            el('td', {}, el('button', { type: 'button', 'data-watch': c.id, onclick: () => panel.open(c.id).then(() => render(op.state), (e) => alert(`${e.code}: ${e.message}`)) }, 'Watch'))))
            : el('tr', {}, el('td', { colspan: 4, class: 'muted' }, 'no pending or active chats')))));
    }));
  }
}
