//! Health shared by the tasks that report it and the endpoints that answer for it (`/readyz`,
//! `/healthz`): which watches have synced, whether this replica's view of the Webhooks can be
//! trusted, and whether an essential task has ended. Plain state, below routing, controllers
//! and the HTTP server, so that each reports or reads it without importing the others.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use tokio::sync::watch;

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

    /// The routing view whose staleness `/readyz` reports.
    pub fn view(&self) -> &ViewHealth {
        &self.view
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

/// Whether this replica's view of the Webhooks can be trusted now. It goes stale when the API
/// server has not answered for a while (a partition, an outage): the watches may be missing
/// changes, so the replica says so in `/readyz` and takes no shared work until it answers again.
#[derive(Clone, Debug, Default)]
pub struct ViewHealth {
    inner: Arc<ViewState>,
}

#[derive(Debug, Default)]
struct ViewState {
    /// Read for every work item: a load, no lock.
    stale: AtomicBool,
    /// Why, for `/readyz` and the log; written only when it changes.
    why: std::sync::Mutex<Option<String>>,
}

impl ViewHealth {
    /// Why the view is stale (None: it is fresh again).
    pub fn set_stale(&self, why: Option<String>) {
        let mut current = self.inner.why.lock().unwrap_or_else(|e| e.into_inner());
        self.inner.stale.store(why.is_some(), Ordering::Release);
        *current = why;
    }

    /// Why the view may be stale; None while it is fresh.
    pub fn stale(&self) -> Option<String> {
        self.inner
            .why
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_fresh(&self) -> bool {
        !self.inner.stale.load(Ordering::Acquire)
    }
}
