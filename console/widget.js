// Widget demo: the online badge of a department with its reason (and `opens_at`), and a
// visitor's chat when the page is given a chat and its token.

import { widget, visitor } from './presence-hub.js';
import { $, el, fill, hub, statusBadge, param, messageLine, header } from './common.js';

header('widget.html');
const department = Number(param('department'));
if (!param('department') || !Number.isInteger(department) || department < 0) {
  $('#pick').classList.remove('hidden');
  $('#pick').addEventListener('submit', (e) => {
    e.preventDefault();
    location.search = `?department=${Number($('#pick-department').value)}`;
  });
} else {
  fill($('#department'), String(department));
  const w = widget(hub, [department]);
  const show = (s) => {
    fill($('#badge'), el('span', { id: 'widget-status' }, statusBadge(s.online, s.reason, { big: true })));
    fill($('#opens'), s.reason === 'closed' ? (s.opens_at ? `opens ${new Date(s.opens_at).toLocaleString()}` : 'does not open again') : '');
  };
  w.on('status', show);
  w.on('mode', (m) => fill($('#mode'), m === 'polling' ? 'WebSocket unavailable: polling every 5 s' : m === 'socket' ? 'live (WebSocket)' : 'connecting…'));
}

const chat = Number(param('chat'));
const token = param('token');
if (param('chat') && token) {
  $('#visitor').classList.remove('hidden');
  $('#visitor-hint').classList.add('hidden');
  const v = visitor(hub, { chat, token });
  const list = $('#messages');
  v.on('state', (s) => {
    if (s.chat) {
      fill($('#visitor-chat'), el('span', { 'data-chat-status': s.chat.status }, `Chat #${s.chat.id}: ${s.chat.status}`),
        s.chat.owner_name ? el('span', { id: 'owner-name' }, ` · you are talking with ${s.chat.owner_name}`) : ' · waiting for an operator');
    }
    fill(list, s.messages.map(messageLine));
    list.scrollTop = list.scrollHeight;
  });
  v.on('close', (c) => {
    if (!c.wasOpen) fill($('#visitor-error'), 'cannot join the chat (is the token right?); retrying');
    else fill($('#visitor-error'));
  });
  v.on('open', () => fill($('#visitor-error')));
  $('#send-form').addEventListener('submit', async (e) => {
    e.preventDefault();
    const input = $('#text');
    if (!input.value.trim()) return;
    try {
      await v.send(input.value);
      input.value = '';
      fill($('#visitor-error'));
    } catch (err) {
      fill($('#visitor-error'), `${err.code}: ${err.message}`);
    }
  });
}
