//! The web console: embedded pages served with a strict Content-Security-Policy, the client
//! module served from `clients/js` itself, and the console's own origin accepted on sockets
//! and CORS when `server.allowed_origins` names only other sites.

mod common;

use common::{Client, TestHub};
use reqwest::Method;
use serde_json::Value;

const SHOP: &str = "https://shop.example";

async fn restricted() -> TestHub {
    TestHub::start_with(|cfg| cfg.server.allowed_origins = vec![SHOP.into()]).await
}

#[tokio::test]
async fn console_pages_are_served_with_a_strict_csp() {
    let hub = TestHub::start().await;
    for page in [
        "/console/",
        "/console/operator.html",
        "/console/supervisor.html",
        "/console/widget.html",
        "/console/admin.html",
    ] {
        let res = hub.public(Method::GET, page, &[]).await;
        assert_eq!(res.status().as_u16(), 200, "{page}");
        let h = res.headers();
        assert!(
            h["content-type"].to_str().unwrap().starts_with("text/html"),
            "{page}"
        );
        let csp = h["content-security-policy"].to_str().unwrap().to_string();
        assert!(csp.contains("default-src 'self'"), "{csp}");
        assert!(csp.contains("script-src 'self';"), "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert!(csp.contains(&format!("ws://{}", hub.addr)), "{csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        let body = res.text().await.unwrap();
        // No inline script or style: everything comes from the embedded files.
        assert!(!body.contains("<script>"), "{page} has an inline script");
        assert!(!body.contains("style="), "{page} has an inline style");
        assert!(!body.contains("<style"), "{page} has an inline style");
    }
    // `/console` leads to the index.
    let res = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .get(hub.url("/console"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 308);
    assert_eq!(res.headers()["location"], "/console/");
}

#[tokio::test]
async fn console_serves_the_js_client_from_clients_js() {
    let hub = TestHub::start().await;
    let res = hub
        .public(Method::GET, "/console/presence-hub.js", &[])
        .await;
    assert_eq!(res.status().as_u16(), 200);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    let served = res.text().await.unwrap();
    let file = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/clients/js/presence-hub.js"
    ))
    .unwrap();
    assert_eq!(served, file);
}

#[tokio::test]
async fn console_unknown_file_is_a_json_404() {
    let hub = TestHub::start().await;
    for path in ["/console/nope.js", "/console/..%2FCargo.toml"] {
        let res = hub.public(Method::GET, path, &[]).await;
        assert_eq!(res.status().as_u16(), 404, "{path}");
        let v: Value = res.json().await.unwrap();
        assert_eq!(v["error"]["code"], "not_found");
    }
}

#[tokio::test]
async fn console_origin_same_as_host_is_accepted_on_sockets_when_allowed_origins_is_restricted() {
    let hub = restricted().await;
    hub.operator(1, &[1]).await;
    let own = format!("http://{}", hub.addr);
    let token = hub.token(1);
    let url = hub.ws_url(&format!("/ws/operator?token={token}"));
    let mut op = Client::connect_with_headers(&url, &[("origin", &own)]).await;
    assert_eq!(op.next().await["type"], "hello");

    let mut w =
        Client::connect_with_headers(&hub.ws_url("/ws/widget?department=1"), &[("origin", &own)])
            .await;
    assert_eq!(w.next().await["type"], "widget_status");

    // Another origin is still refused (1008), also one on the same host with another port.
    let other = format!(
        "http://127.0.0.1:{}",
        hub.addr.port().wrapping_add(1).max(1)
    );
    for bad in ["https://evil.example", other.as_str()] {
        let mut c = Client::connect_with_headers(&url, &[("origin", bad)]).await;
        assert_eq!(c.close_code().await, Some(1008), "{bad}");
    }
}

#[tokio::test]
async fn console_origin_same_as_host_is_accepted_by_widget_cors() {
    let hub = restricted().await;
    let own = format!("http://{}", hub.addr);
    let res = hub
        .public(
            Method::GET,
            "/api/v1/widget/status?department=1",
            &[("origin", &own)],
        )
        .await;
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(res.headers()["access-control-allow-origin"], own.as_str());
    let res = hub
        .public(
            Method::GET,
            "/api/v1/widget/status?department=1",
            &[("origin", "https://evil.example")],
        )
        .await;
    assert_eq!(res.status().as_u16(), 403);
}
