//! The operator process itself against the real API server.

use crate::support::{Operator, control_plane, http_get};

#[tokio::test]
async fn the_operator_starts_and_reports_healthy_and_ready() {
    let cp = control_plane();
    let mut op = Operator::start(cp, &[]);
    op.wait_ready().await;
    let (status, body) = http_get(op.metrics_addr, "/healthz")
        .await
        .expect("healthz reachable");
    assert_eq!((status, body.trim()), (200, "ok"));
    assert!(op.child.try_wait().unwrap().is_none(), "operator exited");
}
