#!/usr/bin/env node
// A command-line peer of the hub for the README's tour and for trying things from a shell:
// prints every frame it receives as one JSON line, sends the requests it is given, and runs
// until it is stopped (Ctrl-C or kill).
//
//   node --experimental-websocket clients/js/examples/cli.mjs widget   URL DEPARTMENT...
//   node --experimental-websocket clients/js/examples/cli.mjs operator URL TOKEN [REQUEST_JSON...]
//   node --experimental-websocket clients/js/examples/cli.mjs visitor  URL CHAT TOKEN [TEXT...]
//
// Requests are sent one after another once connected; each answer (ack or error) is printed.
// Node 22 has WebSocket built in; Node 20 needs --experimental-websocket.

import { operator, widget, visitor } from '../presence-hub.js';

const [kind, url, ...rest] = process.argv.slice(2);
const print = (frame) => console.log(JSON.stringify(frame));
const usage = () => {
  console.error('usage: cli.mjs widget URL DEPT... | operator URL TOKEN [REQUEST_JSON...] | visitor URL CHAT TOKEN [TEXT...]');
  process.exit(2);
};
if (!kind || !url) usage();
if (!globalThis.WebSocket) {
  console.error('no WebSocket in this Node: run it with node --experimental-websocket (Node 20) or Node 22+');
  process.exit(2);
}

/** Sends each request in turn, printing the answer (an error answer is printed too). */
async function send(client, requests) {
  for (const r of requests) {
    try {
      print(await client.request(r));
    } catch (e) {
      print(e.frame ?? { type: 'error', code: e.code, message: e.message });
    }
  }
}

if (kind === 'widget') {
  if (!rest.length) usage();
  const w = widget(url, rest.map(Number));
  w.on('status', (s) => print({ type: 'widget_status', ...s }));
  w.on('mode', (m) => m === 'polling' && console.error('(WebSocket refused: polling)'));
} else if (kind === 'operator') {
  const [token, ...requests] = rest;
  if (!token) usage();
  const op = operator(url, { token });
  op.on('frame', (f) => f.type !== 'ack' && f.type !== 'error' && print(f));
  op.on('close', (c) => c.reconnect ? console.error(`(disconnected ${c.code}; reconnecting in ${c.delay} ms)`) : process.exit(0));
  let sent = false;
  op.on('hello', () => {
    if (sent) return;
    sent = true;
    send(op, requests.map((r) => JSON.parse(r)));
  });
} else if (kind === 'visitor') {
  const [chat, token, ...texts] = rest;
  if (!chat || !token) usage();
  const v = visitor(url, { chat: Number(chat), token });
  v.on('frame', (f) => f.type !== 'ack' && f.type !== 'error' && print(f));
  let sent = false;
  v.on('chat', () => {
    if (sent) return;
    sent = true;
    send(v, texts.map((text) => ({ type: 'send_message', text })));
  });
} else {
  usage();
}
process.on('SIGTERM', () => process.exit(0));
