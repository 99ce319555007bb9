// The client against a real hub: operator state and requests, reconnect across a hub
// restart, the widget socket and its polling fallback, the visitor.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import { spawn } from 'node:child_process';
import { createInterface } from 'node:readline';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { startHub, until, upgradeRefusingProxy } from './hub.js';
import { operator, widget, visitor, backoffDelay, HubError } from '../presence-hub.js';

const WebSocket = globalThis.WebSocket;
const fast = { WebSocket, minDelay: 50, maxDelay: 400 };
let hub;

before(async () => {
  assert.ok(WebSocket, 'run with node --experimental-websocket (npm test does)');
  hub = await startHub();
});
after(async () => {
  await hub?.destroy();
});

let nextId = 100;
/** A fresh operator (and department) so that tests do not see each other. */
async function newOperator(fields = {}) {
  const id = nextId++;
  const dept = fields.departments?.[0] ?? id;
  const r = await hub.api('PUT', `/api/v1/operators/${id}`, {
    name: `Op${id}`,
    departments: [dept],
    permissions: ['change_online_status', 'change_visibility'],
    ...fields,
  });
  assert.ok(r.status === 200 || r.status === 201, JSON.stringify(r.body));
  return { id, dept, token: await hub.token(id) };
}

test('backoff_delay_grows_exponentially_with_jitter_and_a_cap', () => {
  const opts = { minDelay: 100, maxDelay: 1000 };
  assert.equal(backoffDelay(0, { ...opts, random: () => 0 }), 50);
  assert.equal(backoffDelay(0, { ...opts, random: () => 0.999999 }), 100);
  assert.equal(backoffDelay(3, { ...opts, random: () => 0 }), 400);
  assert.equal(backoffDelay(3, { ...opts, random: () => 0.999999 }), 800);
  // Capped: never beyond maxDelay, never below half of it.
  for (let i = 0; i < 100; i++) {
    const d = backoffDelay(40, opts);
    assert.ok(d >= 500 && d <= 1000, `${d}`);
  }
  // Jitter: two clients rarely pick the same delay.
  const seen = new Set(Array.from({ length: 50 }, () => backoffDelay(5, opts)));
  assert.ok(seen.size > 10, `only ${seen.size} distinct delays`);
});

test('operator_hello_fills_the_state_and_set_status_resolves_with_the_ack', async () => {
  const me = await newOperator();
  const colleague = await newOperator({ departments: [me.dept] });
  const op = operator(hub.url, { token: me.token, ...fast });
  try {
    await op.once('hello', () => true, 5000);
    assert.equal(op.state.operator.id, me.id);
    assert.equal(op.state.operator.status, 'online');
    assert.equal(op.state.operators.get(colleague.id).status, 'offline');
    assert.equal(op.state.departments.get(me.dept).online, true);
    assert.equal(op.state.departments.get(me.dept).reason, 'operators');

    const ack = await op.setStatus({ online: false });
    assert.equal(ack.type, 'ack');
    assert.equal(ack.operator.status, 'offline');
    assert.equal(ack.operator.status_reason, 'set_offline');
    assert.equal(op.state.operator.status_reason, 'set_offline');
    await until(() => op.state.departments.get(me.dept).reason === 'none', 5000, 'department offline');
  } finally {
    op.close();
  }
});

test('operator_request_is_rejected_with_the_error_code', async () => {
  const me = await newOperator({ permissions: [] });
  const op = operator(hub.url, { token: me.token, ...fast });
  try {
    await op.once('hello', () => true, 5000);
    await assert.rejects(op.setStatus({ always_online: true }), (e) => {
      assert.ok(e instanceof HubError);
      assert.equal(e.code, 'forbidden');
      assert.match(e.message, /change_always_online/);
      return true;
    });
    await assert.rejects(op.openChat(987654), (e) => e.code === 'not_found');
    // Nothing changed, and the connection goes on.
    assert.equal(op.state.operator.always_online, false);
    assert.equal((await op.activity(true)).type, 'ack');
  } finally {
    op.close();
  }
});

test('operator_request_times_out_when_the_hub_does_not_answer', async () => {
  const me = await newOperator();
  const op = operator(hub.url, { token: me.token, ...fast });
  try {
    await op.once('hello', () => true, 5000);
    // A hub that hangs (stopped, not dead): the socket stays open, no answer comes.
    hub.child.kill('SIGSTOP');
    await until(() => /^\d+ \(.*\) T/.test(readFileSync(`/proc/${hub.child.pid}/stat`, 'utf8')), 5000, 'hub stopped');
    try {
      await assert.rejects(op.request({ type: 'activity', active: false }, { timeout: 200 }), (e) => e.code === 'timeout');
      await assert.rejects(op.request({ type: 'activity', active: true }, { timeout: 200 }), (e) => e.code === 'timeout' && /activity/.test(e.message));
    } finally {
      hub.child.kill('SIGCONT');
    }
    assert.equal((await op.activity(true)).type, 'ack');
  } finally {
    op.close();
  }
});

