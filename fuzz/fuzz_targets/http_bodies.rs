//! HTTP JSON bodies and query strings through the real router (every middleware, the core's
//! rules, the record limits), on the embedded store in a fresh temp dir. The first byte picks the
//! endpoint, the rest is the body (or the query). No answer may be a 500, and every error is
//! the JSON error shape.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Body;
use libfuzzer_sys::fuzz_target;
use presence_hub::auth::Secrets;
use presence_hub::config::Config;
use presence_hub::hub::Hub;
use presence_hub::store::embedded::Embedded;
use tower::ServiceExt;

const KEY: &str = "fuzz-api-key";

/// A data dir for the fuzzing hub's embedded store, removed with the process's temp files.
fn data_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("presence-hub-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// The hub, renewed every few thousand inputs so that what they created stays small.
fn hub() -> Hub {
    static HUB: Mutex<Option<(Hub, u32)>> = Mutex::new(None);
    let mut slot = HUB.lock().unwrap();
    match slot.as_mut() {
        Some((hub, uses)) if *uses < 5000 => {
            *uses += 1;
            hub.clone()
        }
        _ => {
            let mut cfg = Config::default();
            cfg.limits.api_rate = 0;
            let secrets = Secrets {
                jwt_secret: "fuzz-jwt".into(),
                api_key: KEY.into(),
            };
            let _guard = runtime().enter();
            let store = Arc::new(Embedded::open(&data_dir()).unwrap());
            let hub = Hub::open(cfg, secrets, store).unwrap();
            *slot = Some((hub.clone(), 0));
            hub
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (method, path, body) = match pick % 10 {
        0 => ("PUT", "/api/v1/operators/1".to_string(), rest),
        1 => ("PUT", "/api/v1/departments/1".to_string(), rest),
        2 => ("POST", "/api/v1/chats".to_string(), rest),
        3 => ("PATCH", "/api/v1/chats/1".to_string(), rest),
        4 => ("POST", "/api/v1/tokens".to_string(), rest),
        5 => ("PATCH", "/api/v1/operators/1/status".to_string(), rest),
        6 => ("POST", "/api/v1/chats/1/close".to_string(), rest),
        7 | 8 | 9 => {
            let Ok(q) = std::str::from_utf8(rest) else {
                return;
            };
            let base = [
                "/api/v1/operators",
                "/api/v1/chats",
                "/api/v1/widget/status",
            ][pick as usize % 3];
            ("GET", format!("{base}?{q}"), &[][..])
        }
        _ => unreachable!(),
    };
    let Ok(req) = http::Request::builder()
        .method(method)
        .uri(&path)
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-length", body.len())
        .body(Body::from(body.to_vec()))
    else {
        return; // not a valid URI: never reaches the hub
    };
    let hub = hub();
    let app = presence_hub::api::router(hub.clone()).layer(axum::middleware::from_fn_with_state(
        hub,
        presence_hub::api::limits::body_deadline,
    ));
    let res = runtime().block_on(async {
        let res = app.oneshot(req).await.unwrap();
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 16 << 20)
            .await
            .unwrap();
        (status, bytes)
    });
    let (status, bytes) = res;
    assert_ne!(
        status.as_u16(),
        500,
        "{method} {path}: {}",
        String::from_utf8_lossy(&bytes)
    );
    if status.is_client_error() || status.is_server_error() {
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("errors are JSON");
        assert!(v["error"]["code"].is_string(), "{v}");
    }
});
