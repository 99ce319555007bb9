// Starts a real presence-hub for the tests: the debug binary built by cargo, a temporary
// config and data dir, a free port (the hub binds 127.0.0.1:0 and logs its address).

import { spawn } from 'node:child_process';
import http from 'node:http';
import net from 'node:net';
import { mkdtempSync, writeFileSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createInterface } from 'node:readline';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
// Not PRESENCE_HUB_*: the hub reads every such variable as a config override.
export const binary = process.env.HUB_BINARY ?? join(root, 'target', 'debug', 'presence-hub');

export const API_KEY = 'test-api-key-0123456789';
const JWT_SECRET = 'test-jwt-secret-0123456789abcdef';

/** Starts a hub; `extra` is appended TOML (sections of its own). */
export async function startHub({ extra = '', grace = '300ms', dir, port = 0 } = {}) {
  if (!existsSync(binary)) {
    throw new Error(`${binary} is missing: run \`cargo build\` first (scripts/test.sh does)`);
  }
  dir ??= mkdtempSync(join(tmpdir(), 'presence-hub-js-'));
  const config = join(dir, 'hub.toml');
  writeFileSync(
    config,
    `[server]
listen = "127.0.0.1:${port}"
${extra.server ?? ''}
[auth]
jwt_secret = "${JWT_SECRET}"
api_key = "${API_KEY}"
[store]
data_dir = "${join(dir, 'data')}"
[presence]
disconnect_grace = "${grace}"
[log]
format = "json"
level = "info"
${extra.rest ?? ''}
`,
  );
  // RUST_LOG would override the config's level and could hide the line giving the address.
  // Nor may the caller's PRESENCE_HUB_* overrides change the test's config.
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => k !== 'RUST_LOG' && !k.startsWith('PRESENCE_HUB_')));
  const child = spawn(binary, ['--config', config], { stdio: ['ignore', 'pipe', 'pipe'], env });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  const addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`hub did not start within 20 s: ${stderr}`)), 20000);
    child.on('exit', (code) => reject(new Error(`hub exited with ${code}: ${stderr}`)));
    createInterface({ input: child.stdout }).on('line', (line) => {
      try {
        const ev = JSON.parse(line);
        if (ev.fields?.addr) {
          clearTimeout(timer);
          resolve(ev.fields.addr);
        }
      } catch {
        // not a log line of ours
      }
    });
  });
  const url = `http://${addr}`;
  const hub = {
    url,
    dir,
    port: Number(addr.split(':').pop()),
    child,
    /** Calls the back-end API with the key; answers `{status, body}`. */
    async api(method, path, body) {
      const res = await fetch(url + path, {
        method,
        headers: { Authorization: `Bearer ${API_KEY}`, 'Content-Type': 'application/json' },
        body: body === undefined ? undefined : JSON.stringify(body),
      });
      const text = await res.text();
      return { status: res.status, body: text ? JSON.parse(text) : null };
    },
    async token(operator) {
      const r = await hub.api('POST', '/api/v1/tokens', { operator, ttl: '1h' });
      if (r.status !== 200) throw new Error(`token: ${r.status} ${JSON.stringify(r.body)}`);
      return r.body.token;
    },
    /** SIGTERM and wait for the exit (the store is flushed). */
    async stop() {
      if (child.exitCode !== null) return;
      const done = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await done;
    },
    async destroy() {
      await hub.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
  return hub;
}

/** Polls `cond` every 20 ms until it is truthy; fails after `ms`. */
export async function until(cond, ms = 5000, what = 'condition') {
  const end = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * An HTTP proxy in front of the hub that refuses WebSocket upgrades (as some proxies do)
 * while `control.refuse` is set and passes them through otherwise. Plain requests go through
 * untouched (the hub sees the proxy's Host); `seen` lists them with their `If-None-Match`.
 */
export async function upgradeRefusingProxy(target) {
  const { hostname, port } = new URL(target);
  const seen = [];
  const control = { refuse: true };
  const sockets = new Set();
  const track = (s) => {
    sockets.add(s);
    s.on('error', () => {});
    s.on('close', () => sockets.delete(s));
  };
  const server = http.createServer((req, res) => {
    const up = http.request({ host: hostname, port: Number(port), method: req.method, path: req.url, headers: req.headers }, (answer) => {
      seen.push({ url: req.url, ifNoneMatch: req.headers['if-none-match'] ?? null, status: answer.statusCode });
      res.writeHead(answer.statusCode, answer.headers);
      answer.pipe(res);
    });
    up.on('error', () => res.destroy());
    req.pipe(up);
  });
  server.on('connection', track);
  server.on('upgrade', (req, socket, head) => {
    if (control.refuse) {
      socket.end('HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
      return;
    }
    const up = net.connect(Number(port), hostname, () => {
      const lines = [`${req.method} ${req.url} HTTP/1.1`];
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines.push(`${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}`);
      up.write(lines.join('\r\n') + '\r\n\r\n');
      up.write(head);
      socket.pipe(up).pipe(socket);
    });
    track(up);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    url: `http://127.0.0.1:${server.address().port}`,
    seen,
    control,
    close: () => {
      for (const s of sockets) s.destroy();
      return new Promise((r) => server.close(r));
    },
  };
}
