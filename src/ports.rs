//! The inboxes through which the HTTP API hands work to the DocumentEvent controller at run
//! time: events durable ingest just created, and recoveries asked for. Runtime plumbing, not
//! part of the resources, so it sits beside them rather than in `crd`.

use std::time::Instant;

use tokio::sync::mpsc;

use crate::crd::DocumentEvent;

/// Events that durable ingest on this replica has just created, handed to the DocumentEvent
/// controller so that it starts delivering at once rather than when the watch brings them (the
/// watch still does, and then changes nothing: same uid). Only a shortcut: when the queue is
/// full, or the controller is not running here (a standby), the watch alone brings them.
#[derive(Clone, Debug)]
pub struct CreatedEvents {
    tx: mpsc::Sender<(Instant, DocumentEvent)>,
}

impl CreatedEvents {
    /// The handle for ingest and the receiver for the DocumentEvent controller.
    pub fn channel() -> (Self, mpsc::Receiver<(Instant, DocumentEvent)>) {
        let (tx, rx) = mpsc::channel(4096);
        (Self { tx }, rx)
    }

    /// `de` as the API server answered its create.
    pub fn created(&self, de: DocumentEvent) {
        let _ = self.tx.try_send((Instant::now(), de));
    }
}

/// Failed deliveries of retained DocumentEvents to send again (`POST .../recover`), handed to
/// the DocumentEvent controller, which owns their status: it resets each target that is still
/// `Failed` to a new attempt sequence and delivers it through the normal path (retries apply).
pub struct Recovery {
    /// The target Webhook's name.
    pub webhook: String,
    /// Each event as listed, and the id of its failed delivery to `webhook`.
    pub deliveries: Vec<(DocumentEvent, String)>,
    /// How many the controller queued (those still failed when it took them).
    pub queued: tokio::sync::oneshot::Sender<usize>,
}

/// The handle for the API and the receiver for the DocumentEvent controller, like
/// [`CreatedEvents`]. Only the leader runs the controller, so only the leader recovers.
#[derive(Clone, Debug)]
pub struct Recoveries {
    tx: mpsc::Sender<Recovery>,
}

impl Recoveries {
    pub fn channel() -> (Self, mpsc::Receiver<Recovery>) {
        let (tx, rx) = mpsc::channel(16);
        (Self { tx }, rx)
    }

    /// Hands `recovery` over; false when the controller is not taking any (not running here).
    pub async fn send(&self, recovery: Recovery) -> bool {
        self.tx.send(recovery).await.is_ok()
    }
}

/// The namespaces that exist, as a watch of them keeps them (in all-namespaces mode), so that
/// the API refuses a namespace that does not exist before any review: a token spraying
/// `?namespace=` with ever-new names costs the API server nothing. Unknown until the first list.
#[derive(Clone, Debug, Default)]
pub struct KnownNamespaces {
    names: std::sync::Arc<std::sync::RwLock<Option<std::collections::HashSet<String>>>>,
}

impl KnownNamespaces {
    /// Whether `namespace` exists; None until the first list is complete.
    pub fn contains(&self, namespace: &str) -> Option<bool> {
        let names = self.names.read().unwrap_or_else(|e| e.into_inner());
        names.as_ref().map(|n| n.contains(namespace))
    }

    /// After a complete list: exactly these exist.
    pub fn replace(&self, names: std::collections::HashSet<String>) {
        *self.names.write().unwrap_or_else(|e| e.into_inner()) = Some(names);
    }

    pub fn insert(&self, name: String) {
        if let Some(names) = self
            .names
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            names.insert(name);
        }
    }

    pub fn remove(&self, name: &str) {
        if let Some(names) = self
            .names
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            names.remove(name);
        }
    }
}
