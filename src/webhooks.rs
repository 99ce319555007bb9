//! Webhook delivery of the event feed: the log POSTed to `webhooks.url` in order, in batches,
//! signed with HMAC-SHA256, retried with exponential backoff until a 2xx, the delivered
//! position persisted so a restart or a failover goes on after the last delivered batch.
//! In a cluster one node delivers at a time: it holds the `webhooks` role in the store.

use std::time::Duration;

use hmac::{Hmac, Mac};
use metrics::{counter, gauge};
use sha2::Sha256;

use crate::config::Webhooks;
use crate::feed::{FeedError, Page, Position, StoredEvent, Types};
use crate::hub::Hub;
use crate::store::{WEBHOOK_POSITION, Write, durable};

/// Header names of a delivery.
pub const SIGNATURE: &str = "x-presence-hub-signature";
pub const DELIVERY: &str = "x-presence-hub-delivery";
/// The role a deliverer holds (for `cluster.node_lease` without renewal: a killed
/// deliverer is replaced as fast as a killed node stops counting).
const ROLE: &str = "webhooks";
/// First wait after a failed attempt; doubled per failure up to `max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Events read ahead to measure the backlog (the gauge is capped there).
const LOOK_AHEAD: usize = 1000;

/// `sha256=<hex>` of `body` keyed with `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(body);
    let bytes = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in bytes {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// `{"events":[…]}` of a batch.
pub fn body(events: &[StoredEvent]) -> String {
    let mut out = String::from("{\"events\":[");
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&e.to_json());
    }
    out.push_str("]}");
    out
}

/// The wait before attempt `failures + 1` of a batch.
pub fn backoff(failures: u32, max: Duration) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(1u32.checked_shl(failures.min(20)).unwrap_or(u32::MAX))
        .min(max)
        .max(Duration::from_millis(1))
}

/// Runs until shutdown: takes the role, delivers, gives the role up when leaving.
pub async fn run(hub: Hub) {
    let cfg = hub.cfg.webhooks.clone();
    let http = match reqwest::Client::builder().timeout(cfg.timeout).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(cause = %e, "webhooks: no HTTP client; not delivering");
            return;
        }
    };
    let token = format!("{}-{:016x}", hub.cfg.server.node_id, rand::random::<u64>());
    let ttl = hub.cfg.cluster.node_lease;
    let mut holding = false;
    loop {
        if hub.shutdown.is_cancelled() {
            break;
        }
        match hub.store().hold_role(ROLE, &token, ttl).await {
            Ok(true) => {
                if !holding {
                    tracing::info!("webhooks: this node delivers");
                }
                holding = true;
                deliver(&hub, &cfg, &http, &token, ttl).await;
            }
            Ok(false) => {
                holding = false;
                pause(&hub, ttl / 4).await;
            }
            Err(e) => {
                holding = false;
                tracing::warn!(cause = %e, "webhooks: store unavailable");
                pause(&hub, Duration::from_secs(1)).await;
            }
        }
    }
    if holding {
        let _ = hub.store().release_role(ROLE, &token).await;
    }
}

async fn pause(hub: &Hub, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = hub.shutdown.cancelled() => {}
    }
}

