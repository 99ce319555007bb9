// Type declarations of presence-hub.js (the hub's wire shapes: docs/protocol.md).

export type Status = 'online' | 'offline';
export type StatusReason = 'set_offline' | 'inactive' | 'disconnected' | 'logged_out';
export type Permission =
  | 'change_online_status'
  | 'change_visibility'
  | 'change_always_online'
  | 'set_operator_status'
  | 'open_all';

/** The flat operator view of `hello`, `operator_status` and the HTTP API. */
export interface OperatorView {
  id: number;
  name: string;
  departments: number[];
  watch_departments: number[];
  permissions: Permission[];
  max_chats: number;
  exclude_autoassign: boolean;
  auto_accept: boolean;
  online: boolean;
  invisible: boolean;
  always_online: boolean;
  connections: number;
  inactive: boolean;
  active_chats: number;
  pending_chats: number;
  status: Status;
  status_reason: StatusReason | null;
  misconfigured: boolean;
}

export type DepartmentReason = 'disabled' | 'closed' | 'queue_full' | 'operators' | 'bot' | 'none';

export interface DepartmentState {
  department: number;
  online: boolean;
  reason: DepartmentReason;
  /** RFC 3339, present when `reason` is `closed` (null: never opens again). */
  opens_at?: string | null;
}

export type ChatStatus = 'bot' | 'pending' | 'active' | 'closed';

export interface Chat {
  id: number;
  department: number;
  status: ChatStatus;
  owner: number | null;
  priority: number;
  visitor: Record<string, unknown>;
  created_at: string;
  assigned_at: string | null;
  accepted_at: string | null;
}

export interface Message {
  id: number;
  from: { kind: 'operator' | 'visitor' | 'system'; id?: number; name?: string };
  text: string;
  whisper: boolean;
  at: string;
}

/** Any frame from the hub; `type` names it. */
export interface Frame {
  type: string;
  ref?: unknown;
  [field: string]: unknown;
}

export interface AckFrame extends Frame {
  type: 'ack';
  operator?: OperatorView;
  chat?: Chat;
  messages?: Message[];
  message?: Message;
}

/** The hub's `error` (`code`: bad_request, forbidden, not_found, conflict, rate_limited,
 * internal) or a request that got no answer (`timeout`, `disconnected`, `closed`). */
export class HubError extends Error {
  code: string;
  frame?: Frame;
}

export interface CloseInfo {
  code: number;
  reason: string;
  wasOpen?: boolean;
  /** False after `close()` or a logout (1000): the client stays closed. */
  reconnect: boolean;
  /** Milliseconds until the next attempt, when `reconnect`. */
  delay?: number;
}

export interface ConnectionOptions {
  /** A WebSocket constructor (browsers and Node 22+: the global one). */
  WebSocket?: unknown;
  requestTimeout?: number;
  minDelay?: number;
  maxDelay?: number;
  /** For tests: the jitter source, values in [0, 1). */
  random?: () => number;
}

export const defaults: Readonly<{
  requestTimeout: number;
  minDelay: number;
  maxDelay: number;
  pollInterval: number;
  socketRetry: number;
}>;

export function backoffDelay(
  attempt: number,
  opts?: { minDelay?: number; maxDelay?: number; random?: () => number },
): number;

export function hubUrls(url: string): { http: string; ws: string };

type Unsubscribe = () => void;

declare class Connection {
  readonly connected: boolean;
  on(type: 'open', fn: (ev: {}) => void): Unsubscribe;
  on(type: 'close', fn: (ev: CloseInfo) => void): Unsubscribe;
  on(type: string, fn: (frame: Frame) => void): Unsubscribe;
  off(type: string, fn: (ev: any) => void): void;
  /** The first event of `type` matching `pred`; rejects with `timeout` after `timeout` ms (0: never). */
  once(type: string, pred?: (ev: any) => boolean, timeout?: number): Promise<any>;
  request(msg: { type: string; [field: string]: unknown }, opts?: { timeout?: number }): Promise<AckFrame>;
  close(): void;
}

export interface OperatorState {
  operator: OperatorView | null;
  operators: Map<number, OperatorView>;
  departments: Map<number, DepartmentState>;
  /** Pending and active chats (closed ones are dropped). */
  chats: Map<number, Chat>;
}

export class Operator extends Connection {
  state: OperatorState;
  on(type: 'state', fn: (state: OperatorState) => void): Unsubscribe;
  on(type: 'open', fn: (ev: {}) => void): Unsubscribe;
  on(type: 'close', fn: (ev: CloseInfo) => void): Unsubscribe;
  on(type: string, fn: (frame: Frame) => void): Unsubscribe;
  setStatus(fields: { online?: boolean; invisible?: boolean; always_online?: boolean; operator?: number }): Promise<AckFrame>;
  activity(active: boolean): Promise<AckFrame>;
  openChat(chat: number): Promise<AckFrame>;
  leaveChat(chat: number): Promise<AckFrame>;
  sendMessage(chat: number, text: string, opts?: { whisper?: boolean }): Promise<AckFrame>;
  closeChat(chat: number): Promise<AckFrame>;
  logout(): Promise<AckFrame>;
}

export interface VisitorState {
  chat: { id: number; status: ChatStatus; owner_name: string | null } | null;
  messages: Message[];
}

export class Visitor extends Connection {
  state: VisitorState;
  on(type: 'state', fn: (state: VisitorState) => void): Unsubscribe;
  on(type: 'open', fn: (ev: {}) => void): Unsubscribe;
  on(type: 'close', fn: (ev: CloseInfo) => void): Unsubscribe;
  on(type: string, fn: (frame: Frame) => void): Unsubscribe;
  send(text: string): Promise<AckFrame>;
}

export interface WidgetOptions {
  WebSocket?: unknown;
  fetch?: typeof fetch;
  pollInterval?: number;
  socketRetry?: number;
  minDelay?: number;
  maxDelay?: number;
  random?: () => number;
}

export class Widget {
  state: Map<number, DepartmentState>;
  mode: 'connecting' | 'socket' | 'polling';
  on(type: 'status', fn: (s: DepartmentState) => void): Unsubscribe;
  on(type: 'mode', fn: (mode: 'connecting' | 'socket' | 'polling') => void): Unsubscribe;
  on(type: 'error', fn: (e: Error) => void): Unsubscribe;
  off(type: string, fn: (ev: any) => void): void;
  once(type: string, pred?: (ev: any) => boolean, timeout?: number): Promise<any>;
  close(): void;
}

export function operator(url: string, opts: ConnectionOptions & { token: string }): Operator;
export function widget(url: string, departments: number | number[], opts?: WidgetOptions): Widget;
export function visitor(url: string, opts: ConnectionOptions & { chat: number; token: string }): Visitor;