test('operator_request_while_disconnected_is_rejected_at_once', async () => {
  const me = await newOperator();
  const op = operator(hub.url, { token: me.token, ...fast });
  await op.once('hello', () => true, 5000);
  op.close();
  await assert.rejects(op.activity(false), (e) => e.code === 'disconnected');
});

test('operator_reconnects_after_the_hub_restarts_and_a_fresh_hello_replaces_the_state', async () => {
  const me = await newOperator();
  const op = operator(hub.url, { token: me.token, ...fast });
  try {
    await op.once('hello', () => true, 5000);
    // Something the hub never said: the next hello must drop it.
    op.state.chats.set(424242, { id: 424242, status: 'pending' });
    const closed = op.once('close', () => true, 10000);
    const { port, dir } = hub;
    await hub.stop();
    const info = await closed;
    assert.equal(info.reconnect, true);
    assert.ok(info.delay >= 25 && info.delay <= 400, `delay ${info.delay}`);
    assert.equal(op.connected, false);

    const hello = op.once('hello', () => true, 15000);
    hub = await startHub({ port, dir });
    // A colleague added while the client may or may not be back: the state shows it either way.
    const colleague = await newOperator({ departments: [me.dept] });
    await hello;
    assert.equal(op.connected, true);
    assert.equal(op.state.chats.has(424242), false);
    assert.equal(op.state.operator.status, 'online');
    await until(() => op.state.operators.has(colleague.id), 5000, 'colleague in the state');
  } finally {
    op.close();
  }
});

test('operator_logout_closes_for_good', async () => {
  const me = await newOperator();
  const op = operator(hub.url, { token: me.token, ...fast });
  await op.once('hello', () => true, 5000);
  const closed = op.once('close', () => true, 5000);
  await op.logout();
  const info = await closed;
  assert.equal(info.code, 1000);
  assert.equal(info.reconnect, false);
  const view = await hub.api('GET', `/api/v1/operators/${me.id}`);
  assert.equal(view.body.status_reason, 'logged_out');
});

test('widget_socket_pushes_the_department_flip', async () => {
  const me = await newOperator();
  const w = widget(hub.url, [me.dept], fast);
  let op;
  try {
    await until(() => w.state.get(me.dept), 5000, 'first widget_status');
    assert.equal(w.mode, 'socket');
    assert.deepEqual(w.state.get(me.dept), { department: me.dept, online: false, reason: 'none' });
    const online = w.once('status', (s) => s.online, 5000);
    op = operator(hub.url, { token: me.token, ...fast });
    assert.equal((await online).reason, 'operators');
  } finally {
    op?.close();
    w.close();
  }
});

test('widget_falls_back_to_polling_with_etag_when_the_upgrade_is_refused', async () => {
  const me = await newOperator();
  const proxy = await upgradeRefusingProxy(hub.url);
  const w = widget(proxy.url, [me.dept], { ...fast, pollInterval: 50 });
  let op;
  try {
    await until(() => w.mode === 'polling', 5000, 'polling mode');
    await until(() => w.state.get(me.dept), 5000, 'first polled status');
    assert.equal(w.state.get(me.dept).online, false);
    // Unchanged state: the poll asks with the ETag and gets 304.
    await until(() => proxy.seen.some((s) => s.ifNoneMatch && s.status === 304), 5000, 'a 304');
    const online = w.once('status', (s) => s.online, 5000);
    op = operator(hub.url, { token: me.token, ...fast });
    assert.equal((await online).reason, 'operators');
    assert.equal(w.mode, 'polling');
    assert.ok(proxy.seen.every((s) => s.url === `/api/v1/widget/status?department=${me.dept}`));
  } finally {
    op?.close();
    w.close();
    await proxy.close();
  }
});

