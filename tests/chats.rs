//! Chats through real sockets: the opening and writing rules of SPEC.md section 4 (one test
//! per cell of its table), watching, visitors, the widget's chat-driven fallbacks of
//! section 3 (`queue_full`, `bot`) and chats surviving a restart.

mod common;

use std::time::Duration;

use common::{Client, TestHub};
use serde_json::{Value, json};

/// Window over which an absence is checked.
const SHORT: Duration = Duration::from_millis(200);
const PERMS: [&str; 3] = [
    "change_online_status",
    "change_visibility",
    "change_always_online",
];

fn is_chat(m: &Value, id: u64) -> bool {
    m["type"] == "chat" && m["chat"]["id"] == id
}

fn is_message(m: &Value, id: u64) -> bool {
    m["type"] == "message" && m["chat"] == id
}

fn id_of(chat: &Value) -> u64 {
    chat["id"].as_u64().expect("chat id")
}

/// An operator working in `departments` in the given mode.
async fn operator_in_mode(
    hub: &TestHub,
    id: u64,
    departments: &[u64],
    online: bool,
    invisible: bool,
) {
    hub.operator_with(
        id,
        json!({"name": format!("op{id}"), "departments": departments, "permissions": PERMS,
               "online": online, "invisible": invisible}),
    )
    .await;
}

fn assert_ack(v: &Value) {
    assert_eq!(v["type"], "ack", "{v}");
}

fn assert_error(v: &Value, code: &str) {
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["code"], code, "{v}");
}

/// One chat of department 1 (assignment off, so nobody owns it), operator 1 in the mode
/// under test, a visible colleague (operator 2) and the chat's visitor.
struct Scene {
    hub: TestHub,
    me: Client,
    colleague: Client,
    visitor: Client,
    chat: u64,
}

async fn scene(online: bool, invisible: bool, bot: bool) -> Scene {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"assignment": "off"})).await;
    operator_in_mode(&hub, 1, &[1], online, invisible).await;
    hub.operator(2, &[1]).await;
    let (me, _) = hub.connect(1).await;
    let (mut colleague, _) = hub.connect(2).await;
    let (chat, token) = hub
        .create_chat(json!({"department": 1, "bot": bot, "visitor": {"name": "Ann"}}))
        .await;
    let id = id_of(&chat);
    assert_eq!(chat["status"], if bot { "bot" } else { "pending" });
    colleague
        .next_where("the new chat", |m| is_chat(m, id))
        .await;
    let (visitor, first) = hub.visitor(id, &token).await;
    assert_eq!(first["chat"]["owner_name"], Value::Null, "{first}");
    Scene {
        hub,
        me,
        colleague,
        visitor,
        chat: id,
    }
}

/// Operator 1 owns the chat, it is active, and the department and the visitor were told.
async fn assert_taken(s: &mut Scene) {
    let id = s.chat;
    let c = s.hub.chat_view(id).await;
    assert_eq!(c["owner"], 1, "{c}");
    assert_eq!(c["status"], "active", "{c}");
    assert!(c["accepted_at"].is_string(), "{c}");
    let ev = s
        .colleague
        .next_where("the chat taken", |m| is_chat(m, id))
        .await;
    assert_eq!(ev["chat"]["owner"], 1, "{ev}");
    assert_eq!(ev["chat"]["status"], "active", "{ev}");
    let v = s.visitor.next_of("chat").await;
    assert_eq!(v["chat"]["status"], "active", "{v}");
    assert_eq!(v["chat"]["owner_name"], "op1", "{v}");
    let me = s.hub.view(1).await;
    assert_eq!(
        (me["active_chats"].clone(), me["pending_chats"].clone()),
        (json!(1), json!(0)),
        "{me}"
    );
}

/// Nothing changed: no owner, same status, nobody told of a change.
async fn assert_untouched(s: &mut Scene, status: &str) {
    let id = s.chat;
    let c = s.hub.chat_view(id).await;
    assert_eq!(c["owner"], Value::Null, "{c}");
    assert_eq!(c["status"], status, "{c}");
    assert_eq!(c["accepted_at"], Value::Null, "{c}");
    tokio::join!(
        s.colleague
            .silent_for(SHORT, "a chat update", |m| is_chat(m, id)),
        s.visitor
            .silent_for(SHORT, "a chat update", |m| m["type"] == "chat"),
    );
    let me = s.hub.view(1).await;
    assert_eq!(
        (me["active_chats"].clone(), me["pending_chats"].clone()),
        (json!(0), json!(0)),
        "{me}"
    );
}

/// The opener watches: a visitor's message reaches them.
async fn assert_watching(s: &mut Scene) {
    let ack = s
        .visitor
        .request(json!({"type": "send_message", "text": "anyone?"}))
        .await;
    assert_ack(&ack);
    let m =
        s.me.next_where("the visitor's message", |m| is_message(m, s.chat))
            .await;
    assert_eq!(m["message"]["text"], "anyone?");
    assert_eq!(m["message"]["from"]["kind"], "visitor");
}

