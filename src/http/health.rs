use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    routing::get,
};

use crate::{
    health::{Liveness, Readiness},
    metrics::Metrics,
};

/// `/metrics`, `/healthz` and `/readyz`.
pub fn metrics_router(readiness: Readiness, liveness: Liveness, metrics: Metrics) -> Router {
    Router::new()
        .route(
            "/healthz",
            get(move || async move {
                match liveness.failure() {
                    None => (StatusCode::OK, "ok\n".to_owned()),
                    Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("failed: {why}\n")),
                }
            }),
        )
        .route("/readyz", get(readyz))
        .with_state(readiness)
        .route(
            "/metrics",
            get(move || async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }),
        )
}

async fn readyz(State(readiness): State<Readiness>) -> (StatusCode, String) {
    match (readiness.pending(), readiness.view().stale()) {
        (pending, _) if !pending.is_empty() => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("waiting for initial sync of: {}\n", pending.join(", ")),
        ),
        (_, Some(why)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
        (_, None) => (StatusCode::OK, "ok\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::ViewHealth;

    #[test]
    fn ready_only_after_every_component() {
        let r = Readiness::new(&["webhooks", "secrets"]);
        assert!(!r.is_ready());
        r.mark_ready("webhooks");
        assert_eq!(r.pending(), ["secrets"]);
        r.mark_ready("secrets");
        assert!(r.is_ready());
    }

    #[tokio::test]
    async fn readyz_fails_while_the_routing_view_is_stale_and_says_why() {
        let view = ViewHealth::default();
        let r = Readiness::new(&[]).with_view(view.clone());
        assert_eq!(readyz(State(r.clone())).await.0, StatusCode::OK);
        view.set_stale(Some("the API server has not answered for 12s".into()));
        let (code, body) = readyz(State(r.clone())).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("has not answered for 12s"), "{body}");
        view.set_stale(None);
        assert_eq!(readyz(State(r)).await.0, StatusCode::OK);
    }
}
