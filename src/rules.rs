//! The seed's rules for opening and writing in a chat (SPEC.md section 4), as plain data.

use crate::error::{Error, Result};
use crate::model::{Chat, ChatStatus, OperatorRecord, Permission};
use crate::presence::Settings;

/// How an operator relates to a chat's department.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Works in the department: may take its chats.
    Member,
    /// Only watches the department (supervisor): sees, never takes.
    Watcher,
}

/// May `op` open (and so watch, and write in) `chat`?
pub fn access(op: &OperatorRecord, chat: &Chat) -> Result<Access> {
    let access = if op.works_in(chat.department) {
        Access::Member
    } else if op.watches(chat.department) {
        Access::Watcher
    } else {
        return Err(Error::Forbidden(format!(
            "chat {} belongs to department {}, which you neither work in nor watch",
            chat.id, chat.department
        )));
    };
    let others = chat.owner.is_some_and(|o| o != op.id) && chat.status != ChatStatus::Closed;
    if others && access == Access::Member && !op.can(Permission::OpenAll) {
        return Err(Error::Forbidden(format!(
            "chat {} is assigned to operator {}; opening it needs open_all",
            chat.id,
            chat.owner.unwrap_or_default()
        )));
    }
    Ok(access)
}

/// Opening a pending chat takes it only for a visible member; a bot chat is never taken by
/// opening; invisible operators (Online or Offline) only watch.
pub fn open_takes(settings: &Settings, access: Access, chat: &Chat) -> bool {
    chat.status == ChatStatus::Pending && access == Access::Member && !settings.invisible
}

/// A non-whisper message of a visible member takes a pending or bot chat.
pub fn message_takes(settings: &Settings, access: Access, chat: &Chat, whisper: bool) -> bool {
    !whisper
        && access == Access::Member
        && !settings.invisible
        && matches!(chat.status, ChatStatus::Pending | ChatStatus::Bot)
}

/// `auto_accept` accepts an assigned chat at once where opening would take it.
pub fn auto_accepts(op: &OperatorRecord, settings: &Settings) -> bool {
    op.auto_accept && !settings.invisible
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(perms: Vec<Permission>) -> OperatorRecord {
        OperatorRecord {
            id: 1,
            name: "a".into(),
            departments: vec![1],
            watch_departments: vec![2],
            permissions: perms,
            max_chats: 0,
            exclude_autoassign: false,
            auto_accept: false,
        }
    }

    fn chat(dept: u64, status: ChatStatus, owner: Option<u64>) -> Chat {
        Chat {
            id: 9,
            department: dept,
            status,
            owner,
            priority: 0,
            visitor: serde_json::json!({}),
            created_at: String::new(),
            assigned_at: None,
            accepted_at: None,
            seq: 0,
            visitor_token: String::new(),
            avoid: None,
            assign_reason: None,
            version: 0,
        }
    }

    fn mode(online: bool, invisible: bool) -> Settings {
        Settings {
            online,
            invisible,
            always_online: false,
        }
    }

    #[test]
    fn open_pending_table_of_section_4() {
        let c = chat(1, ChatStatus::Pending, None);
        assert!(
            open_takes(&mode(true, false), Access::Member, &c),
            "online & visible takes"
        );
        assert!(
            open_takes(&mode(false, false), Access::Member, &c),
            "offline & visible takes"
        );
        assert!(
            !open_takes(&mode(false, true), Access::Member, &c),
            "offline & invisible watches"
        );
        assert!(
            !open_takes(&mode(true, true), Access::Member, &c),
            "online & invisible watches"
        );
        assert!(
            !open_takes(&mode(true, false), Access::Watcher, &c),
            "supervisors only watch"
        );
    }

    #[test]
    fn open_bot_chat_never_takes() {
        assert!(!open_takes(
            &mode(true, false),
            Access::Member,
            &chat(1, ChatStatus::Bot, None)
        ));
    }

    #[test]
    fn message_table_of_section_4() {
        for status in [ChatStatus::Pending, ChatStatus::Bot] {
            let c = chat(1, status, None);
            assert!(message_takes(&mode(true, false), Access::Member, &c, false));
            assert!(message_takes(
                &mode(false, false),
                Access::Member,
                &c,
                false
            ));
            assert!(!message_takes(
                &mode(false, true),
                Access::Member,
                &c,
                false
            ));
            assert!(!message_takes(&mode(true, true), Access::Member, &c, false));
            assert!(
                !message_takes(&mode(true, false), Access::Member, &c, true),
                "whisper"
            );
        }
    }

    #[test]
    fn open_forbidden_outside_departments() {
        assert!(access(&op(vec![]), &chat(3, ChatStatus::Pending, None)).is_err());
        assert_eq!(
            access(&op(vec![]), &chat(2, ChatStatus::Pending, None)).unwrap(),
            Access::Watcher
        );
    }

    #[test]
    fn open_all_needed_for_others_chats() {
        let c = chat(1, ChatStatus::Pending, Some(5));
        assert!(matches!(access(&op(vec![]), &c), Err(Error::Forbidden(_))));
        assert_eq!(
            access(&op(vec![Permission::OpenAll]), &c).unwrap(),
            Access::Member
        );
    }
}