async fn open_takes_case(online: bool, invisible: bool) {
    let mut s = scene(online, invisible, false).await;
    let ack =
        s.me.request(json!({"type": "open_chat", "chat": s.chat}))
            .await;
    assert_ack(&ack);
    assert_eq!(ack["chat"]["owner"], 1, "{ack}");
    assert_eq!(ack["chat"]["status"], "active", "{ack}");
    assert_taken(&mut s).await;
    assert_watching(&mut s).await;
}

async fn open_watches_case(online: bool, invisible: bool) {
    let mut s = scene(online, invisible, false).await;
    let ack =
        s.me.request(json!({"type": "open_chat", "chat": s.chat}))
            .await;
    assert_ack(&ack);
    assert_eq!(ack["chat"]["owner"], Value::Null, "{ack}");
    assert_eq!(ack["chat"]["status"], "pending", "{ack}");
    assert_untouched(&mut s, "pending").await;
    assert_watching(&mut s).await;
}

async fn send(c: &mut Client, chat: u64, text: &str, whisper: bool) -> Value {
    let ack = c
        .request(json!({"type": "send_message", "chat": chat, "text": text, "whisper": whisper}))
        .await;
    assert_ack(&ack);
    assert_eq!(ack["message"]["text"], text, "{ack}");
    assert_eq!(ack["message"]["whisper"], whisper, "{ack}");
    ack
}

/// The visitor receives the operator's message.
async fn assert_message_sent(s: &mut Scene, text: &str) {
    let m = s.visitor.next_of("message").await;
    assert_eq!(m["message"]["text"], text, "{m}");
    assert_eq!(m["message"]["from"]["kind"], "operator", "{m}");
    assert_eq!(m["message"]["from"]["id"], 1, "{m}");
}

async fn message_takes_case(online: bool, invisible: bool, bot: bool) {
    let mut s = scene(online, invisible, bot).await;
    let chat = s.chat;
    let ack = send(&mut s.me, chat, "hello, I am here", false).await;
    assert_eq!(ack["message"]["from"]["id"], 1, "{ack}");
    assert_taken(&mut s).await;
    assert_message_sent(&mut s, "hello, I am here").await;
}

async fn message_only_case(online: bool, invisible: bool, bot: bool) {
    let mut s = scene(online, invisible, bot).await;
    let chat = s.chat;
    send(&mut s.me, chat, "psst, a hint", false).await;
    assert_message_sent(&mut s, "psst, a hint").await;
    assert_untouched(&mut s, if bot { "bot" } else { "pending" }).await;
}

// ----- the table of section 4: opens a pending chat -----

#[tokio::test]
async fn open_pending_online_visible_becomes_owner_chat_active() {
    open_takes_case(true, false).await;
}

#[tokio::test]
async fn open_pending_offline_visible_becomes_owner_chat_active() {
    open_takes_case(false, false).await;
}

#[tokio::test]
async fn open_pending_offline_invisible_watches_nothing_changes() {
    open_watches_case(false, true).await;
}

#[tokio::test]
async fn open_pending_online_invisible_watches_chat_stays_pending() {
    open_watches_case(true, true).await;
}

// ----- sends a message in a pending chat -----

#[tokio::test]
async fn message_pending_online_visible_becomes_owner_chat_active() {
    message_takes_case(true, false, false).await;
}

#[tokio::test]
async fn message_pending_offline_visible_becomes_owner_chat_active() {
    message_takes_case(false, false, false).await;
}

#[tokio::test]
async fn message_pending_offline_invisible_sent_nothing_else_changes() {
    message_only_case(false, true, false).await;
}

#[tokio::test]
async fn message_pending_online_invisible_sent_nothing_else_changes() {
    message_only_case(true, true, false).await;
}

// ----- sends a message in a bot chat -----

#[tokio::test]
async fn message_bot_online_visible_becomes_owner_chat_active() {
    message_takes_case(true, false, true).await;
}

#[tokio::test]
async fn message_bot_offline_visible_becomes_owner_chat_active() {
    message_takes_case(false, false, true).await;
}

#[tokio::test]
async fn message_bot_offline_invisible_sent_nothing_else_changes() {
    message_only_case(false, true, true).await;
}

#[tokio::test]
async fn message_bot_online_invisible_sent_nothing_else_changes() {
    message_only_case(true, true, true).await;
}

// ----- the rules under the table -----

#[tokio::test]
async fn open_bot_chat_never_takes_it_first_visible_message_does() {
    let mut s = scene(true, false, true).await;
    let ack =
        s.me.request(json!({"type": "open_chat", "chat": s.chat}))
            .await;
    assert_ack(&ack);
    assert_eq!(ack["chat"]["status"], "bot", "{ack}");
    assert_eq!(ack["chat"]["owner"], Value::Null, "{ack}");
    assert_untouched(&mut s, "bot").await;
    let chat = s.chat;
    send(&mut s.me, chat, "a human now", false).await;
    assert_taken(&mut s).await;
}

