// The console in real Chromium (Debian's /usr/bin/chromium, headless, driven by
// playwright-core) against a real hub whose allowed_origins is not "*": the newcomer's whole
// path from the admin view to a closed operator tab. Screenshots of each view go to docs/img/.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startHub, API_KEY, upgradeRefusingProxy } from '../clients/js/test/hub.js';

const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
// The README's pictures: `SCREENSHOTS=1 npm test` writes them to docs/img/; otherwise they go
// to a temporary folder (still taken, so a page that cannot render fails the test).
const IMG = process.env.SCREENSHOTS === '1' ? join(dirname(fileURLToPath(import.meta.url)), '..', 'docs', 'img') : mkdtempSync(join(tmpdir(), 'presence-hub-shots-'));
const GRACE_MS = 1500;
/** Longest wait for something that must show. */
const WAIT = 10000;

let hub;
let browser;
let profile;
const problems = [];

before(async () => {
  hub = await startHub({
    grace: `${GRACE_MS}ms`,
    extra: { server: 'allowed_origins = ["https://shop.example"]' },
  });
  profile = mkdtempSync(join(tmpdir(), 'presence-hub-chromium-'));
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      `--user-data-dir=${profile}`,
    ].filter((a) => !a.startsWith('--user-data-dir')),
  });
  mkdirSync(IMG, { recursive: true });
});

