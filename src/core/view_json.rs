//! The JSON of an operator view, written by hand: a view is serialized on every connect,
//! disconnect and end of grace (its `operator_status` event, kept for `hello`), and serde's
//! field-by-field writer (escaping every constant key, a write call per token) was about a
//! third of that path. The bytes are the ones `serde_json` writes for `OperatorView` (the test
//! below compares them over many views).

use serde_json::value::RawValue;

use crate::model::{OperatorRecord, OperatorView, Permission};
use crate::presence::{Reason, Settings, Status};

/// The view as a JSON value to share (the same bytes as `serde_json::to_raw_value`).
pub(super) fn raw(view: &OperatorView) -> Box<RawValue> {
    let mut out = Vec::with_capacity(384 + view.record.name.len());
    write(view, &mut out);
    let json = String::from_utf8(out).expect("JSON written from strings is UTF-8");
    RawValue::from_string(json).expect("the view is JSON")
}

fn write(v: &OperatorView, out: &mut Vec<u8>) {
    // Destructured: a field added to a part fails to compile here until it is written.
    let OperatorRecord {
        id,
        name,
        departments,
        watch_departments,
        permissions,
        max_chats,
        exclude_autoassign,
        auto_accept,
    } = &v.record;
    let Settings {
        online,
        invisible,
        always_online,
    } = &v.settings;
    let OperatorView {
        record: _,
        settings: _,
        connections,
        inactive,
        active_chats,
        pending_chats,
        status,
        status_reason,
        misconfigured,
    } = v;
    out.extend_from_slice(b"{\"id\":");
    number(out, *id);
    out.extend_from_slice(b",\"name\":");
    serde_json::to_writer(&mut *out, name).expect("writing to a Vec cannot fail");
    out.extend_from_slice(b",\"departments\":");
    numbers(out, departments);
    out.extend_from_slice(b",\"watch_departments\":");
    numbers(out, watch_departments);
    out.extend_from_slice(b",\"permissions\":[");
    for (i, p) in permissions.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'"');
        out.extend_from_slice(permission(*p).as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b"],\"max_chats\":");
    number(out, u64::from(*max_chats));
    out.extend_from_slice(b",\"exclude_autoassign\":");
    boolean(out, *exclude_autoassign);
    out.extend_from_slice(b",\"auto_accept\":");
    boolean(out, *auto_accept);
    out.extend_from_slice(b",\"online\":");
    boolean(out, *online);
    out.extend_from_slice(b",\"invisible\":");
    boolean(out, *invisible);
    out.extend_from_slice(b",\"always_online\":");
    boolean(out, *always_online);
    out.extend_from_slice(b",\"connections\":");
    number(out, u64::from(*connections));
    out.extend_from_slice(b",\"inactive\":");
    boolean(out, *inactive);
    out.extend_from_slice(b",\"active_chats\":");
    number(out, u64::from(*active_chats));
    out.extend_from_slice(b",\"pending_chats\":");
    number(out, u64::from(*pending_chats));
    out.extend_from_slice(b",\"status\":");
    out.extend_from_slice(match status {
        Status::Online => b"\"online\"",
        Status::Offline => b"\"offline\"",
    });
    out.extend_from_slice(b",\"status_reason\":");
    out.extend_from_slice(match status_reason {
        None => b"null".as_slice(),
        Some(Reason::SetOffline) => b"\"set_offline\"",
        Some(Reason::Inactive) => b"\"inactive\"",
        Some(Reason::Disconnected) => b"\"disconnected\"",
        Some(Reason::LoggedOut) => b"\"logged_out\"",
    });
    out.extend_from_slice(b",\"misconfigured\":");
    boolean(out, *misconfigured);
    out.push(b'}');
}

/// The wire name of a permission (serde's `snake_case` of the variant).
fn permission(p: Permission) -> &'static str {
    match p {
        Permission::ChangeOnlineStatus => "change_online_status",
        Permission::ChangeVisibility => "change_visibility",
        Permission::ChangeAlwaysOnline => "change_always_online",
        Permission::SetOperatorStatus => "set_operator_status",
        Permission::OpenAll => "open_all",
    }
}

fn number(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn numbers(out: &mut Vec<u8>, ns: &[u64]) {
    out.push(b'[');
    for (i, n) in ns.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        number(out, *n);
    }
    out.push(b']');
}

fn boolean(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Views over every variant and edge: names that need escaping, empty and long lists,
    /// the extremes of each number.
    fn views() -> Vec<OperatorView> {
        let perms = [
            Permission::ChangeOnlineStatus,
            Permission::ChangeVisibility,
            Permission::ChangeAlwaysOnline,
            Permission::SetOperatorStatus,
            Permission::OpenAll,
        ];
        let reasons = [
            None,
            Some(Reason::SetOffline),
            Some(Reason::Inactive),
            Some(Reason::Disconnected),
            Some(Reason::LoggedOut),
        ];
        let names = ["", "Ann", "a \"quoted\" \\ name", "tab\there\nnl \u{1} é 日本 🙂", "</script>"];
        let mut out = Vec::new();
        for i in 0..50usize {
            let b = |k: usize| (i >> k) & 1 == 1;
            out.push(OperatorView {
                record: OperatorRecord {
                    id: [0, 7, u64::MAX, 10, 1_000_000_007][i % 5],
                    name: names[i % names.len()].to_string(),
                    departments: (0..(i % 4) as u64).map(|d| d * 10 + 1).collect(),
                    watch_departments: if b(1) { vec![u64::MAX, 0] } else { vec![] },
                    permissions: perms[..i % (perms.len() + 1)].to_vec(),
                    max_chats: [0, 1, u32::MAX][i % 3],
                    exclude_autoassign: b(0),
                    auto_accept: b(2),
                },
                settings: Settings {
                    online: b(1),
                    invisible: b(3),
                    always_online: b(4),
                },
                connections: [0, 1, 42, u32::MAX][i % 4],
                inactive: b(2),
                active_chats: (i * 3) as u32,
                pending_chats: [u32::MAX, 0, 9][i % 3],
                status: if b(0) { Status::Online } else { Status::Offline },
                status_reason: reasons[i % reasons.len()],
                misconfigured: b(3),
            });
        }
        out
    }

    #[test]
    fn operator_view_json_written_by_hand_is_serdes() {
        for v in views() {
            let ours = raw(&v);
            let serde = serde_json::value::to_raw_value(&v).unwrap();
            assert_eq!(ours.get(), serde.get());
            let back: OperatorView = serde_json::from_str(ours.get()).unwrap();
            assert_eq!(back, v);
        }
    }
}