#[tokio::test]
async fn whisper_never_takes_a_chat_and_never_reaches_the_visitor() {
    for bot in [false, true] {
        let mut s = scene(true, false, bot).await;
        let chat = s.chat;
        s.hub
            .operator_with(3, json!({"name": "sup", "watch_departments": [1]}))
            .await;
        let (mut sup, _) = s.hub.connect(3).await;
        assert_ack(
            &sup.request(json!({"type": "open_chat", "chat": chat}))
                .await,
        );
        send(&mut s.me, chat, "colleagues only", true).await;
        let w = sup.next_where("the whisper", |m| is_message(m, chat)).await;
        assert_eq!(w["message"]["whisper"], true, "{w}");
        assert_eq!(w["message"]["text"], "colleagues only", "{w}");
        s.visitor
            .silent_for(SHORT, "a whisper", |m| m["type"] == "message")
            .await;
        assert_untouched(&mut s, if bot { "bot" } else { "pending" }).await;
        // Once the chat is taken, whispers still stay among operators: the visitor's next
        // message is the one after the whisper.
        send(&mut s.me, chat, "first", false).await;
        send(&mut s.me, chat, "secret", true).await;
        send(&mut s.me, chat, "second", false).await;
        assert_eq!(
            s.visitor.next_of("message").await["message"]["text"],
            "first"
        );
        assert_eq!(
            s.visitor.next_of("message").await["message"]["text"],
            "second"
        );
        let w = sup
            .next_where("the second whisper", |m| {
                is_message(m, chat) && m["message"]["whisper"] == true
            })
            .await;
        assert_eq!(w["message"]["text"], "secret");
    }
}

#[tokio::test]
async fn open_forbidden_outside_departments_and_watched_departments() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    hub.operator_with(2, json!({"name": "sup", "watch_departments": [3]}))
        .await;
    let (mut op, _) = hub.connect(1).await;
    let (mut sup, _) = hub.connect(2).await;
    let (chat, _) = hub.create_chat(json!({"department": 3})).await;
    let id = id_of(&chat);
    assert_error(
        &op.request(json!({"type": "open_chat", "chat": id})).await,
        "forbidden",
    );
    assert_error(
        &op.request(json!({"type": "send_message", "chat": id, "text": "hi"}))
            .await,
        "forbidden",
    );
    assert_error(
        &sup.request(json!({"type": "open_chat", "chat": 999})).await,
        "not_found",
    );
    // A watched department may be opened, but only watched: the chat is not taken.
    let ack = sup.request(json!({"type": "open_chat", "chat": id})).await;
    assert_ack(&ack);
    assert_eq!(ack["chat"]["owner"], Value::Null, "{ack}");
    let c = hub.chat_view(id).await;
    assert_eq!(
        (c["status"].clone(), c["owner"].clone()),
        (json!("pending"), Value::Null),
        "{c}"
    );
    assert_eq!(hub.view(1).await["active_chats"], 0);
}

#[tokio::test]
async fn open_all_needed_for_a_pending_chat_assigned_to_someone_else() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    hub.operator(2, &[1]).await;
    hub.operator_with(
        3,
        json!({"name": "op3", "departments": [1], "permissions": ["open_all"]}),
    )
    .await;
    let (mut owner, _) = hub.connect(1).await;
    let (chat, _) = hub.create_chat(json!({"department": 1})).await;
    let id = id_of(&chat);
    assert_eq!(
        (chat["owner"].clone(), chat["status"].clone()),
        (json!(1), json!("pending")),
        "{chat}"
    );
    let (mut plain, _) = hub.connect(2).await;
    let (mut all, _) = hub.connect(3).await;
    assert_error(
        &plain
            .request(json!({"type": "open_chat", "chat": id}))
            .await,
        "forbidden",
    );
    assert_error(
        &plain
            .request(json!({"type": "send_message", "chat": id, "text": "mine?"}))
            .await,
        "forbidden",
    );
    let c = hub.chat_view(id).await;
    assert_eq!(
        (c["owner"].clone(), c["status"].clone()),
        (json!(1), json!("pending")),
        "refused: unchanged {c}"
    );
    // With open_all a visible operator opens it, and opening a pending chat takes it.
    let ack = all.request(json!({"type": "open_chat", "chat": id})).await;
    assert_ack(&ack);
    assert_eq!(
        (ack["chat"]["owner"].clone(), ack["chat"]["status"].clone()),
        (json!(3), json!("active")),
        "{ack}"
    );
    let ev = owner
        .next_where("the chat taken over", |m| {
            is_chat(m, id) && m["chat"]["owner"] == 3
        })
        .await;
    assert_eq!(ev["chat"]["status"], "active");
    assert_eq!(hub.view(1).await["pending_chats"], 0);
}

