//! Every change to the hub's state is one typed command, applied by the core (which does no
//! I/O) and answered with a typed answer. The hub runs a command under its lock, makes the
//! writes it produced durable, and only then shows its frames and answers
//! (`Hub::apply`): command → checked → durable → applied → shown.
//!
//! Each command is a struct implementing [`Change`], so its caller gets its own answer type;
//! [`Command`] gathers them all in one serde enum, for logs, fuzzing and tests that replay
//! sequences of changes. Commands that attach a socket carry a [`Socket`]: a live handle that
//! serializes as its connection id and is never read back (sockets do not travel).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::answer::{ChatAnswer, DepartmentView, PutOperatorsAnswer};
use crate::core::{Actor, ChatOp, Core, Note, SettingsChange, Timer};
use crate::error::Result;
use crate::model::{ChatId, Department, DeptId, OperatorId, OperatorRecord, OperatorView};
use crate::peer::Peer;
use crate::presence::ConnId;

mod node;
pub use node::{DropNode, EndSessions, LogNodeState, MarkIdle, Resync, ResyncChats};

/// A change: checked and applied to the core in one critical section.
pub trait Change {
    type Answer;
    fn apply(self, core: &mut Core, now: Instant) -> Result<Self::Answer>;
}

/// A socket attached by a command: the live handle, serialized as its connection id.
#[derive(Clone)]
pub struct Socket(pub Arc<Peer>);

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Socket({})", self.0.id)
    }
}

impl Serialize for Socket {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_u64(self.0.id)
    }
}

impl<'de> Deserialize<'de> for Socket {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> std::result::Result<Self, D::Error> {
        Err(serde::de::Error::custom(
            "a socket is attached where it is open; it cannot be read from a command",
        ))
    }
}

/// Every change of the hub, one variant each.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    PutOperator(PutOperator),
    PutOperators(PutOperators),
    DeleteOperator(DeleteOperator),
    SetSettings(SetSettings),
    PutDepartment(PutDepartment),
    ConnectOperator(ConnectOperator),
    DisconnectOperator(DisconnectOperator),
    SetActive(SetActive),
    LeaveChat(LeaveChat),
    WatchChat(WatchChat),
    ConnectWidget(ConnectWidget),
    DisconnectWidget(DisconnectWidget),
    ConnectVisitor(ConnectVisitor),
    DisconnectVisitor(DisconnectVisitor),
    Chat(ChatOp),
    Replicate(Replicate),
    Expire(Expire),
    Assign(Assign),
    MarkIdle(MarkIdle),
    LogNodeState(LogNodeState),
    DropNode(DropNode),
    Resync(Resync),
    ResyncChats(ResyncChats),
    EndSessions(EndSessions),
}

/// What any command answers, for [`Command`]'s callers.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Done,
    Operator(OperatorView),
    PutOperator {
        operator: OperatorView,
        created: bool,
    },
    Operators(PutOperatorsAnswer),
    Department(DepartmentView),
    Chat(ChatAnswer),
}

impl Change for Command {
    type Answer = Answer;

