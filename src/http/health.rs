use std::collections::BTreeSet;

use tokio::sync::watch;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    routing::get,
};

use crate::metrics::Metrics;

/// Readiness as a set of components still pending. `/readyz` answers 200 only once every
/// component registered at start (one per watch) has reported its initial sync.
#[derive(Clone, Debug)]
pub struct Readiness {
    pending: watch::Sender<BTreeSet<&'static str>>,
}

impl Readiness {
    pub fn new(components: &[&'static str]) -> Self {
        Self {
            pending: watch::Sender::new(components.iter().copied().collect()),
        }
    }

    pub fn mark_ready(&self, component: &'static str) {
        if self
            .pending
            .send_if_modified(|pending| pending.remove(component))
        {
            tracing::info!(component, "initial sync done");
        }
    }

    /// Components that have not synced yet; empty when ready.
    pub fn pending(&self) -> Vec<&'static str> {
        self.pending.borrow().iter().copied().collect()
    }

    /// Waits until `component` has synced.
    pub async fn synced(&self, component: &'static str) {
        let mut rx = self.pending.subscribe();
        let _ = rx.wait_for(|pending| !pending.contains(component)).await;
    }

    pub fn is_ready(&self) -> bool {
        self.pending().is_empty()
    }
}

/// Liveness: fails for good once an essential task has ended, so that `/healthz` tells the
/// kubelet to restart a process that would otherwise look healthy while delivering nothing.
#[derive(Clone, Debug, Default)]
pub struct Liveness {
    failure: std::sync::Arc<std::sync::OnceLock<String>>,
}

impl Liveness {
    pub fn fail(&self, why: String) {
        let _ = self.failure.set(why);
    }

    /// Why the operator is not alive; None while it is.
    pub fn failure(&self) -> Option<&str> {
        self.failure.get().map(String::as_str)
    }
}

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
    match readiness.pending() {
        pending if pending.is_empty() => (StatusCode::OK, "ok\n".into()),
        pending => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("waiting for initial sync of: {}\n", pending.join(", ")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_after_every_component() {
        let r = Readiness::new(&["webhooks", "secrets"]);
        assert!(!r.is_ready());
        r.mark_ready("webhooks");
        assert_eq!(r.pending(), ["secrets"]);
        r.mark_ready("secrets");
        assert!(r.is_ready());
    }
}