#[tokio::test]
async fn online_invisible_leaves_an_auto_assigned_chat_pending_when_opened() {
    let hub = TestHub::start().await;
    operator_in_mode(&hub, 1, &[1], true, true).await;
    let (mut op, _) = hub.connect(1).await;
    let (chat, _) = hub.create_chat(json!({"department": 1})).await;
    let id = id_of(&chat);
    let assigned = op.next_of("chat_assigned").await;
    assert_eq!(assigned["chat"]["id"], id, "{assigned}");
    assert_eq!(assigned["chat"]["status"], "pending", "{assigned}");
    let ack = op.request(json!({"type": "open_chat", "chat": id})).await;
    assert_ack(&ack);
    assert_eq!(
        (ack["chat"]["owner"].clone(), ack["chat"]["status"].clone()),
        (json!(1), json!("pending")),
        "{ack}"
    );
    let c = hub.chat_view(id).await;
    assert_eq!(
        (c["status"].clone(), c["accepted_at"].clone()),
        (json!("pending"), Value::Null),
        "{c}"
    );
    let v = hub.view(1).await;
    assert_eq!(
        (v["active_chats"].clone(), v["pending_chats"].clone()),
        (json!(0), json!(1)),
        "{v}"
    );
    assert_eq!(v["misconfigured"], true, "{v}");
}

// ----- watching -----

#[tokio::test]
async fn open_chat_acks_with_the_chat_and_its_recent_messages() {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"assignment": "off"})).await;
    hub.operator_with(1, json!({"name": "sup", "watch_departments": [1]}))
        .await;
    let (chat, token) = hub
        .create_chat(json!({"department": 1, "visitor": {"name": "Ann"}, "priority": 2}))
        .await;
    let id = id_of(&chat);
    let (mut visitor, _) = hub.visitor(id, &token).await;
    for text in ["hello", "is anyone there?"] {
        assert_ack(
            &visitor
                .request(json!({"type": "send_message", "text": text}))
                .await,
        );
    }
    let (mut sup, _) = hub.connect(1).await;
    let ack = sup.request(json!({"type": "open_chat", "chat": id})).await;
    assert_ack(&ack);
    assert_eq!(ack["chat"]["id"], id);
    assert_eq!(ack["chat"]["priority"], 2);
    assert_eq!(ack["chat"]["visitor"], json!({"name": "Ann"}));
    let msgs = ack["messages"].as_array().expect("messages");
    let texts: Vec<&str> = msgs.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["hello", "is anyone there?"]);
    assert_eq!(msgs[0]["from"], json!({"kind": "visitor", "name": "Ann"}));
    assert!(msgs[0]["id"].as_u64() < msgs[1]["id"].as_u64());
}

#[tokio::test]
async fn watcher_gets_messages_until_leave_chat() {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"assignment": "off"})).await;
    hub.operator(1, &[1]).await;
    hub.operator_with(2, json!({"name": "sup", "watch_departments": [1]}))
        .await;
    let (mut owner, _) = hub.connect(1).await;
    let (mut sup, _) = hub.connect(2).await;
    let (chat, token) = hub.create_chat(json!({"department": 1})).await;
    let id = id_of(&chat);
    let (mut visitor, _) = hub.visitor(id, &token).await;
    assert_ack(
        &owner
            .request(json!({"type": "open_chat", "chat": id}))
            .await,
    );
    assert_ack(&sup.request(json!({"type": "open_chat", "chat": id})).await);
    assert_ack(
        &visitor
            .request(json!({"type": "send_message", "text": "one"}))
            .await,
    );
    assert_eq!(
        sup.next_where("one", |m| is_message(m, id)).await["message"]["text"],
        "one"
    );
    send(&mut owner, id, "answer", false).await;
    assert_eq!(
        sup.next_where("the owner's answer", |m| is_message(m, id))
            .await["message"]["text"],
        "answer"
    );
    assert_ack(&sup.request(json!({"type": "leave_chat", "chat": id})).await);
    assert_ack(
        &visitor
            .request(json!({"type": "send_message", "text": "two"}))
            .await,
    );
    assert_eq!(
        owner.next_where("two", |m| is_message(m, id)).await["message"]["text"],
        "two"
    );
    sup.silent_for(SHORT, "a message after leave_chat", |m| {
        m["type"] == "message"
    })
    .await;
}

