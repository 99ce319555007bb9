// presence-hub browser and Node client: operator, widget and visitor connections.
//
// One dependency-free ES module. Browsers use their own WebSocket and fetch; Node 20 passes
// an implementation in ({ WebSocket }) or runs with --experimental-websocket (Node 22 has it
// built in). The hub's wire protocol is in docs/protocol.md of the presence-hub repository.

/** Default timings, in milliseconds. */
export const defaults = Object.freeze({
  /** How long a request waits for its ack or error. */
  requestTimeout: 10000,
  /** First reconnect delay; doubled after each failed attempt, up to `maxDelay`. */
  minDelay: 500,
  maxDelay: 30000,
  /** Widget polling interval when WebSockets are unavailable. */
  pollInterval: 5000,
  /** While polling, how often the widget tries its socket again. */
  socketRetry: 60000,
});

/** An `error` answer of the hub, or a request that got no answer (`code` = `timeout`,
 * `disconnected`, `closed`). */
export class HubError extends Error {
  constructor(code, message, frame) {
    super(message);
    this.name = 'HubError';
    this.code = code;
    this.frame = frame;
  }
}

/**
 * The delay before reconnect attempt `attempt` (0-based): exponential with "equal jitter",
 * between half and all of min(maxDelay, minDelay * 2^attempt). Jitter spreads the reconnects
 * of many clients after a hub restart; the lower half-bound keeps the backoff meaningful.
 */
export function backoffDelay(attempt, { minDelay = defaults.minDelay, maxDelay = defaults.maxDelay, random = Math.random } = {}) {
  const cap = Math.min(maxDelay, minDelay * 2 ** Math.min(attempt, 30));
  return Math.round(cap / 2 + (random() * cap) / 2);
}

/** `http://h:p`, `ws://h:p`, with or without a path: the hub's base as http(s) and ws(s). */
export function hubUrls(url) {
  const base = new URL(url, globalThis.location ? globalThis.location.href : undefined);
  const secure = base.protocol === 'https:' || base.protocol === 'wss:';
  const host = base.host;
  return {
    http: `${secure ? 'https' : 'http'}://${host}`,
    ws: `${secure ? 'wss' : 'ws'}://${host}`,
  };
}

