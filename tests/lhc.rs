//! Every request of docs/integrations/live-helper-chat.md, run as the guide writes it: the
//! back end syncs operators in bulk, mints a token the way the guide's PHP does, creates a
//! chat, and learns the decision from the event feed.

mod common;

use common::{JWT_SECRET, TestHub};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

/// base64url without padding, as PHP's `rtrim(strtr(base64_encode($s), '+/', '-_'), '=')`.
fn b64url(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// The guide's PHP `presence_hub_token()`, line for line.
fn php_token(secret: &str, operator: u64, exp: u64) -> String {
    let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = b64url(format!(r#"{{"sub":"{operator}","exp":{exp}}}"#).as_bytes());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{header}.{claims}").as_bytes());
    let sig = b64url(&mac.finalize().into_bytes());
    format!("{header}.{claims}.{sig}")
}

#[tokio::test]
async fn lhc_guide_sync_token_chat_and_feed() {
    let hub = TestHub::start().await;
    // 1. Departments (lh_departament).
    let (status, _) = hub
        .put(
            "/api/v1/departments/1",
            json!({"name": "Sales", "max_chats": 3, "accept_timeout": "60s"}),
        )
        .await;
    assert_eq!(status, 200);
    // 2. Operators in bulk (lh_users + lh_userdep), the columns mapped as the guide says.
    let (status, bulk) = hub
        .put(
            "/api/v1/operators",
            json!([
                {"id": 7, "name": "Ann", "departments": [1], "max_chats": 3,
                 "exclude_autoassign": false, "online": true, "invisible": false, "always_online": false,
                 "permissions": ["change_online_status", "change_visibility"]},
                {"id": 9, "name": "Sue (supervisor)", "watch_departments": [1],
                 "permissions": ["set_operator_status", "open_all"]}
            ]),
        )
        .await;
    assert_eq!(status, 200, "{bulk}");
    assert_eq!(
        (bulk["created"].clone(), bulk["updated"].clone()),
        (json!(2), json!(0))
    );
    // A second sync with the same list updates, creates nothing.
    let (_, again) = hub
        .put(
            "/api/v1/operators",
            json!([{"id": 7, "name": "Ann", "departments": [1]}]),
        )
        .await;
    assert_eq!(
        (again["created"].clone(), again["updated"].clone()),
        (json!(0), json!(1))
    );
    // 3. The dashboard's token, minted in PHP.
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = php_token(JWT_SECRET, 7, exp);
    let mut ann =
        common::Client::connect(&hub.ws_url(&format!("/ws/operator?token={token}"))).await;
    let hello = ann.next().await;
    assert_eq!(hello["operator"]["status"], "online", "{hello}");
    // 4. A visitor starts a chat (lh_chat row): the hub assigns it.
    let (status, created) = hub
        .post(
            "/api/v1/chats",
            json!({"id": 1001, "department": 1, "visitor": {"name": "Visitor 1001"}}),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    assert!(created["visitor_token"].is_string());
    // 5. The back end learns the decision from the feed and sets lh_chat.user_id.
    let (status, page) = hub
        .get("/api/v1/events?types=chat_assigned,chat&limit=100")
        .await;
    assert_eq!(status, 200);
    let assigned: Vec<&Value> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "chat_assigned")
        .collect();
    assert_eq!(assigned.len(), 1, "{page}");
    assert_eq!(assigned[0]["chat"]["id"], 1001);
    assert_eq!(assigned[0]["chat"]["owner"], 7);
    let last = page["last_id"].as_str().unwrap();
    // 6. Ann closes her laptop: the feed says offline after the grace, no 300 s timeout.
    //    The back end long-polls in a loop, going on after each answer's last_id.
    ann.close().await;
    let mut after = last.to_string();
    let off = loop {
        let (status, next) = hub
            .get(&format!(
                "/api/v1/events?after={after}&types=operator_status&wait=5s"
            ))
            .await;
        assert_eq!(status, 200);
        let events = next["events"].as_array().unwrap();
        assert!(!events.is_empty(), "no offline event within the wait");
        if let Some(e) = events.iter().find(|e| e["operator"]["status"] == "offline") {
            break e.clone();
        }
        after = next["last_id"].as_str().unwrap().to_string();
    };
    assert_eq!(off["operator"]["id"], 7);
    assert_eq!(off["operator"]["status_reason"], "disconnected");
    // 7. The supervisor view of who is online.
    let (_, online) = hub
        .get("/api/v1/operators?department=1&status=online")
        .await;
    assert_eq!(online["operators"], json!([]));
    // 8. Close the chat from the back end (lh_chat.status = 2).
    let (status, closed) = hub.post("/api/v1/chats/1001/close", json!({})).await;
    assert_eq!((status, closed["status"].clone()), (200, json!("closed")));
}

#[tokio::test]
async fn bulk_put_operators_is_all_or_nothing() {
    let hub = TestHub::start().await;
    let (status, body) = hub
        .put(
            "/api/v1/operators",
            json!([{"id": 1, "name": "a"}, {"name": "no id"}]),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("index 1")
    );
    let (status, _) = hub.get("/api/v1/operators/1").await;
    assert_eq!(status, 404, "nothing applied");
    let (status, body) = hub
        .put("/api/v1/operators", json!([{"id": 1}, {"id": 1}]))
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = hub.put("/api/v1/operators", json!({"id": 1})).await;
    assert_eq!(status, 400, "an array: {body}");
    let many: Vec<Value> = (1..=1001).map(|i| json!({"id": i})).collect();
    let (status, _) = hub.put("/api/v1/operators", json!(many)).await;
    assert_eq!(status, 400, "bounded");
    let many: Vec<Value> = (1..=1000)
        .map(|i| json!({"id": i, "departments": [1]}))
        .collect();
    let (status, body) = hub.put("/api/v1/operators", json!(many)).await;
    assert_eq!(status, 200);
    assert_eq!(body["created"], 1000);
    let (_, list) = hub.get("/api/v1/operators?department=1").await;
    assert_eq!(list["operators"].as_array().unwrap().len(), 1000);
}