#[tokio::test]
async fn watching_is_per_connection_and_ends_with_the_connection() {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"assignment": "off"})).await;
    hub.operator(1, &[1]).await;
    hub.operator_with(2, json!({"name": "sup", "watch_departments": [1]}))
        .await;
    let (mut owner, _) = hub.connect(1).await;
    let (mut s1, _) = hub.connect(2).await;
    let (mut s2, _) = hub.connect(2).await;
    let (chat, token) = hub.create_chat(json!({"department": 1})).await;
    let id = id_of(&chat);
    let (mut visitor, _) = hub.visitor(id, &token).await;
    assert_ack(
        &owner
            .request(json!({"type": "open_chat", "chat": id}))
            .await,
    );
    assert_ack(&s1.request(json!({"type": "open_chat", "chat": id})).await);
    assert_ack(
        &visitor
            .request(json!({"type": "send_message", "text": "one"}))
            .await,
    );
    assert_eq!(
        s1.next_where("one", |m| is_message(m, id)).await["message"]["text"],
        "one"
    );
    s2.silent_for(
        SHORT,
        "a message on a connection that did not open the chat",
        |m| m["type"] == "message",
    )
    .await;
    assert_ack(&s2.request(json!({"type": "open_chat", "chat": id})).await);
    s1.close().await;
    hub.poll_until("/api/v1/operators/2", "one connection left", |v| {
        v["connections"] == 1
    })
    .await;
    assert_ack(
        &visitor
            .request(json!({"type": "send_message", "text": "two"}))
            .await,
    );
    assert_eq!(
        s2.next_where("two", |m| is_message(m, id)).await["message"]["text"],
        "two"
    );
    // A new connection watches nothing until it opens the chat.
    let (mut s3, _) = hub.connect(2).await;
    assert_ack(
        &visitor
            .request(json!({"type": "send_message", "text": "three"}))
            .await,
    );
    assert_eq!(
        s2.next_where("three", |m| is_message(m, id)).await["message"]["text"],
        "three"
    );
    s3.silent_for(SHORT, "a message on a new connection", |m| {
        m["type"] == "message"
    })
    .await;
}

#[tokio::test]
async fn supervisor_sees_watched_department_chats_in_hello_and_as_chat_events() {
    let hub = TestHub::start().await;
    hub.operator_with(9, json!({"name": "sup", "watch_departments": [1, 2]}))
        .await;
    let (a, _) = hub.create_chat(json!({"department": 1})).await;
    let (b, _) = hub.create_chat(json!({"department": 2})).await;
    let (bot, _) = hub.create_chat(json!({"department": 1, "bot": true})).await;
    let (other, _) = hub.create_chat(json!({"department": 3})).await;
    let (mut sup, hello) = hub.connect(9).await;
    let mut ids: Vec<u64> = hello["chats"]
        .as_array()
        .expect("chats")
        .iter()
        .map(id_of)
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![id_of(&a), id_of(&b)],
        "pending and active chats of watched departments only: {hello}"
    );
    assert!(!ids.contains(&id_of(&bot)) && !ids.contains(&id_of(&other)));
    // A supervisor is online (connected) but never counts for the department nor gets chats.
    let depts = hello["departments"].as_array().expect("departments");
    assert!(depts.iter().all(|d| d["online"] == false), "{hello}");
    let (c, _) = hub.create_chat(json!({"department": 2})).await;
    let ev = sup
        .next_where("the new chat", |m| m["type"] == "chat")
        .await;
    assert_eq!(ev["chat"]["id"], id_of(&c), "{ev}");
    assert_eq!(hub.chat_view(id_of(&c)).await["owner"], Value::Null);
    hub.create_chat(json!({"department": 3})).await;
    sup.silent_for(SHORT, "a chat of an unwatched department", |m| {
        m["type"] == "chat"
    })
    .await;
}

#[tokio::test]
async fn invisible_watcher_is_never_shown_to_the_visitor() {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"assignment": "off"})).await;
    hub.operator_with(
        1,
        json!({"name": "sup", "watch_departments": [1], "invisible": true}),
    )
    .await;
    operator_in_mode(&hub, 2, &[1], true, true).await;
    hub.operator(3, &[1]).await;
    let (chat, token) = hub.create_chat(json!({"department": 1})).await;
    let id = id_of(&chat);
    let (mut visitor, first) = hub.visitor(id, &token).await;
    assert_eq!(
        first,
        json!({"type": "chat", "chat": {"id": id, "status": "pending", "owner_name": null}})
    );
    let (mut sup, _) = hub.connect(1).await;
    let (mut inv, _) = hub.connect(2).await;
    let (mut owner, _) = hub.connect(3).await;
    assert_ack(&sup.request(json!({"type": "open_chat", "chat": id})).await);
    assert_ack(&inv.request(json!({"type": "open_chat", "chat": id})).await);
    visitor
        .silent_for(SHORT, "anything about invisible watchers", |_| true)
        .await;
    assert_ack(
        &owner
            .request(json!({"type": "open_chat", "chat": id}))
            .await,
    );
    let v = visitor.next().await;
    assert_eq!(
        v,
        json!({"type": "chat", "chat": {"id": id, "status": "active", "owner_name": "op3"}})
    );
}

// ----- visitors -----

#[tokio::test]
async fn visitor_without_token_is_refused_401() {
    let hub = TestHub::start().await;
    let (chat, _) = hub.create_chat(json!({"department": 1})).await;
    let url = hub.ws_url(&format!("/ws/visitor?chat={}", id_of(&chat)));
    assert_eq!(Client::refused(&url).await, 401);
}

