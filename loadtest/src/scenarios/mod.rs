//! The scenarios, one file each, and what they share.

pub mod assign;
pub mod chats;
pub mod churn;
pub mod fanout;
pub mod idle;
pub mod slowread;
pub mod soak;

use std::time::Duration;

use anyhow::{Context, Result};
use futures::{StreamExt, TryStreamExt};

use crate::{
    hub::{Target, TargetArgs, TargetKind},
    report::Run,
};

/// "200ms", "5s", "2m", "1h", "1.5s" or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration {s:?} (e.g. 200ms, 5s, 2m)"))?;
    if !(v >= 0.0 && v.is_finite()) {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(v * mult))
}

/// Start the target, run `body` on it, and always stop it again. A target that died during
/// the run makes the run fail with the end of its log.
pub async fn on_target(
    kind: TargetKind,
    args: &TargetArgs,
    body: impl AsyncFnOnce(&mut Target) -> Result<Run>,
) -> Result<Run> {
    eprintln!("-- starting {} --", kind.name());
    let mut target = Target::start(kind, args).await?;
    let mut result = body(&mut target).await;
    // The hub's own counters at the end of the run.
    if let (Ok(run), Ok(api)) = (&mut result, target.api())
        && let Ok(totals) = api.metric_totals().await
    {
        for (name, value) in totals {
            run.add(&format!("metric:{name}"), value, "");
        }
    }
    let alive = target.check_alive();
    let tail = target.log_tail(20);
    let stopped = target.shutdown().await;
    alive?;
    let run = match result {
        Ok(run) => run,
        Err(e) if tail.is_empty() => return Err(e),
        Err(e) => return Err(e.context(tail)),
    };
    stopped?;
    Ok(run)
}

/// Run `f(i)` for i in 0..n, `concurrency` at a time; the first error stops it.
pub async fn concurrently<T, F, Fut>(n: usize, concurrency: usize, f: F) -> Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    futures::stream::iter(0..n)
        .map(f)
        .buffer_unordered(concurrency.max(1))
        .try_collect()
        .await
}

/// Create operators `ids` (department of operator i: `department(i)`), `concurrency` PUTs in
/// flight. Returns how long it took.
pub async fn put_operators(
    target: &Target,
    ids: &[u64],
    department: impl Fn(usize) -> u64,
    max_chats: u32,
) -> Result<Duration> {
    let api = target.api()?;
    let t0 = std::time::Instant::now();
    let department = &department;
    concurrently(ids.len(), 32, |i| async move {
        api.put_operator(ids[i], &[department(i)], max_chats)
            .await
            .map(|_| ())
    })
    .await
    .context("creating operators")?;
    Ok(t0.elapsed())
}

/// A `{"type":…, "ref":…}` helper: the `type` field of a frame.
pub fn frame_type(v: &serde_json::Value) -> &str {
    v.get("type").and_then(|t| t.as_str()).unwrap_or("")
}

/// The `type` of a frame read from its text without parsing it, when it is the first key
/// (the hub writes it first: its events are internally tagged). A scenario that ignores
/// most frames (every `chat` event of a department) then parses only the ones it uses, so
/// the tool's own CPU does not bound the figure it measures. `None`: parse the frame.
pub fn peek_type(text: &str) -> Option<&str> {
    let rest = text.strip_prefix(r#"{"type":""#)?;
    let end = rest.find('"')?;
    let ty = &rest[..end];
    // An escaped quote or backslash would need the parser.
    (!ty.contains('\\')).then_some(ty)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_type_reads_a_leading_type_key() {
        assert_eq!(peek_type(r#"{"type":"chat","chat":{}}"#), Some("chat"));
        assert_eq!(
            peek_type(r#"{"ref":1,"type":"ack"}"#),
            None,
            "not first: parse"
        );
        assert_eq!(
            peek_type(r#"{"type": "chat"}"#),
            None,
            "other spacing: parse"
        );
        assert_eq!(peek_type(r#"{"type":"a\\"b"}"#), None, "escaped: parse");
        assert_eq!(peek_type("not json"), None);
    }
}
