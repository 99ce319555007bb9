//! Department online hours (SPEC.md section 3) through real sockets: the widget flips at the
//! boundary by the hub's timer, `opens_at`, the order of reasons, validation and restarts.
//! The rules themselves (zones, DST, closed dates) are unit-tested in `src/hours.rs`.

mod common;

use std::time::{Duration, SystemTime};

use common::{Client, TestHub};
use futures::StreamExt;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// The next whole UTC minute at least `margin` ahead, and a one-minute weekly range starting
/// then: (weekday key, "HH:MM-HH:MM"). Ranges are whole minutes, and every zone's offset is
/// whole minutes, so UTC is as good as any; a range starting at 23:59 ends at `24:00`, so it
/// never crosses midnight whatever the time of day the test runs.
fn range_starting_soon(margin: Duration) -> (Timestamp, &'static str, String) {
    let now = Timestamp::now().as_second();
    let mut start = (now / 60 + 1) * 60;
    if start - now < margin.as_secs() as i64 {
        start += 60;
    }
    let start = Timestamp::from_second(start).unwrap();
    let local = TimeZone::UTC.to_datetime(start);
    let day = DAYS[local.weekday().to_monday_zero_offset() as usize];
    let (h, m) = (local.hour(), local.minute());
    let end = h as i32 * 60 + m as i32 + 1;
    let range = format!("{h:02}:{m:02}-{:02}:{:02}", end / 60, end % 60);
    (start, day, range)
}

fn stamp(v: &Value) -> Timestamp {
    v.as_str()
        .unwrap_or_else(|| panic!("an RFC 3339 string, got {v}"))
        .parse()
        .expect("RFC 3339")
}

async fn widget_http(hub: &TestHub, dept: u64) -> Value {
    hub.public(
        Method::GET,
        &format!("/api/v1/widget/status?department={dept}"),
        &[],
    )
    .await
    .json()
    .await
    .unwrap()
}

/// Reads a socket until `pred`, for at most `limit` (answering the hub's pings meanwhile);
/// returns the message and when it came.
async fn read_until(
    w: &mut Client,
    limit: Duration,
    pred: impl Fn(&Value) -> bool,
) -> (Value, SystemTime) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let msg = tokio::time::timeout_at(deadline, w.ws.next())
            .await
            .expect("the flip in time")
            .expect("socket open")
            .expect("no socket error");
        if let Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            if pred(&v) {
                return (v, SystemTime::now());
            }
        }
    }
}