#[tokio::test]
async fn visitor_with_wrong_token_is_refused_403() {
    let hub = TestHub::start().await;
    let (a, token_a) = hub.create_chat(json!({"department": 1})).await;
    let (b, _) = hub.create_chat(json!({"department": 1})).await;
    assert_eq!(
        Client::refused(&hub.visitor_url(id_of(&a), "not-the-token")).await,
        403
    );
    assert_eq!(
        Client::refused(&hub.visitor_url(id_of(&b), &token_a)).await,
        403,
        "another chat's token"
    );
    let (_ok, first) = hub.visitor(id_of(&a), &token_a).await;
    assert_eq!(first["chat"]["id"], id_of(&a));
}

#[tokio::test]
async fn visitor_sends_messages_to_the_owner_and_watchers() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    let (chat, token) = hub
        .create_chat(json!({"department": 1, "visitor": {"name": "Ann"}}))
        .await;
    let id = id_of(&chat);
    assert_eq!(chat["owner"], 1, "auto-assigned: {chat}");
    let (mut visitor, _) = hub.visitor(id, &token).await;
    let ack = visitor
        .request(json!({"type": "send_message", "text": "my order is late"}))
        .await;
    assert_ack(&ack);
    assert_eq!(
        ack["message"]["from"],
        json!({"kind": "visitor", "name": "Ann"}),
        "{ack}"
    );
    assert_eq!(ack["message"]["whisper"], false, "{ack}");
    let m = op
        .next_where("the visitor's message", |m| is_message(m, id))
        .await;
    assert_eq!(
        m["message"], ack["message"],
        "the owner gets the message as acknowledged"
    );
    let bad = visitor
        .request(json!({"type": "send_message", "text": "   "}))
        .await;
    assert_error(&bad, "bad_request");
    let ack = op.request(json!({"type": "open_chat", "chat": id})).await;
    assert_eq!(ack["messages"].as_array().map(Vec::len), Some(1), "{ack}");
}

#[tokio::test]
async fn visitor_receives_chat_updates_and_non_whisper_messages() {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"assignment": "off"})).await;
    hub.operator_with(1, json!({"name": "Bob", "departments": [1]}))
        .await;
    let (mut op, _) = hub.connect(1).await;
    let (chat, token) = hub.create_chat(json!({"department": 1})).await;
    let id = id_of(&chat);
    let (mut visitor, first) = hub.visitor(id, &token).await;
    assert_eq!(
        first,
        json!({"type": "chat", "chat": {"id": id, "status": "pending", "owner_name": null}})
    );
    assert_ack(&op.request(json!({"type": "open_chat", "chat": id})).await);
    assert_eq!(
        visitor.next().await,
        json!({"type": "chat", "chat": {"id": id, "status": "active", "owner_name": "Bob"}})
    );
    send(&mut op, id, "hello Ann", false).await;
    send(&mut op, id, "she looks angry", true).await;
    send(&mut op, id, "how can I help?", false).await;
    let m = visitor.next().await;
    assert_eq!(m["type"], "message", "{m}");
    assert_eq!(m["chat"], id);
    assert_eq!(m["message"]["text"], "hello Ann");
    assert_eq!(
        m["message"]["from"],
        json!({"kind": "operator", "id": 1, "name": "Bob"})
    );
    assert_eq!(
        visitor.next().await["message"]["text"],
        "how can I help?",
        "the whisper was skipped"
    );
    let (status, _) = hub
        .post(&format!("/api/v1/chats/{id}/close"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        visitor.next().await,
        json!({"type": "chat", "chat": {"id": id, "status": "closed", "owner_name": "Bob"}})
    );
    assert_error(
        &visitor
            .request(json!({"type": "send_message", "text": "hello?"}))
            .await,
        "conflict",
    );
}

// ----- chats over HTTP -----

#[tokio::test]
async fn create_chat_answers_201_and_409_on_a_used_id() {
    let hub = TestHub::start().await;
    let (chat, token) = hub
        .create_chat(json!({"id": 42, "department": 7, "priority": 3, "visitor": {"name": "Ann"}}))
        .await;
    assert_eq!(chat["id"], 42);
    assert_eq!(chat["status"], "pending");
    assert_eq!(chat["owner"], Value::Null);
    assert!(chat["created_at"].is_string());
    assert!(!token.is_empty());
    let (status, v) = hub
        .post("/api/v1/chats", json!({"id": 42, "department": 1}))
        .await;
    assert_eq!(status, 409, "{v}");
    let (next, _) = hub.create_chat(json!({"department": 7})).await;
    assert!(
        next["id"].as_u64() > Some(42),
        "allocated ids never collide: {next}"
    );
    let (_, list) = hub.get("/api/v1/chats?department=7&status=pending").await;
    assert_eq!(list["chats"].as_array().map(Vec::len), Some(2), "{list}");
}