    fn apply(self, core: &mut Core, now: Instant) -> Result<Answer> {
        let done = |()| Answer::Done;
        Ok(match self {
            Command::PutOperator(c) => {
                let (operator, created) = c.apply(core, now)?;
                Answer::PutOperator { operator, created }
            }
            Command::PutOperators(c) => Answer::Operators(c.apply(core, now)?),
            Command::DeleteOperator(c) => c.apply(core, now).map(done)?,
            Command::SetSettings(c) => Answer::Operator(c.apply(core, now)?),
            Command::PutDepartment(c) => Answer::Department(c.apply(core, now)?),
            Command::ConnectOperator(c) => c.apply(core, now).map(done)?,
            Command::DisconnectOperator(c) => c.apply(core, now).map(done)?,
            Command::SetActive(c) => c.apply(core, now).map(done)?,
            Command::LeaveChat(c) => c.apply(core, now).map(done)?,
            Command::WatchChat(c) => c.apply(core, now).map(done)?,
            Command::ConnectWidget(c) => c.apply(core, now).map(done)?,
            Command::DisconnectWidget(c) => c.apply(core, now).map(done)?,
            Command::ConnectVisitor(c) => c.apply(core, now).map(done)?,
            Command::DisconnectVisitor(c) => c.apply(core, now).map(done)?,
            Command::Chat(op) => Answer::Chat(op.apply(core, now)?),
            Command::Replicate(c) => c.apply(core, now).map(done)?,
            Command::Expire(c) => c.apply(core, now).map(done)?,
            Command::Assign(c) => c.apply(core, now).map(done)?,
            Command::MarkIdle(c) => c.apply(core, now).map(done)?,
            Command::LogNodeState(c) => c.apply(core, now).map(done)?,
            Command::DropNode(c) => c.apply(core, now).map(done)?,
            Command::Resync(c) => c.apply(core, now).map(done)?,
            Command::ResyncChats(c) => c.apply(core, now).map(done)?,
            Command::EndSessions(c) => c.apply(core, now).map(done)?,
        })
    }
}

/// `PUT /api/v1/operators/{id}`: the record, and the settings it sets. Answers the view and
/// whether the operator is new.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PutOperator {
    pub record: OperatorRecord,
    pub settings: SettingsChange,
}

impl Change for PutOperator {
    type Answer = (OperatorView, bool);
    fn apply(self, core: &mut Core, now: Instant) -> Result<(OperatorView, bool)> {
        Ok(core.put_operator(self.record, self.settings, now))
    }
}

/// `PUT /api/v1/operators` with a list: all of them in one change.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PutOperators {
    pub operators: Vec<PutOperator>,
}

impl Change for PutOperators {
    type Answer = PutOperatorsAnswer;
    fn apply(self, core: &mut Core, now: Instant) -> Result<PutOperatorsAnswer> {
        let mut created = 0;
        let mut operators = Vec::with_capacity(self.operators.len());
        for p in self.operators {
            let (view, new) = core.put_operator(p.record, p.settings, now);
            created += usize::from(new);
            operators.push(view);
        }
        Ok(PutOperatorsAnswer {
            updated: operators.len() - created,
            operators,
            created,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeleteOperator {
    pub operator: OperatorId,
}

impl Change for DeleteOperator {
    type Answer = ();
    fn apply(self, core: &mut Core, now: Instant) -> Result<()> {
        core.delete_operator(self.operator.0, now)
    }
}

/// `set_status` / `PATCH …/status`: a partial change of an operator's settings, checked
/// against the actor's permissions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetSettings {
    pub actor: Actor,
    pub operator: OperatorId,
    pub change: SettingsChange,
}

impl Change for SetSettings {
    type Answer = OperatorView;
    fn apply(self, core: &mut Core, now: Instant) -> Result<OperatorView> {
        core.set_settings(self.actor, self.operator.0, self.change, now)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PutDepartment {
    pub department: Department,
}

impl Change for PutDepartment {
    type Answer = DepartmentView;
    fn apply(self, core: &mut Core, now: Instant) -> Result<DepartmentView> {
        Ok(core.put_department(self.department, now))
    }
}

/// An operator's dashboard connected (after its `hello` is queued).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectOperator {
    pub operator: OperatorId,
    pub socket: Socket,
}

impl Change for ConnectOperator {
    type Answer = ();
    fn apply(self, core: &mut Core, now: Instant) -> Result<()> {
        core.connect_operator(self.operator.0, self.socket.0, now)
    }
}

/// A dashboard's socket closed; `logout`: on purpose (no grace).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DisconnectOperator {
    pub operator: OperatorId,
    pub conn: ConnId,
    pub logout: bool,
}

impl Change for DisconnectOperator {
    type Answer = ();
    fn apply(self, core: &mut Core, now: Instant) -> Result<()> {
        core.disconnect_operator(self.operator.0, self.conn, self.logout, now);
        Ok(())
    }
}

/// `activity`: a dashboard is in use or idle.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetActive {
    pub operator: OperatorId,
    pub conn: ConnId,
    pub active: bool,
}

impl Change for SetActive {
    type Answer = ();
    fn apply(self, core: &mut Core, now: Instant) -> Result<()> {
        core.set_active(self.operator.0, self.conn, self.active, now);
        Ok(())
    }
}

/// `leave_chat`: the connection stops watching the chat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaveChat {
    pub operator: OperatorId,
    pub conn: ConnId,
    pub chat: ChatId,
}

impl Change for LeaveChat {
    type Answer = ();
    fn apply(self, core: &mut Core, _: Instant) -> Result<()> {
        core.leave_chat(self.operator.0, self.conn, self.chat.0)
    }
}

/// The socket that opened or wrote in a chat (through another node) watches it here.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WatchChat {
    pub operator: OperatorId,
    pub socket: Socket,
    pub chat: ChatId,
}