#[tokio::test]
async fn hours_widget_flips_at_the_boundary() {
    let hub = TestHub::start().await;
    let (start, day, range) = range_starting_soon(Duration::from_secs(3));
    let (s, v) = hub
        .put(
            "/api/v1/departments/1",
            json!({"bot": true, "hours": {"timezone": "UTC", "weekly": {day: [range]}}}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["reason"], "closed", "{v}");
    hub.operator_with(
        9,
        json!({"name":"sup","watch_departments":[1],"permissions":[]}),
    )
    .await;
    let (mut sup, hello) = hub.connect(9).await;
    assert_eq!(hello["departments"][0]["reason"], "closed", "{hello}");
    let mut widget = hub.widget(&[1]).await;
    let first = widget.next_of("widget_status").await;
    assert_eq!(
        (first["online"].clone(), first["reason"].clone()),
        (json!(false), json!("closed"))
    );
    assert_eq!(stamp(&first["opens_at"]), start, "{first}");
    let http = widget_http(&hub, 1).await;
    assert_eq!(http["reason"], "closed");
    assert_eq!(stamp(&http["opens_at"]), start);

    let wait = Duration::from_millis(start.duration_since(Timestamp::now()).as_millis() as u64)
        + Duration::from_secs(3);
    // Both sockets are read while waiting: a socket left unread would miss the hub's pings.
    let (widget_flip, operator_flip) = tokio::join!(
        read_until(&mut widget, wait, |v| v["type"] == "widget_status"),
        read_until(&mut sup, wait, |m| {
            m["type"] == "department_status" && m["department"] == 1
        }),
    );
    let (v, at) = widget_flip;
    assert_eq!(
        v,
        json!({"type":"widget_status","department":1,"online":true,"reason":"bot"})
    );
    let at = Timestamp::try_from(at).unwrap();
    let late = at.duration_since(start);
    assert!(
        late >= jiff::SignedDuration::ZERO && late < jiff::SignedDuration::from_secs(1),
        "flipped {late:?} after the boundary"
    );
    eprintln!("hours: the widget flipped {late:?} after the boundary");
    let (d, at) = operator_flip;
    assert_eq!(d["online"], true, "{d}");
    assert!(
        Timestamp::try_from(at).unwrap().duration_since(start) < jiff::SignedDuration::from_secs(1)
    );
    let http = widget_http(&hub, 1).await;
    assert_eq!(http, json!({"department":1,"online":true,"reason":"bot"}));
}

#[tokio::test]
async fn hours_closed_is_checked_after_disabled_and_before_queue_full() {
    let hub = TestHub::start().await;
    // No range at all: closed for good, opens_at null.
    let never = json!({"timezone": "Europe/Vilnius", "weekly": {}});
    let (s, v) = hub
        .put(
            "/api/v1/departments/1",
            json!({"disabled": true, "hours": never}),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(widget_http(&hub, 1).await["reason"], "disabled");
    hub.put(
        "/api/v1/departments/1",
        json!({"pending_max": 1, "hours": never}),
    )
    .await;
    hub.post("/api/v1/chats", json!({"department": 1})).await;
    let v = widget_http(&hub, 1).await;
    assert_eq!(
        v,
        json!({"department":1,"online":false,"reason":"closed","opens_at":null}),
        "closed wins over queue_full"
    );
    hub.put("/api/v1/departments/1", json!({"pending_max": 1}))
        .await;
    assert_eq!(widget_http(&hub, 1).await["reason"], "queue_full");
}

#[tokio::test]
async fn hours_bad_zone_or_range_is_a_400_naming_it() {
    let hub = TestHub::start().await;
    for (hours, names) in [
        (json!({"timezone": "Mars/Olympus"}), "Mars/Olympus"),
        (
            json!({"timezone": "UTC", "weekly": {"mon": ["18:00-09:00"]}}),
            "hours.weekly.mon[0]",
        ),
        (
            json!({"timezone": "UTC", "weekly": {"someday": []}}),
            "someday",
        ),
        (
            json!({"timezone": "UTC", "closed_dates": ["2026-13-01"]}),
            "2026-13-01",
        ),
    ] {
        let (s, v) = hub
            .put("/api/v1/departments/1", json!({ "hours": hours }))
            .await;
        assert_eq!(s, 400, "{hours}: {v}");
        assert_eq!(v["error"]["code"], "bad_request");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(names), "{msg}");
    }
    let (_, v) = hub.get("/api/v1/departments/1").await;
    assert_eq!(v["hours"], Value::Null, "nothing was set");
}

#[tokio::test]
async fn hours_survive_a_restart() {
    let hub = TestHub::start().await;
    let hours =
        json!({"timezone": "Pacific/Kiritimati", "weekly": {}, "closed_dates": ["2026-12-25"]});
    let (s, _) = hub
        .put(
            "/api/v1/departments/3",
            json!({"bot": true, "hours": hours}),
        )
        .await;
    assert_eq!(s, 200);
    let dir = hub.dir.clone();
    let _tmp = hub.stop_keep_dir().await;
    let hub = TestHub::start_in(&dir, |_| {}).await;
    let (_, v) = hub.get("/api/v1/departments/3").await;
    assert_eq!(v["hours"], hours);
    assert_eq!(v["reason"], "closed");
    assert_eq!(
        widget_http(&hub, 3).await,
        json!({"department":3,"online":false,"reason":"closed","opens_at":null})
    );
}
