mod common;

use common::TestHub;
use serde_json::json;

#[tokio::test]
async fn smoke_operator_connects_and_widget_sees_online() {
    let hub = TestHub::start().await;
    hub.operator(1, &[1]).await;
    let mut w = hub.widget(&[1]).await;
    let first = w.next().await;
    assert_eq!(
        first,
        json!({"type":"widget_status","department":1,"online":false,"reason":"none"})
    );
    let (mut op, hello) = hub.connect(1).await;
    assert_eq!(hello["operator"]["status"], "online");
    let flip = w.next().await;
    assert_eq!(flip["online"], true);
    assert_eq!(flip["reason"], "operators");
    let ack = op
        .request(json!({"type":"set_status","online":false}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(w.next().await["online"], false);
}
