//! How the embedded store encodes a chat's record: a compact, versioned binary row, the
//! format since 2026-12-01 night. The chat is the record an assignment writes (one per
//! decision), and its JSON (every timestamp and token escaped, every field named) was a
//! quarter of the writer's time and most of the row's size; smaller rows also mean fewer
//! B-tree leaves copied per commit.
//!
//! A row starts with a format byte. [`CHAT_V1`] is this encoding; a row written by an older
//! version is the chat's JSON, which starts with `{` and is still read, so a data dir of an
//! older version opens unchanged (each chat is rewritten in the new form the next time it
//! changes). Any other first byte is a corrupt row.
//!
//! Layout of [`CHAT_V1`] (integers are LEB128 varints, `i64` zigzagged; a string is its
//! length as a varint, then its UTF-8 bytes):
//! `0x01`, flags (bit 0 owner, 1 assigned_at, 2 accepted_at, 3 avoid, 4 assign_reason),
//! id, department, status byte, priority, seq, version, created_at, visitor_token, then the
//! present optional fields in flag order (owner, assigned_at, accepted_at, avoid, the
//! reason's byte), and last the visitor's JSON, the rest of the row.

use crate::model::{AssignReason, Chat, ChatStatus};

/// First byte of a chat row in the binary form of this module.
pub(super) const CHAT_V1: u8 = 0x01;
/// First byte of a row of the older JSON form.
const JSON_ROW: u8 = b'{';

const OWNER: u8 = 1;
const ASSIGNED_AT: u8 = 1 << 1;
const ACCEPTED_AT: u8 = 1 << 2;
const AVOID: u8 = 1 << 3;
const REASON: u8 = 1 << 4;

