use std::collections::BTreeSet;

use tokio::sync::watch;

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    routing::get,
};

use crate::{metrics::Metrics, routing::ViewHealth};

/// Readiness as a set of components still pending. `/readyz` answers 200 only once every
/// component registered at start (one per watch) has reported its initial sync.
/// After that, `/readyz` also fails while the routing view is stale ([`ViewHealth`]).
#[derive(Clone, Debug)]
pub struct Readiness {
    pending: watch::Sender<BTreeSet<&'static str>>,
    view: ViewHealth,
}

impl Readiness {
    pub fn new(components: &[&'static str]) -> Self {
        Self {
            pending: watch::Sender::new(components.iter().copied().collect()),
            view: ViewHealth::default(),
        }
    }

    /// `/readyz` also fails while `view` is stale.
    pub fn with_view(mut self, view: ViewHealth) -> Self {
        self.view = view;
        self
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
    match (readiness.pending(), readiness.view.stale()) {
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
