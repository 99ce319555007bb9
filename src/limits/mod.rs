//! Limits that hold under abuse (the counting part): open connections of every kind against
//! `limits.max_connections`, widget sockets against `limits.max_widget_connections`, the back
//! end's request rate, and the one rule for query parameters. The HTTP middleware using them
//! is in [`http`]; the per-socket rate is a [`Bucket`] in the WebSocket loop.

pub mod bucket;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::Mutex;

pub use bucket::Bucket;

use crate::config::Limits;
use crate::error::{Error, Result};

/// Shared counters and the API key's bucket; one per hub.
pub struct Limiter {
    /// HTTP connections open (an upgrade request counts here until it is a WebSocket).
    http: Arc<AtomicUsize>,
    /// Widget sockets open.
    widgets: AtomicUsize,
    api: Mutex<Bucket>,
}

impl Limiter {
    pub fn new(cfg: &Limits) -> Limiter {
        Limiter {
            http: Arc::new(AtomicUsize::new(0)),
            widgets: AtomicUsize::new(0),
            api: Mutex::new(Bucket::new(cfg.api_rate, cfg.api_burst, Instant::now())),
        }
    }

    /// Admits a new TCP connection while fewer than `max` connections are open (`sockets`
    /// WebSockets plus the HTTP ones); the slot is held until the guard drops.
    pub fn admit_http(&self, sockets: usize, max: usize) -> Option<HttpSlot> {
        self.http
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open + sockets < max).then_some(open + 1)
            })
            .ok()
            .map(|_| HttpSlot(self.http.clone()))
    }

    /// HTTP connections open.
    pub fn http_open(&self) -> usize {
        self.http.load(Ordering::Acquire)
    }

    /// Takes a widget place if one is left under `max`; given back by [`Limiter::widget_closed`].
    pub fn admit_widget(&self, max: usize) -> bool {
        self.widgets
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            })
            .is_ok()
    }

    pub fn widget_closed(&self) {
        let _ = self
            .widgets
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }

    /// Widget sockets open.
    pub fn widgets_open(&self) -> usize {
        self.widgets.load(Ordering::Acquire)
    }

    /// One request of the back end (its API key); false = over `limits.api_rate`.
    pub fn api_request(&self, now: Instant) -> bool {
        self.api.lock().take(now)
    }
}

/// An admitted HTTP connection; dropping it frees the place.
pub struct HttpSlot(Arc<AtomicUsize>);

impl Drop for HttpSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The size of a record, checked where it comes in (the 400 or `error` names the limit).
pub mod record {
    use super::*;

    /// Departments of an operator record: `departments` and `watch_departments` each.
    pub fn departments(cfg: &Limits, field: &str, n: usize) -> Result<()> {
        if n > cfg.max_departments {
            return Err(Error::bad(format!(
                "{field}: {n} departments, at most {} (limits.max_departments)",
                cfg.max_departments
            )));
        }
        Ok(())
    }

    /// A chat's `visitor` object, measured as the JSON it is stored as.
    pub fn visitor(cfg: &Limits, visitor: &serde_json::Value) -> Result<()> {
        let n = serde_json::to_vec(visitor).map_or(usize::MAX, |v| v.len());
        if n > cfg.max_visitor_bytes {
            return Err(Error::bad(format!(
                "visitor: {n} bytes of JSON, at most {} (limits.max_visitor_bytes)",
                cfg.max_visitor_bytes
            )));
        }
        Ok(())
    }

    /// A message's text, in UTF-8 bytes.
    pub fn text(cfg: &Limits, text: &str) -> Result<()> {
        if text.len() > cfg.max_text_bytes {
            return Err(Error::bad(format!(
                "text: {} bytes, at most {} (limits.max_text_bytes)",
                text.len(),
                cfg.max_text_bytes
            )));
        }
        Ok(())
    }
}

/// The one rule for query strings, on every endpoint that reads one: a parameter the
/// endpoint does not know is a 400 that names it (a typo such as `departmnet=1` must not
/// silently widen an answer).
pub fn check_query(query: Option<&str>, known: &[&str]) -> Result<()> {
    for (k, _) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if !known.contains(&k.as_ref()) {
            return Err(Error::bad(if known.is_empty() {
                format!("unknown query parameter `{k}`: this endpoint takes none")
            } else {
                format!(
                    "unknown query parameter `{k}`, expected one of {}",
                    known
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_connections_counts_http_and_sockets() {
        let l = Limiter::new(&Limits::default());
        let a = l.admit_http(1, 3).expect("1 socket + 0 http < 3");
        let _b = l.admit_http(1, 3).expect("1 + 1 < 3");
        assert!(l.admit_http(1, 3).is_none(), "1 + 2 = 3: full");
        drop(a);
        assert_eq!(l.http_open(), 1);
        assert!(l.admit_http(1, 3).is_some(), "a freed place is taken again");
    }

    #[test]
    fn max_widget_connections_counts_widgets() {
        let l = Limiter::new(&Limits::default());
        assert!(l.admit_widget(2));
        assert!(l.admit_widget(2));
        assert!(!l.admit_widget(2));
        l.widget_closed();
        assert!(l.admit_widget(2));
        assert_eq!(l.widgets_open(), 2);
    }

    #[test]
    fn record_size_limits_name_the_limit() {
        let cfg = Limits {
            max_departments: 2,
            max_visitor_bytes: 10,
            max_text_bytes: 3,
            ..Limits::default()
        };
        assert!(record::departments(&cfg, "departments", 2).is_ok());
        let e = record::departments(&cfg, "departments", 3).unwrap_err();
        assert!(e.to_string().contains("limits.max_departments"), "{e}");
        assert!(
            record::visitor(&cfg, &serde_json::json!({"a":"bc"})).is_ok(),
            "10 bytes"
        );
        let e = record::visitor(&cfg, &serde_json::json!({"a":"bcd"})).unwrap_err();
        assert!(e.to_string().contains("limits.max_visitor_bytes"), "{e}");
        assert!(record::text(&cfg, "abc").is_ok());
        let e = record::text(&cfg, "é€").unwrap_err();
        assert!(
            e.to_string().contains("5 bytes"),
            "UTF-8 bytes are counted: {e}"
        );
    }

    #[test]
    fn unknown_query_parameter_is_named() {
        assert!(
            check_query(
                Some("department=1&status=online"),
                &["department", "status"]
            )
            .is_ok()
        );
        assert!(check_query(None, &[]).is_ok());
        assert!(check_query(Some(""), &[]).is_ok());
        let e = check_query(Some("department=1&departmnet=2"), &["department"]).unwrap_err();
        assert!(e.to_string().contains("`departmnet`"), "{e}");
        let e = check_query(Some("x=1"), &[]).unwrap_err();
        assert!(e.to_string().contains("takes none"), "{e}");
    }
}