/// Delivers while this node holds the role; returns to renew it (every third of its ttl).
async fn deliver(hub: &Hub, cfg: &Webhooks, http: &reqwest::Client, token: &str, ttl: Duration) {
    let renew_at = tokio::time::Instant::now() + ttl / 3;
    let types = Types::from_list(&cfg.types);
    let mut signal = hub.store().event_signal();
    let mut from = match hub.store().meta(WEBHOOK_POSITION).await {
        Ok(Some(id)) => Position::After(id),
        Ok(None) => Position::Start,
        Err(e) => {
            tracing::warn!(cause = %e, "webhooks: cannot read the delivered position");
            return pause(hub, Duration::from_secs(1)).await;
        }
    };
    while tokio::time::Instant::now() < renew_at && !hub.shutdown.is_cancelled() {
        signal.borrow_and_update();
        let page = match hub
            .store()
            .read_events(from.clone(), LOOK_AHEAD, types.clone())
            .await
        {
            Ok(p) => p,
            Err(FeedError::Gone(_)) => {
                // Retention dropped events never delivered: say so loudly and go on with
                // what is kept rather than stop for good.
                tracing::error!("webhooks: undelivered events were dropped by retention");
                counter!("presence_hub_webhook_events_lost_total").increment(1);
                from = Position::Start;
                continue;
            }
            Err(e) => {
                tracing::warn!(cause = %e, "webhooks: cannot read the feed");
                return pause(hub, Duration::from_secs(1)).await;
            }
        };
        gauge!("presence_hub_webhook_backlog").set(page.events.len() as f64);
        let Page { events, last_id } = page;
        if events.is_empty() {
            // Only events the filter leaves out: move past them for good.
            if let Some(last) = last_id
                && Some(last.as_str()) != from.id()
            {
                if save(hub, &last).await {
                    from = Position::After(last);
                }
                continue;
            }
            tokio::select! {
                _ = signal.changed() => {}
                _ = tokio::time::sleep_until(renew_at) => {}
                _ = hub.shutdown.cancelled() => {}
            }
            continue;
        }
        let batch = &events[..events.len().min(cfg.batch)];
        let last = batch.last().map(|e| e.id.clone()).expect("non-empty batch");
        // The same batch, byte for byte, until it is answered 2xx.
        let body = body(batch);
        let mut failures = 0u32;
        loop {
            // Renewed before each attempt: a POST never outlives the role (its timeout is
            // below `cluster.node_lease`), so two nodes never deliver at once.
            if !matches!(hub.store().hold_role(ROLE, token, ttl).await, Ok(true)) {
                return;
            }
            if post(http, cfg, &body, &last).await {
                break;
            }
            counter!("presence_hub_webhook_failed_attempts_total").increment(1);
            let wait = backoff(failures, cfg.max_backoff);
            failures = failures.saturating_add(1);
            tracing::warn!(batch = %last, retry_in = ?wait, "webhooks: delivery failed");
            // The role is renewed through the wait (a long backoff outlives its ttl).
            let until = tokio::time::Instant::now() + wait;
            loop {
                let left = until.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                pause(hub, left.min(ttl / 3)).await;
                if hub.shutdown.is_cancelled()
                    || !matches!(hub.store().hold_role(ROLE, token, ttl).await, Ok(true))
                {
                    return;
                }
            }
        }
        counter!("presence_hub_webhook_delivered_total").increment(batch.len() as u64);
        gauge!("presence_hub_webhook_backlog").set((events.len() - batch.len()) as f64);
        if !save(hub, &last).await {
            return;
        }
        from = Position::After(last);
    }
}

/// One attempt: true on a 2xx answer within `webhooks.timeout`.
async fn post(http: &reqwest::Client, cfg: &Webhooks, body: &str, last: &str) -> bool {
    let sig = signature(cfg.secret.as_str().as_bytes(), body.as_bytes());
    let res = http
        .post(&cfg.url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE, sig)
        .header(DELIVERY, last)
        .body(body.to_string())
        .send()
        .await;
    match res {
        Ok(r) if r.status().is_success() => true,
        Ok(r) => {
            tracing::debug!(status = r.status().as_u16(), "webhooks: refused");
            false
        }
        Err(e) => {
            tracing::debug!(cause = %e, "webhooks: no answer");
            false
        }
    }
}

/// Persists the position; false when the store refused (delivery pauses, then retries
/// from the last position saved: a batch may be sent again, never skipped).
async fn save(hub: &Hub, last: &str) -> bool {
    let ticket = hub.store().write(vec![Write::Meta {
        key: WEBHOOK_POSITION,
        value: last.to_string(),
    }]);
    match durable(ticket).await {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(cause = %e, "webhooks: cannot save the delivered position");
            pause(hub, Duration::from_secs(1)).await;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_signature_is_hmac_sha256_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn webhook_backoff_doubles_up_to_the_cap() {
        let max = Duration::from_secs(5);
        assert_eq!(backoff(0, max), Duration::from_millis(500));
        assert_eq!(backoff(1, max), Duration::from_secs(1));
        assert_eq!(backoff(3, max), Duration::from_secs(4));
        assert_eq!(backoff(4, max), max);
        assert_eq!(backoff(u32::MAX, max), max);
    }
}