after(async () => {
  if (problems.length) console.log(`page problems:\n${problems.join('\n')}`);
  await browser?.close();
  await hub?.destroy();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

/** A page in a fresh context (own session storage, like another person's browser). */
async function page(name) {
  const ctx = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const p = await ctx.newPage();
  p.on('console', (m) => {
    // A hub without the sessions report or the event feed answers 404: the page says so.
    const expected = /\/api\/v1\/(reports\/online|events\/stream)/.test(m.location().url) && /404/.test(m.text());
    if (m.type() === 'error' && !expected) problems.push(`${name}: ${m.text()} (${m.location().url})`);
  });
  p.on('pageerror', (e) => problems.push(`${name}: ${e.message}`));
  return p;
}

const shot = (p, file) => p.screenshot({ path: join(IMG, file), fullPage: true });

test('console_scenario_admin_operator_widget_visitor_supervisor_in_chromium', async () => {
  // Admin: the API key, typed in.
  const admin = await page('admin');
  await admin.goto(`${hub.url}/console/admin.html`);
  await admin.fill('#api-key', API_KEY);
  await admin.click('#key-form button');
  await admin.waitForSelector('#app:not(.hidden)');
  // The live event feed, from now on (or "not available" on a hub without it).
  await admin.click('#feed-toggle');
  const feed = await admin.waitForSelector('#feed-live, #feed-unavailable', { timeout: WAIT });
  const feedLive = (await feed.getAttribute('id')) === 'feed-live';

  // Admin creates an operator (Ann, department 1) and a supervisor (Sue, watches 1).
  await admin.fill('#op-id', '1');
  await admin.fill('#op-name', 'Ann');
  await admin.fill('#op-departments', '1');
  // Ann may not switch "always online" herself: her view shows that control disabled.
  await admin.uncheck('[data-perm="change_always_online"]');
  await admin.click('#operator-form button[type=submit]');
  await admin.waitForSelector('#operators tr[data-operator="1"]', { timeout: WAIT });
  await admin.fill('#op-id', '2');
  await admin.fill('#op-name', 'Sue');
  await admin.fill('#op-departments', '');
  await admin.fill('#op-watch', '1');
  await admin.check('[data-perm="set_operator_status"]');
  await admin.click('#operator-form button[type=submit]');
  await admin.waitForSelector('#operators tr[data-operator="2"]', { timeout: WAIT });
  const offline = await admin.textContent('#operators tr[data-operator="1"] [data-status]');
  assert.equal(offline, 'offline');

  // The widget demo: offline, nobody is there.
  const widget = await page('widget');
  await widget.goto(`${hub.url}/console/widget.html?department=1`);
  await widget.waitForSelector('#widget-status [data-status="offline"]', { timeout: WAIT });
  assert.equal(await widget.textContent('#widget-status [data-reason]'), 'nobody online');

  // The operator signs in with a token minted in the admin view and sees themself online.
  await admin.click('button[data-token="1"]');
  const operatorHref = await admin.getAttribute('#operator-link', 'href', { timeout: WAIT });
  const operator = await page('operator');
  await operator.goto(`${hub.url}/console/${operatorHref}`);
  await operator.waitForSelector('#me-status [data-status="online"]', { timeout: WAIT });
  assert.equal(await operator.textContent('#me-name'), 'Ann');
  // The token left the URL (kept in the tab's session storage).
  assert.ok(!operator.url().includes('token='), operator.url());

  // The widget flips online within a second.
  const flip = Date.now();
  await widget.waitForSelector('#widget-status [data-status="online"]', { timeout: 1000 });
  const flipMs = Date.now() - flip;
  assert.equal(await widget.textContent('#widget-status [data-reason]'), 'operators online');
  assert.ok(await operator.isEnabled('#set-online'));
  assert.ok(await operator.isDisabled('#set-always_online'), 'a setting without its permission is disabled');

  // Ann sets herself offline and back: her view says why, the widget follows.
  await operator.uncheck('#set-online');
  await operator.waitForSelector('#me-status [data-reason="set_offline"]', { timeout: WAIT });
  await widget.waitForSelector('#widget-status [data-status="offline"]', { timeout: WAIT });
  await operator.check('#set-online');
  await operator.waitForSelector('#me-status [data-status="online"]', { timeout: WAIT });
  await widget.waitForSelector('#widget-status [data-status="online"]', { timeout: WAIT });
  // Online & Invisible is a misconfiguration: the view warns while it lasts.
  await operator.check('#set-invisible');
  await operator.waitForSelector('#warnings [data-warning="online_invisible"]', { timeout: WAIT });
  await operator.uncheck('#set-invisible');
  await operator.waitForSelector('#warnings [data-warning]', { state: 'detached', timeout: WAIT });

  // A chat created from the admin view is assigned to Ann and shows at once in her view.
  await admin.fill('#chat-department', '1');
  await admin.fill('#chat-visitor', 'Bob');
  await admin.click('#chat-form button[type=submit]');
  await admin.waitForSelector('#visitor-link', { timeout: WAIT });
  await operator.waitForSelector('[data-assigned="1"]', { timeout: 2000 });
  await operator.waitForSelector('#chats tr[data-chat="1"] button[data-open="1"]', { timeout: 2000 });
  assert.equal(await operator.textContent('#chats tr[data-chat="1"] button'), 'Accept');

  // The visitor's page (the link from the admin view).
  const visitorHref = await admin.getAttribute('#visitor-link', 'href');
  const visitor = await page('visitor');
  await visitor.goto(`${hub.url}/console/${visitorHref}`);
  await visitor.waitForSelector('#visitor-chat [data-chat-status="pending"]', { timeout: WAIT });

  // Ann accepts it, and they talk.
  await operator.click('button[data-open="1"]');
  await operator.waitForSelector('#chat-info [data-chat-status="active"]', { timeout: WAIT });
  await visitor.waitForSelector('#visitor-chat [data-chat-status="active"]', { timeout: WAIT });
  assert.match(await visitor.textContent('#owner-name'), /Ann/);
  await operator.fill('#text', 'Hello Bob, how can I help?');
  await operator.click('#send-form button[type=submit]');
  await visitor.waitForSelector('#messages .msg:has-text("Hello Bob, how can I help?")', { timeout: WAIT });
  await visitor.fill('#text', 'Do you ship to Norway?');
  await visitor.click('#send-form button[type=submit]');
  await operator.waitForSelector('#messages .msg.visitor:has-text("Do you ship to Norway?")', { timeout: WAIT });

  // A supervisor watches it invisibly and whispers to Ann.
  await admin.click('button[data-token="2"]');
  await admin.waitForSelector('#token-box [data-token-for="2"]', { timeout: WAIT });
  const supervisorHref = await admin.getAttribute('#supervisor-link', 'href');
  const supervisor = await page('supervisor');
  await supervisor.goto(`${hub.url}/console/${supervisorHref}`);
  await supervisor.waitForSelector('section[data-department="1"] tr[data-chat="1"]', { timeout: WAIT });
  await supervisor.click('button[data-watch="1"]');
  await supervisor.waitForSelector('#messages .msg:has-text("Do you ship to Norway?")', { timeout: WAIT });
  assert.ok(await supervisor.isChecked('#whisper'));
  await supervisor.fill('#text', 'Offer the free shipping');
  await supervisor.click('#send-form button[type=submit]');
  await operator.waitForSelector('#messages .msg.whisper:has-text("Offer the free shipping")', { timeout: WAIT });
  // What the visitor sees next came after the whisper; the supervisor never shows.
  await operator.fill('#text', 'Yes, and shipping is free!');
  await operator.click('#send-form button[type=submit]');
  await visitor.waitForSelector('#messages .msg:has-text("shipping is free")', { timeout: WAIT });
  await supervisor.waitForSelector('#messages .msg:has-text("shipping is free")', { timeout: WAIT });
  // Sue (set_operator_status) sets Ann offline and back from her view; Ann's view says why.
  await supervisor.click('button[data-set-online="1"]');
  await operator.waitForSelector('#me-status [data-reason="set_offline"]', { timeout: WAIT });
  await supervisor.waitForSelector('section[data-department="1"] tr[data-operator="1"] [data-reason="set_offline"]', { timeout: WAIT });
  await widget.waitForSelector('#widget-status [data-status="offline"]', { timeout: WAIT });
  await supervisor.click('button[data-set-online="1"]:has-text("Set online")');
  await operator.waitForSelector('#me-status [data-status="online"]', { timeout: WAIT });
  await widget.waitForSelector('#widget-status [data-status="online"]', { timeout: WAIT });

  const seen = await visitor.textContent('body');
  assert.ok(!seen.includes('Sue'), 'the visitor page shows the supervisor');
  assert.ok(!seen.includes('Offer the free shipping'), 'the visitor page shows a whisper');
  assert.match(await visitor.textContent('#owner-name'), /Ann/);

  // The admin view's other parts answer (or say plainly that this hub lacks them).
  await admin.waitForSelector('#report table, #report-unavailable', { timeout: WAIT });
  if (feedLive) await admin.waitForSelector('#feed [data-event="chat_assigned"]', { timeout: WAIT });
  if (await admin.$('#report table')) {
    await admin.waitForSelector('#report tr[data-operator="1"]', { timeout: WAIT });
  }
  await admin.waitForSelector('#chats tr[data-chat="1"] [data-chat-status="active"]', { timeout: WAIT });

  await Promise.all([shot(admin, 'admin.png'), shot(operator, 'operator.png'), shot(supervisor, 'supervisor.png'), shot(visitor, 'widget.png')]);

  // Ann closes her tab: the widget stays online through the grace, then turns offline.
  const closed = Date.now();
  await operator.context().close();
  await widget.waitForSelector('#widget-status [data-status="offline"]', { timeout: GRACE_MS + WAIT });
  const offlineMs = Date.now() - closed;
  assert.ok(offlineMs >= GRACE_MS - 200, `offline after ${offlineMs} ms, before the ${GRACE_MS} ms grace`);
  await supervisor.waitForSelector(`section[data-department="1"] tr[data-operator="1"] [data-reason="disconnected"]`, { timeout: WAIT });
  if (feedLive) {
    // The feed shows what the hub decided, as it happens.
    await admin.waitForSelector('#feed [data-event="operator_status"]', { timeout: WAIT });
  }

  assert.deepEqual(problems.filter((p) => /Content Security Policy|Refused to/i.test(p)), [], 'CSP violations');
  assert.deepEqual(problems, [], 'errors in the pages');
  console.log(`widget flipped online ${flipMs} ms after the operator's page showed online; offline ${offlineMs} ms after the tab closed (grace ${GRACE_MS} ms)`);
});

test('console_admin_feed_reads_server_sent_events_with_fetch', async () => {
  // The page's own SSE reading (fetch with the key, since EventSource cannot send one), fed a
  // fixed stream so that comments, CRLF line ends and events split across chunks are covered
  // whatever this hub's feed holds.
  const admin = await page('admin-feed');
  let auth = null;
  await admin.route('**/api/v1/events/stream*', (route) => {
    auth = route.request().headers().authorization;
    route.fulfill({
      status: 200,
      headers: { 'content-type': 'text/event-stream' },
      body:
        ': ping\r\n\r\nid: 7\r\nevent: chat\r\ndata: {"id":"7","type":"chat","chat":{"id":3,"status":"pending","owner":null}}\r\n\r\n' +
        'id: 8\nevent: operator_status\ndata: {"id":"8",\ndata: "type":"operator_status","operator":{"id":1,"name":"Ann","status":"offline","status_reason":"disconnected"}}\n\n',
    });
  });
  await admin.goto(`${hub.url}/console/admin.html`);
  await admin.fill('#api-key', API_KEY);
  await admin.click('#key-form button');
  await admin.click('#feed-toggle');
  await admin.waitForSelector('#feed [data-event="operator_status"]', { timeout: WAIT });
  assert.equal(auth, `Bearer ${API_KEY}`);
  const rows = await admin.$$eval('#feed [data-event]', (es) => es.map((e) => [e.dataset.event, e.dataset.json, e.textContent]));
  assert.deepEqual(rows, [
    ['operator_status', '{"id":"8",\n"type":"operator_status","operator":{"id":1,"name":"Ann","status":"offline","status_reason":"disconnected"}}', 'operator_status Ann #1 offline (disconnected)'],
    ['chat', '{"id":"7","type":"chat","chat":{"id":3,"status":"pending","owner":null}}', 'chat chat #3 pending, owner none'],
  ]);
  await admin.context().close();
});

test('console_widget_demo_polls_when_websockets_are_refused', async () => {
  // The console served through a proxy that refuses WebSocket upgrades: the widget demo falls
  // back to polling the status (with its ETag) and still shows the department flip.
  const proxy = await upgradeRefusingProxy(hub.url);
  try {
    const r = await hub.api('PUT', '/api/v1/operators/30', { name: 'Cleo', departments: [30] });
    assert.ok(r.status === 201 || r.status === 200, JSON.stringify(r.body));
    const w = await page('widget-polling');
    await w.goto(`${proxy.url}/console/widget.html?department=30`);
    await w.waitForSelector('#widget-status [data-status="offline"]', { timeout: WAIT });
    await w.waitForSelector('#mode:has-text("polling")', { timeout: WAIT });
    const cleo = await page('cleo');
    await cleo.goto(`${hub.url}/console/operator.html#token=${await hub.token(30)}`);
    await cleo.waitForSelector('#me-status [data-status="online"]', { timeout: WAIT });
    // Polled every 5 s: the flip shows by the next poll.
    await w.waitForSelector('#widget-status [data-status="online"]', { timeout: 5000 + WAIT });
    const polls = proxy.seen.filter((s) => s.url === '/api/v1/widget/status?department=30');
    assert.ok(polls.length >= 2, `${polls.length} polls`);
    assert.ok(polls.slice(1).every((s) => s.ifNoneMatch), 'every poll after the first sends If-None-Match');
    await cleo.context().close();
    await w.context().close();
  } finally {
    await proxy.close();
  }
});