#[tokio::test]
async fn hand_over_patch_pending_only_for_bot_chats() {
    let hub = TestHub::start().await;
    let (bot, _) = hub.create_chat(json!({"department": 1, "bot": true})).await;
    let id = id_of(&bot);
    assert_eq!(bot["status"], "bot");
    let (status, v) = hub
        .patch(&format!("/api/v1/chats/{id}"), json!({"status": "pending"}))
        .await;
    assert_eq!(
        (status, v["status"].clone()),
        (200, json!("pending")),
        "{v}"
    );
    let (status, v) = hub
        .patch(&format!("/api/v1/chats/{id}"), json!({"status": "pending"}))
        .await;
    assert_eq!(status, 409, "not a bot chat any more: {v}");
}

// ----- the widget's fallbacks (section 3) -----

#[tokio::test]
async fn widget_offline_queue_full_when_pending_max_reached() {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"pending_max": 2})).await;
    hub.operator_with(
        1,
        json!({"name": "op1", "departments": [1], "max_chats": 1}),
    )
    .await;
    let (mut op, _) = hub.connect(1).await;
    let mut w = hub.widget(&[1]).await;
    assert_eq!(w.next().await["reason"], "operators");
    let (a, _) = hub.create_chat(json!({"department": 1})).await;
    assert_eq!(a["owner"], 1, "assigned, still pending: {a}");
    w.silent_for(SHORT, "a change at one pending chat", |m| {
        m["type"] == "widget_status"
    })
    .await;
    let (b, _) = hub.create_chat(json!({"department": 1})).await;
    assert_eq!(b["owner"], Value::Null, "queued: {b}");
    assert_eq!(
        w.next().await,
        json!({"type": "widget_status", "department": 1, "online": false, "reason": "queue_full"})
    );
    let (status, v) = hub.get("/api/v1/widget/status?department=1").await;
    assert_eq!(
        (status, v["online"].clone(), v["reason"].clone()),
        (200, json!(false), json!("queue_full")),
        "{v}"
    );
    // Accepting one chat leaves one pending: room again.
    assert_ack(
        &op.request(json!({"type": "open_chat", "chat": id_of(&a)}))
            .await,
    );
    assert_eq!(
        w.next().await,
        json!({"type": "widget_status", "department": 1, "online": true, "reason": "operators"})
    );
}

#[tokio::test]
async fn widget_online_reason_bot_when_no_operator_online() {
    let hub = TestHub::start().await;
    hub.put_department(1, json!({"bot": true})).await;
    hub.operator(1, &[1]).await;
    let mut w = hub.widget(&[1, 2]).await;
    let first = [w.next().await, w.next().await];
    assert!(
        first.contains(
            &json!({"type": "widget_status", "department": 1, "online": true, "reason": "bot"})
        ),
        "{first:?}"
    );
    assert!(
        first.contains(
            &json!({"type": "widget_status", "department": 2, "online": false, "reason": "none"})
        ),
        "{first:?}"
    );
    let (mut op, _) = hub.connect(1).await;
    assert_eq!(
        w.next().await,
        json!({"type": "widget_status", "department": 1, "online": true, "reason": "operators"})
    );
    assert_ack(
        &op.request(json!({"type": "set_status", "online": false}))
            .await,
    );
    assert_eq!(
        w.next().await,
        json!({"type": "widget_status", "department": 1, "online": true, "reason": "bot"})
    );
}

// ----- persistence -----

