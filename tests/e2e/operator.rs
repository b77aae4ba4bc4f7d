//! The operator process itself against the real API server.

use crate::support::{Operator, control_plane, http_get, metric};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_starts_and_reports_healthy_and_ready() {
    let cp = control_plane();
    // Scoped to its own namespace: other tests create Webhooks with public example URLs, and
    // no test may deliver beyond loopback.
    let ns = cp.namespace("process").await;
    let mut op = Operator::start(cp, &["--namespace", &ns]);
    op.wait_ready().await;
    let (status, body) = http_get(op.metrics_addr, "/healthz")
        .await
        .expect("healthz reachable");
    assert_eq!((status, body.trim()), (200, "ok"));
    // Metrics are exported, with the (empty) routing table counted.
    assert_eq!(
        metric(op.metrics_addr, "hookrelay_webhooks{state=\"Active\"}").await,
        Some(0.0)
    );
    // The REST API port serves the OpenAPI document without authentication.
    let (status, body) = http_get(op.listen_addr, "/openapi.json")
        .await
        .expect("API reachable");
    assert_eq!(status, 200);
    assert!(body.contains("\"/api/events\""), "{body}");
    assert!(op.child.try_wait().unwrap().is_none(), "operator exited");
}
