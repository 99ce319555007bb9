// The chat panel shared by the operator and supervisor views: open (or watch) a chat, its
// messages as they come, write, whisper, close, leave.

import { $, el, fill, messageLine, chatLabel, statusBadge } from './common.js';

export class ChatPanel {
  constructor(op, names) {
    this.op = op;
    this.names = names;
    this.chat = null;
    this.panel = $('#chat-panel');
    this.list = $('#messages');
    op.on('message', (f) => {
      if (this.chat && f.chat === this.chat.id) this.add(f.message);
    });
    op.on('chat', (f) => {
      if (this.chat && f.chat.id === this.chat.id) this.showInfo(f.chat);
    });
    // After a reconnect the hub has forgotten that this socket watched the chat: open again.
    op.on('hello', () => {
      if (this.chat) this.open(this.chat.id).catch(() => this.hide());
    });
    $('#send-form').addEventListener('submit', (e) => {
      e.preventDefault();
      this.send();
    });
    $('#close-chat')?.addEventListener('click', () => this.run(() => op.closeChat(this.chat.id)));
    $('#leave-chat').addEventListener('click', async () => {
      await this.run(() => op.leaveChat(this.chat.id));
      this.hide();
    });
  }

  async open(id) {
    const ack = await this.op.openChat(id);
    this.chat = ack.chat;
    this.panel.classList.remove('hidden');
    this.panel.dataset.chat = String(id);
    fill(this.list, (ack.messages ?? []).map(messageLine));
    this.list.scrollTop = this.list.scrollHeight;
    this.showInfo(ack.chat);
    fill($('#chat-error'));
    $('#text').focus();
    return ack;
  }

  showInfo(c) {
    this.chat = c;
    fill($('#chat-title'), `Chat ${chatLabel(c)}`);
    fill($('#chat-info'), el('span', { 'data-chat-status': c.status }, `status ${c.status}`), ' · owner ', c.owner ? this.names(c.owner) : 'nobody', ' · department ', String(c.department));
  }

  add(m) {
    if (this.list.querySelector(`[data-id="${m.id}"]`)) return;
    this.list.append(messageLine(m));
    this.list.scrollTop = this.list.scrollHeight;
  }

  async send() {
    const input = $('#text');
    const text = input.value;
    if (!text.trim() || !this.chat) return;
    const ack = await this.run(() => this.op.sendMessage(this.chat.id, text, { whisper: $('#whisper').checked }));
    if (ack) {
      input.value = '';
      this.add(ack.message);
    }
  }

  async run(fn) {
    try {
      fill($('#chat-error'));
      return await fn();
    } catch (e) {
      fill($('#chat-error'), `${e.code ?? 'error'}: ${e.message}`);
      return null;
    }
  }

  hide() {
    this.chat = null;
    this.panel.classList.add('hidden');
  }
}

export { statusBadge };