/** A minimal typed event emitter: `on(type, fn)` returns a function that unsubscribes. */
class Emitter {
  constructor() {
    this._listeners = new Map();
  }
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return () => this.off(type, fn);
  }
  off(type, fn) {
    this._listeners.get(type)?.delete(fn);
  }
  /** Resolves with the first event of `type` for which `pred` holds. */
  once(type, pred = () => true, timeout = 0) {
    return new Promise((resolve, reject) => {
      let timer;
      const off = this.on(type, (ev) => {
        if (!pred(ev)) return;
        off();
        clearTimeout(timer);
        resolve(ev);
      });
      if (timeout > 0) {
        timer = setTimeout(() => {
          off();
          reject(new HubError('timeout', `no ${type} event within ${timeout} ms`));
        }, timeout);
      }
    });
  }
  emit(type, ev) {
    for (const fn of [...(this._listeners.get(type) ?? [])]) {
      try {
        fn(ev);
      } catch (e) {
        // One listener's bug must not stop the others or the connection.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }
}

function pickWebSocket(opts) {
  const WS = opts.WebSocket ?? globalThis.WebSocket;
  if (!WS) {
    throw new Error('no WebSocket implementation: pass { WebSocket } (Node 20: the "ws" package or --experimental-websocket)');
  }
  return WS;
}

/**
 * A socket that reconnects by itself with backoff, answers requests with promises and
 * dispatches frames to listeners by `type`. The base of the operator and visitor clients.
 */
class Connection extends Emitter {
  constructor(url, opts) {
    super();
    this._url = url;
    this._opts = { ...defaults, ...opts };
    this._WS = pickWebSocket(this._opts);
    this._random = this._opts.random ?? Math.random;
    this._pending = new Map();
    this._nextRef = 1;
    this._attempt = 0;
    this._stopped = false;
    this._ws = null;
    this._timer = null;
    /** True while the socket is open. */
    this.connected = false;
    this._connect();
  }

  _connect() {
    this._timer = null;
    if (this._stopped) return;
    let ws;
    try {
      ws = new this._WS(this._url);
    } catch (e) {
      this._scheduleReconnect({ code: 0, reason: String(e?.message ?? e) });
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      this.connected = true;
      this.emit('open', {});
    };
    ws.onmessage = (ev) => this._onData(ev.data);
    // Browsers follow every error with a close event; Node 20's WebSocket does not after a
    // refused handshake, so an error before the open counts as the close.
    ws.onerror = () => {
      if (!this.connected) ws.onclose({ code: 1006, reason: 'connection failed' });
    };
    ws.onclose = (ev) => {
      if (this._ws !== ws) return;
      this._ws = null;
      const was = this.connected;
      this.connected = false;
      this._failPending('disconnected', `connection closed (${ev.code})`);
      const info = { code: ev.code, reason: ev.reason, wasOpen: was };
      this._onClose(info);
    };
  }

  _onClose(info) {
    // 1000 is the hub's answer to logout: the user meant it, do not come back.
    if (this._stopped || info.code === 1000) {
      this._stopped = true;
      this.emit('close', { ...info, reconnect: false });
      return;
    }
    this._scheduleReconnect(info);
  }

  _scheduleReconnect(info) {
    const delay = backoffDelay(this._attempt++, {
      minDelay: this._opts.minDelay,
      maxDelay: this._opts.maxDelay,
      random: this._random,
    });
    this.emit('close', { ...info, reconnect: true, delay });
    this._timer = setTimeout(() => this._connect(), delay);
  }

  /** The handshake frame arrived: the connection is good, the backoff starts over. */
  _established() {
    this._attempt = 0;
  }

  _onData(data) {
    let frame;
    try {
      frame = JSON.parse(typeof data === 'string' ? data : new TextDecoder().decode(data));
    } catch {
      return;
    }
    if (!frame || typeof frame !== 'object') return;
    if ((frame.type === 'ack' || frame.type === 'error') && this._pending.has(frame.ref)) {
      const p = this._pending.get(frame.ref);
      this._pending.delete(frame.ref);
      clearTimeout(p.timer);
      if (frame.type === 'ack') p.resolve(frame);
      else p.reject(new HubError(frame.code, frame.message, frame));
    }
    this._apply(frame);
    this.emit(frame.type, frame);
    this.emit('frame', frame);
  }

  /** Keeps the client's state from a frame; overridden by each kind. */
  _apply(_frame) {}

  _failPending(code, message) {
    for (const [, p] of this._pending) {
      clearTimeout(p.timer);
      p.reject(new HubError(code, message));
    }
    this._pending.clear();
  }

  /**
   * Sends `msg` with a fresh `ref`; resolves with the `ack` frame, rejects with a
   * `HubError` carrying the hub's `code`, or `timeout` / `disconnected`.
   */
  request(msg, { timeout = this._opts.requestTimeout } = {}) {
    return new Promise((resolve, reject) => {
      if (!this.connected || !this._ws) {
        reject(new HubError('disconnected', 'not connected'));
        return;
      }
      const ref = this._nextRef++;
      const timer = setTimeout(() => {
        this._pending.delete(ref);
        reject(new HubError('timeout', `no answer to ${msg.type} within ${timeout} ms`));
      }, timeout);
      this._pending.set(ref, { resolve, reject, timer });
      this._ws.send(JSON.stringify({ ...msg, ref }));
    });
  }

  /** Closes for good: no reconnect. */
  close() {
    this._stopped = true;
    clearTimeout(this._timer);
    this._failPending('closed', 'client closed');
    const ws = this._ws;
    if (ws) ws.close(1000);
    else this.emit('close', { code: 1000, reason: 'client closed', reconnect: false });
  }
}

/** An operator's dashboard connection (`/ws/operator`), with the live state it implies. */
export class Operator extends Connection {
  constructor(url, opts = {}) {
    if (!opts.token) throw new Error('operator(url, { token }) needs a token');
    const { ws } = hubUrls(url);
    super(`${ws}/ws/operator?token=${encodeURIComponent(opts.token)}`, opts);
    this.state = emptyOperatorState();
  }

  _apply(f) {
    const s = this.state;
    switch (f.type) {
      case 'hello':
        // A fresh hello is the whole truth: whatever happened while disconnected is in it.
        this.state = emptyOperatorState();
        this.state.operator = f.operator;
        for (const o of f.operators ?? []) this.state.operators.set(o.id, o);
        for (const d of f.departments ?? []) this.state.departments.set(d.department, d);
        for (const c of f.chats ?? []) this.state.chats.set(c.id, c);
        this._established();
        break;
      case 'operator_status':
      case 'ack':
        if (f.operator) this._view(f.operator);
        if (f.chat) this._chat(f.chat);
        break;
      case 'department_status':
        s.departments.set(f.department, { department: f.department, online: f.online, reason: f.reason, ...(f.opens_at !== undefined ? { opens_at: f.opens_at } : {}) });
        break;
      case 'chat':
      case 'chat_assigned':
        this._chat(f.chat);
        break;
      default:
        return;
    }
    this.emit('state', this.state);
  }

  _view(v) {
    if (this.state.operator && v.id === this.state.operator.id) this.state.operator = v;
    else this.state.operators.set(v.id, v);
  }

  _chat(c) {
    // A closed chat leaves the hub's live state; the client follows.
    if (c.status === 'closed') this.state.chats.delete(c.id);
    else this.state.chats.set(c.id, c);
  }

  setStatus(fields) {
    return this.request({ type: 'set_status', ...fields });
  }
  activity(active) {
    return this.request({ type: 'activity', active });
  }
  openChat(chat) {
    return this.request({ type: 'open_chat', chat });
  }
  leaveChat(chat) {
    return this.request({ type: 'leave_chat', chat });
  }
  sendMessage(chat, text, { whisper = false } = {}) {
    return this.request({ type: 'send_message', chat, text, whisper });
  }
  closeChat(chat) {
    return this.request({ type: 'close_chat', chat });
  }
  /** Goes offline at once (no grace); the hub closes with 1000 and the client stays closed. */
  logout() {
    return this.request({ type: 'logout' });
  }
}

function emptyOperatorState() {
  return { operator: null, operators: new Map(), departments: new Map(), chats: new Map() };
}

/** A visitor's connection to their chat (`/ws/visitor`). */
export class Visitor extends Connection {
  constructor(url, opts = {}) {
    if (opts.chat === undefined || !opts.token) throw new Error('visitor(url, { chat, token }) needs both');
    const { ws } = hubUrls(url);
    super(`${ws}/ws/visitor?chat=${encodeURIComponent(opts.chat)}&token=${encodeURIComponent(opts.token)}`, opts);
    this.state = { chat: null, messages: [] };
  }

  _apply(f) {
    switch (f.type) {
      case 'chat':
        this.state.chat = f.chat;
        this._established();
        break;
      case 'history':
        // Sent on every (re)connect: it replaces what the page had.
        this.state.messages = [...(f.messages ?? [])];
        break;
      case 'message':
        this._push(f.message);
        break;
      case 'ack':
        if (f.message) this._push(f.message);
        break;
      default:
        return;
    }
    this.emit('state', this.state);
  }

  _push(m) {
    if (!this.state.messages.some((x) => x.id === m.id)) this.state.messages.push(m);
  }

  send(text) {
    return this.request({ type: 'send_message', text });
  }
}

/**
 * A chat widget's view of departments: the widget socket, or, when WebSockets are
 * unavailable (no implementation, a proxy that refuses the upgrade), polling of
 * `GET /api/v1/widget/status` with `If-None-Match`, trying the socket again now and then.
 */
export class Widget extends Emitter {
  constructor(url, departments, opts = {}) {
    super();
    const list = (Array.isArray(departments) ? departments : [departments]).map(Number);
    if (list.length === 0 || list.some((d) => !Number.isInteger(d) || d < 0)) {
      throw new Error('widget(url, departments) needs department ids');
    }
    this._urls = hubUrls(url);
    this._departments = list;
    this._opts = { ...defaults, ...opts };
    this._WS = this._opts.WebSocket ?? globalThis.WebSocket;
    this._fetch = this._opts.fetch ?? globalThis.fetch?.bind(globalThis);
    this._random = this._opts.random ?? Math.random;
    this._etags = new Map();
    this._attempt = 0;
    this._stopped = false;
    this._timer = null;
    this._ws = null;
    /** Department id → `{department, online, reason, opens_at?}`. */
    this.state = new Map();
    /** `connecting`, `socket` or `polling`. */
    this.mode = 'connecting';
    if (this._WS) this._connect();
    else this._poll();
  }

  _setMode(mode) {
    if (this.mode === mode) return;
    this.mode = mode;
    this.emit('mode', mode);
  }

  _update(s) {
    const before = this.state.get(s.department);
    const next = { department: s.department, online: s.online, reason: s.reason, ...(s.opens_at !== undefined ? { opens_at: s.opens_at } : {}) };
    this.state.set(s.department, next);
    if (!before || before.online !== next.online || before.reason !== next.reason || before.opens_at !== next.opens_at) {
      this.emit('status', next);
    }
  }

  _connect() {
    this._timer = null;
    if (this._stopped) return;
    const q = this._departments.map((d) => `department=${d}`).join('&');
    let ws;
    try {
      ws = new this._WS(`${this._urls.ws}/ws/widget?${q}`);
    } catch {
      this._poll();
      return;
    }
    this._ws = ws;
    let opened = false;
    ws.onopen = () => {
      opened = true;
      this._attempt = 0;
      this._setMode('socket');
    };
    ws.onmessage = (ev) => {
      let f;
      try {
        f = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (f?.type === 'widget_status') this._update(f);
    };
    ws.onerror = () => {
      if (!opened) ws.onclose(); // Node 20 sends no close after a refused handshake
    };
    ws.onclose = () => {
      if (this._ws !== ws) return;
      this._ws = null;
      if (this._stopped) return;
      if (!opened) {
        // The upgrade failed: WebSockets do not get through. Poll, and try again later.
        this._poll();
        return;
      }
      const delay = backoffDelay(this._attempt++, { minDelay: this._opts.minDelay, maxDelay: this._opts.maxDelay, random: this._random });
      this._setMode('connecting');
      this._timer = setTimeout(() => this._connect(), delay);
    };
  }

  async _poll() {
    this._timer = null;
    if (this._stopped) return;
    this._setMode('polling');
    this._pollingSince ??= Date.now();
    await Promise.all(this._departments.map((d) => this._pollOne(d)));
    if (this._stopped) return;
    if (this._WS && Date.now() - this._pollingSince >= this._opts.socketRetry) {
      this._pollingSince = null;
      this._connect();
      return;
    }
    this._timer = setTimeout(() => this._poll(), this._opts.pollInterval);
  }

  async _pollOne(d) {
    if (!this._fetch) return;
    const headers = {};
    const tag = this._etags.get(d);
    if (tag) headers['If-None-Match'] = tag;
    try {
      const res = await this._fetch(`${this._urls.http}/api/v1/widget/status?department=${d}`, { headers, cache: 'no-store' });
      if (res.status === 304) return;
      if (!res.ok) {
        this.emit('error', new HubError('http_' + res.status, `widget status answered ${res.status}`));
        return;
      }
      const etag = res.headers.get('ETag');
      if (etag) this._etags.set(d, etag);
      this._update(await res.json());
    } catch (e) {
      this.emit('error', e);
    }
  }

  /** Stops the socket and the polling. */
  close() {
    this._stopped = true;
    clearTimeout(this._timer);
    if (this._ws) this._ws.close(1000);
    this._ws = null;
  }
}

/** `operator(url, { token, WebSocket? })`: an operator's live connection. */
export function operator(url, opts) {
  return new Operator(url, opts);
}

/** `widget(url, departments, { WebSocket?, fetch?, pollInterval? })`: online badges. */
export function widget(url, departments, opts) {
  return new Widget(url, departments, opts);
}

/** `visitor(url, { chat, token, WebSocket? })`: a visitor in their chat. */
export function visitor(url, opts) {
  return new Visitor(url, opts);
}
