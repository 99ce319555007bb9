//! The seed's rules for opening and writing in a chat (SPEC.md section 4) and who may change
//! an operator's settings (section 2), as plain data.

use crate::error::{Error, Result};
use crate::model::{Chat, ChatStatus, OperatorRecord, Permission};
use crate::presence::Settings;

/// Which settings a change touches (the fields it gives).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Touches {
    pub online: bool,
    pub invisible: bool,
    pub always_online: bool,
}

/// May operator `me` change `target`'s settings as `touches` says? One's own settings need
/// each field's permission; another operator's need `set_operator_status` alone, and only
/// for someone who shares a department or a watched department with `me`. All or nothing:
/// the error names every missing permission.
pub fn may_change_settings(
    me: &OperatorRecord,
    target: &OperatorRecord,
    touches: Touches,
) -> Result<()> {
    if me.id != target.id {
        if !me.can(Permission::SetOperatorStatus) {
            return Err(Error::Forbidden(
                "missing permission: set_operator_status".into(),
            ));
        }
        let shared = me
            .all_departments()
            .any(|d| target.works_in(d) || target.watches(d));
        if !shared {
            return Err(Error::Forbidden(format!(
                "operator {} shares no department with you",
                target.id
            )));
        }
        return Ok(());
    }
    let need = [
        (
            touches.online,
            Permission::ChangeOnlineStatus,
            "change_online_status",
        ),
        (
            touches.invisible,
            Permission::ChangeVisibility,
            "change_visibility",
        ),
        (
            touches.always_online,
            Permission::ChangeAlwaysOnline,
            "change_always_online",
        ),
    ];
    let missing: Vec<&str> = need
        .iter()
        .filter(|(touched, perm, _)| *touched && !me.can(*perm))
        .map(|(_, _, name)| *name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::Forbidden(format!(
            "missing permission: {}",
            missing.join(", ")
        )))
    }
}

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

    fn rec(id: u64, depts: Vec<u64>, watch: Vec<u64>, perms: Vec<Permission>) -> OperatorRecord {
        OperatorRecord {
            id,
            departments: depts,
            watch_departments: watch,
            permissions: perms,
            ..op(vec![])
        }
    }

    const ONLINE: Touches = Touches {
        online: true,
        invisible: false,
        always_online: false,
    };

    #[test]
    fn permissions_supervisor_needs_set_operator_status_alone() {
        let sup = rec(9, vec![], vec![1], vec![Permission::SetOperatorStatus]);
        let ann = rec(7, vec![1], vec![], vec![]);
        let all = Touches {
            online: true,
            invisible: true,
            always_online: true,
        };
        assert!(
            may_change_settings(&sup, &ann, all).is_ok(),
            "a watched department is shared"
        );
        let member = rec(9, vec![1], vec![], vec![Permission::SetOperatorStatus]);
        assert!(may_change_settings(&member, &ann, ONLINE).is_ok());
        // Both only watch department 1: still shared.
        let watcher = rec(7, vec![], vec![1], vec![]);
        assert!(may_change_settings(&sup, &watcher, ONLINE).is_ok());
    }

    #[test]
    fn permissions_supervisor_forbidden_without_a_shared_department() {
        let sup = rec(9, vec![2], vec![3], vec![Permission::SetOperatorStatus]);
        let ann = rec(7, vec![1], vec![4], vec![]);
        let e = may_change_settings(&sup, &ann, ONLINE).unwrap_err();
        assert!(
            matches!(e, Error::Forbidden(ref m) if m.contains("shares no department")),
            "{e}"
        );
        let field_perms = rec(
            9,
            vec![1],
            vec![],
            vec![Permission::ChangeOnlineStatus, Permission::ChangeVisibility],
        );
        let e = may_change_settings(&field_perms, &ann, ONLINE).unwrap_err();
        assert!(e.to_string().contains("set_operator_status"), "{e}");
    }

    #[test]
    fn permissions_own_settings_need_each_field_permission() {
        let me = rec(7, vec![1], vec![], vec![Permission::ChangeOnlineStatus]);
        assert!(may_change_settings(&me, &me, ONLINE).is_ok());
        let both = Touches {
            online: true,
            invisible: true,
            always_online: false,
        };
        let e = may_change_settings(&me, &me, both).unwrap_err();
        assert_eq!(e.to_string(), "missing permission: change_visibility");
        // set_operator_status does not stand in for one's own field permissions.
        let sup = rec(9, vec![1], vec![], vec![Permission::SetOperatorStatus]);
        assert!(may_change_settings(&sup, &sup, ONLINE).is_err());
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