/// Why a chat row could not be read.
#[derive(Debug, thiserror::Error)]
pub(super) enum RowError {
    #[error("truncated row")]
    Truncated,
    #[error("unknown row format {0:#04x}")]
    Format(u8),
    #[error("bad value: {0}")]
    Value(&'static str),
    #[error("bad JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Appends `chat`'s row to `out` (a buffer the writer reuses across a group).
pub(super) fn encode_chat(chat: &Chat, out: &mut Vec<u8>) {
    out.push(CHAT_V1);
    let flag = |present: bool, bit: u8| if present { bit } else { 0 };
    let flags = flag(chat.owner.is_some(), OWNER)
        | flag(chat.assigned_at.is_some(), ASSIGNED_AT)
        | flag(chat.accepted_at.is_some(), ACCEPTED_AT)
        | flag(chat.avoid.is_some(), AVOID)
        | flag(chat.assign_reason.is_some(), REASON);
    out.push(flags);
    varint(out, chat.id);
    varint(out, chat.department);
    out.push(status_byte(chat.status));
    varint(out, zigzag(chat.priority));
    varint(out, chat.seq);
    varint(out, chat.version);
    string(out, &chat.created_at);
    string(out, &chat.visitor_token);
    if let Some(o) = chat.owner {
        varint(out, o);
    }
    if let Some(t) = &chat.assigned_at {
        string(out, t);
    }
    if let Some(t) = &chat.accepted_at {
        string(out, t);
    }
    if let Some(a) = chat.avoid {
        varint(out, a);
    }
    if let Some(r) = chat.assign_reason {
        out.push(reason_byte(r));
    }
    // The visitor is free-form JSON from the back end: kept as JSON, the rest of the row.
    serde_json::to_writer(&mut *out, &chat.visitor).expect("a JSON value serializes");
}

/// A chat row of either form.
pub(super) fn decode_chat(row: &[u8]) -> Result<Chat, RowError> {
    match row.first() {
        Some(&CHAT_V1) => Reader(&row[1..]).chat(),
        Some(&JSON_ROW) => Ok(serde_json::from_slice(row)?),
        Some(&b) => Err(RowError::Format(b)),
        None => Err(RowError::Truncated),
    }
}

fn status_byte(s: ChatStatus) -> u8 {
    match s {
        ChatStatus::Bot => 0,
        ChatStatus::Pending => 1,
        ChatStatus::Active => 2,
        ChatStatus::Closed => 3,
    }
}

fn reason_byte(r: AssignReason) -> u8 {
    match r {
        AssignReason::Auto => 0,
        AssignReason::AcceptTimeout => 1,
        AssignReason::OperatorUnavailable => 2,
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn string(out: &mut Vec<u8>, s: &str) {
    varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// The rest of a row, read front to back.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, RowError> {
        let (&b, rest) = self.0.split_first().ok_or(RowError::Truncated)?;
        self.0 = rest;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, RowError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            let part = u64::from(b & 0x7F);
            // The tenth byte may carry only the top bit.
            if shift == 63 && part > 1 {
                return Err(RowError::Value("varint overflows u64"));
            }
            v |= part << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(RowError::Value("varint longer than 10 bytes"))
    }

    fn bytes(&mut self) -> Result<&[u8], RowError> {
        let len = usize::try_from(self.varint()?).map_err(|_| RowError::Truncated)?;
        if len > self.0.len() {
            return Err(RowError::Truncated);
        }
        let (b, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(b)
    }

    fn string(&mut self) -> Result<String, RowError> {
        std::str::from_utf8(self.bytes()?)
            .map(str::to_owned)
            .map_err(|_| RowError::Value("string is not UTF-8"))
    }

    fn chat(mut self) -> Result<Chat, RowError> {
        let flags = self.byte()?;
        if flags & !(OWNER | ASSIGNED_AT | ACCEPTED_AT | AVOID | REASON) != 0 {
            return Err(RowError::Value("unknown flags"));
        }
        let id = self.varint()?;
        let department = self.varint()?;
        let status = match self.byte()? {
            0 => ChatStatus::Bot,
            1 => ChatStatus::Pending,
            2 => ChatStatus::Active,
            3 => ChatStatus::Closed,
            _ => return Err(RowError::Value("unknown status")),
        };
        let priority = unzigzag(self.varint()?);
        let seq = self.varint()?;
        let version = self.varint()?;
        let created_at = self.string()?;
        let visitor_token = self.string()?;
        let has = |f: u8| flags & f != 0;
        let owner = has(OWNER).then(|| self.varint()).transpose()?;
        let assigned_at = has(ASSIGNED_AT).then(|| self.string()).transpose()?;
        let accepted_at = has(ACCEPTED_AT).then(|| self.string()).transpose()?;
        let avoid = has(AVOID).then(|| self.varint()).transpose()?;
        let assign_reason = match has(REASON).then(|| self.byte()).transpose()? {
            None => None,
            Some(0) => Some(AssignReason::Auto),
            Some(1) => Some(AssignReason::AcceptTimeout),
            Some(2) => Some(AssignReason::OperatorUnavailable),
            Some(_) => return Err(RowError::Value("unknown assign reason")),
        };
        // JSON refuses a cut value and bytes after it.
        let visitor = serde_json::from_slice(self.0)?;
        Ok(Chat {
            id,
            department,
            status,
            owner,
            priority,
            visitor,
            created_at,
            assigned_at,
            accepted_at,
            seq,
            visitor_token,
            avoid,
            assign_reason,
            version,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat() -> Chat {
        Chat {
            id: 300,
            department: 7,
            status: ChatStatus::Active,
            owner: Some(42),
            priority: -3,
            visitor: serde_json::json!({"name": "Ann \"A\"", "tags": [1, 2], "é": null}),
            created_at: "2026-12-01T21:00:00.123Z".into(),
            assigned_at: Some("2026-12-01T21:00:01.000Z".into()),
            accepted_at: None,
            seq: 1 << 40,
            visitor_token: "tok-\u{1F600}".into(),
            avoid: Some(u64::MAX),
            assign_reason: Some(AssignReason::OperatorUnavailable),
            version: 9,
        }
    }

    fn encoded(c: &Chat) -> Vec<u8> {
        let mut out = Vec::new();
        encode_chat(c, &mut out);
        out
    }

    #[test]
    fn chat_rows_round_trip_in_the_binary_form() {
        let full = chat();
        let bare = Chat {
            owner: None,
            assigned_at: None,
            avoid: None,
            assign_reason: None,
            status: ChatStatus::Closed,
            priority: i64::MIN,
            accepted_at: Some("x".into()),
            visitor: serde_json::Value::Null,
            ..chat()
        };
        for c in [full, bare] {
            let row = encoded(&c);
            assert_eq!(row[0], CHAT_V1);
            assert_eq!(decode_chat(&row).unwrap(), c);
        }
    }

    #[test]
    fn chat_rows_are_smaller_than_their_json() {
        let c = chat();
        let json = serde_json::to_vec(&c).unwrap();
        let row = encoded(&c);
        assert!(
            row.len() * 2 < json.len(),
            "{} vs {}",
            row.len(),
            json.len()
        );
    }

    #[test]
    fn chat_rows_of_the_older_json_form_are_read() {
        let c = chat();
        let json = serde_json::to_vec(&c).unwrap();
        assert_eq!(decode_chat(&json).unwrap(), c);
    }

    #[test]
    fn chat_rows_that_are_corrupt_are_refused() {
        let row = encoded(&chat());
        // Every cut of the row is refused, never read as some other chat or a panic.
        for cut in 0..row.len() {
            assert!(decode_chat(&row[..cut]).is_err(), "cut at {cut}");
        }
        let mut extra = row.clone();
        extra.push(0);
        assert!(decode_chat(&extra).is_err());
        let mut status = row.clone();
        // flags, id (2 bytes: 300), department (1 byte): the status byte.
        status[5] = 9;
        assert!(matches!(decode_chat(&status), Err(RowError::Value(_))));
        assert!(matches!(decode_chat(&[0x02, 0]), Err(RowError::Format(2))));
        assert!(
            decode_chat(&[
                CHAT_V1, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F
            ])
            .is_err()
        );
    }
}