#[tokio::test]
async fn chats_owners_and_history_survive_a_restart() {
    let hub = TestHub::start().await;
    hub.put_department(2, json!({"assignment": "off"})).await;
    hub.operator(1, &[1, 2]).await;
    let (mut op, _) = hub.connect(1).await;
    let (a, token_a) = hub
        .create_chat(json!({"department": 1, "priority": 4, "visitor": {"name": "Ann"}}))
        .await;
    let a = id_of(&a);
    let (b, _) = hub.create_chat(json!({"department": 2})).await;
    let b = id_of(&b);
    let (c, _) = hub.create_chat(json!({"department": 2, "bot": true})).await;
    let c = id_of(&c);
    assert_ack(&op.request(json!({"type": "open_chat", "chat": a})).await);
    let (mut visitor, _) = hub.visitor(a, &token_a).await;
    assert_ack(
        &visitor
            .request(json!({"type": "send_message", "text": "hi"}))
            .await,
    );
    send(&mut op, a, "hello Ann", false).await;
    send(&mut op, a, "note to self", true).await;
    let before: Vec<Value> = hub.get("/api/v1/chats").await.1["chats"]
        .as_array()
        .unwrap()
        .clone();
    let history = op.request(json!({"type": "open_chat", "chat": a})).await["messages"].clone();
    assert_eq!(history.as_array().map(Vec::len), Some(3));
    op.close().await;
    visitor.close().await;
    let dir = hub.dir.clone();
    let _tmp = hub.stop_keep_dir().await;

    let hub = TestHub::start_in(&dir, |_| {}).await;
    let after: Vec<Value> = hub.get("/api/v1/chats").await.1["chats"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(
        after, before,
        "chats, statuses and owners as before the restart"
    );
    let statuses: Vec<(u64, Value, Value)> = after
        .iter()
        .map(|x| (id_of(x), x["status"].clone(), x["owner"].clone()))
        .collect();
    assert!(
        statuses.contains(&(a, json!("active"), json!(1))),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&(b, json!("pending"), Value::Null)),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&(c, json!("bot"), Value::Null)),
        "{statuses:?}"
    );
    assert_eq!(hub.view(1).await["active_chats"], 1);
    let (mut op, hello) = hub.connect(1).await;
    let mut in_hello: Vec<u64> = hello["chats"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect();
    in_hello.sort();
    assert_eq!(in_hello, vec![a, b]);
    let ack = op.request(json!({"type": "open_chat", "chat": a})).await;
    assert_eq!(ack["messages"], history, "history as before the restart");
    let (mut visitor, first, kept) = hub.visitor_with_history(a, &token_a).await;
    assert_eq!(first["chat"]["owner_name"], "op1");
    let texts: Vec<&Value> = kept["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["text"])
        .collect();
    assert_eq!(
        texts,
        ["hi", "hello Ann"],
        "the visitor's history, whisper left out"
    );
    let ack = visitor
        .request(json!({"type": "send_message", "text": "still there?"}))
        .await;
    assert_eq!(
        ack["message"]["id"].as_u64(),
        history[2]["id"].as_u64().map(|i| i + 1),
        "ids continue: {ack}"
    );
}

#[tokio::test]
async fn history_keeps_only_the_last_chats_history_messages() {
    let three = |cfg: &mut presence_hub::config::Config| cfg.chats.history = 3;
    let hub = TestHub::start_with(three).await;
    hub.put_department(1, json!({"assignment": "off"})).await;
    hub.operator(1, &[1]).await;
    let (mut op, _) = hub.connect(1).await;
    let (chat, _) = hub.create_chat(json!({"department": 1})).await;
    let id = id_of(&chat);
    for i in 1..=5 {
        send(&mut op, id, &format!("m{i}"), false).await;
    }
    let texts = |ack: &Value| -> Vec<String> {
        ack["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["text"].as_str().unwrap().to_string())
            .collect()
    };
    let ack = op.request(json!({"type": "open_chat", "chat": id})).await;
    assert_eq!(texts(&ack), ["m3", "m4", "m5"]);
    op.close().await;
    let dir = hub.dir.clone();
    let _tmp = hub.stop_keep_dir().await;

    let hub = TestHub::start_in(&dir, three).await;
    let (mut op, _) = hub.connect(1).await;
    let ack = op.request(json!({"type": "open_chat", "chat": id})).await;
    assert_eq!(texts(&ack), ["m3", "m4", "m5"], "trimmed in the store too");
    send(&mut op, id, "m6", false).await;
    let ack = op.request(json!({"type": "open_chat", "chat": id})).await;
    assert_eq!(texts(&ack), ["m4", "m5", "m6"]);
}

/// A chat that waited while nobody could take it is assigned at start to an always-online
/// operator; that decision is written like any other: the next start finds it (and the feed
/// has it), even when capacity would not allow it again.
#[tokio::test]
async fn boot_time_assignment_is_persisted() {
    let tmp = tempfile::tempdir().unwrap();
    let no_capacity = |cfg: &mut presence_hub::config::Config| cfg.assignment.default_max_chats = 0;
    let mut first = TestHub::start_in(tmp.path(), no_capacity).await;
    first
        .operator_with(
            1,
            json!({"name": "Ann", "departments": [1], "permissions": ["change_always_online"]}),
        )
        .await;
    let (s, v) = first
        .patch("/api/v1/operators/1/status", json!({"always_online": true}))
        .await;
    assert_eq!(s, 200, "{v}");
    let (chat, _) = first.create_chat(json!({"department": 1})).await;
    let id = chat["id"].as_u64().unwrap();
    assert_eq!(
        first.chat_view(id).await["owner"],
        Value::Null,
        "no capacity yet"
    );
    first.stop().await;
    // Capacity now: the start assigns the waiting chat to the always-online operator.
    let mut second = TestHub::start_in(tmp.path(), |_| {}).await;
    assert_eq!(second.chat_view(id).await["owner"], 1);
    second.stop().await;
    // No capacity again: only a persisted decision shows an owner.
    let third = TestHub::start_in(tmp.path(), no_capacity).await;
    assert_eq!(
        third.chat_view(id).await["owner"],
        1,
        "the boot-time assignment was written"
    );
    let (_, feed) = third.get("/api/v1/events?types=chat_assigned").await;
    let assigned: Vec<&Value> = feed["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["chat"]["id"] == id)
        .collect();
    assert_eq!(assigned.len(), 1, "{feed}");
    assert_eq!(assigned[0]["chat"]["owner"], 1);
}