test('widget_goes_back_to_the_socket_once_upgrades_get_through_again', async () => {
  const me = await newOperator();
  const proxy = await upgradeRefusingProxy(hub.url);
  const w = widget(proxy.url, [me.dept], { ...fast, pollInterval: 50, socketRetry: 200 });
  let op;
  try {
    await until(() => w.mode === 'polling' && w.state.get(me.dept), 5000, 'polling');
    proxy.control.refuse = false;
    await until(() => w.mode === 'socket', 5000, 'back on the socket');
    const polls = proxy.seen.length;
    const online = w.once('status', (s) => s.online, 5000);
    op = operator(hub.url, { token: me.token, ...fast });
    assert.equal((await online).reason, 'operators');
    // Pushed, not polled: at most a poll that was already under way.
    assert.ok(proxy.seen.length <= polls + 1, `${proxy.seen.length - polls} polls after the socket opened`);
  } finally {
    op?.close();
    w.close();
    await proxy.close();
  }
});

test('cli_example_prints_frames_as_json_lines', async () => {
  const me = await newOperator();
  const cli = fileURLToPath(new URL('../examples/cli.mjs', import.meta.url));
  const child = spawn(process.execPath, ['--no-warnings', '--experimental-websocket', cli, 'operator', hub.url, me.token, '{"type":"set_status","online":false}'], { stdio: ['ignore', 'pipe', 'inherit'] });
  try {
    const lines = [];
    const rl = createInterface({ input: child.stdout });
    const done = new Promise((resolve) => rl.on('line', (l) => {
      lines.push(JSON.parse(l));
      if (lines.some((f) => f.type === 'ack')) resolve();
    }));
    await Promise.race([done, new Promise((_, reject) => setTimeout(() => reject(new Error(`no ack; got ${JSON.stringify(lines)}`)), 5000))]);
    assert.equal(lines[0].type, 'hello');
    assert.equal(lines[0].operator.id, me.id);
    const ack = lines.find((f) => f.type === 'ack');
    assert.equal(ack.operator.status_reason, 'set_offline');
  } finally {
    child.kill('SIGTERM');
  }
});

test('visitor_and_operator_exchange_messages', async () => {
  const me = await newOperator();
  const op = operator(hub.url, { token: me.token, ...fast });
  let v;
  try {
    await op.once('hello', () => true, 5000);
    const assigned = op.once('chat_assigned', () => true, 5000);
    const created = await hub.api('POST', '/api/v1/chats', { department: me.dept, visitor: { name: 'Vera' } });
    assert.equal(created.status, 201);
    const chat = created.body.chat.id;
    assert.equal((await assigned).chat.id, chat);
    assert.equal(op.state.chats.get(chat).owner, me.id);

    v = visitor(hub.url, { chat, token: created.body.visitor_token, ...fast });
    await until(() => v.state.chat, 5000, 'visitor chat frame');
    assert.equal(v.state.chat.owner_name, `Op${me.id}`);

    const opened = await op.openChat(chat);
    assert.equal(opened.chat.status, 'active');
    await until(() => v.state.chat.status === 'active', 5000, 'visitor sees active');

    const toVisitor = v.once('message', () => true, 5000);
    await op.sendMessage(chat, 'Hello Vera!');
    assert.equal((await toVisitor).message.text, 'Hello Vera!');

    const toOperator = op.once('message', (f) => f.chat === chat, 5000);
    const ack = await v.send('Hi!');
    assert.equal(ack.message.from.kind, 'visitor');
    assert.equal((await toOperator).message.text, 'Hi!');
    assert.deepEqual(v.state.messages.map((m) => m.text), ['Hello Vera!', 'Hi!']);

    await op.closeChat(chat);
    assert.equal(op.state.chats.has(chat), false);
    await until(() => v.state.chat.status === 'closed', 5000, 'visitor sees closed');
    await assert.rejects(v.send('still there?'), (e) => e.code === 'conflict');
  } finally {
    v?.close();
    op.close();
  }
});

test('visitor_history_on_connect_fills_the_messages', async () => {
  const me = await newOperator();
  const op = operator(hub.url, { token: me.token, ...fast });
  let v;
  try {
    await op.once('hello', () => true, 5000);
    const created = await hub.api('POST', '/api/v1/chats', { department: me.dept, visitor: { name: 'Ida' } });
    const chat = created.body.chat.id;
    await op.openChat(chat);
    await op.sendMessage(chat, 'Written before you came');
    await op.sendMessage(chat, 'For operators only', { whisper: true });
    // A visitor who connects (or reloads the page) gets what was said, whispers left out.
    v = visitor(hub.url, { chat, token: created.body.visitor_token, ...fast });
    await v.once('history', () => true, 5000);
    assert.deepEqual(v.state.messages.map((m) => m.text), ['Written before you came']);
  } finally {
    v?.close();
    op.close();
  }
});