impl Change for WatchChat {
    type Answer = ();
    fn apply(self, core: &mut Core, _: Instant) -> Result<()> {
        core.watch(self.operator.0, &self.socket.0, self.chat.0);
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectWidget {
    pub socket: Socket,
    pub departments: Vec<DeptId>,
}

impl Change for ConnectWidget {
    type Answer = ();
    fn apply(self, core: &mut Core, _: Instant) -> Result<()> {
        core.connect_widget(self.socket.0, &raw_ids(&self.departments));
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DisconnectWidget {
    pub conn: ConnId,
    pub departments: Vec<DeptId>,
}

impl Change for DisconnectWidget {
    type Answer = ();
    fn apply(self, core: &mut Core, _: Instant) -> Result<()> {
        core.disconnect_widget(self.conn, &raw_ids(&self.departments));
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectVisitor {
    pub chat: ChatId,
    pub socket: Socket,
}

impl Change for ConnectVisitor {
    type Answer = ();
    fn apply(self, core: &mut Core, _: Instant) -> Result<()> {
        core.connect_visitor(self.chat.0, self.socket.0)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DisconnectVisitor {
    pub chat: ChatId,
    pub conn: ConnId,
}

impl Change for DisconnectVisitor {
    type Answer = ();
    fn apply(self, core: &mut Core, _: Instant) -> Result<()> {
        core.disconnect_visitor(self.chat.0, self.conn);
        Ok(())
    }
}

impl Change for ChatOp {
    type Answer = ChatAnswer;
    fn apply(self, core: &mut Core, now: Instant) -> Result<ChatAnswer> {
        core.exec(self, now)
    }
}

/// What another node did, read from the change log: applied here as it was there.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Replicate {
    pub node: String,
    pub note: Note,
}

impl Change for Replicate {
    type Answer = ();
    fn apply(self, core: &mut Core, now: Instant) -> Result<()> {
        core.apply_note(&self.node, self.note, now);
        Ok(())
    }
}

/// A timer came due: the change it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "timer", rename_all = "snake_case")]
pub enum Expire {
    /// An operator's grace after their last connection closed is over.
    GraceEnd { operator: OperatorId },
    /// A chat assigned in `round` was not accepted in time.
    AcceptDeadline { chat: ChatId, round: u64 },
    /// One grace after assigning started: owners still offline give their chats back.
    OfflineOwners,
    /// A department's online hours started or ended.
    HoursBoundary { department: DeptId, generation: u64 },
}

impl From<Timer> for Expire {
    fn from(t: Timer) -> Expire {
        match t {
            Timer::GraceEnd { operator, .. } => Expire::GraceEnd {
                operator: operator.into(),
            },
            Timer::AcceptDeadline { chat, round, .. } => Expire::AcceptDeadline {
                chat: chat.into(),
                round,
            },
            Timer::OfflineOwners { .. } => Expire::OfflineOwners,
            Timer::HoursBoundary {
                department,
                generation,
                ..
            } => Expire::HoursBoundary {
                department: department.into(),
                generation,
            },
        }
    }
}

impl Change for Expire {
    type Answer = ();
    fn apply(self, core: &mut Core, now: Instant) -> Result<()> {
        match self {
            Expire::GraceEnd { operator } => core.grace_ended(operator.0, now),
            Expire::AcceptDeadline { chat, round } => core.accept_deadline(chat.0, round, now),
            Expire::OfflineOwners => core.requeue_offline_owners(now),
            Expire::HoursBoundary {
                department,
                generation,
            } => core.hours_boundary(department.0, generation, now),
        }
        Ok(())
    }
}

/// The cluster's election: this node starts assigning under its lease token (every write it
/// makes as assigner carries the token, and is refused once another node holds the lease),
/// or stops.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "assign", rename_all = "snake_case")]
pub enum Assign {
    Start { lease: String },
    Stop,
}

impl Change for Assign {
    type Answer = ();
    fn apply(self, core: &mut Core, now: Instant) -> Result<()> {
        match self {
            Assign::Start { lease } => core.start_assigning_fenced(lease.into(), now),
            Assign::Stop => core.stop_assigning(),
        }
        Ok(())
    }
}

fn raw_ids(ids: &[DeptId]) -> Vec<u64> {
    ids.iter().map(|d| d.0).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::peer::Kind;
    use crate::store::Snapshot;

    fn core() -> Core {
        Core::new(Arc::new(Config::default()), Snapshot::default())
    }

    #[test]
    fn commands_read_back_from_json_apply_and_keep_the_invariants() {
        let cfg = Config::default();
        let mut c = core();
        let now = Instant::now();
        let record = OperatorRecord {
            id: 7,
            name: "Ann".into(),
            departments: vec![1],
            watch_departments: vec![],
            permissions: vec![],
            max_chats: 2,
            exclude_autoassign: false,
            auto_accept: false,
        };
        let online = SettingsChange {
            online: Some(true),
            always_online: Some(true),
            ..Default::default()
        };
        let script = vec![
            Command::PutDepartment(PutDepartment {
                department: Department::with_defaults(1, &cfg.assignment),
            }),
            Command::PutOperator(PutOperator {
                record,
                settings: online,
            }),
            Command::Chat(ChatOp::Create {
                req: serde_json::from_str(r#"{"department":1}"#).expect("a new chat"),
            }),
            Command::SetSettings(SetSettings {
                actor: Actor::Backend,
                operator: OperatorId(7),
                change: SettingsChange {
                    online: Some(false),
                    ..Default::default()
                },
            }),
        ];
        let json = serde_json::to_string(&script).expect("commands serialize");
        let commands: Vec<Command> = serde_json::from_str(&json).expect("and read back");
        let mut answers = Vec::new();
        for cmd in commands {
            answers.push(cmd.apply(&mut c, now).expect("each command applies"));
            c.check_invariants()
                .expect("invariants hold after each command");
        }
        match &answers[2] {
            Answer::Chat(ChatAnswer::Created { chat, .. }) => {
                assert_eq!(chat.owner, Some(7), "the always-online operator got it")
            }
            other => panic!("a created chat, got {other:?}"),
        }
        match &answers[3] {
            Answer::Operator(view) => assert!(!view.settings.online, "went offline"),
            other => panic!("an operator view, got {other:?}"),
        }
    }

    #[test]
    fn a_command_that_fails_answers_an_error_and_names_the_cause() {
        let mut c = core();
        let err = DeleteOperator {
            operator: OperatorId(9),
        }
        .apply(&mut c, Instant::now())
        .expect_err("operator 9 does not exist");
        assert_eq!(err.code(), "not_found");
    }

    #[test]
    fn a_socket_serializes_as_its_connection_and_is_never_read_back() {
        let peer = Arc::new(Peer::new(42, Kind::Widget, 16, 0));
        let cmd = Command::ConnectWidget(ConnectWidget {
            socket: Socket(peer),
            departments: vec![DeptId(3)],
        });
        let json = serde_json::to_string(&cmd).expect("serializes");
        assert_eq!(
            json,
            r#"{"command":"connect_widget","socket":42,"departments":[3]}"#
        );
        let back = serde_json::from_str::<Command>(&json).expect_err("sockets do not travel");
        assert!(back.to_string().contains("socket"), "{back}");
    }

    mod replay {
        use super::*;
        use crate::core::NewChat;
        use crate::model::Permission;
        use proptest::prelude::*;
        use std::collections::HashMap;

        /// A command over a small world: 3 departments, 4 operators, chat ids 1..8,
        /// operator connections 1..6 (each belongs to the operator it first connected as),
        /// widget connections 10..12, timers coming due.
        fn command() -> impl Strategy<Value = Command> {
            let dept = 1u64..4;
            let op = 1u64..5;
            let chat = 1u64..9;
            let flag = proptest::option::of(any::<bool>());
            let change = (flag.clone(), flag.clone(), flag).prop_map(|(o, i, a)| SettingsChange {
                online: o,
                invisible: i,
                always_online: a,
            });
            prop_oneof![
                (dept.clone(), any::<bool>(), 0u32..3).prop_map(|(id, disabled, max)| {
                    let mut d = Department::with_defaults(id, &Config::default().assignment);
                    d.disabled = disabled;
                    d.max_chats = max;
                    Command::PutDepartment(PutDepartment { department: d })
                }),
                (
                    op.clone(),
                    proptest::collection::vec(dept.clone(), 0..3),
                    change.clone(),
                    any::<bool>()
                )
                    .prop_map(|(id, departments, settings, all)| {
                        Command::PutOperator(PutOperator {
                            record: OperatorRecord {
                                id,
                                name: format!("op{id}"),
                                departments,
                                watch_departments: vec![],
                                permissions: if all {
                                    vec![Permission::OpenAll]
                                } else {
                                    vec![]
                                },
                                max_chats: 0,
                                exclude_autoassign: false,
                                auto_accept: false,
                            },
                            settings,
                        })
                    }),
                op.clone()
                    .prop_map(|id| Command::DeleteOperator(DeleteOperator {
                        operator: OperatorId(id)
                    })),
                (op.clone(), change).prop_map(|(id, change)| Command::SetSettings(SetSettings {
                    actor: Actor::Backend,
                    operator: OperatorId(id),
                    change,
                })),
                (dept, any::<bool>()).prop_map(|(department, bot)| Command::Chat(ChatOp::Create {
                    req: NewChat {
                        id: None,
                        department,
                        bot,
                        priority: 0,
                        visitor: serde_json::json!({}),
                    },
                })),
                chat.clone()
                    .prop_map(|chat| Command::Chat(ChatOp::HandOver { chat: ChatId(chat) })),
                (proptest::option::of(op.clone()), chat.clone()).prop_map(|(by, chat)| {
                    Command::Chat(ChatOp::Close {
                        by: by.map(OperatorId),
                        chat: ChatId(chat),
                    })
                }),
                (op.clone(), chat.clone()).prop_map(|(me, chat)| Command::Chat(ChatOp::Open {
                    me: OperatorId(me),
                    chat: ChatId(chat)
                })),
                (op.clone(), chat, any::<bool>()).prop_map(|(me, chat, whisper)| {
                    Command::Chat(ChatOp::Message {
                        me: OperatorId(me),
                        chat: ChatId(chat),
                        text: "hi".into(),
                        whisper,
                        origin: None,
                    })
                }),
                (op.clone(), 1u64..7).prop_map(|(id, conn)| {
                    Command::ConnectOperator(ConnectOperator {
                        operator: OperatorId(id),
                        socket: Socket(Arc::new(Peer::new(conn, Kind::Operator(id), 1024, 0))),
                    })
                }),
                (op.clone(), 1u64..7, any::<bool>()).prop_map(|(id, conn, logout)| {
                    Command::DisconnectOperator(DisconnectOperator {
                        operator: OperatorId(id),
                        conn,
                        logout,
                    })
                }),
                (op.clone(), 1u64..7, any::<bool>()).prop_map(|(id, conn, active)| {
                    Command::SetActive(SetActive {
                        operator: OperatorId(id),
                        conn,
                        active,
                    })
                }),
                (op.clone(), 1u64..7, 1u64..9).prop_map(|(id, conn, chat)| {
                    Command::LeaveChat(LeaveChat {
                        operator: OperatorId(id),
                        conn,
                        chat: ChatId(chat),
                    })
                }),
                (10u64..13, proptest::collection::vec(1u64..5, 1..3)).prop_map(|(conn, d)| {
                    Command::ConnectWidget(ConnectWidget {
                        socket: Socket(Arc::new(Peer::new(conn, Kind::Widget, 1024, 0))),
                        departments: d.into_iter().map(DeptId).collect(),
                    })
                }),
                (10u64..13, proptest::collection::vec(1u64..5, 1..3)).prop_map(|(conn, d)| {
                    Command::DisconnectWidget(DisconnectWidget {
                        conn,
                        departments: d.into_iter().map(DeptId).collect(),
                    })
                }),
                op.clone().prop_map(|id| Command::Expire(Expire::GraceEnd {
                    operator: OperatorId(id)
                })),
                (1u64..9, 0u64..4).prop_map(|(chat, round)| Command::Expire(
                    Expire::AcceptDeadline {
                        chat: ChatId(chat),
                        round,
                    }
                )),
                Just(Command::Expire(Expire::OfflineOwners)),
                proptest::collection::vec((op.clone(), 1u64..7), 1..3).prop_map(|s| {
                    Command::MarkIdle(MarkIdle {
                        sockets: s.into_iter().map(|(o, c)| (OperatorId(o), c)).collect(),
                    })
                }),
                Just(Command::LogNodeState(LogNodeState)),
                Just(Command::DropNode(DropNode { node: "n2".into() })),
                Just(Command::EndSessions(EndSessions)),
                (op.clone(), 0u64..3).prop_map(|(o, v)| Command::Resync(Resync {
                    tombstones: vec![(OperatorId(o), v)],
                    ..Default::default()
                })),
                (op.clone(), 0u32..3, 0u32..2).prop_map(|(o, active, idle)| {
                    Command::Resync(Resync {
                        remote: HashMap::from([(
                            "n2".to_string(),
                            vec![(OperatorId(o), active, idle)],
                        )]),
                        ..Default::default()
                    })
                }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]
            /// Any sequence of commands keeps the core's invariants (one owner per chat,
            /// counts and queues in step, nobody past capacity by assignment), and a refused
            /// command leaves nothing behind: no write, no frame, no timer, no note.
            #[test]
            fn replay_of_any_commands_keeps_the_invariants_and_refusals_leave_no_trace(
                script in proptest::collection::vec(command(), 1..60),
                cluster in any::<bool>(),
            ) {
                let mut c = core();
                // As the elected node of a cluster: notes for the other nodes are made too.
                c.cluster = cluster;
                let now = Instant::now();
                // What the boot did (the offline-owners timer) is not the first command's.
                let _ = (c.take_outbox(), c.take_effects(), c.take_notes());
                // A connection id stays with the operator that opened it, as on a real hub.
                let mut conns: std::collections::HashMap<ConnId, u64> = Default::default();
                for cmd in script {
                    if let Command::ConnectOperator(ConnectOperator { operator, socket }) = &cmd
                        && *conns.entry(socket.0.id).or_insert(operator.0) != operator.0
                    {
                        continue;
                    }
                    let result = cmd.apply(&mut c, now);
                    let frames = c.take_outbox();
                    let (writes, timers) = c.take_effects();
                    let notes = c.take_notes();
                    if let Err(e) = &result {
                        prop_assert!(
                            writes.is_empty() && frames.is_empty() && timers.is_empty() && notes.is_empty(),
                            "refused ({e}) but left {} writes, {} frames, {} timers",
                            writes.len(), frames.len(), timers.len()
                        );
                    }
                    if let Err(broken) = c.check_invariants() {
                        prop_assert!(false, "{broken}");
                    }
                }
            }
        }
    }
}
