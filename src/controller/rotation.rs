//! The end of a rotation's grace period: `POST /api/webhooks/{id}/rotate-secret` keeps the old
//! secret as `previous` in the generated Secret and records when it expires in an annotation;
//! at that time the leader removes both, and the Webhook controller (on every replica) sees the
//! Secret change and signs with the new secret only.
//!
//! Every replica schedules the removal from the Secrets it watches, so a new leader takes over
//! the ones pending; the removal reads the annotation, and patches with the Secret's
//! resourceVersion as a precondition, so it never removes a newer rotation's `previous`, and
//! doing it twice is harmless.

use std::{collections::HashMap, time::Duration};

use k8s_openapi::{api::core::v1::Secret, jiff::Timestamp};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::task::AbortHandle;

use crate::{
    crd::{PREVIOUS_EXPIRES_ANNOTATION, PREVIOUS_KEY},
    leader::Leadership,
};

/// The pending removals, one per Secret.
pub struct PreviousKeyExpiry {
    client: Option<Client>,
    leadership: Leadership,
    /// (namespace, name) -> (annotation value, the task waiting for it).
    scheduled: HashMap<(String, String), (String, AbortHandle)>,
}

impl Drop for PreviousKeyExpiry {
    fn drop(&mut self) {
        for (_, task) in self.scheduled.values() {
            task.abort();
        }
    }
}

impl PreviousKeyExpiry {
    pub fn new(client: Option<Client>, leadership: Leadership) -> Self {
        Self {
            client,
            leadership,
            scheduled: HashMap::new(),
        }
    }

    /// The Secret `namespace/name` now carries `expires` (None: no rotation pending, or the
    /// Secret was deleted).
    pub fn observe(&mut self, namespace: &str, name: &str, expires: Option<&str>) {
        let key = (namespace.to_owned(), name.to_owned());
        if self.scheduled.get(&key).map(|(at, _)| Some(at.as_str())) == Some(expires) {
            return;
        }
        let pending = self.scheduled.remove(&key);
        let Some(expires) = expires else {
            // Not aborted: the annotation disappears when our own removal lands, while its task
            // is still finishing (and logging); for a deleted Secret the task wakes once at the
            // expiry and finds nothing to do.
            return;
        };
        if let Some((_, task)) = pending {
            task.abort();
        }
        let Some(client) = self.client.clone() else {
            return;
        };
        let Ok(at) = expires.parse::<Timestamp>() else {
            tracing::warn!(secret = %format!("{namespace}/{name}"), expires, "ignoring an unreadable {PREVIOUS_EXPIRES_ANNOTATION} annotation");
            return;
        };
        let task = tokio::spawn(remove_at(
            client,
            self.leadership.clone(),
            key.clone(),
            expires.to_owned(),
            at,
        ));
        self.scheduled
            .insert(key, (expires.to_owned(), task.abort_handle()));
    }
}

async fn remove_at(
    client: Client,
    mut leadership: Leadership,
    (namespace, name): (String, String),
    expires: String,
    at: Timestamp,
) {
    let wait = at.duration_since(Timestamp::now());
    if wait.is_positive() {
        tokio::time::sleep(wait.unsigned_abs()).await;
    }
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    loop {
        while !leadership.is_leader() {
            if !leadership.changed().await {
                return;
            }
        }
        match remove_previous(&api, &name, &expires).await {
            Ok(false) => return,
            Ok(true) => {
                tracing::info!(secret = %format!("{namespace}/{name}"), "rotation grace period over: the previous secret no longer signs");
                return;
            }
            // Gone, or rotated again meanwhile (the precondition fails): nothing left to do.
            Err(kube::Error::Api(e)) if matches!(e.code, 404 | 409) => return,
            Err(error) => {
                tracing::warn!(secret = %format!("{namespace}/{name}"), %error, "removing the previous secret after its grace period failed; retrying");
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }
    }
}

/// Removes `previous` and the annotation if the annotation still says `expires`, with the
/// Secret's resourceVersion as a precondition (409 when it changed since it was read). False:
/// nothing to remove (the Secret is gone, or carries no or another rotation).
async fn remove_previous(
    api: &Api<Secret>,
    name: &str,
    expires: &str,
) -> Result<bool, kube::Error> {
    let Some(secret) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let current = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(PREVIOUS_EXPIRES_ANNOTATION));
    if current.map(String::as_str) != Some(expires) {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "metadata": {
            "resourceVersion": secret.metadata.resource_version,
            "annotations": {PREVIOUS_EXPIRES_ANNOTATION: null},
        },
        "data": {PREVIOUS_KEY: null},
    });
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| true)
}
