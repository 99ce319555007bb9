// Compiled (never run) by `npm test` with tsc --strict: the declarations describe the module
// as the README uses it.
import { operator, widget, visitor, HubError, backoffDelay, type OperatorView, type DepartmentState } from '../presence-hub.js';

const op = operator('http://localhost:8080', { token: 't', requestTimeout: 500 });
op.on('state', (s) => {
  const me: OperatorView | null = s.operator;
  const online: boolean = me?.status === 'online';
  const d: DepartmentState | undefined = s.departments.get(1);
  void [online, d?.reason, s.chats.get(3)?.owner];
});
op.on('close', (c) => void (c.reconnect ? c.delay : c.code));
async function flow(): Promise<void> {
  const ack = await op.setStatus({ online: false });
  const reason: string | null | undefined = ack.operator?.status_reason;
  void reason;
  try {
    await op.openChat(1);
  } catch (e) {
    if (e instanceof HubError) void e.code.toUpperCase();
  }
  await op.sendMessage(1, 'hi', { whisper: true });
}
void flow;

const w = widget('http://localhost:8080', [1, 2], { pollInterval: 1000 });
w.on('status', (s) => void s.online);
w.on('mode', (m) => void (m === 'polling'));
const v = visitor('http://localhost:8080', { chat: 1, token: 'x' });
v.on('state', (s) => void s.messages.map((m) => m.text));
const ms: number = backoffDelay(3);
void ms;
